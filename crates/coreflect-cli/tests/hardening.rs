//! Output holes and the lock (issue 8): only regular files are replaced, the output path is
//! checked completely before the target is touched, and a lock squatted by a user who could
//! not dump the target does not block a dump. Also: shared memory read live is reported.

mod common;

use common::*;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn err_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn overwrite_replaces_only_a_regular_file() {
    let d = tmpdir("overwrite-special");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    let pid = t.pid.to_string();
    let fifo = d.join("fifo");
    let dev = d.join("null");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    let made_dev = is_root()
        && Command::new("mknod")
            .arg(&dev)
            .args(["c", "1", "3"])
            .status()
            .is_ok_and(|s| s.success());
    let mut cases = vec![(fifo.clone(), "a FIFO")];
    if made_dev {
        cases.push((dev.clone(), "a character device"));
    } else {
        eprintln!("no device node (needs root): FIFO only");
    }
    use std::os::unix::fs::FileTypeExt;
    for (path, kind) in &cases {
        for extra in [&["--overwrite"][..], &[][..]] {
            let mut args = vec!["dump", &pid, "-o", path.to_str().unwrap()];
            args.extend_from_slice(extra);
            let o = coreflect(&args);
            let err = err_of(&o);
            assert!(!o.status.success(), "{args:?} succeeded: {err}");
            assert!(err.contains("refusing to replace"), "{err}");
            assert!(err.contains(kind), "{err}");
            assert!(err.contains("only regular files"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let ft = std::fs::symlink_metadata(path).unwrap().file_type();
        assert!(ft.is_fifo() || ft.is_char_device(), "{path:?} was replaced");
    }
    // A regular file still is replaced with --overwrite.
    let reg = d.join("regular.core");
    std::fs::write(&reg, b"old").unwrap();
    dump(t.pid, &reg, &["--overwrite"]);
    assert!(std::fs::metadata(&reg).unwrap().len() > 4096);
    t.assert_free();
    assert!(t.ping());
}

/// Runs a dump that must fail on its output path with the test hook armed at `stopped`:
/// the hook would announce the stop (and wait there) if the target were ever stopped.
fn fails_before_stopping(pid: i32, out: &std::ffi::OsStr, needle: &str) -> String {
    let mut child = Command::new(exe())
        .arg("dump")
        .arg(pid.to_string())
        .arg("-o")
        .arg(out)
        .env("COREFLECT_TEST_PAUSE_AT", "stopped")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coreflect did not exit: it must fail before stopping the target");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        !err.contains("test pause at"),
        "the target was stopped: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn the_output_path_is_checked_before_anything_is_stopped() {
    let d = tmpdir("long-name");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    // A 300-byte file name: longer than the filesystem's NAME_MAX.
    let long = d.join("c".repeat(300));
    let err = fails_before_stopping(t.pid, long.as_os_str(), "file name is 300 bytes");
    assert!(err.contains("shorter path"), "{err}");
    // A path over PATH_MAX (made of existing-looking short components).
    let deep = format!("{}/{}x.core", d.display(), "d/".repeat(2100));
    let err = fails_before_stopping(t.pid, std::ffi::OsStr::new(&deep), "a path may have");
    assert!(err.contains("shorter path"), "{err}");
    // A directory component over NAME_MAX.
    let comp = d.join("e".repeat(300)).join("x.core");
    fails_before_stopping(t.pid, comp.as_os_str(), "too long");
    // A path that names a directory rather than a file.
    let dir = format!("{}/", d.display());
    fails_before_stopping(t.pid, std::ffi::OsStr::new(&dir), "names a directory");
    let dotdot = d.join("..");
    fails_before_stopping(t.pid, dotdot.as_os_str(), "names a directory");
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    t.assert_free();
    assert!(children(t.pid).is_empty());
    // A 255-byte name is fine.
    let ok = d.join("f".repeat(255));
    dump(t.pid, &ok, &[]);
    assert!(std::fs::metadata(&ok).unwrap().len() > 4096);
    assert!(t.ping());
}

fn start_time(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

fn lock_addr(pid: i32) -> (libc::sockaddr_un, libc::socklen_t) {
    let name = format!("coreflect/target/{pid}/{}", start_time(pid));
    // SAFETY: sockaddr_un is a plain C struct, valid when zeroed.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (i, b) in name.bytes().enumerate() {
        a.sun_path[i + 1] = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (a, len as libc::socklen_t)
}

/// A process that holds the lock name of `pid` as `uid` (a listening stream socket, as
/// coreflect's own lock), until killed. Returns its pid.
fn squat_lock(pid: i32, uid: u32, sock_type: i32, listen: bool) -> i32 {
    let (a, len) = lock_addr(pid);
    let mut p = [0i32; 2];
    // SAFETY: `p` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // The child only makes raw syscalls (no allocation) before it pauses.
    // SAFETY: the child makes only async-signal-safe raw syscalls, then exits or is killed.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // SAFETY: in the forked child: raw syscalls on its own descriptors and the sockaddr built above.
        unsafe {
            // Keep none of the test process's other descriptors (other tests' pipes): the
            // pipe's write end becomes stdout, everything from 3 up is closed.
            if libc::dup2(p[1], 1) != 1
                || libc::close_range(3, u32::MAX, 0) != 0
                || libc::close(0) != 0
                || libc::close(2) != 0
            {
                libc::_exit(1);
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, sock_type, 0);
            if fd < 0 || libc::bind(fd, &a as *const _ as *const libc::sockaddr, len) != 0 {
                libc::_exit(3);
            }
            if listen && libc::listen(fd, 128) != 0 {
                libc::_exit(4);
            }
            libc::write(1, b"k".as_ptr() as *const libc::c_void, 1);
            libc::close(1);
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: closes the pipe's write end, which this function owns.
    unsafe { libc::close(p[1]) };
    let mut b = [0u8; 1];
    // SAFETY: reads at most one byte into `b`, a live one-byte buffer.
    let n = unsafe { libc::read(p[0], b.as_mut_ptr() as *mut libc::c_void, 1) };
    // SAFETY: closes the pipe's read end, which this function owns.
    unsafe { libc::close(p[0]) };
    assert_eq!(n, 1, "the squatter could not bind the lock name");
    child
}

/// Kills the squatter when dropped, even when a test fails.
struct Squatter(i32);

impl Drop for Squatter {
    fn drop(&mut self) {
        kill_squatter(self.0);
    }
}

fn kill_squatter(p: i32) {
    // SAFETY: signals and reaps the squatter child this test forked.
    unsafe {
        libc::kill(p, libc::SIGKILL);
        libc::waitpid(p, std::ptr::null_mut(), 0);
    }
}

#[test]
fn a_lock_squatted_by_another_user_is_ignored() {
    if !is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let d = tmpdir("squat");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    for (kind, listen, why) in [
        (libc::SOCK_STREAM, true, "running as uid 65534"),
        (libc::SOCK_STREAM, false, "does not listen"),
    ] {
        let sq = Squatter(squat_lock(t.pid, 65534, kind, listen));
        let out = d.join(format!("squat-{kind}-{listen}.core"));
        let started = Instant::now();
        let o = coreflect(&[
            "dump",
            &t.pid.to_string(),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]);
        drop(sq);
        let err = err_of(&o);
        assert!(
            o.status.success(),
            "the squatted lock blocked the dump: {err}"
        );
        let j = Json(String::from_utf8(o.stdout).unwrap());
        let w = j.warnings();
        assert!(w.contains("per-target lock"), "{w}");
        assert!(w.contains(why), "{why:?} not in {w}");
        assert!(w.contains("ignored it"), "{w}");
        assert_eq!(j.warning_kinds(), ["lock_ignored"], "{}", j.0);
        // Not a timing assertion: the old behaviour waited 10 s and then failed.
        eprintln!("dump with a squatted lock took {:?}", started.elapsed());
        assert!(std::fs::metadata(&out).unwrap().len() > 4096);
        t.assert_free();
    }
    assert!(t.ping());
}

#[test]
fn a_lock_held_by_root_is_honoured() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = tmpdir("honoured");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    let holder = Squatter(squat_lock(t.pid, 0, libc::SOCK_STREAM, true));
    let out = d.join("x.core");
    let mut child = Command::new(exe())
        .args(["dump", &t.pid.to_string(), "-o", out.to_str().unwrap()])
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While root holds the lock, coreflect waits: it neither stops the target nor exits.
    std::thread::sleep(Duration::from_millis(1500));
    let early = child.try_wait().unwrap();
    if early.is_some() {
        let o = child.wait_with_output().unwrap();
        panic!("coreflect did not wait: {}", err_of(&o));
    }
    assert_eq!(status_field(t.pid, "TracerPid"), "0");
    drop(holder);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", err_of(&o));
    let j = Json(String::from_utf8(o.stdout).unwrap());
    assert!(!j.warnings().contains("lock"), "{}", j.0);
    t.assert_free();
    assert!(t.ping());
}

#[test]
fn shared_memory_read_live_is_reported() {
    let d = tmpdir("live-bytes");
    let mut t = Target::spawn(&["--heap-mib", "1", "--shared-kib", "256"]);
    let len = t.get("shm_len");
    let j = dump(t.pid, &d.join("r.core"), &["--mode", "reflect"]);
    assert_eq!(j.get("mode").as_deref(), Some("reflect"), "{}", j.0);
    assert!(j.num("live_bytes") >= len, "{}", j.0);
    // Suspend mode: the target was stopped throughout, nothing was live.
    let j = dump(t.pid, &d.join("s.core"), &["--mode", "suspend"]);
    assert_eq!(j.num("live_bytes"), 0, "{}", j.0);
    // The text summary says it too.
    let o = coreflect(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        d.join("t.core").to_str().unwrap(),
        "--mode",
        "reflect",
    ]);
    let err = err_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("read live, not frozen"), "{err}");
    t.assert_free();
    assert!(t.ping());
}
