//! Why the kernel refuses to let us ptrace a process, and what the user can do about it.
//!
//! The kernel's checks (`kernel/ptrace.c: __ptrace_may_access`, then the LSMs) for attaching:
//! 1. the same user: the caller's uid and gid must equal the target's real, effective and
//!    saved ids — or the caller has `CAP_SYS_PTRACE` (in the target's user namespace);
//! 2. the target must be dumpable (not set-user-ID, no `PR_SET_DUMPABLE` 0) — or
//!    `CAP_SYS_PTRACE`;
//! 3. Yama, when built in (`/proc/sys/kernel/yama/ptrace_scope`): 0 allows the above; 1 only
//!    descendants, or a tracer the target named with `prctl(PR_SET_PTRACER, …)`, or
//!    `CAP_SYS_PTRACE`; 2 only `CAP_SYS_PTRACE`; 3 nobody;
//! 4. other LSMs (AppArmor, SELinux) may refuse on their own.
//!
//! [`diagnose`] reads those settings and says which one applies. It only reads `/proc`
//! and `/sys`: nothing is attached.

use crate::error::Pid;

/// `CAP_SYS_PTRACE`'s bit in `/proc/*/status` capability masks.
const CAP_SYS_PTRACE: u64 = 1 << 19;

/// The Yama setting, if Yama is in this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Yama {
    /// `/proc/sys/kernel/yama` does not exist: the kernel has no Yama.
    Absent,
    /// `ptrace_scope` with this value.
    Scope(u32),
}

impl Yama {
    /// Reads `/proc/sys/kernel/yama/ptrace_scope`.
    pub fn read() -> Yama {
        match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
            Ok(s) => Yama::Scope(s.trim().parse().unwrap_or(1)),
            Err(_) => Yama::Absent,
        }
    }
}

/// Ids and capabilities of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gid: [u32; 4],
    /// The effective capability set.
    pub cap_eff: u64,
    /// The permitted capability set.
    pub cap_prm: u64,
}

impl Creds {
    /// Reads the credentials of `pid` (`None` if its status cannot be read).
    pub fn read(pid: Pid) -> Option<Creds> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mut c = Creds::default();
        for line in s.lines() {
            let (k, v) = line.split_once(':')?;
            let ids = |v: &str| {
                let mut a = [0u32; 4];
                for (i, w) in v.split_whitespace().take(4).enumerate() {
                    a[i] = w.parse().unwrap_or(0);
                }
                a
            };
            match k {
                "Uid" => c.uid = ids(v),
                "Gid" => c.gid = ids(v),
                "CapEff" => c.cap_eff = u64::from_str_radix(v.trim(), 16).unwrap_or(0),
                "CapPrm" => c.cap_prm = u64::from_str_radix(v.trim(), 16).unwrap_or(0),
                _ => {}
            }
        }
        Some(c)
    }

    /// True if `CAP_SYS_PTRACE` is effective.
    pub fn can_ptrace_any(&self) -> bool {
        self.cap_eff & CAP_SYS_PTRACE != 0
    }
}

/// The kernel's same-user rule: our (fs) uid/gid equal all of the target's real, effective
/// and saved ids.
fn same_user(me: &Creds, target: &Creds) -> bool {
    let u = me.uid[3];
    let g = me.gid[3];
    target.uid[..3].iter().all(|&x| x == u) && target.gid[..3].iter().all(|&x| x == g)
}

/// A user name for a uid (from /etc/passwd), or `uid N`.
pub fn user_name(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
    });
    match name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// True if `pid` descends from `ancestor` (walking `PPid` in /proc).
fn descends_from(mut pid: Pid, ancestor: Pid) -> bool {
    for _ in 0..4096 {
        if pid == ancestor {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        pid = match crate::proc::Stat::read(pid) {
            Ok(s) => s.ppid,
            Err(_) => return false,
        };
    }
    false
}

/// Active LSMs besides capability/Yama that can refuse ptrace on their own.
fn other_lsms() -> Vec<String> {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap_or_default()
        .trim()
        .split(',')
        .filter(|s| matches!(*s, "apparmor" | "selinux" | "smack" | "tomoyo" | "landlock"))
        .filter(|s| *s != "landlock")
        .map(String::from)
        .collect()
}

/// `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH` and `CAP_KILL` bits.
const CAP_DAC_OVERRIDE: u64 = 1 << 1;
const CAP_DAC_READ_SEARCH: u64 = 1 << 2;
const CAP_KILL: u64 = 1 << 5;

/// The capabilities needed to dump another user's process: ptrace it, read its /proc files
/// (`mem`, `auxv`, `pagemap` are 0400/0600 and owned by that user) and kill its clone.
pub const OTHER_USER_CAPS: &str = "cap_sys_ptrace,cap_dac_read_search,cap_kill";

/// How to give coreflect's binary `caps`: `sudo setcap CAPS+ep <path>`.
fn setcap_hint(caps: &str) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "$(command -v coreflect)".into());
    format!("give the binary the capabilities once (sudo setcap {caps}+ep {exe})")
}

/// What blocks `ptrace` of `pid` by this process and the options, as one sentence for an
/// error message. Reads the settings at the time of the call.
pub fn diagnose(pid: Pid) -> String {
    let me = Creds::read(std::process::id() as Pid).unwrap_or_default();
    let descendant = descends_from(pid, std::process::id() as Pid);
    explain(
        pid,
        &me,
        Creds::read(pid),
        Yama::read(),
        descendant,
        &other_lsms(),
    )
}

/// [`diagnose`] on given facts: our credentials, the target's (if readable), Yama, whether
/// the target descends from us, and the other active LSMs.
fn explain(
    pid: Pid,
    me: &Creds,
    target: Option<Creds>,
    yama: Yama,
    descendant: bool,
    lsms: &[String],
) -> String {
    let yama_text = match yama {
        Yama::Absent => "this kernel has no Yama (/proc/sys/kernel/yama is absent)".to_string(),
        Yama::Scope(s) => format!("kernel.yama.ptrace_scope is {s}"),
    };
    let Some(target) = target else {
        return format!(
            "its /proc/{pid}/status cannot be read; run as root (sudo), or {}; {yama_text}",
            setcap_hint(OTHER_USER_CAPS)
        );
    };
    let cap = me.can_ptrace_any();
    if !same_user(me, &target) {
        let mut missing = Vec::new();
        if !cap {
            missing.push("CAP_SYS_PTRACE");
        }
        if me.cap_eff & (CAP_DAC_READ_SEARCH | CAP_DAC_OVERRIDE) == 0 {
            missing.push("CAP_DAC_READ_SEARCH");
        }
        if me.cap_eff & CAP_KILL == 0 {
            missing.push("CAP_KILL");
        }
        if !missing.is_empty() {
            let who = if target.uid[..3].iter().all(|&u| u == target.uid[0]) {
                format!("it runs as {}", user_name(target.uid[0]))
            } else {
                format!(
                    "it runs with uids {}/{}/{} (real/effective/saved: it changed user)",
                    target.uid[0], target.uid[1], target.uid[2]
                )
            };
            return format!(
                "{who} and coreflect runs as {} without {} (a user may trace only processes whose real, effective and saved uid and gid are all its own); options: run coreflect as that user, run it as root (sudo coreflect …), or {}",
                user_name(me.uid[1]),
                missing.join(", "),
                setcap_hint(OTHER_USER_CAPS)
            );
        }
    }
    let setcap = setcap_hint("cap_sys_ptrace");
    match yama {
        Yama::Scope(3) => {
            return "kernel.yama.ptrace_scope is 3: ptrace is disabled for everyone, root included, until the next reboot (it cannot be lowered); options: reboot with a lower kernel.yama.ptrace_scope in /etc/sysctl.d".to_string();
        }
        Yama::Scope(2) if !cap => {
            return format!(
                "kernel.yama.ptrace_scope is 2: only processes with CAP_SYS_PTRACE may trace; options: run as root (sudo coreflect …), or {setcap}"
            );
        }
        Yama::Scope(1) if !cap && !descendant => {
            return format!(
                "kernel.yama.ptrace_scope is 1: a user may trace only its own descendants, or a process that named it with prctl(PR_SET_PTRACER, pid or PR_SET_PTRACER_ANY); options: {setcap}, run as root (sudo coreflect …), have the target call prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY), or allow same-user tracing (sudo sysctl kernel.yama.ptrace_scope=0)"
            );
        }
        _ => {}
    }
    let lsm_text = if lsms.is_empty() {
        String::new()
    } else {
        format!(
            "; the security module(s) {} may refuse it: look for a denial in the kernel log (dmesg, journalctl -k, /var/log/audit)",
            lsms.join(", ")
        )
    };
    format!(
        "the user and capability checks pass ({yama_text}{}){lsm_text}; the target may be in another user namespace or a container: run as root on the host",
        if cap { ", coreflect has CAP_SYS_PTRACE" } else { ", same user" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_creds_are_readable() {
        let me = Creds::read(std::process::id() as Pid).unwrap();
        // SAFETY: getuid/getegid have no preconditions and cannot fail.
        let (uid, egid) = unsafe { (libc::getuid(), libc::getegid()) };
        assert_eq!((me.uid[0], me.gid[1]), (uid, egid));
        assert!(same_user(&me, &me));
    }

    #[test]
    fn other_user_is_named() {
        let me = Creds {
            uid: [1000; 4],
            gid: [1000; 4],
            ..Creds::default()
        };
        let root = Creds::default();
        assert!(!same_user(&me, &root));
        let setuid = Creds {
            uid: [1000, 0, 0, 0],
            gid: [1000; 4],
            ..Creds::default()
        };
        assert!(!same_user(&me, &setuid));
    }

    #[test]
    fn each_setting_is_named_with_its_options() {
        let user = Creds {
            uid: [1000; 4],
            gid: [1000; 4],
            ..Creds::default()
        };
        let none: &[String] = &[];
        let root_target = explain(7, &user, Some(Creds::default()), Yama::Absent, false, none);
        assert!(root_target.contains("it runs as") && root_target.contains("uid 0"));
        assert!(root_target.contains("CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_KILL"));
        assert!(root_target.contains("setcap cap_sys_ptrace,cap_dac_read_search,cap_kill+ep"));
        assert!(root_target.contains("sudo"));
        let own = Some(user.clone());
        let s1 = explain(7, &user, own.clone(), Yama::Scope(1), false, none);
        assert!(s1.starts_with("kernel.yama.ptrace_scope is 1"), "{s1}");
        for want in [
            "PR_SET_PTRACER",
            "sysctl kernel.yama.ptrace_scope=0",
            "setcap cap_sys_ptrace+ep",
            "sudo",
        ] {
            assert!(s1.contains(want), "{want} not in {s1}");
        }
        // A descendant is allowed at scope 1: the refusal is then something else.
        let s1d = explain(7, &user, own.clone(), Yama::Scope(1), true, none);
        assert!(s1d.contains("checks pass"), "{s1d}");
        let s2 = explain(7, &user, own.clone(), Yama::Scope(2), false, none);
        assert!(
            s2.starts_with("kernel.yama.ptrace_scope is 2")
                && s2.contains("setcap cap_sys_ptrace+ep")
        );
        let s3 = explain(7, &user, own.clone(), Yama::Scope(3), false, none);
        assert!(s3.contains("is 3") && s3.contains("reboot"), "{s3}");
        let capable = Creds {
            cap_eff: CAP_SYS_PTRACE,
            ..user.clone()
        };
        let s2c = explain(7, &capable, own.clone(), Yama::Scope(2), false, none);
        assert!(
            s2c.contains("checks pass") && s2c.contains("CAP_SYS_PTRACE"),
            "{s2c}"
        );
        let lsm = explain(
            7,
            &user,
            own,
            Yama::Absent,
            false,
            &["apparmor".to_string()],
        );
        assert!(
            lsm.contains("no Yama") && lsm.contains("apparmor") && lsm.contains("dmesg"),
            "{lsm}"
        );
        let gone = explain(7, &user, None, Yama::Scope(0), false, none);
        assert!(gone.contains("/proc/7/status cannot be read"), "{gone}");
    }

    #[test]
    fn descendants() {
        let me = std::process::id() as Pid;
        assert!(descends_from(me, me));
        let parent = crate::proc::Stat::read(me).unwrap().ppid;
        assert!(descends_from(me, parent));
        assert!(!descends_from(parent, me));
    }
}
