//! A system-wide, per-target mutex, so that two coreflect processes (or two snapshots in one
//! process) never ptrace the same target at the same time: each would otherwise find some
//! threads already traced by the other and both would fail.
//!
//! The lock is a listening abstract Unix stream socket named
//! `coreflect/target/<pid>/<start time>`: no file to clean up, released by the kernel when
//! its holder exits, however it exits.
//!
//! Any local user can bind an abstract name, so a name that is taken is only honoured when
//! its holder could have dumped the target itself. A contender connects to the holder and
//! reads its credentials (`SO_PEERCRED`: the effective uid it had when it started
//! listening, as the kernel recorded it, mapped into our user namespace). The lock counts
//! when that uid is 0 (root, the usual coreflect) or equals the target's real, effective
//! and saved uids (the target's own user, whom ptrace lets attach). Anything else — another
//! user, a socket that is not listening, a datagram socket, a full backlog — is a squatter:
//! the lock is ignored, with a warning, and the dump goes on unlocked. Capabilities are not
//! consulted: a process in a user namespace of its own shows a full `CapEff` in /proc
//! without any power over the target.

use crate::error::{Error, Pid, Result};
use crate::warning::Warning;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::{Duration, Instant};

/// Holds the lock on one target; released when dropped.
#[derive(Debug)]
pub struct TargetLock {
    /// `None` when the name was squatted and the lock ignored.
    _listener: Option<UnixListener>,
    warning: Option<Warning>,
}

/// The lock's abstract socket name for a target.
pub fn lock_name(pid: Pid, start: u64) -> String {
    format!("coreflect/target/{pid}/{start}")
}

/// Who holds a taken lock name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A listening stream socket whose owner had these credentials.
    Peer { pid: Pid, uid: u32 },
    /// Nobody any more (released between our bind and our connect).
    Gone,
    /// Something that is not a coreflect lock: the errno of our connect.
    Foreign(i32),
}

/// Connects to the holder of `name` without ever blocking, and reads its credentials.
fn holder(name: &str) -> Holder {
    // SAFETY: plain socket creation; the result is checked and closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Holder::Foreign(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (i, b) in name.bytes().enumerate() {
        a.sun_path[i + 1] = b as libc::c_char; // sun_path[0] = 0: abstract namespace
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: `a` is a valid sockaddr_un of which `len` bytes are used; `fd` is ours.
    let r = unsafe { libc::connect(fd, &a as *const _ as *const libc::sockaddr, len as _) };
    let h = if r != 0 {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) => Holder::Gone,
            e => Holder::Foreign(e.unwrap_or(0)),
        }
    } else {
        // SAFETY: an all-zero ucred is a valid value.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut clen = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a writable ucred of `clen` bytes; `fd` is a connected socket.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut libc::c_void,
                &mut clen,
            )
        };
        if r == 0 {
            Holder::Peer {
                pid: cred.pid,
                uid: cred.uid,
            }
        } else {
            Holder::Foreign(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    h
}

/// The target's real, effective and saved uids.
fn target_uids(pid: Pid) -> Option<[u32; 3]> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let v: Vec<u32> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v.len() >= 3).then(|| [v[0], v[1], v[2]])
}

/// Whether a holder with effective uid `uid` could itself dump a target with these uids.
fn may_dump(uid: u32, target: Option<[u32; 3]>) -> bool {
    uid == 0 || target.is_some_and(|t| t.iter().all(|&u| u == uid))
}

impl TargetLock {
    /// Takes the lock on `pid` (started at `start`, in clock ticks since boot), waiting up
    /// to `wait` for another holder to finish. A holder that could not dump the target
    /// itself is not waited for: the lock is then not held, and [`TargetLock::warning`]
    /// says so.
    pub fn acquire(pid: Pid, start: u64, wait: Duration) -> Result<TargetLock> {
        let deadline = Instant::now() + wait;
        let name = lock_name(pid, start);
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| Error::io("naming the target lock", e))?;
        let mut checked: Option<Instant> = None;
        let mut gone = 0;
        let mut honoured = false;
        loop {
            match UnixListener::bind_addr(&addr) {
                Ok(l) => {
                    return Ok(TargetLock {
                        _listener: Some(l),
                        warning: None,
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
                Err(e) => return Err(Error::io("taking the target lock", e)),
            }
            // Taken: look at the holder now and then (each look queues one connection on
            // its socket until it exits, so rarely).
            if checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) || gone > 0 {
                checked = Some(Instant::now());
                let squatter = match holder(&name) {
                    Holder::Peer { uid, .. } if may_dump(uid, target_uids(pid)) => {
                        gone = 0;
                        honoured = true;
                        None
                    }
                    // The queue of a holder already found legitimate filled up with other
                    // contenders' looks: still that holder.
                    Holder::Foreign(libc::EAGAIN) if honoured => None,
                    Holder::Peer { pid: hp, uid } => Some(format!(
                        "held by pid {hp} running as uid {uid}, who could not dump pid {pid} itself"
                    )),
                    // Released between our bind and our connect: bind again. A name that
                    // stays bound without anyone listening is not a lock.
                    Holder::Gone | Holder::Foreign(libc::ECONNREFUSED) if gone < 5 => {
                        gone += 1;
                        None
                    }
                    Holder::Gone | Holder::Foreign(libc::ECONNREFUSED) => {
                        Some("bound by a socket that does not listen".to_string())
                    }
                    Holder::Foreign(libc::EPROTOTYPE) => {
                        Some("bound by a socket of another type".to_string())
                    }
                    Holder::Foreign(libc::EAGAIN) => {
                        Some("bound by a socket whose queue is full".to_string())
                    }
                    Holder::Foreign(e) => Some(format!(
                        "bound by a socket whose owner could not be checked ({})",
                        std::io::Error::from_raw_os_error(e)
                    )),
                };
                if let Some(why) = squatter {
                    return Ok(TargetLock {
                        _listener: None,
                        warning: Some(Warning::LockIgnored {
                            name: name.clone(),
                            holder: why,
                        }),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy {
                    pid,
                    waited_ms: wait.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Why the lock was not held, when its name was taken by someone who could not dump
    /// the target (it was ignored).
    pub fn warning(&self) -> Option<&Warning> {
        self.warning.as_ref()
    }

    /// True when the lock is really held (not ignored).
    #[cfg(test)]
    pub fn is_held(&self) -> bool {
        self._listener.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_hold_the_lock() {
        assert!(may_dump(0, Some([1000, 1000, 1000])));
        assert!(may_dump(1000, Some([1000, 1000, 1000])));
        assert!(!may_dump(65534, Some([0, 0, 0])));
        assert!(!may_dump(1000, Some([1000, 0, 1000])));
        assert!(!may_dump(1000, None));
    }

    #[test]
    fn a_held_lock_is_waited_for_and_a_free_one_taken() {
        let me = std::process::id() as Pid;
        let start = 0xC0FFEE;
        let a = TargetLock::acquire(me, start, Duration::from_secs(1)).unwrap();
        assert!(a.is_held() && a.warning().is_none());
        // We hold it as ourselves (root, or this process's own user): honoured.
        let e = TargetLock::acquire(me, start, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, Error::Busy { .. }), "{e}");
        drop(a);
        let b = TargetLock::acquire(me, start, Duration::from_secs(1)).unwrap();
        assert!(b.is_held());
    }

    #[test]
    fn a_socket_that_does_not_listen_is_not_a_lock() {
        let me = std::process::id() as Pid;
        // A datagram socket does not even share the stream sockets' names.
        let start = 0xBADC0DE;
        let addr = SocketAddr::from_abstract_name(lock_name(me, start).as_bytes()).unwrap();
        let _dgram = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        let l = TargetLock::acquire(me, start, Duration::from_secs(5)).unwrap();
        assert!(l.is_held() && l.warning().is_none());
        drop(l);
        // A bound stream socket that never listens: ignored, with a warning.
        // SAFETY: plain socket calls on a socket we own and close.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        let name = lock_name(me, start);
        // SAFETY: an all-zero sockaddr_un is valid.
        let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in name.bytes().enumerate() {
            a.sun_path[i + 1] = b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
        // SAFETY: `a` holds `len` valid bytes of address.
        let r = unsafe { libc::bind(fd, &a as *const _ as *const libc::sockaddr, len as _) };
        assert_eq!(r, 0);
        let l = TargetLock::acquire(me, start, Duration::from_secs(5)).unwrap();
        assert!(!l.is_held());
        assert!(
            l.warning().unwrap().to_string().contains("does not listen"),
            "{:?}",
            l.warning()
        );
        // SAFETY: ours, closed once.
        unsafe { libc::close(fd) };
    }
}
