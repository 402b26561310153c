//! Thin, typed wrappers over the ptrace requests coreflect uses, and waiting with a deadline.
//!
//! ptrace binds a tracee to the *thread* that attached it: every request on a tracee must
//! come from that same OS thread.

use crate::arch::x86_64::Regs;
use crate::error::{Error, Pid, Result};
use std::io;
use std::time::{Duration, Instant};

/// `PTRACE_O_TRACESYSGOOD`.
pub const O_TRACESYSGOOD: u32 = libc::PTRACE_O_TRACESYSGOOD as u32;
/// `PTRACE_O_TRACECLONE`.
pub const O_TRACECLONE: u32 = libc::PTRACE_O_TRACECLONE as u32;
/// `PTRACE_O_EXITKILL`.
pub const O_EXITKILL: u32 = libc::PTRACE_O_EXITKILL as u32;
/// `PTRACE_O_SUSPEND_SECCOMP`.
pub const O_SUSPEND_SECCOMP: u32 = libc::PTRACE_O_SUSPEND_SECCOMP as u32;
/// `PTRACE_EVENT_CLONE`.
pub const EVENT_CLONE: i32 = libc::PTRACE_EVENT_CLONE;
/// `PTRACE_EVENT_FORK`.
pub const EVENT_FORK: i32 = libc::PTRACE_EVENT_FORK;
/// `PTRACE_EVENT_STOP`.
pub const EVENT_STOP: i32 = libc::PTRACE_EVENT_STOP;
/// `NT_PRFPREG` regset (fxsave area).
pub const NT_PRFPREG: u32 = 2;
/// `NT_X86_XSTATE` regset (full xsave area).
pub const NT_X86_XSTATE: u32 = 0x202;

fn req(op: &'static str, tid: Pid, r: libc::c_long) -> Result<libc::c_long> {
    if r == -1 {
        Err(Error::Ptrace {
            op,
            tid,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

/// # Safety
/// `addr` and `data` must be what `request` expects of them: when the request reads or
/// writes through one, it must point to live memory of the size the kernel uses for it.
unsafe fn raw(request: libc::c_uint, tid: Pid, addr: usize, data: usize) -> libc::c_long {
    libc::ptrace(
        request,
        tid,
        addr as *mut libc::c_void,
        data as *mut libc::c_void,
    )
}

/// `PTRACE_SEIZE` with options.
pub fn seize(tid: Pid, options: u32) -> Result<()> {
    // SAFETY: SEIZE takes no pointer: `addr` is 0 and `data` the option bits, so the kernel reads
    // or writes none of our memory.
    req("SEIZE", tid, unsafe {
        raw(libc::PTRACE_SEIZE, tid, 0, options as usize)
    })
    .map(drop)
}

/// `PTRACE_INTERRUPT`.
pub fn interrupt(tid: Pid) -> Result<()> {
    // SAFETY: INTERRUPT takes no pointer (addr and data are 0).
    req("INTERRUPT", tid, unsafe {
        raw(libc::PTRACE_INTERRUPT, tid, 0, 0)
    })
    .map(drop)
}

/// `PTRACE_DETACH`, delivering `sig` (0 for none).
pub fn detach(tid: Pid, sig: i32) -> Result<()> {
    // SAFETY: DETACH takes no pointer: `data` is a signal number.
    req("DETACH", tid, unsafe {
        raw(libc::PTRACE_DETACH, tid, 0, sig as usize)
    })
    .map(drop)
}

/// `PTRACE_CONT`, delivering `sig` (0 for none).
pub fn cont(tid: Pid, sig: i32) -> Result<()> {
    // SAFETY: CONT takes no pointer: `data` is a signal number.
    req("CONT", tid, unsafe {
        raw(libc::PTRACE_CONT, tid, 0, sig as usize)
    })
    .map(drop)
}

/// `PTRACE_SYSCALL`: resume until the next syscall entry or exit.
pub fn syscall(tid: Pid) -> Result<()> {
    // SAFETY: SYSCALL takes no pointer (addr and data are 0).
    req("SYSCALL", tid, unsafe {
        raw(libc::PTRACE_SYSCALL, tid, 0, 0)
    })
    .map(drop)
}

/// `PTRACE_SETOPTIONS`.
pub fn set_options(tid: Pid, options: u32) -> Result<()> {
    // SAFETY: SETOPTIONS takes no pointer: `data` is the option bits.
    req("SETOPTIONS", tid, unsafe {
        raw(libc::PTRACE_SETOPTIONS, tid, 0, options as usize)
    })
    .map(drop)
}

/// `PTRACE_GETEVENTMSG`.
pub fn event_msg(tid: Pid) -> Result<u64> {
    let mut v: libc::c_ulong = 0;
    // SAFETY: GETEVENTMSG writes one `unsigned long` to `data`, which points to `v`, a live local
    // `c_ulong`.
    req("GETEVENTMSG", tid, unsafe {
        raw(libc::PTRACE_GETEVENTMSG, tid, 0, &mut v as *mut _ as usize)
    })?;
    Ok(v as u64)
}

/// `PTRACE_GETREGS`.
pub fn get_regs(tid: Pid) -> Result<Regs> {
    // SAFETY: `user_regs_struct` is plain integers: all-zero bytes are a valid value.
    let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: GETREGS writes exactly one `user_regs_struct` to `data`, which points to `r`, a live
    // local of that type.
    req("GETREGS", tid, unsafe {
        raw(libc::PTRACE_GETREGS, tid, 0, &mut r as *mut _ as usize)
    })?;
    Ok(Regs(r))
}

/// `PTRACE_SETREGS`.
pub fn set_regs(tid: Pid, regs: &Regs) -> Result<()> {
    // SAFETY: SETREGS only reads one `user_regs_struct` from `data`, which points to `regs.0`,
    // borrowed for the call.
    req("SETREGS", tid, unsafe {
        raw(libc::PTRACE_SETREGS, tid, 0, &regs.0 as *const _ as usize)
    })
    .map(drop)
}

/// `PTRACE_GETREGSET` of type `nt` into `buf`; returns the length the kernel filled.
pub fn get_regset(tid: Pid, nt: u32, buf: &mut [u8]) -> Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: GETREGSET writes at most `iov.iov_len` bytes to `iov.iov_base`, which is `buf`
    // (mutably borrowed, exactly that long), and updates `iov`, a live local.
    req("GETREGSET", tid, unsafe {
        raw(
            libc::PTRACE_GETREGSET,
            tid,
            nt as usize,
            &mut iov as *mut _ as usize,
        )
    })?;
    Ok(iov.iov_len)
}

/// `PTRACE_GETSIGMASK`.
pub fn get_sigmask(tid: Pid) -> Result<u64> {
    let mut m: u64 = 0;
    // SAFETY: GETSIGMASK writes `addr` = 8 bytes (the kernel's sigset_t) to `data`, which points to
    // `m`, a live local u64.
    req("GETSIGMASK", tid, unsafe {
        raw(libc::PTRACE_GETSIGMASK, tid, 8, &mut m as *mut _ as usize)
    })?;
    Ok(m)
}

/// `PTRACE_SETSIGMASK`.
pub fn set_sigmask(tid: Pid, mask: u64) -> Result<()> {
    // SAFETY: SETSIGMASK reads `addr` = 8 bytes from `data`, which points to `mask`, a u64 on our
    // stack.
    req("SETSIGMASK", tid, unsafe {
        raw(libc::PTRACE_SETSIGMASK, tid, 8, &mask as *const _ as usize)
    })
    .map(drop)
}

/// `PTRACE_GETSIGINFO` as the raw 128-byte `siginfo_t`.
pub fn get_siginfo(tid: Pid) -> Result<[u8; 128]> {
    let mut si = [0u8; 128];
    // SAFETY: GETSIGINFO writes one kernel `siginfo_t` (128 bytes, no alignment needed by
    // copy_to_user) to `data`, which points to `si`, a live 128-byte array.
    req("GETSIGINFO", tid, unsafe {
        raw(libc::PTRACE_GETSIGINFO, tid, 0, si.as_mut_ptr() as usize)
    })?;
    Ok(si)
}

/// What `waitpid` reported for one tracee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Stopped. `sig` is the stop signal, `event` the ptrace event (0 for none).
    Stopped {
        /// `WSTOPSIG`.
        sig: i32,
        /// `status >> 16`.
        event: i32,
    },
    /// Stopped at a syscall entry or exit (with `PTRACE_O_TRACESYSGOOD`).
    SyscallStop,
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

impl WaitStatus {
    pub(crate) fn decode(status: i32) -> WaitStatus {
        if libc::WIFEXITED(status) {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            let sig = libc::WSTOPSIG(status);
            if sig == libc::SIGTRAP | 0x80 {
                WaitStatus::SyscallStop
            } else {
                WaitStatus::Stopped {
                    sig,
                    event: (status >> 16) & 0xff,
                }
            }
        }
    }

    /// True if the task is gone.
    pub fn is_gone(&self) -> bool {
        matches!(self, WaitStatus::Exited(_) | WaitStatus::Signaled(_))
    }
}

/// Non-blocking wait for one tracee: `Ok(None)` if it has nothing to report yet.
pub fn try_wait(tid: Pid) -> Result<Option<WaitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int through its pointer, which points to `status`, a live
        // local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == 0 {
            return Ok(None);
        }
        if r == tid {
            return Ok(Some(WaitStatus::decode(status)));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(Error::Ptrace {
            op: "waitpid",
            tid,
            source: e,
        });
    }
}

/// Waits for one tracee until `deadline`: `Ok(None)` on timeout.
///
/// Polls with `WNOHANG`: it spins (yielding) for the first ~200 µs, where almost every ptrace
/// stop lands, then sleeps in growing steps up to 1 ms.
pub fn wait_until(tid: Pid, deadline: Instant) -> Result<Option<WaitStatus>> {
    let start = Instant::now();
    let mut nap = Duration::from_micros(20);
    loop {
        if let Some(s) = try_wait(tid)? {
            return Ok(Some(s));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now - start < Duration::from_micros(200) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

/// The advice given when ptrace or /proc access to `pid` is refused: which setting blocks
/// it and the options (see [`crate::access::diagnose`]).
pub fn permission_hint(pid: Pid) -> String {
    crate::access::diagnose(pid)
}
