//! Never harm the target (issue 8): targets built to be killed or disturbed by a careless
//! live dumper — a seccomp filter on one worker, private hugetlb memory, threads waiting for
//! any child with `__WALL`, a thread in `vfork`, no usable vDSO, a main thread that exited —
//! are dumped; each must stay alive and undisturbed, keep no child, and the core must be
//! valid.

mod common;

use common::*;
use coreflect::elf::reader::CoreFile;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits (generously) until `pid` has no child; false if one stays.
fn no_children_soon(pid: i32) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if children(pid).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The core is one our reader opens, holding the target's marker, and one gdb reads with
/// `threads` threads and a backtrace.
fn assert_valid_core(t: &Target, core: &Path, threads: usize) {
    let leader_exited = status_field(t.pid, "State").starts_with('Z');
    let cf = CoreFile::open(core).expect("our reader opens the core");
    let b = cf
        .read(t.get("marker_addr"), 8)
        .unwrap()
        .expect("marker in core");
    assert_eq!(u64::from_le_bytes(b.try_into().unwrap()), t.get("marker"));
    let out = gdb(core, &["info threads", "thread apply all bt 3"]);
    let n = out
        .lines()
        .filter(|l| l.contains("(LWP "))
        // gdb's libthread_db lists an exited main thread (no registers) from glibc's own
        // thread list; only the threads in the core count here.
        .filter(|l| !(leader_exited && l.contains(&format!("(LWP {})", t.pid))))
        .filter(|l| {
            l.trim_start()
                .starts_with(|c: char| c == '*' || c.is_ascii_digit())
        })
        .count();
    assert_eq!(n, threads, "gdb's thread list:\n{out}");
    assert!(!out.contains("not in executable format"), "{out}");
}

/// Runs coreflect `dump pid` with `--json` and extra arguments, returning the output.
fn try_dump(pid: i32, core: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(exe())
        .args([
            "dump",
            &pid.to_string(),
            "-o",
            core.to_str().unwrap(),
            "--json",
        ])
        .args(extra)
        .output()
        .expect("run coreflect")
}

fn stats_ok(stats: &HashMap<String, u64>) {
    assert_undisturbed(stats);
    for k in ["wall_children", "wall_poll_children", "vfork_foreign"] {
        assert_eq!(stats.get(k), Some(&0), "target counter {k} in {stats:?}");
    }
}

/// Defect 1: a seccomp filter (KILL_PROCESS on clone, clone3, wait4) on one worker thread.
/// Neither the clone nor the reaping may be injected into that thread.
#[test]
fn seccomp_filter_on_one_worker_never_kills_the_target() {
    let d = tmpdir("harm-seccomp");
    let mut t = Target::spawn(&["--heap-mib", "1", "--seccomp-worker"]);
    let threads = t.threads();
    for i in 0..4 {
        let core = d.join(format!("{i}.core"));
        let json = dump(t.pid, &core, &[]);
        assert_eq!(json.get("mode").as_deref(), Some("reflect"), "{}", json.0);
        assert!(t.ping(), "the target died after dump {i}");
        assert!(no_children_soon(t.pid), "a child is left after dump {i}");
        t.assert_free();
        if i == 0 {
            assert_valid_core(&t, &core, threads);
        }
        std::fs::remove_file(&core).unwrap();
    }
    // Without CAP_SYS_ADMIN (no PTRACE_O_SUSPEND_SECCOMP): the unfiltered threads are used.
    if is_root() {
        let core = d.join("nocap.core");
        let o = Command::new("setpriv")
            .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin"])
            .arg(exe())
            .args(["dump", &t.pid.to_string(), "-o", core.to_str().unwrap()])
            .args(["--json", "--mode", "reflect"])
            .output()
            .expect("setpriv");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(t.ping(), "the target died (no CAP_SYS_ADMIN)");
        assert!(no_children_soon(t.pid));
        assert_valid_core(&t, &core, threads);
    }
    let stats = t.quit();
    stats_ok(&stats);
    assert_eq!(stats.get("seccomp_spins"), Some(&1), "{stats:?}");
}

/// Sets `/proc/sys/vm/nr_hugepages` and puts the old value back when dropped.
struct HugePool(Option<String>);

impl HugePool {
    const PATH: &'static str = "/proc/sys/vm/nr_hugepages";
    fn meminfo(key: &str) -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
    /// Makes exactly `free` more 2 MiB pages free, or None (skipped visibly; a failure in CI).
    fn with_free(free: u64) -> Option<HugePool> {
        let skip = |why: String| {
            assert!(
                std::env::var_os("CI").is_none(),
                "huge pages needed in CI: {why}"
            );
            eprintln!("SKIPPED: {why}");
            None
        };
        if Self::meminfo("Hugepagesize:") != 2048 {
            return skip("the default huge page size is not 2 MiB".into());
        }
        let Ok(old) = std::fs::read_to_string(Self::PATH) else {
            return skip(format!("{} unreadable", Self::PATH));
        };
        let total = Self::meminfo("HugePages_Total:");
        let used = total - Self::meminfo("HugePages_Free:");
        let want = used + free;
        let pool = HugePool(Some(old.trim().to_string()));
        if std::fs::write(Self::PATH, want.to_string()).is_err()
            || Self::meminfo("HugePages_Total:") != want
        {
            return skip(format!("could not get {want} huge pages (as root?)"));
        }
        Some(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(Self::PATH, old);
        }
    }
}

/// Asks the target to write every huge page again and check them.
fn hugewrite(t: &mut Target) -> bool {
    t.command("hugewrite")
        .is_some_and(|l| l.starts_with("HUGE ok=1"))
}

/// Defect 2: private hugetlb memory with an exhausted pool. A clone would make the
/// target's next write a copy-on-write with no huge page to copy into (SIGBUS); it must not
/// be cloned: auto falls back to suspend (and says why), reflect refuses.
#[test]
fn private_hugetlb_is_never_cloned() {
    let Some(_pool) = HugePool::with_free(2) else {
        return;
    };
    let d = tmpdir("harm-hugetlb");
    let mut t = Target::spawn(&["--heap-mib", "1", "--hugetlb-private", "4"]);
    assert_eq!(
        HugePool::meminfo("HugePages_Free:"),
        0,
        "the pool is not exhausted"
    );
    let core = d.join("auto.core");
    let json = dump(t.pid, &core, &[]);
    assert_eq!(json.get("mode").as_deref(), Some("suspend"), "{}", json.0);
    assert!(json.warnings().contains("hugetlb"), "{}", json.0);
    assert!(hugewrite(&mut t), "the target died writing its huge pages");
    // The core holds the huge pages' contents as they were (generation 1).
    let cf = CoreFile::open(&core).unwrap();
    let (addr, len) = (t.get("huge_addr"), t.get("huge_len"));
    for off in (0..len).step_by(1 << 20) {
        let b = cf.read(addr + off, 8).unwrap().expect("huge page in core");
        assert_eq!(u64::from_le_bytes(b.try_into().unwrap()), 1 ^ off);
    }
    let o = try_dump(t.pid, &d.join("reflect.core"), &["--mode", "reflect"]);
    assert!(!o.status.success(), "reflect mode cloned a hugetlb target");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("hugetlb") && err.contains("--mode suspend"),
        "{err}"
    );
    assert!(!d.join("reflect.core").exists());
    assert!(hugewrite(&mut t), "the target died writing its huge pages");
    t.assert_free();
    assert!(no_children_soon(t.pid));
    stats_ok(&t.quit());
}

/// Defect 3: threads waiting for any child with `__WALL` (one blocked in `waitpid`, one
/// polling with WNOHANG) must never see the clone.
#[test]
fn clone_is_invisible_to_wait_with_wall() {
    let d = tmpdir("harm-wall");
    let mut t = Target::spawn(&["--heap-mib", "4", "--wait-all"]);
    let threads = t.threads();
    for i in 0..6 {
        let core = d.join(format!("{i}.core"));
        let json = dump(t.pid, &core, &[]);
        assert_eq!(json.get("mode").as_deref(), Some("reflect"), "{}", json.0);
        assert_eq!(json.warnings(), "", "{}", json.0);
        let reap = json.get("reap_us").expect("reap_us in the report");
        assert!(reap.parse::<u64>().unwrap() > 0, "{}", json.0);
        assert!(t.ping());
        assert!(children(t.pid).is_empty(), "a child is left after dump {i}");
        t.assert_free();
        if i == 0 {
            assert_valid_core(&t, &core, threads);
        }
        std::fs::remove_file(&core).unwrap();
    }
    stats_ok(&t.quit());
}

/// Defect 3 with a main thread that keeps calling vfork (it cannot be stopped while its
/// child lives, 3 s) and then waits with `waitpid(-1, __WALL)`: it must never get the clone
/// either, and the reap must not wait for it.
#[test]
fn clone_is_invisible_to_a_thread_in_vfork() {
    let d = tmpdir("harm-vfork");
    let mut t = Target::spawn(&["--heap-mib", "1", "--vfork-loop"]);
    for i in 0..2 {
        let core = d.join(format!("{i}.core"));
        let json = dump(t.pid, &core, &["--stop-timeout", "5s"]);
        assert_eq!(json.get("mode").as_deref(), Some("reflect"), "{}", json.0);
        assert!(!json.warnings().contains("zombie"), "{}", json.0);
        assert!(t.ping());
        t.assert_free();
        std::fs::remove_file(&core).unwrap();
    }
    let stats = t.quit();
    stats_ok(&stats);
    assert!(stats["vforks"] > 0, "{stats:?}");
}

/// Defect 4: no vDSO, or one that cannot be executed. Every dump succeeds (auto) and the
/// clone is reaped each time: no zombie piles up.
#[test]
fn no_usable_vdso_dumps_and_leaves_no_zombie() {
    let d = tmpdir("harm-vdso");
    for args in [
        &["--unmap-vdso"][..],
        &["--vdso-prot", "none"],
        &["--vdso-prot", "r"],
    ] {
        let mut a = vec!["--heap-mib", "1"];
        a.extend_from_slice(args);
        let mut t = Target::spawn(&a);
        let threads = t.threads();
        for i in 0..3 {
            let core = d.join(format!("{i}.core"));
            let json = dump(t.pid, &core, &["--overwrite"]);
            assert!(
                !json.warnings().contains("zombie"),
                "{args:?} dump {i}: {}",
                json.0
            );
            assert!(t.ping(), "{args:?}: the target died");
            assert!(
                children(t.pid).is_empty(),
                "{args:?}: children {:?} after dump {i}",
                children(t.pid)
            );
            if i == 0 {
                assert_valid_core(&t, &core, threads);
            }
        }
        t.assert_free();
        stats_ok(&t.quit());
    }
}

/// Defect 5: the main thread called pthread_exit (the leader is a zombie) while the other
/// threads run. The process is dumped like any other (the kernel would dump it too); its
/// live threads are in the core.
#[test]
fn process_whose_main_thread_exited_is_dumped() {
    let d = tmpdir("harm-exit-main");
    let mut t = Target::spawn(&["--heap-mib", "1", "--exit-main"]);
    let end = Instant::now() + Duration::from_secs(10);
    while !status_field(t.pid, "State").starts_with('Z') {
        assert!(Instant::now() < end, "the main thread did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let live = t.threads() - 1;
    for mode in ["auto", "reflect", "suspend"] {
        let core = d.join(format!("{mode}.core"));
        let json = dump(t.pid, &core, &["--mode", mode]);
        assert_eq!(json.num("threads") as usize, live, "{}", json.0);
        assert!(t.ping(), "the target stopped answering");
        assert!(no_children_soon(t.pid));
        t.assert_free();
        assert_valid_core(&t, &core, live);
    }
    // A live thread's id names the process to dump, which now works.
    let tid = std::fs::read_dir(format!("/proc/{}/task", t.pid))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .parse::<i32>()
                .unwrap()
        })
        .find(|&x| x != t.pid)
        .unwrap();
    let o = try_dump(tid, &d.join("tid.core"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("dump {} instead", t.pid)), "{err}");
    stats_ok(&t.quit());
}
