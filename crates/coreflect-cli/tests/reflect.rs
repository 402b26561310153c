//! Reflection: repeated default-mode dumps of a busy target leave no trace in it, show one
//! consistent instant, survive the tool being killed at any phase, and handle memory and
//! filters a clone cannot hold.

mod common;

use common::*;
use coreflect::elf::reader::CoreFile;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The sequence numbers the target's writer stored, as the core holds them.
fn seq_values(t: &Target, core: &Path) -> Vec<u64> {
    let cf = CoreFile::open(core).unwrap();
    let (base, pages, stride) = (t.get("seq_addr"), t.get("seq_pages"), t.get("seq_stride"));
    (0..pages)
        .map(|p| {
            let b = cf
                .read(base + p * stride, 8)
                .unwrap()
                .expect("seq page in core");
            u64::from_le_bytes(b.try_into().unwrap())
        })
        .collect()
}

/// One instant: the writer stores n into pages 0.. in order, so a consistent image shows a
/// run of n followed by a run of n-1 (or all equal).
fn assert_one_instant(v: &[u64]) {
    assert!(v[0] > 0, "the writer had not started: {v:?}");
    for w in v.windows(2) {
        assert!(w[0] >= w[1], "not one instant: {v:?}");
    }
    assert!(v[0] - v[v.len() - 1] <= 1, "not one instant: {v:?}");
}

#[test]
fn repeated_dumps_leave_no_trace_and_show_one_instant() {
    let d = tmpdir("repeat");
    let t = Target::spawn(&["--heap-mib", "8", "--seq-pages", "256"]);
    let threads = t.threads();
    for i in 0..4 {
        let core = d.join(format!("{i}.core"));
        let json = dump(t.pid, &core, &[]);
        assert_eq!(json.get("mode").as_deref(), Some("reflect"), "{}", json.0);
        assert_eq!(json.warnings(), "", "warnings: {}", json.0);
        assert!(json.num("pause_us") > 0);
        t.assert_free();
        assert!(
            children(t.pid).is_empty(),
            "the target has children after dump {i}"
        );
        assert_eq!(t.threads(), threads);
        assert_one_instant(&seq_values(&t, &core));
        std::fs::remove_file(&core).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let stats = t.quit();
    assert_undisturbed(&stats);
    assert!(stats["sleeps"] > 0);
}

#[test]
fn suspend_mode_is_consistent_too() {
    let d = tmpdir("suspend-consistent");
    let t = Target::spawn(&["--heap-mib", "4", "--seq-pages", "256"]);
    let core = d.join("s.core");
    dump(t.pid, &core, &["--mode", "suspend"]);
    assert_one_instant(&seq_values(&t, &core));
    assert_undisturbed(&t.quit());
}

/// Starts `coreflect dump` paused at `phase` (test hook); returns it once it got there.
fn dump_paused_at(pid: i32, out: &Path, phase: &str) -> std::process::Child {
    let mut c = Command::new(exe())
        .args(["dump", &pid.to_string(), "-o", out.to_str().unwrap(), "-q"])
        .env("COREFLECT_TEST_PAUSE_AT", phase)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(c.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains(&format!("test pause at {phase}")), "{line}");
    // Keep draining stderr so the tool never blocks on it.
    std::thread::spawn(move || {
        let mut s = String::new();
        while err.read_line(&mut s).unwrap_or(0) > 0 {}
    });
    c
}

/// Waits (at most 10 s) until the target is untraced and running: the warden process
/// that outlives a killed coreflect finishes its cleanup first.
fn wait_free(pid: i32) {
    for _ in 0..1000 {
        if std::panic::catch_unwind(|| assert_free(pid)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_free(pid);
}

/// Asserts that the warden of a killed coreflect finishes within 10 s.
fn wait_no_dumper(pid: i32) {
    assert!(
        common::wait_no_dumper(pid, Duration::from_secs(10)),
        "a coreflect process for {pid} is still running 10 s after its parent was killed"
    );
}

fn child_states(pid: i32) -> Vec<char> {
    children(pid)
        .into_iter()
        .filter_map(|c| {
            let s = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            s.rsplit(')').next()?.trim().chars().next()
        })
        .collect()
}

#[test]
fn killing_the_tool_at_any_phase_never_harms_the_target() {
    let d = tmpdir("kill");
    let mut t = Target::spawn(&["--heap-mib", "8"]);
    for phase in ["stopped", "released", "writing", "reaping"] {
        let out = d.join(format!("{phase}.core"));
        let mut c = dump_paused_at(t.pid, &out, phase);
        c.kill().unwrap();
        c.wait().unwrap();
        wait_free(t.pid);
        wait_no_dumper(t.pid);
        assert!(t.ping(), "target stopped answering after a kill at {phase}");
        // The clone never runs: at most a zombie is left, reaped by the next dump.
        let mut states = child_states(t.pid);
        for _ in 0..200 {
            if states.iter().all(|s| *s == 'Z') {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            states = child_states(t.pid);
        }
        assert!(
            states.iter().all(|s| *s == 'Z'),
            "a live child after a kill at {phase}: {states:?}"
        );
        if phase == "reaping" {
            // The core was complete and named before the clone was reaped.
            let cf = CoreFile::open(&out).expect("a complete core");
            assert_eq!(
                coreflect::elf::reader::thread_ids(&cf.notes().unwrap()).len(),
                t.threads()
            );
            std::fs::remove_file(&out).unwrap();
        }
        assert!(!out.exists(), "a file was left after a kill at {phase}");
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "temporary files left"
        );
        let json = dump(t.pid, &out, &[]);
        assert_eq!(json.get("mode").as_deref(), Some("reflect"));
        if !states.is_empty() {
            assert!(json.warnings().contains("leftover"), "{}", json.0);
        }
        assert!(
            children(t.pid).is_empty(),
            "children left after the next dump ({phase})"
        );
        std::fs::remove_file(&out).unwrap();
    }
    assert_undisturbed(&t.quit());
}

#[test]
fn sigterm_and_sigint_release_everything_and_leave_no_file() {
    let d = tmpdir("sigterm");
    let t = Target::spawn(&["--heap-mib", "8"]);
    for (phase, sig) in [
        ("writing", libc::SIGTERM),
        ("released", libc::SIGINT),
        ("stopped", libc::SIGTERM),
    ] {
        let out = d.join("x.core");
        let mut c = dump_paused_at(t.pid, &out, phase);
        send_signal(c.id() as i32, sig);
        let status = c.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(130),
            "exit code after signal {sig} at {phase}"
        );
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        t.assert_free();
        assert!(
            children(t.pid).is_empty(),
            "clone left after cancel at {phase}"
        );
    }
    assert_undisturbed(&t.quit());
}

/// A region the clone cannot hold (`flag`: `--wipeonfork-kib` or `--dontfork-kib`, filled
/// with `fill` at the READY key `addr_key`) is read from the live target, with a warning.
fn live_region_is_dumped(name: &str, flag: &str, addr_key: &str, fill: u8, warning: &str) {
    let d = tmpdir(name);
    let t = Target::spawn(&["--heap-mib", "1", flag, "64"]);
    let core = d.join("l.core");
    let json = dump(t.pid, &core, &[]);
    assert_eq!(json.get("mode").as_deref(), Some("reflect"));
    assert!(json.warnings().contains(warning), "{}", json.0);
    assert!(
        json.warning_kinds().iter().any(|k| k == "read_live"),
        "{}",
        json.0
    );
    let cf = CoreFile::open(&core).unwrap();
    let b = cf
        .read(t.get(addr_key) + 100, 64)
        .unwrap()
        .unwrap_or_else(|| panic!("{warning} range missing from the core"));
    assert!(
        b.iter().all(|&x| x == fill),
        "the clone's view was dumped: {b:?}"
    );
    assert_undisturbed(&t.quit());
}

#[test]
fn wipeonfork_memory_is_read_from_the_live_target() {
    live_region_is_dumped(
        "wof",
        "--wipeonfork-kib",
        "wof_addr",
        0xAB,
        "MADV_WIPEONFORK",
    );
}

#[test]
fn dontfork_memory_is_read_from_the_live_target() {
    live_region_is_dumped("dof", "--dontfork-kib", "dof_addr", 0xCD, "MADV_DONTFORK");
}

#[test]
fn seccomp_target_with_and_without_cap_sys_admin() {
    if !require_root(
        "seccomp_target_with_and_without_cap_sys_admin",
        "(CAP_SYS_ADMIN) to suspend seccomp",
    ) {
        return;
    }
    let d = tmpdir("seccomp");
    let mut t = Target::spawn(&["--heap-mib", "1", "--seccomp-kill-clone"]);
    // With CAP_SYS_ADMIN: reflected, seccomp suspended for the injection only.
    let core = d.join("a.core");
    let json = dump(t.pid, &core, &[]);
    assert_eq!(json.get("mode").as_deref(), Some("reflect"), "{}", json.0);
    assert!(t.ping(), "the target died");
    assert!(children(t.pid).is_empty());
    // Without it: auto falls back to suspend with a warning; reflect refuses.
    let nocap = |extra: &[&str]| {
        Command::new("setpriv")
            .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin"])
            .arg(exe())
            .args([
                "dump",
                &t.pid.to_string(),
                "-o",
                d.join("b.core").to_str().unwrap(),
                "--json",
                "--overwrite",
            ])
            .args(extra)
            .output()
            .expect("setpriv")
    };
    let o = nocap(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = Json(String::from_utf8_lossy(&o.stdout).trim().to_string());
    assert_eq!(json.get("mode").as_deref(), Some("suspend"), "{}", json.0);
    assert!(json.warnings().contains("seccomp"), "{}", json.0);
    assert!(
        json.warning_kinds()
            .iter()
            .any(|k| k == "suspended_instead"),
        "{}",
        json.0
    );
    let o = nocap(&["--mode", "reflect"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("seccomp") && err.contains("--mode suspend"),
        "{err}"
    );
    t.assert_free();
    assert!(t.ping(), "the target died");
    assert_undisturbed(&t.quit());
}

/// The state letter of a process.
fn state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit(')').next().unwrap().trim().chars().next().unwrap()
}

#[test]
fn signals_sent_during_the_pause_are_delivered_once() {
    let d = tmpdir("signals");
    let mut t = Target::spawn(&["--heap-mib", "4"]);
    // A handled signal (SIGCHLD, SA_RESTART) arrives while every thread is stopped.
    let out = d.join("x.core");
    let mut c = dump_paused_at(t.pid, &out, "stopped");
    send_signal(t.pid, libc::SIGCHLD);
    std::thread::sleep(Duration::from_millis(50));
    send_signal(c.id() as i32, libc::SIGTERM);
    c.wait().unwrap();
    wait_free(t.pid);
    assert!(t.ping());
    // SIGSTOP during the pause: the target must end up stopped, as it asked.
    let mut c = dump_paused_at(t.pid, &out, "stopped");
    send_signal(t.pid, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    send_signal(c.id() as i32, libc::SIGTERM);
    c.wait().unwrap();
    wait_no_dumper(t.pid);
    let mut st = state(t.pid);
    for _ in 0..200 {
        if st == 'T' {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        st = state(t.pid);
    }
    assert_eq!(st, 'T', "the SIGSTOP sent during the pause was lost");
    send_signal(t.pid, libc::SIGCONT);
    assert!(t.ping());
    // A stopped target is not injected into: the clone's zombie waits for the next dump.
    assert!(child_states(t.pid).iter().all(|s| *s == 'Z'));
    dump(t.pid, &out, &[]);
    assert!(children(t.pid).is_empty());
    let stats = t.quit();
    assert_eq!(stats["sigchld"], 1, "{stats:?}");
    // (The handler may legitimately cut a nanosleep or a pause() short — the kernel's rule
    // for a handled signal — but a read() under SA_RESTART restarts.)
    for k in ["read_eintr", "read_bad", "short_sleep", "waitpid_children"] {
        assert_eq!(stats[k], 0, "{k}: {stats:?}");
    }
}

#[test]
fn a_target_in_its_own_pid_namespace_is_reflected_and_reaped() {
    if !require_root(
        "a_target_in_its_own_pid_namespace_is_reflected_and_reaped",
        "for a pid namespace",
    ) {
        return;
    }
    let d = tmpdir("pidns");
    let (mut u, line) = spawn_first_line(
        Command::new("unshare")
            .args(["--pid", "--fork"])
            .arg(exe())
            .args(["__target", "--heap-mib", "2"]),
    );
    assert!(
        line.starts_with("READY pid=1 "),
        "not pid 1 in its namespace: {line}"
    );
    let pid = children(u.id() as i32)[0];
    let core = d.join("ns.core");
    for _ in 0..3 {
        let json = dump(pid, &core, &["--mode", "reflect", "--overwrite"]);
        assert_eq!(json.warnings(), "", "{}", json.0);
        assert!(
            children(pid).is_empty(),
            "the clone's zombie was left in the container"
        );
    }
    assert_free(pid);
    let _ = u.kill();
    send_signal(pid, libc::SIGKILL);
    let _ = u.wait();
}
