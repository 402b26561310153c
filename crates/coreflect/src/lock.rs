//! A system-wide, per-target mutex, so that two coreflect processes (or two snapshots in one
//! process) never ptrace the same target at the same time: each would otherwise find some
//! threads already traced by the other and both would fail.
//!
//! The lock is an abstract Unix socket named after the target's pid and start time: no file
//! to clean up, released by the kernel when its holder exits, however it exits.

use crate::error::{Error, Pid, Result};
use std::time::{Duration, Instant};

/// Holds the lock on one target; released when dropped.
#[derive(Debug)]
pub struct TargetLock {
    fd: libc::c_int,
}

fn addr(pid: Pid, start: u64) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: `sockaddr_un` is an integer and a byte array: all-zero bytes are a valid value (and
    // the abstract-namespace marker, sun_path[0] = 0).
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("coreflect/target/{pid}/{start}");
    for (i, b) in name.bytes().enumerate() {
        a.sun_path[i + 1] = b as libc::c_char; // sun_path[0] = 0: abstract namespace
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (a, len as libc::socklen_t)
}

impl TargetLock {
    /// Takes the lock on `pid` (started at `start`, in clock ticks since boot), waiting up
    /// to `wait` for another holder to finish.
    pub fn acquire(pid: Pid, start: u64, wait: Duration) -> Result<TargetLock> {
        let deadline = Instant::now() + wait;
        // SAFETY: socket() takes no pointers; the returned descriptor is owned by this function
        // until stored in the `TargetLock` (or closed below).
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::io(
                "creating the target lock",
                std::io::Error::last_os_error(),
            ));
        }
        let (a, len) = addr(pid, start);
        loop {
            // SAFETY: bind reads `len` bytes at `&a`: `a` is a live `sockaddr_un` and `len` is at
            // most its size (family + NUL + a name that fits `sun_path`, or the indexing above
            // panics).
            if unsafe { libc::bind(fd, &a as *const _ as *const libc::sockaddr, len) } == 0 {
                return Ok(TargetLock { fd });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EADDRINUSE) {
                // SAFETY: `fd` is ours, open, and not stored anywhere: closed exactly once.
                unsafe { libc::close(fd) };
                return Err(Error::io("taking the target lock", e));
            }
            if Instant::now() >= deadline {
                // SAFETY: `fd` is ours, open, and not stored anywhere: closed exactly once.
                unsafe { libc::close(fd) };
                return Err(Error::Busy {
                    pid,
                    waited_ms: wait.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // SAFETY: `self.fd` is the socket this lock owns; nothing else closes it, and drop runs
        // once.
        unsafe { libc::close(self.fd) };
    }
}
