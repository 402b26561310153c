//! Hostile conditions found by an adversarial review, each a regression test on a real
//! target: the dumps must fail (or warn) honestly and never harm the target.

mod common;

use common::*;
use coreflect::trace::{dump_held, Event, Tracer};
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
    let held = tracer.stop_all(Duration::from_secs(30)).unwrap();
    let mut killed = false;
    let mut progress = |_: u64, _: u64| {
        if !killed {
            kill_and_wait_dead(pid);
            killed = true;
        }
        true
    };
    let r = dump_held(&held, None, &dump_opts(&out, Mode::Suspend), &mut progress);
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
    let _ = tracer.resume_all();
}

fn zombie_children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().file_name();
        let ch =
            std::fs::read_to_string(format!("/proc/{pid}/task/{}/children", t.to_string_lossy()))
                .unwrap_or_default();
        for c in ch.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            let st = std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
            if st.rsplit(')').next().unwrap_or("").trim().starts_with('Z') {
                v.push(c);
            }
        }
    }
    v
}

/// Two snapshots of one target at once (`watch --clones`, two `coreflect dump`s): the first
/// has killed its clone (its image is written) and is about to reap it when the second
/// starts. The second took that zombie for a leftover of an interrupted dump and reaped it
/// itself, so the first found nothing to reap (and a reused pid could be reaped in its
/// place). A clone whose snapshot is still alive — its tracer still traces the zombie —
/// belongs to that snapshot.
#[test]
fn a_concurrent_snapshot_does_not_reap_a_live_snapshots_clone() {
    let t = Target::spawn(&["--heap-mib", "4", "--seq-pages", "8"]);
    let o = Options {
        mode: Mode::Reflect,
        stop_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let mut a = coreflect::Snapshot::capture(t.pid, &o).unwrap();
    let clone = a.clone_pid().expect("reflect mode has a clone");
    a.release_image();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !zombie_children(t.pid).contains(&clone) {
        assert!(
            Instant::now() < deadline,
            "the clone {clone} never became a zombie"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = coreflect::Snapshot::capture(t.pid, &o).unwrap();
    assert!(
        !b.warnings().iter().any(|w| matches!(
            w,
            coreflect::Warning::LeftoverClonesReaped { .. }
                | coreflect::Warning::LeftoverClonesNotReaped { .. }
        )),
        "the second snapshot reaped the first one's clone: {:?}",
        b.warnings()
    );
    assert!(
        zombie_children(t.pid).contains(&clone),
        "the first snapshot's clone zombie {clone} was reaped by someone else"
    );
    assert_eq!(a.finish(), None, "the first snapshot's end warned");
    assert_eq!(b.finish(), None, "the second snapshot's end warned");
    assert!(
        zombie_children(t.pid).is_empty(),
        "zombies left in the target: {:?}",
        zombie_children(t.pid)
    );
}

fn status_field(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// A traced target (`coreflect watch --signal`) starts a child *process* with `clone()`
/// and an exit signal other than SIGCHLD: `PTRACE_O_TRACECLONE` attaches the tracer to it
/// as if it were a thread. The watcher kept it traced, stopped it for every dump and wrote
/// it into the target's core as one more thread (registers and stack of another process).
/// It must be let go at once and never appear in the target's core.
#[test]
fn a_child_process_made_by_clone_is_not_a_thread_of_the_watched_target() {
    let mut t = Target::spawn(&["--heap-mib", "2", "--seq-pages", "8"]);
    let mut tracer = Tracer::attach(t.pid, &[libc::SIGTERM]).unwrap();
    t.send("cloneproc");
    let deadline = Instant::now() + Duration::from_secs(30);
    let child: i32 = loop {
        // The target stops at the clone until the tracer handles it.
        assert_eq!(tracer.next_event(Duration::from_millis(20)).unwrap(), None);
        if let Some(l) = t.try_line() {
            if let Some(c) = l.strip_prefix("CLONEPROC child=") {
                break c.trim().parse().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the target never answered cloneproc"
        );
    };
    assert!(child > 0, "clone failed in the target: {child}");
    while status_field(child, "TracerPid:") != "0" {
        assert_eq!(tracer.next_event(Duration::from_millis(20)).unwrap(), None);
        assert!(
            Instant::now() < deadline,
            "the child process {child} stays traced by the watcher"
        );
    }
    assert_eq!(
        tracer.thread_count(),
        t.threads(),
        "the tracer counts another process among the target's threads"
    );
    let dir = tmpdir("cloneproc");
    let out = dir.join("held.core");
    let held = tracer.stop_all(Duration::from_secs(30)).unwrap();
    let rep = dump_held(&held, None, &dump_opts(&out, Mode::Suspend), &mut |_, _| {
        true
    });
    tracer.resume_all().unwrap();
    let rep = rep.unwrap();
    let core = coreflect::elf::reader::CoreFile::open(&rep.path).unwrap();
    let tids = coreflect::elf::reader::thread_ids(&core.notes().unwrap());
    assert!(
        !tids.contains(&child),
        "the core lists process {child} as a thread of {}: {tids:?}",
        t.pid
    );
    assert_eq!(tids.len(), t.threads(), "{tids:?}");
    drop(tracer);
    t.assert_free();
    let state = status_field(child, "State:");
    assert!(state.starts_with('S'), "the child process is {state}");
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(child, libc::SIGKILL) };
}

/// `watch --signal SEGV` with another trigger: a watched signal that arrives while the
/// watcher stops every thread for a dump (a crash during a timer dump) was held by the
/// stop, then delivered when the target was resumed, without a dump of its own: the crash
/// dump was lost. It must be reported as the next event, still undelivered.
#[test]
fn a_watched_signal_caught_while_stopping_for_another_dump_is_reported() {
    let t = Target::spawn(&["--heap-mib", "2", "--seq-pages", "8"]);
    // SIGWINCH: ignored by default, yet shown to a tracer; the target survives it.
    let mut tracer = Tracer::attach(t.pid, &[libc::SIGWINCH]).unwrap();
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(t.pid, libc::SIGWINCH) };
    // Wait (without collecting it) until a thread sits in its signal-delivery stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped_thread = || {
        std::fs::read_dir(format!("/proc/{}/task", t.pid))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                std::fs::read_to_string(e.path().join("stat"))
                    .is_ok_and(|s| s.rsplit(')').next().unwrap_or("").trim().starts_with('t'))
            })
    };
    while !stopped_thread() {
        assert!(Instant::now() < deadline, "SIGWINCH never stopped a thread");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A dump for another trigger: the stop collects the signal's stop.
    let dir = tmpdir("pending-signal");
    let held = tracer.stop_all(Duration::from_secs(30)).unwrap();
    let r = dump_held(
        &held,
        None,
        &dump_opts(&dir.join("timer.core"), Mode::Suspend),
        &mut |_, _| true,
    );
    tracer.resume_all().unwrap();
    r.unwrap();
    let mut ev = None;
    while ev.is_none() && Instant::now() < deadline {
        ev = tracer.next_event(Duration::from_millis(100)).unwrap();
    }
    match ev {
        Some(Event::Signal { sig, tid }) => {
            assert_eq!(sig, libc::SIGWINCH);
            // Its own dump, then delivery.
            let held = tracer.stop_all(Duration::from_secs(30)).unwrap();
            let r = dump_held(
                &held,
                Some(tid),
                &dump_opts(&dir.join("signal.core"), Mode::Suspend),
                &mut |_, _| true,
            );
            tracer.resume_all().unwrap();
            r.unwrap();
        }
        other => panic!("the signal that arrived during a dump was not reported: {other:?}"),
    }
    drop(tracer);
    t.assert_free();
}

/// The tracer waited for any child of its thread (`waitpid(-1)`): a process the tracing
/// thread spawned itself (a helper a watcher starts, a clone made for a dump) had its exit
/// status taken and thrown away by the tracer, and its own wait then failed with ECHILD.
/// The tracer must only wait for the threads it traces.
#[test]
fn the_tracer_leaves_the_exit_status_of_its_threads_other_children_alone() {
    let t = Target::spawn(&["--heap-mib", "2", "--seq-pages", "8"]);
    let mut tracer = Tracer::attach(t.pid, &[libc::SIGTERM]).unwrap();
    // A child of this (the tracing) thread, which exits at once with a status of its own.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "exit 7"])
        .spawn()
        .unwrap();
    // Wait, without reaping it, until it is a zombie: its exit status is pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    let zombie = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
    };
    while !zombie(child.id()) {
        assert!(Instant::now() < deadline, "the child never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The tracer waits while the child's status is pending...
    for _ in 0..5 {
        assert_eq!(tracer.next_event(Duration::from_millis(20)).unwrap(), None);
    }
    assert!(
        zombie(child.id()),
        "the tracer reaped a child of its thread that it does not trace"
    );
    // ...and the child's own waiter still gets it.
    let st = child
        .wait()
        .expect("the child's exit status was taken by the tracer");
    assert_eq!(st.code(), Some(7));
    drop(tracer);
    t.assert_free();
}

/// A `Held` handle outlives the stop it stands for: once the tracer let the threads run
/// again, dumping with it would read a running target as if it were held. `dump_held`
/// refuses it (a panic: a misuse of the API), before creating anything at the output path.
#[test]
fn a_held_handle_is_stale_once_the_tracer_resumes() {
    let t = Target::spawn(&["--heap-mib", "2", "--seq-pages", "8"]);
    let mut tracer = Tracer::attach(t.pid, &[libc::SIGTERM]).unwrap();
    let held = tracer.stop_all(Duration::from_secs(30)).unwrap();
    assert!(held.is_current());
    assert_eq!(held.pid(), t.pid);
    let threads = held.threads();
    assert_eq!(threads.first(), Some(&t.pid), "main thread first");
    assert_eq!(threads.len(), t.threads());
    tracer.resume_all().unwrap();
    assert!(!held.is_current());
    let dir = tmpdir("stale-held");
    let out = dir.join("stale.core");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dump_held(&held, None, &dump_opts(&out, Mode::Suspend), &mut |_, _| {
            true
        })
    }));
    assert!(r.is_err(), "a dump with a stale Held handle was attempted");
    assert!(!out.exists(), "a file was left at {}", out.display());
    // A fresh stop works again, and the target ends free.
    let held = tracer.stop_all(Duration::from_secs(30)).unwrap();
    dump_held(&held, None, &dump_opts(&out, Mode::Suspend), &mut |_, _| {
        true
    })
    .unwrap();
    tracer.resume_all().unwrap();
    drop(tracer);
    t.assert_free();
}
