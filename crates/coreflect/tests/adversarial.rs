//! Hostile conditions found by an adversarial review, each a regression test on a real
//! target: the dumps must fail (or warn) honestly and never harm the target.

mod common;

use common::*;
use coreflect::trace::{dump_held, Tracer};
use coreflect::{DumpOptions, Error, Level, Mode, Options};
use std::path::Path;
use std::time::{Duration, Instant};

target_entry!();

/// Sends SIGKILL to `pid` and waits (generously) until none of its threads is stopped any
/// more: the rest of its memory can no longer be read.
fn kill_and_wait_dead(pid: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
        if !matches!(state, Some('t') | Some('T') | Some('R') | Some('S')) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not die: {stat}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn dump_opts(out: &Path, mode: Mode) -> DumpOptions {
    DumpOptions {
        snapshot: Options {
            mode,
            stop_timeout: Duration::from_secs(30),
            ..Default::default()
        },
        output: out.to_path_buf(),
        overwrite: false,
        filter: None,
        level: Level::Default,
        compress: None,
        stdout: false,
    }
}

/// A target killed while a suspended dump reads it: the memory not yet read comes back as
/// holes. The dump used to succeed with a core that looked complete (zeros where the heap
/// was); it must fail and leave nothing.
#[test]
fn suspended_dump_of_a_target_killed_mid_write_fails() {
    let t = Target::spawn(&["--heap-mib", "64", "--seq-pages", "8"]);
    let dir = tmpdir("killed-suspend");
    let out = dir.join("killed.core");
    let pid = t.pid;
    let mut killed = false;
    let mut progress = |_: u64, _: u64| {
        if !killed {
            kill_and_wait_dead(pid);
            killed = true;
        }
        true
    };
    let r = coreflect::dump(pid, &dump_opts(&out, Mode::Suspend), &mut progress);
    assert!(
        killed,
        "the progress callback never ran: nothing was tested"
    );
    match r {
        Err(Error::ProcessExited { pid: p }) => assert_eq!(p, pid),
        Err(e) => panic!("expected ProcessExited, got: {}", e.with_causes()),
        Ok(rep) => panic!(
            "a dump of a process killed mid-write succeeded: {} ({} warnings: {:?})",
            rep.path.display(),
            rep.warnings.len(),
            rep.warnings
        ),
    }
    assert!(
        !out.exists(),
        "a partial core was left at {}",
        out.display()
    );
}

/// The same with the target held by a staying tracer (`coreflect watch --signal`): the
/// held dump used to succeed silently, without even the unreadable ranges' warnings.
#[test]
fn held_dump_of_a_target_killed_mid_write_fails() {
    let t = Target::spawn(&["--heap-mib", "64", "--seq-pages", "8"]);
    let dir = tmpdir("killed-held");
    let out = dir.join("killed.core");
    let pid = t.pid;
    let mut tracer = Tracer::attach(pid, &[libc::SIGTERM]).unwrap();
    let stopped = tracer.stop_all(Duration::from_secs(30)).unwrap();
    let mut killed = false;
    let mut progress = |_: u64, _: u64| {
        if !killed {
            kill_and_wait_dead(pid);
            killed = true;
        }
        true
    };
    let r = dump_held(
        &stopped,
        None,
        &dump_opts(&out, Mode::Suspend),
        &mut progress,
    );
    assert!(
        killed,
        "the progress callback never ran: nothing was tested"
    );
    match r {
        Err(Error::ProcessExited { pid: p }) => assert_eq!(p, pid),
        Err(e) => panic!("expected ProcessExited, got: {}", e.with_causes()),
        Ok(rep) => panic!(
            "a held dump of a process killed mid-write succeeded: {} (warnings: {:?})",
            rep.path.display(),
            rep.warnings
        ),
    }
    assert!(
        !out.exists(),
        "a partial core was left at {}",
        out.display()
    );
    let _ = tracer.resume_all(Some(stopped));
}
