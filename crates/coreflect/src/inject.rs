//! Making a stopped target thread execute one syscall on our behalf, and putting it back
//! exactly as it was.
//!
//! No code bytes are written: the thread is pointed at an existing `syscall` instruction
//! (borrowed from the `[vdso]`, or the one a thread is blocked behind). Its signal mask is
//! set to "all blocked" for the duration so no handler can run on the borrowed context.
//! Afterwards the thread is brought to an interrupt stop on its way back to user mode and its
//! registers and mask are put back there unchanged, so the kernel itself decides, as for any
//! other thread, whether the syscall it had been interrupted in restarts (the program never
//! sees `-ERESTART*` codes or a sleep restarted from zero) or returns EINTR to a handler.

use crate::arch::x86_64::{self as arch, Regs};
use crate::error::{Error, Pid, Result};
use crate::proc::{Mapping, MappingKind, ProcMem};
use crate::ptrace::{self, WaitStatus};
use crate::stop::{self, StopKind, ThreadState, Tracee};
use std::time::{Duration, Instant};

/// Finds a `syscall` instruction (`0f 05`) in the target's `[vdso]`. `None` when there is
/// no vDSO, or it is not executable (`mprotect`ed: /proc/PID/mem would still read it, but
/// the borrowed instruction would fault).
pub fn find_syscall_in_vdso(maps: &[Mapping], mem: &ProcMem) -> Option<u64> {
    let vdso = maps
        .iter()
        .find(|m| m.kind() == MappingKind::Vdso && m.exec)?;
    let mut buf = vec![0u8; vdso.len() as usize];
    let n = mem.read_at(vdso.start, &mut buf).ok()?;
    buf[..n]
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| vdso.start + i as u64)
}

/// Finds a thread blocked right behind a `syscall` instruction and returns that address.
pub fn find_syscall_behind(threads: &[ThreadState], mem: &ProcMem) -> Option<u64> {
    let regs: Vec<Regs> = threads.iter().map(|t| t.regs).collect();
    find_syscall_behind_regs(&regs, mem)
}

/// As [`find_syscall_behind`], from the threads' registers.
pub fn find_syscall_behind_regs(regs: &[Regs], mem: &ProcMem) -> Option<u64> {
    regs.iter().find_map(|r| {
        r.syscall_nr()?;
        let at = r.0.rip.checked_sub(2)?;
        let mut b = [0u8; 2];
        (mem.read_at(at, &mut b).ok()? == 2 && b == [0x0f, 0x05]).then_some(at)
    })
}

/// True if a stopped thread may be borrowed for an injected syscall: interrupted by us (not
/// delivering a signal, not in a group stop), and either in user mode or in a restartable
/// syscall that does not swap its signal mask.
pub fn eligible(kind: StopKind, regs: &Regs) -> bool {
    if kind != StopKind::Interrupt {
        return false;
    }
    match regs.syscall_nr() {
        None => true,
        Some(nr) => !arch::MASK_SWAPPING_SYSCALLS.contains(&nr) && arch::restartable(regs),
    }
}

/// What an injected syscall did.
#[derive(Debug, Clone, Copy)]
pub struct Injected {
    /// The syscall's return value (`-errno` on failure).
    pub ret: i64,
    /// The child reported by `PTRACE_EVENT_CLONE`/`FORK`, if any.
    pub child: Option<Pid>,
}

/// Runs syscall `nr(args)` on stopped thread `tid` (saved state `saved`, `saved_mask`) using
/// the `syscall` instruction at `insn`, with extra ptrace `options` for the duration.
/// `on_child` runs at a clone/fork event, while the thread is still inside the syscall (the
/// caller should remember the child: it exists even if this function then fails);
/// `during` runs once while the thread executes the syscall (to overlap other work with a
/// long syscall such as `clone`).
///
/// Afterwards the thread is brought to an interrupt stop on its way back to user mode and
/// its registers, signal mask and options are put back there unchanged, as far as it still
/// exists: the kernel itself then decides, as for every other thread, whether the syscall
/// the thread had been interrupted in restarts or returns EINTR to a signal handler. Signals
/// that arrived for it meanwhile are queued again. The caller detaches it.
#[allow(clippy::too_many_arguments)]
pub fn inject_syscall(
    tid: Pid,
    saved: &Regs,
    saved_mask: u64,
    insn: u64,
    nr: u64,
    args: [u64; 6],
    options: u32,
    timeout: Duration,
    on_child: &mut dyn FnMut(Pid) -> Result<()>,
    during: &mut dyn FnMut() -> Result<()>,
) -> Result<Injected> {
    ptrace::set_sigmask(tid, !0)?;
    let mut requeue = Vec::new();
    let res = (|| {
        ptrace::set_options(tid, ptrace::O_TRACESYSGOOD | options)?;
        let mut r = *saved;
        r.0.rip = insn;
        r.0.rax = nr;
        r.0.orig_rax = u64::MAX;
        r.0.rdi = args[0];
        r.0.rsi = args[1];
        r.0.rdx = args[2];
        r.0.r10 = args[3];
        r.0.r8 = args[4];
        r.0.r9 = args[5];
        ptrace::set_regs(tid, &r)?;
        drive(tid, timeout, on_child, during, &mut requeue)
    })();
    if matches!(res, Err(Error::ProcessExited { .. })) {
        return res;
    }
    // Bring it to an interrupt stop before user mode and put everything back there.
    let restored = (|| {
        ptrace::interrupt(tid)?;
        ptrace::cont(tid, 0)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ptrace::wait_until(tid, deadline)? {
                Some(WaitStatus::Stopped { event, .. }) if event == ptrace::EVENT_STOP => break,
                Some(WaitStatus::Stopped { sig, event: 0 }) => {
                    requeue.push(sig);
                    ptrace::cont(tid, 0)?;
                }
                Some(WaitStatus::Exited(_) | WaitStatus::Signaled(_)) => {
                    return Err(Error::ProcessExited { pid: tid })
                }
                Some(_) => ptrace::cont(tid, 0)?,
                None => {
                    return Err(Error::io(
                        format!("bringing thread {tid} back after an injected syscall"),
                        std::io::Error::from(std::io::ErrorKind::TimedOut),
                    ))
                }
            }
        }
        ptrace::set_regs(tid, saved)?;
        ptrace::set_sigmask(tid, saved_mask)?;
        ptrace::set_options(tid, 0)
    })();
    for sig in requeue {
        // Pending again once the thread is released, with its own mask.
        // SAFETY: tkill takes no pointers; at worst it signals a thread that is gone (ESRCH).
        unsafe { libc::syscall(libc::SYS_tkill, tid, sig) };
    }
    let out = res?;
    restored?;
    Ok(out)
}

/// A stopped thread borrowed to run injected syscalls. Each [`InjectedThread::syscall`]
/// puts the thread's registers, signal mask and ptrace options back as they were (see
/// [`inject_syscall`]); dropping the handle detaches the thread, which runs on.
#[derive(Debug)]
pub(crate) struct InjectedThread {
    tracee: Tracee,
    /// Its registers when it was borrowed.
    saved: Regs,
    /// Its signal mask when it was borrowed.
    saved_mask: u64,
    /// The `syscall` instruction it executes.
    insn: u64,
    /// Extra ptrace options during each syscall.
    options: u32,
    /// How long each syscall may take.
    timeout: Duration,
}

impl InjectedThread {
    /// Borrows `tracee`, stopped with registers `saved`, to run syscalls through the
    /// `syscall` instruction at `insn`. On error (its signal mask unreadable) the thread is
    /// detached.
    pub(crate) fn new(
        tracee: Tracee,
        saved: Regs,
        insn: u64,
        options: u32,
        timeout: Duration,
    ) -> Result<InjectedThread> {
        let saved_mask = match ptrace::get_sigmask(tracee.tid) {
            Ok(m) => m,
            Err(e) => {
                let _ = stop::detach_tracee(&tracee);
                return Err(e);
            }
        };
        Ok(InjectedThread {
            tracee,
            saved,
            saved_mask,
            insn,
            options,
            timeout,
        })
    }

    /// Runs syscall `nr(args)` on the thread; its return value (`-errno` on failure).
    pub(crate) fn syscall(&mut self, nr: u64, args: [u64; 6]) -> Result<i64> {
        inject_syscall(
            self.tracee.tid,
            &self.saved,
            self.saved_mask,
            self.insn,
            nr,
            args,
            self.options,
            self.timeout,
            &mut |_| Ok(()),
            &mut || Ok(()),
        )
        .map(|r| r.ret)
    }
}

impl Drop for InjectedThread {
    fn drop(&mut self) {
        let _ = stop::detach_tracee(&self.tracee);
    }
}

/// Signals a thread gets for an instruction it executes: if the borrowed `syscall` raises
/// one, the injection failed.
const FAULTS: &[i32] = &[
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGSYS,
];

const FAULTED: &str = "the borrowed syscall instruction faulted";

/// True if `e` says the borrowed `syscall` instruction faulted (the signal was suppressed:
/// the thread never ran the syscall, and is restored unchanged).
pub fn is_fault(e: &Error) -> bool {
    matches!(e, Error::Io { what, .. } if what.starts_with(FAULTED))
}

/// A readable description of an injected syscall's unexpected return value: an errno's
/// name and text, or, for a value that is no error number, what it means.
pub fn describe_return(nr: u64, ret: i64) -> String {
    if (-4095..0).contains(&ret) {
        let e = std::io::Error::from_raw_os_error(-ret as i32);
        format!("returned -{} ({e})", -ret)
    } else if ret as u64 == nr {
        // The kernel leaves the syscall number in rax when the syscall is skipped before it
        // runs (a seccomp filter or a tracer skipped it).
        format!("did not run (returned {ret}, its own number: skipped, e.g. by a seccomp filter)")
    } else {
        format!("returned {ret}, which is neither a child's pid nor an error")
    }
}

fn drive(
    tid: Pid,
    timeout: Duration,
    on_child: &mut dyn FnMut(Pid) -> Result<()>,
    during: &mut dyn FnMut() -> Result<()>,
    requeue: &mut Vec<i32>,
) -> Result<Injected> {
    let mut child = None;
    let mut entered = false;
    let mut during_result = None;
    let mut child_result = Ok(());
    // Until the syscall is entered, `timeout` applies; once inside, it must be waited out
    // (giving up would leave the thread running borrowed registers with EXITKILL armed).
    let mut deadline = Instant::now() + timeout;
    ptrace::syscall(tid)?;
    loop {
        let st = ptrace::wait_until(tid, deadline)?.ok_or_else(|| {
            Error::io(
                format!("waiting for the injected syscall in thread {tid}"),
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            )
        })?;
        match st {
            WaitStatus::SyscallStop if !entered => {
                entered = true;
                deadline = Instant::now() + Duration::from_secs(24 * 3600);
            }
            WaitStatus::SyscallStop => break,
            WaitStatus::Stopped { event, .. }
                if event == ptrace::EVENT_CLONE || event == ptrace::EVENT_FORK =>
            {
                let pid = ptrace::event_msg(tid)? as Pid;
                child = Some(pid);
                child_result = on_child(pid);
            }
            WaitStatus::Stopped { sig, event: 0 } if !entered && FAULTS.contains(&sig) => {
                return Err(Error::io(
                    format!("{FAULTED} in thread {tid}"),
                    std::io::Error::other(format!("signal {sig}")),
                ));
            }
            WaitStatus::Stopped { sig, event: 0 } => requeue.push(sig),
            WaitStatus::Stopped { .. } => {}
            WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                return Err(Error::ProcessExited { pid: tid })
            }
        }
        ptrace::syscall(tid)?;
        if entered && during_result.is_none() {
            // The thread is now inside the syscall: overlap the caller's work with it.
            during_result = Some(during());
        }
    }
    let ret = ptrace::get_regs(tid)?.ret();
    during_result.unwrap_or(Ok(()))?;
    child_result?;
    Ok(Injected { ret, child })
}

/// `__WALL` for wait4.
const WALL: u64 = 0x4000_0000;

/// Reaps zombie children `zombies` of `pid` by making one of its threads call
/// `wait4(z, NULL, __WALL|WNOHANG, NULL)` for each. Only one thread is stopped at a time,
/// and only for a few ptrace round trips. Returns how many were reaped.
pub fn reap_in_target(
    pid: Pid,
    zombies: &[Pid],
    insn: u64,
    options: u32,
    timeout: Duration,
) -> Result<usize> {
    if zombies.is_empty() {
        return Ok(0);
    }
    for tid in crate::proc::threads(pid)? {
        let Some(tracee) = stop_one(tid, timeout)? else {
            continue;
        };
        let regs = match ptrace::get_regs(tid) {
            Ok(r) => r,
            Err(_) => {
                let _ = stop::detach_tracee(&tracee);
                continue;
            }
        };
        if !eligible(tracee.kind, &regs) || !may_inject(pid, tid, options) {
            let _ = stop::detach_tracee(&tracee);
            continue;
        }
        // Detached when dropped, also on error.
        let mut thread = InjectedThread::new(tracee, regs, insn, options, timeout)?;
        let mut reaped = 0;
        for &z in zombies {
            let ret = thread.syscall(
                arch::SYS_WAIT4,
                [z as u64, 0, WALL | libc::WNOHANG as u64, 0, 0, 0],
            )?;
            if ret == z as i64 {
                reaped += 1;
            }
        }
        drop(thread);
        return Ok(reaped);
    }
    Ok(0)
}

/// The `Seccomp:` mode of thread `tid` of `pid` (0 none, 1 strict, 2 filter); 2 if
/// unreadable (assume the worst).
pub fn thread_seccomp(pid: Pid, tid: Pid) -> u32 {
    crate::proc::Status::read_thread(pid, tid)
        .map(|s| s.seccomp)
        .unwrap_or(2)
}

/// True if a syscall may be injected into thread `tid`: it has no seccomp filter (seccomp
/// is per thread: a filter could kill the whole process for the injected syscall, as
/// `SECCOMP_RET_KILL_PROCESS` does), or the filter is suspended for the injection
/// (`options` holds `PTRACE_O_SUSPEND_SECCOMP`).
pub fn may_inject(pid: Pid, tid: Pid, options: u32) -> bool {
    options & ptrace::O_SUSPEND_SECCOMP != 0 || thread_seccomp(pid, tid) == 0
}

/// Seizes and interrupts one thread; `None` if it vanished or is not eligible to stop.
fn stop_one(tid: Pid, timeout: Duration) -> Result<Option<Tracee>> {
    match ptrace::seize(tid, 0) {
        Ok(()) => {}
        // Gone, exiting (EPERM), or traced by someone else: try another thread.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::EPERM)) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    if ptrace::interrupt(tid).is_err() {
        let _ = ptrace::detach(tid, 0);
        return Ok(None);
    }
    match ptrace::wait_until(tid, Instant::now() + timeout)? {
        Some(WaitStatus::Stopped { sig, event }) => {
            let kind = if event == ptrace::EVENT_STOP {
                if sig == libc::SIGTRAP {
                    StopKind::Interrupt
                } else {
                    StopKind::GroupStop(sig)
                }
            } else {
                StopKind::Signal(sig)
            };
            Ok(Some(Tracee {
                tid,
                kind,
                siginfo: None,
            }))
        }
        Some(_) => Ok(None),
        None => Err(Error::StopTimeout {
            pid: tid,
            tid,
            millis: timeout.as_millis() as u64,
            state: "?".into(),
        }),
    }
}
