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
use crate::error::{Error, InjectionFailure, Pid, Result};
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

/// Where a borrowed thread stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// As it was found: registers, signal mask and ptrace options its own.
    Held,
    /// Signal mask all blocked and our options set, registers untouched, still in the stop
    /// it was borrowed in.
    Armed,
    /// It ran (or was about to run) an injected syscall: it must be brought to an interrupt
    /// stop on its way to user mode before its registers are put back.
    Ran,
    /// It exited: nothing to put back.
    Gone,
}

/// A stopped thread borrowed to run injected syscalls: the one way coreflect makes a thread
/// execute a syscall on its behalf.
///
/// [`InjectedThread::borrow`] saves the thread's signal mask, blocks every signal and sets
/// the ptrace options for the injection. Each [`InjectedThread::syscall`] (or
/// [`InjectedThread::clone_with`]) points the thread at the borrowed `syscall` instruction,
/// runs it, brings the thread to an interrupt stop on its way back to user mode and puts its
/// registers, signal mask and ptrace options back there (see the module documentation);
/// signals that arrived meanwhile are queued again. Whatever is still changed is put back by
/// [`InjectedThread::restore`], or, ignoring errors, when the handle is dropped.
///
/// The handle never detaches a thread it did not seize itself: a thread of a full stop
/// ([`crate::stop::StoppedProcess`]) or the clone stays attached and stopped, for its owner
/// to release; one seized for the handle alone ([`InjectedThread::owned`]) is detached when
/// the handle is done.
#[derive(Debug)]
pub(crate) struct InjectedThread {
    tid: Pid,
    /// Seized for this handle alone (detached when done); `None`: held by the caller.
    owned: Option<Tracee>,
    /// Its registers when it was borrowed.
    saved: Regs,
    /// Its signal mask when it was borrowed.
    saved_mask: u64,
    /// The `syscall` instruction it executes.
    insn: u64,
    /// Extra ptrace options during each syscall.
    options: u32,
    /// The ptrace options it is left with (0, or `PTRACE_O_EXITKILL` for the clone).
    final_options: u32,
    /// How long a syscall may take to be entered (once inside, it is waited out).
    timeout: Duration,
    state: State,
    /// The syscall it ran last, for messages.
    last: &'static str,
    /// Signals that arrived for it during an injection, queued again once it is restored.
    requeue: Vec<i32>,
}

/// How long a thread may take to come back to an interrupt stop after an injected syscall.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

impl InjectedThread {
    /// Borrows thread `tid`, stopped by the caller (who stays its tracer and releases it)
    /// with registers `saved`, to run syscalls through the `syscall` instruction at `insn`,
    /// with extra ptrace `options` for the duration; each syscall must be entered within
    /// `timeout`. Its signal mask is read and every signal blocked.
    pub(crate) fn borrow(
        tid: Pid,
        saved: Regs,
        insn: u64,
        options: u32,
        timeout: Duration,
    ) -> Result<InjectedThread> {
        let saved_mask = ptrace::get_sigmask(tid)?;
        let mut t = InjectedThread {
            tid,
            owned: None,
            saved,
            saved_mask,
            insn,
            options,
            final_options: 0,
            timeout,
            state: State::Held,
            last: "syscall",
            requeue: Vec::new(),
        };
        t.arm()?;
        Ok(t)
    }

    /// As [`InjectedThread::borrow`], for a thread seized for this handle alone: it is
    /// detached when the handle is done (also when this fails).
    pub(crate) fn owned(
        tracee: Tracee,
        saved: Regs,
        insn: u64,
        options: u32,
        timeout: Duration,
    ) -> Result<InjectedThread> {
        match InjectedThread::borrow(tracee.tid, saved, insn, options, timeout) {
            Ok(mut t) => {
                t.owned = Some(tracee);
                Ok(t)
            }
            Err(e) => {
                let _ = stop::detach_tracee(&tracee);
                Err(e)
            }
        }
    }

    /// Leaves the thread with ptrace `options` once restored instead of none (the clone
    /// keeps `PTRACE_O_EXITKILL`).
    pub(crate) fn leaving_options(mut self, options: u32) -> InjectedThread {
        self.final_options = options;
        self
    }

    /// Runs syscall `nr(args)` on the thread; its return value (`-errno` on failure). The
    /// thread is restored afterwards.
    pub(crate) fn syscall(&mut self, nr: u64, args: [u64; 6]) -> Result<i64> {
        self.run(nr, args, &mut |_| Ok(()), &mut || Ok(()))
            .map(|r| r.ret)
    }

    /// Runs `clone(args)` on the thread. `on_child` runs at the clone event, while the
    /// thread is still inside the syscall (the caller should remember the child: it exists
    /// even if this then fails); `during` runs once while the thread executes the syscall
    /// (to overlap other work with the kernel's copy of the address space). The thread is
    /// restored afterwards.
    pub(crate) fn clone_with(
        &mut self,
        args: [u64; 6],
        on_child: &mut dyn FnMut(Pid) -> Result<()>,
        during: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Injected> {
        self.run(arch::SYS_CLONE, args, on_child, during)
    }

    /// Puts the thread back as it was borrowed (see [`InjectedThread`]) and, if the handle
    /// seized it, detaches it. A thread that exited is not an error here.
    pub(crate) fn restore(mut self) -> Result<()> {
        self.finish()
    }

    /// Blocks every signal and sets our ptrace options.
    fn arm(&mut self) -> Result<()> {
        ptrace::set_sigmask(self.tid, !0)?;
        self.state = State::Armed;
        ptrace::set_options(self.tid, ptrace::O_TRACESYSGOOD | self.options)
    }

    fn run(
        &mut self,
        nr: u64,
        args: [u64; 6],
        on_child: &mut dyn FnMut(Pid) -> Result<()>,
        during: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Injected> {
        match self.state {
            State::Gone => return Err(Error::ProcessExited { pid: self.tid }),
            State::Held => {
                if let Err(e) = self.arm() {
                    let _ = self.put_back();
                    return Err(e);
                }
            }
            State::Armed => {}
            // Not put back after an earlier syscall: do it now, before borrowing it again.
            State::Ran => {
                self.put_back()?;
                self.arm()?;
            }
        }
        let tid = self.tid;
        self.last = syscall_name(nr);
        let res = (|| {
            let r = self.saved.at_syscall(self.insn, nr, args);
            self.state = State::Ran;
            ptrace::set_regs(tid, &r)?;
            drive(tid, nr, self.timeout, on_child, during, &mut self.requeue)
        })();
        if matches!(res, Err(Error::ProcessExited { .. })) {
            self.state = State::Gone;
            self.requeue.clear();
            return res;
        }
        // Bring it to an interrupt stop before user mode and put everything back there.
        let restored = self.put_back();
        let out = res?;
        restored?;
        Ok(out)
    }

    /// Undoes whatever the handle changed, then queues again the signals that arrived
    /// meanwhile (pending once the thread is released, with its own mask).
    fn put_back(&mut self) -> Result<()> {
        let tid = self.tid;
        let r = match self.state {
            State::Held | State::Gone => Ok(()),
            State::Armed => ptrace::set_sigmask(tid, self.saved_mask)
                .and_then(|()| ptrace::set_options(tid, self.final_options)),
            State::Ran => self.back_to_interrupt_stop().and_then(|()| {
                ptrace::set_regs(tid, &self.saved)?;
                ptrace::set_sigmask(tid, self.saved_mask)?;
                ptrace::set_options(tid, self.final_options)
            }),
        };
        match &r {
            Err(Error::ProcessExited { .. }) => self.state = State::Gone,
            // Tried once: a second attempt (at drop) would not fare better.
            _ if self.state != State::Gone => self.state = State::Held,
            _ => {}
        }
        for sig in self.requeue.drain(..) {
            // SAFETY: tkill takes no pointers; at worst it signals a thread that is gone (ESRCH).
            unsafe { libc::syscall(libc::SYS_tkill, tid, sig) };
        }
        r
    }

    /// Interrupts the thread and lets it run to the interrupt stop on its way back to user
    /// mode; signals it gets meanwhile are suppressed and remembered.
    fn back_to_interrupt_stop(&mut self) -> Result<()> {
        let tid = self.tid;
        ptrace::interrupt(tid)?;
        ptrace::cont(tid, 0)?;
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        loop {
            match ptrace::wait_until(tid, deadline)? {
                Some(WaitStatus::Stopped { event, .. }) if event == ptrace::EVENT_STOP => {
                    return Ok(())
                }
                Some(WaitStatus::Stopped { sig, event: 0 }) => {
                    self.requeue.push(sig);
                    ptrace::cont(tid, 0)?;
                }
                Some(WaitStatus::Exited(_) | WaitStatus::Signaled(_)) => {
                    return Err(Error::ProcessExited { pid: tid })
                }
                Some(_) => ptrace::cont(tid, 0)?,
                None => {
                    return Err(Error::Injection {
                        tid,
                        syscall: self.last,
                        kind: InjectionFailure::NotBack {
                            millis: RESTORE_TIMEOUT.as_millis() as u64,
                        },
                    })
                }
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        let r = self.put_back();
        let detached = match self.owned.take() {
            Some(t) => stop::detach_tracee(&t),
            None => Ok(()),
        };
        match r {
            Err(Error::ProcessExited { .. }) => Ok(()),
            r => r.and(detached),
        }
    }
}

impl Drop for InjectedThread {
    fn drop(&mut self) {
        let _ = self.finish();
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

/// True if `e` says the borrowed `syscall` instruction faulted (the signal was suppressed:
/// the thread never ran the syscall, and is restored unchanged).
pub fn is_fault(e: &Error) -> bool {
    matches!(
        e,
        Error::Injection {
            kind: InjectionFailure::Faulted { .. },
            ..
        }
    )
}

/// The name of syscall `nr`, for messages (the ones coreflect injects).
pub fn syscall_name(nr: u64) -> &'static str {
    match nr {
        3 => "close",
        9 => "mmap",
        11 => "munmap",
        18 => "pwrite64",
        28 => "madvise",
        41 => "socket",
        42 => "connect",
        47 => "recvmsg",
        56 => "clone",
        61 => "wait4",
        231 => "exit_group",
        278 => "vmsplice",
        436 => "close_range",
        _ => "syscall",
    }
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
    nr: u64,
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
        let st = ptrace::wait_until(tid, deadline)?.ok_or(Error::Injection {
            tid,
            syscall: syscall_name(nr),
            kind: InjectionFailure::NotEntered {
                millis: timeout.as_millis() as u64,
            },
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
                return Err(Error::Injection {
                    tid,
                    syscall: syscall_name(nr),
                    kind: InjectionFailure::Faulted { signal: sig },
                });
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
        let Some(tracee) = stop_one(pid, tid, timeout)? else {
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
        // Seized for this alone: detached when done, also on error.
        let mut thread = InjectedThread::owned(tracee, regs, insn, options, timeout)?;
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
        // Already put back after each wait4: only the detach is left, and it cannot fail
        // in a way that matters here.
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

/// Seizes and interrupts thread `tid` of `pid`; `None` if it vanished or is not eligible
/// to stop.
fn stop_one(pid: Pid, tid: Pid, timeout: Duration) -> Result<Option<Tracee>> {
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
            pid,
            tid,
            millis: timeout.as_millis() as u64,
            state: "?".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_errors_are_typed_and_name_the_thread_and_syscall() {
        let fault = Error::Injection {
            tid: 42,
            syscall: syscall_name(arch::SYS_CLONE),
            kind: InjectionFailure::Faulted {
                signal: libc::SIGSEGV,
            },
        };
        assert!(is_fault(&fault));
        let m = fault.to_string();
        assert!(m.contains("thread 42") && m.contains("clone"), "{m}");
        assert!(m.contains("signal 11"), "{m}");
        let slow = Error::Injection {
            tid: 7,
            syscall: syscall_name(arch::SYS_WAIT4),
            kind: InjectionFailure::NotEntered { millis: 2000 },
        };
        assert!(!is_fault(&slow));
        let m = slow.with_causes();
        assert!(m.contains("wait4") && m.contains("2000 ms"), "{m}");
        assert!(!is_fault(&Error::ProcessExited { pid: 7 }));
        assert_eq!(syscall_name(18), "pwrite64");
        assert_eq!(syscall_name(9999), "syscall");
    }

    /// A real `sleep` process, seized and interrupted by this thread.
    fn sleeper() -> (std::process::Child, Tracee, Regs) {
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as Pid;
        // Past its exec and asleep.
        let end = Instant::now() + Duration::from_secs(10);
        while !crate::proc::Stat::read(pid).is_ok_and(|s| s.state == 'S')
            || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n"
        {
            assert!(Instant::now() < end, "sleep did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let tracee = stop_one(pid, pid, Duration::from_secs(10))
            .unwrap()
            .expect("sleep stopped");
        let regs = ptrace::get_regs(pid).unwrap();
        (child, tracee, regs)
    }

    fn same(a: &Regs, b: &Regs) -> bool {
        let (a, b) = (&a.0, &b.0);
        (
            a.rip, a.rsp, a.rax, a.orig_rax, a.rdi, a.rsi, a.rdx, a.r10, a.eflags,
        ) == (
            b.rip, b.rsp, b.rax, b.orig_rax, b.rdi, b.rsi, b.rdx, b.r10, b.eflags,
        )
    }

    fn tracer_of(pid: Pid) -> Pid {
        crate::proc::Status::read(pid).unwrap().tracer_pid
    }

    fn end(mut child: std::process::Child) {
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A borrowed thread runs `getpid` through the vDSO's `syscall`, is put back exactly
    /// (registers, signal mask) and stays attached: the handle does not detach what it does
    /// not own.
    #[test]
    fn a_borrowed_thread_runs_a_syscall_and_is_put_back_attached() {
        let (child, tracee, regs) = sleeper();
        let pid = tracee.tid;
        let mem = ProcMem::open(pid).unwrap();
        let maps = crate::proc::maps::read_maps(pid).unwrap();
        let Some(insn) = find_syscall_in_vdso(&maps, &mem) else {
            // Without an executable vDSO, the instruction sleep is blocked behind.
            return end(child);
        };
        let mask = ptrace::get_sigmask(pid).unwrap();
        let mut t = InjectedThread::borrow(pid, regs, insn, 0, Duration::from_secs(10)).unwrap();
        assert_eq!(ptrace::get_sigmask(pid).unwrap() | (1 << 8) | (1 << 18), !0);
        assert_eq!(t.syscall(39, [0; 6]).unwrap(), pid as i64); // getpid
        assert_eq!(t.syscall(39, [0; 6]).unwrap(), pid as i64);
        t.restore().unwrap();
        assert!(same(&ptrace::get_regs(pid).unwrap(), &regs));
        assert_eq!(ptrace::get_sigmask(pid).unwrap(), mask);
        assert_ne!(tracer_of(pid), 0, "a borrowed thread was detached");
        stop::detach_tracee(&tracee).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            crate::proc::Stat::read(pid).unwrap().state,
            'S',
            "not asleep again"
        );
        end(child);
    }

    /// An instruction that cannot be executed: a typed fault, the thread put back unchanged,
    /// and detached when the handle owned it.
    #[test]
    fn a_faulting_instruction_is_a_typed_fault_and_the_thread_is_put_back() {
        let (child, tracee, regs) = sleeper();
        let pid = tracee.tid;
        let mask = ptrace::get_sigmask(pid).unwrap();
        // The stack is not executable.
        let insn = regs.0.rsp & !0xfff;
        let mut t = InjectedThread::owned(tracee, regs, insn, 0, Duration::from_secs(10)).unwrap();
        let e = t.syscall(39, [0; 6]).unwrap_err();
        assert!(is_fault(&e), "{e}");
        assert!(e.to_string().contains(&format!("thread {pid}")), "{e}");
        assert!(same(&ptrace::get_regs(pid).unwrap(), &regs));
        assert_eq!(ptrace::get_sigmask(pid).unwrap(), mask);
        drop(t);
        assert_eq!(
            tracer_of(pid),
            0,
            "an owned thread is detached when dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
        let st = crate::proc::Stat::read(pid).unwrap().state;
        assert_eq!(st, 'S', "the SIGSEGV reached it or it is not asleep again");
        end(child);
    }
}
