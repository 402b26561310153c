//! `/proc/PID/status` and `/proc/PID/stat`.

use super::{path, read_text};
use crate::error::{Error, Pid, Result};

/// The fields of `/proc/PID/status` coreflect uses.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// `Name:` (comm).
    pub name: String,
    /// First letter of `State:`.
    pub state: char,
    /// `Tgid:`.
    pub tgid: Pid,
    /// `PPid:`.
    pub ppid: Pid,
    /// `TracerPid:` (0 when not traced).
    pub tracer_pid: Pid,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// `Seccomp:` mode (0 none, 1 strict, 2 filter).
    pub seccomp: u32,
    /// `VmPTE:` in KiB (page-table size: drives the clone's cost).
    pub vm_pte_kb: u64,
    /// `RssAnon:` in KiB.
    pub rss_anon_kb: u64,
    /// `VmRSS:` in KiB.
    pub vm_rss_kb: u64,
    /// `SigPnd:` | `ShdPnd:` (pending signals).
    pub sig_pending: u64,
    /// `SigPnd:` alone (the thread's own pending signals).
    pub thread_pending: u64,
    /// `SigBlk:` (blocked signals).
    pub sig_blocked: u64,
    /// `CapEff:` (effective capabilities).
    pub cap_eff: u64,
    /// `Threads:`.
    pub threads: u32,
    /// True when the status has no `VmSize:` line (kernel threads, zombies).
    pub no_mm: bool,
    /// The pid in the process's own (innermost) pid namespace: the last `NSpid:` field.
    pub ns_pid: Pid,
}

impl Status {
    /// Reads `/proc/<pid>/status`.
    pub fn read(pid: Pid) -> Result<Status> {
        Ok(Status::parse(&read_text(pid, "status")?))
    }

    /// Reads `/proc/<pid>/task/<tid>/status`.
    pub fn read_thread(pid: Pid, tid: Pid) -> Result<Status> {
        Ok(Status::parse(&read_text(
            pid,
            &format!("task/{tid}/status"),
        )?))
    }

    /// Parses the text of a status file.
    pub fn parse(text: &str) -> Status {
        let mut s = Status {
            no_mm: true,
            ..Default::default()
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            let first = v.split_whitespace().next().unwrap_or("");
            let num = || first.parse::<u64>().unwrap_or(0);
            let hex = || u64::from_str_radix(first, 16).unwrap_or(0);
            match k {
                "Name" => s.name = v.to_string(),
                "State" => s.state = v.chars().next().unwrap_or('?'),
                "Tgid" => s.tgid = num() as Pid,
                "PPid" => s.ppid = num() as Pid,
                "TracerPid" => s.tracer_pid = num() as Pid,
                "Uid" => s.uid = num() as u32,
                "Gid" => s.gid = num() as u32,
                "Seccomp" => s.seccomp = num() as u32,
                "VmPTE" => s.vm_pte_kb = num(),
                "RssAnon" => s.rss_anon_kb = num(),
                "VmRSS" => s.vm_rss_kb = num(),
                "VmSize" => s.no_mm = false,
                "SigPnd" => {
                    s.thread_pending = hex();
                    s.sig_pending |= hex();
                }
                "ShdPnd" => s.sig_pending |= hex(),
                "SigBlk" => s.sig_blocked = hex(),
                "CapEff" => s.cap_eff = hex(),
                "Threads" => s.threads = num() as u32,
                "NSpid" => {
                    s.ns_pid = v
                        .split_whitespace()
                        .last()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0)
                }
                _ => {}
            }
        }
        s
    }
}

/// The fields of `/proc/PID/stat` coreflect uses.
#[derive(Debug, Clone, Default)]
pub struct Stat {
    /// The command name between the parentheses.
    pub comm: String,
    /// State letter.
    pub state: char,
    /// Parent pid.
    pub ppid: Pid,
    /// Process group.
    pub pgrp: Pid,
    /// Session.
    pub session: Pid,
    /// Kernel task flags (`PF_*`).
    pub flags: u64,
    /// User time in clock ticks.
    pub utime: u64,
    /// System time in clock ticks.
    pub stime: u64,
    /// Children's user time in clock ticks.
    pub cutime: u64,
    /// Children's system time in clock ticks.
    pub cstime: u64,
    /// Nice value.
    pub nice: i64,
    /// The signal sent to the parent when this task exits (field 38).
    pub exit_signal: i32,
    /// Start time in clock ticks after boot (field 22): with the pid, it names a process
    /// uniquely.
    pub start_time: u64,
    /// Exit status in `waitpid` form, for a zombie (field 52).
    pub exit_code: i32,
}

/// `PF_KTHREAD`: the task is a kernel thread.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl Stat {
    /// Reads `/proc/<pid>/stat`.
    pub fn read(pid: Pid) -> Result<Stat> {
        Stat::parse(&read_text(pid, "stat")?).ok_or_else(|| Error::Parse {
            path: path(pid, "stat"),
            detail: "unexpected format".into(),
        })
    }

    /// Reads `/proc/<pid>/task/<tid>/stat`.
    pub fn read_thread(pid: Pid, tid: Pid) -> Result<Stat> {
        let what = format!("task/{tid}/stat");
        Stat::parse(&read_text(pid, &what)?).ok_or_else(|| Error::Parse {
            path: path(pid, &what),
            detail: "unexpected format".into(),
        })
    }

    /// Parses the text of a stat file.
    pub fn parse(text: &str) -> Option<Stat> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text[open + 1..close].to_string();
        let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
        // f[0] is field 3 (state).
        let n = |i: usize| {
            f.get(i - 3)
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0)
        };
        Some(Stat {
            comm,
            state: f.first()?.chars().next()?,
            ppid: n(4) as Pid,
            pgrp: n(5) as Pid,
            session: n(6) as Pid,
            flags: n(9) as u64,
            utime: n(14) as u64,
            stime: n(15) as u64,
            cutime: n(16) as u64,
            cstime: n(17) as u64,
            nice: n(19),
            exit_signal: n(38) as i32,
            start_time: n(22) as u64,
            exit_code: n(52) as i32,
        })
    }

    /// True for kernel threads.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_comm_with_spaces_and_parens() {
        // Fields 3..=52; field n is at index n - 3.
        let mut f: Vec<String> = (3..=52).map(|_| "0".to_string()).collect();
        f[0] = "S".into();
        f[4 - 3] = "1".into();
        f[14 - 3] = "7".into();
        f[15 - 3] = "3".into();
        f[38 - 3] = "17".into();
        f[52 - 3] = "52992".into();
        let s = format!("42 (a (b) c) {}", f.join(" "));
        let s = s.as_str();
        let st = Stat::parse(s).unwrap();
        assert_eq!(st.comm, "a (b) c");
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 1);
        assert_eq!(st.utime, 7);
        assert_eq!(st.stime, 3);
        assert_eq!(st.exit_signal, 17);
        assert_eq!(st.exit_code, 0xCF00);
        assert!(!st.is_kernel_thread());
    }

    #[test]
    fn status_parses_fields() {
        let t = "Name:\tx\nState:\tS (sleeping)\nTgid:\t5\nPPid:\t1\nTracerPid:\t9\nUid:\t1000\t1000\t1000\t1000\nVmSize:\t 10 kB\nVmPTE:\t  12 kB\nSigPnd:\t0000000000000100\nShdPnd:\t0000000000000001\nSeccomp:\t2\nNSpid:\t812\t7\n";
        let s = Status::parse(t);
        assert_eq!(s.name, "x");
        assert_eq!(s.tracer_pid, 9);
        assert_eq!(s.uid, 1000);
        assert_eq!(s.vm_pte_kb, 12);
        assert_eq!(s.sig_pending, 0x101);
        assert_eq!(s.seccomp, 2);
        assert_eq!(s.ns_pid, 7);
        assert!(!s.no_mm);
    }
}
