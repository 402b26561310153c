//! Bad input and hostile environments: each gets one clear error line, a non-zero exit,
//! nothing left at the output path, and the target untouched.

mod common;

use common::*;
use std::os::unix::fs::symlink;
use std::process::Command;

fn fails_with(args: &[&str], needle: &str) -> String {
    let o = coreflect(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "coreflect {args:?} succeeded: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "coreflect {args:?}: expected {needle:?} in:\n{err}"
    );
    assert!(
        err.starts_with("coreflect: error:") || err.contains("error:"),
        "{err}"
    );
    err
}

fn empty(d: &std::path::Path) -> bool {
    std::fs::read_dir(d).map(|r| r.count() == 0).unwrap_or(true)
}

#[test]
fn bad_pids() {
    let d = tmpdir("bad-pids");
    let o = d.join("x.core");
    let o = o.to_str().unwrap();
    fails_with(&["dump", "0", "-o", o], "invalid pid");
    fails_with(&["dump", "-5", "-o", o], "invalid pid");
    fails_with(&["dump", "99999999999", "-o", o], "invalid pid");
    fails_with(&["dump", "4194300", "-o", o], "no process with pid 4194300");
    fails_with(&["dump", "2", "-o", o], "kernel thread");
    assert!(empty(&d));
}

#[test]
fn a_thread_id_is_not_a_process() {
    let d = tmpdir("tid");
    let t = Target::spawn(&["--heap-mib", "1"]);
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
    let o = d.join("x.core");
    fails_with(
        &["dump", &tid.to_string(), "-o", o.to_str().unwrap()],
        &format!("thread of process {}", t.pid),
    );
    t.assert_free();
}

#[test]
fn zombie() {
    let d = tmpdir("zombie");
    // sh forks `true`, then becomes `sleep`, which never reaps it.
    let mut sh = Command::new("sh")
        .args(["-c", "true & exec sleep 30"])
        .spawn()
        .unwrap();
    let pid = sh.id() as i32;
    let mut z = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        z = children(pid).into_iter().find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(false)
        });
        if z.is_some() {
            break;
        }
    }
    let z = z.expect("no zombie appeared");
    let o = d.join("x.core");
    fails_with(
        &["dump", &z.to_string(), "-o", o.to_str().unwrap()],
        "zombie",
    );
    let _ = sh.kill();
    let _ = sh.wait();
    assert!(empty(&d));
}

#[test]
fn itself() {
    let d = tmpdir("self");
    // The shell's pid becomes coreflect's through exec.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {} dump $$ -o {}/x.core",
            exe().display(),
            d.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("coreflect itself"), "{err}");
    assert!(empty(&d));
}

#[test]
fn already_traced() {
    let d = tmpdir("traced");
    let t = Target::spawn(&["--heap-mib", "1"]);
    // Trace the target's main thread from this test thread.
    // SAFETY: PTRACE_SEIZE with addr and data 0 reads or writes none of our memory.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, t.pid, 0, 0) };
    assert_eq!(r, 0, "seize from the test");
    // TracerPid names the tracing thread.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let o = d.join("x.core");
    for mode in ["auto", "suspend"] {
        fails_with(
            &[
                "dump",
                &t.pid.to_string(),
                "-o",
                o.to_str().unwrap(),
                "--mode",
                mode,
            ],
            &format!("already traced by pid {me}"),
        );
    }
    // SAFETY: PTRACE_DETACH with addr and data 0 reads or writes none of our memory; it runs on the
    // test thread that seized the target.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, t.pid, 0, 0) };
    assert!(empty(&d));
    let mut t = t;
    assert!(t.ping());
}

#[test]
fn permission_denied_names_the_fix() {
    if !require_root(
        "permission_denied_names_the_fix",
        "to run coreflect as another user",
    ) {
        return;
    }
    let d = tmpdir("eperm");
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let t = Target::spawn(&["--heap-mib", "1"]);
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(exe())
        .args([
            "dump",
            &t.pid.to_string(),
            "-o",
            d.join("x.core").to_str().unwrap(),
        ])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("CAP_SYS_PTRACE"), "{err}");
    assert!(empty(&d));
    t.assert_free();
}

#[test]
fn output_problems() {
    let d = tmpdir("output");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    let pid = t.pid.to_string();
    // Missing directory.
    let missing = d.join("no/such/dir/x.core");
    fails_with(
        &["dump", &pid, "-o", missing.to_str().unwrap()],
        "does not exist",
    );
    // An existing file without --overwrite is kept; with it, replaced.
    let existing = d.join("existing.core");
    std::fs::write(&existing, b"keep me").unwrap();
    fails_with(
        &["dump", &pid, "-o", existing.to_str().unwrap()],
        "--overwrite",
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    dump(t.pid, &existing, &["--overwrite"]);
    assert!(std::fs::metadata(&existing).unwrap().len() > 4096);
    // A symlink at the output path is never followed, even with --overwrite.
    let victim = d.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = d.join("link.core");
    symlink(&victim, &link).unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec!["dump", &pid, "-o", link.to_str().unwrap()];
        args.extend_from_slice(extra);
        fails_with(&args, "symbolic link");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // Only the files we made are there: no temporaries left behind.
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["existing.core", "link.core", "victim"]);
    t.assert_free();
    assert!(t.ping());
}

/// Mounts a small tmpfs at `dir` (root only); returns false if it could not.
fn mount_tmpfs(dir: &std::path::Path, opts: &str) -> bool {
    Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            opts,
            "coreflect-test",
            dir.to_str().unwrap(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn umount(dir: &std::path::Path) {
    let _ = Command::new("umount").arg(dir).status();
}

#[test]
fn full_and_read_only_filesystems() {
    if !require_root("full_and_read_only_filesystems", "to mount a small tmpfs") {
        return;
    }
    let d = tmpdir("fs");
    let full = d.join("full");
    let ro = d.join("ro");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    assert!(mount_tmpfs(&full, "size=2m"), "mount tmpfs");
    assert!(mount_tmpfs(&ro, "ro,size=1m"), "mount tmpfs");
    let mut t = Target::spawn(&["--heap-mib", "8"]);
    let pid = t.pid.to_string();
    for mode in ["auto", "suspend"] {
        let err = fails_with(
            &[
                "dump",
                &pid,
                "-o",
                full.join("x.core").to_str().unwrap(),
                "--mode",
                mode,
            ],
            "filesystem is full",
        );
        assert!(err.lines().count() == 1, "one line: {err}");
        assert!(empty(&full), "a partial dump was left behind");
        t.assert_free();
        assert!(children(t.pid).is_empty(), "clone left after a failed dump");
    }
    fails_with(
        &["dump", &pid, "-o", ro.join("x.core").to_str().unwrap()],
        "not writable",
    );
    assert!(empty(&ro));
    umount(&full);
    umount(&ro);
    t.assert_free();
    assert!(t.ping());
    let stats = t.quit();
    assert_undisturbed(&stats);
}

#[test]
fn max_pause_refuses_before_stopping() {
    let d = tmpdir("max-pause");
    let mut t = Target::spawn(&["--heap-mib", "64"]);
    let err = fails_with(
        &[
            "dump",
            &t.pid.to_string(),
            "-o",
            d.join("x.core").to_str().unwrap(),
            "--max-pause",
            "1us",
        ],
        "estimated pause",
    );
    assert!(err.contains("exceeds the limit"), "{err}");
    assert!(empty(&d));
    assert!(t.ping());
}

#[test]
fn filter_values() {
    let d = tmpdir("filter");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    let pid = t.pid.to_string();
    // 0X (upper case) is accepted like 0x.
    let o = d.join("upper.core");
    let o = o.to_str().unwrap();
    let r = coreflect(&["dump", &pid, "-o", o, "--filter", "0X33", "-q"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Out of range: said so, not "not a hex number".
    for bad in ["0x200", "0x1000", "0xffffffffff"] {
        let r = coreflect(&["dump", &pid, "-o", o, "--filter", bad, "--overwrite"]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(err.contains("out of range"), "{err}");
        assert!(err.contains("0x1ff"), "{err}");
        assert!(!err.contains("not a hex number"), "{err}");
    }
    let r = coreflect(&["dump", &pid, "-o", o, "--filter", "0xzz"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("not a hex number"), "{err}");
    t.assert_free();
    assert!(t.ping());
}

#[test]
fn control_characters_in_paths_are_escaped() {
    let d = tmpdir("ctl");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    let pid = t.pid.to_string();
    // An error naming such a path: one line, escaped.
    let bad = d.join("no\nsuch\x1b[31m/dir/x.core");
    let o = coreflect(&["dump", &pid, "-o", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("no\\nsuch\\e[31m"), "{err:?}");
    assert!(!err.contains('\x1b'), "{err:?}");
    // A summary naming such a path: every line is one of the summary's own.
    let good = d.join("a\nb\tc\x07.core");
    let o = coreflect(&["dump", &pid, "-o", good.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(std::fs::metadata(&good).is_ok());
    assert!(err.contains("a\\nb\\tc\\x07.core"), "{err:?}");
    for l in err.lines() {
        assert!(
            l.starts_with("coreflect: ") || l.starts_with("  "),
            "a line the summary did not start: {l:?} in {err:?}"
        );
        assert!(!l.chars().any(|c| c.is_control()), "{l:?}");
    }
    t.assert_free();
    assert!(t.ping());
}

#[test]
fn stop_timeout_zero_names_the_state_it_saw() {
    // With no time to stop at all, the first pass may find threads not yet stopped: the
    // message must say what their state means, and blame uninterruptible sleep only for D.
    let d = tmpdir("stop-timeout-0");
    let mut t = Target::spawn(&["--heap-mib", "1", "--extra-threads", "40"]);
    let pid = t.pid.to_string();
    let o = d.join("x.core");
    let mut seen = 0;
    for _ in 0..10 {
        let r = coreflect(&[
            "dump",
            &pid,
            "-o",
            o.to_str().unwrap(),
            "--overwrite",
            "--stop-timeout",
            "0",
        ]);
        let err = String::from_utf8_lossy(&r.stderr).to_string();
        if r.status.success() {
            continue;
        }
        assert!(err.contains("did not stop within 0 ms"), "{err}");
        seen += 1;
        let state = err
            .split("(state ")
            .nth(1)
            .and_then(|s| s.chars().next())
            .unwrap();
        assert_eq!(
            err.contains("uninterruptible"),
            state == 'D',
            "state {state}: {err}"
        );
        assert!(err.contains("--stop-timeout"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        t.assert_free();
    }
    eprintln!("{seen} of 10 dumps timed out");
    assert!(t.ping());
}
