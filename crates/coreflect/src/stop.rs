//! Stopping every thread of a process with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, capturing
//! their state, and releasing them.
//!
//! [`StoppedProcess`] releases every thread it still holds when dropped, so an error, a
//! panic or an early return never leaves the target stopped.

use crate::arch::x86_64::Regs;
use crate::error::{Error, Pid, Result};
use crate::proc;
use crate::ptrace::{self, WaitStatus};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How a thread came to be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Our `PTRACE_INTERRUPT` stopped it (`PTRACE_EVENT_STOP` with SIGTRAP).
    Interrupt,
    /// It was in (or entered) a group stop, e.g. after SIGSTOP.
    GroupStop(i32),
    /// It stopped about to receive signal `.0`, which is re-delivered at release.
    Signal(i32),
}

/// One stopped thread.
#[derive(Debug, Clone)]
pub struct Tracee {
    /// Thread id.
    pub tid: Pid,
    /// How it stopped.
    pub kind: StopKind,
    /// The siginfo of the signal it stopped on, for [`StopKind::Signal`].
    pub siginfo: Option<[u8; 128]>,
}

/// The state of one thread, captured while stopped.
#[derive(Clone)]
pub struct ThreadState {
    /// Thread id.
    pub tid: Pid,
    /// General registers.
    pub regs: Regs,
    /// The `NT_PRFPREG` (fxsave, 512 bytes) area.
    pub fpregs: Vec<u8>,
    /// The `NT_X86_XSTATE` area, as long as the kernel returned it.
    pub xstate: Vec<u8>,
    /// Blocked signals (`PTRACE_GETSIGMASK` while stopped), the core's `pr_sighold`.
    pub sigmask: u64,
    /// How it stopped (signal to re-deliver, if any).
    pub kind: StopKind,
    /// siginfo of the signal it was stopped on, if any.
    pub siginfo: Option<[u8; 128]>,
}

impl std::fmt::Debug for ThreadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadState")
            .field("tid", &self.tid)
            .field("regs", &self.regs)
            .field("xstate_len", &self.xstate.len())
            .field("kind", &self.kind)
            .finish()
    }
}

/// The most re-scans of `/proc/PID/task` before giving up on a process that keeps creating
/// threads.
pub const MAX_SCAN_PASSES: usize = 30;

/// Every thread of a process, seized and stopped.
#[derive(Debug)]
pub struct StoppedProcess {
    pid: Pid,
    tracees: Vec<Tracee>,
    /// Threads seized but not (yet) seen stopped; released by detaching when they stop.
    unstopped: HashSet<Pid>,
    timeout: Duration,
    /// Threads in uninterruptible sleep (`vfork`) may stay seized but running: see
    /// [`StoppedProcess::stop_tolerating_blocked`].
    tolerate_blocked: bool,
}

impl StoppedProcess {
    /// Seizes and interrupts every thread of `pid`, starting with `first` (the thread list
    /// the caller read before the pause, so that no scan is spent inside it), re-scanning
    /// `/proc/PID/task` until no new thread appears, and waits (at most `timeout` in all)
    /// until each is stopped.
    pub fn stop(pid: Pid, first: Vec<Pid>, timeout: Duration) -> Result<StoppedProcess> {
        Self::stop_inner(pid, first, timeout, false)
    }

    /// As [`StoppedProcess::stop`], except that threads still in uninterruptible sleep
    /// (state `D`, e.g. in `vfork` until the child execs or exits) after a short grace are
    /// left seized and interrupted but not waited for. Such a thread cannot reach user mode
    /// without stopping first (the interrupt stays pending), so it cannot observe anything
    /// done while the others are stopped. They are detached once they stop, at release
    /// (waiting at most the stop timeout; later, only when this thread exits).
    pub fn stop_tolerating_blocked(
        pid: Pid,
        first: Vec<Pid>,
        timeout: Duration,
    ) -> Result<StoppedProcess> {
        Self::stop_inner(pid, first, timeout, true)
    }

    fn stop_inner(
        pid: Pid,
        first: Vec<Pid>,
        timeout: Duration,
        tolerate_blocked: bool,
    ) -> Result<StoppedProcess> {
        let deadline = Instant::now() + timeout;
        let mut sp = StoppedProcess {
            pid,
            tracees: Vec::new(),
            unstopped: HashSet::new(),
            timeout,
            tolerate_blocked,
        };
        let mut known: HashSet<Pid> = HashSet::new();
        let mut first = Some(first);
        for pass in 0.. {
            let tids = match first.take() {
                Some(t) => t,
                None => match proc::threads(pid) {
                    Ok(t) => t,
                    Err(Error::NoSuchProcess { .. }) => return Err(Error::ProcessExited { pid }),
                    Err(e) => return Err(e),
                },
            };
            let new: Vec<Pid> = tids.into_iter().filter(|t| known.insert(*t)).collect();
            if new.is_empty() {
                break;
            }
            if pass >= MAX_SCAN_PASSES {
                return Err(Error::ThreadsKeptAppearing {
                    pid,
                    scans: MAX_SCAN_PASSES,
                });
            }
            // Interrupt each thread right after seizing it, so the first ones are on their
            // way to their stop while the rest are being seized.
            let mut seized = Vec::with_capacity(new.len());
            for tid in new {
                match ptrace::seize(tid, 0) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    // The kernel also refuses (EPERM) a thread that is exiting.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) && exiting(pid, tid) => {
                        continue
                    }
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) =>
                    {
                        return Err(seize_refused(pid, tid))
                    }
                    Err(e) => return Err(e),
                }
                sp.unstopped.insert(tid);
                match ptrace::interrupt(tid) {
                    Ok(()) => seized.push(tid),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        seized.push(tid); // it is exiting: collect its exit
                    }
                    Err(e) => return Err(e),
                }
            }
            sp.collect_stops(seized, deadline)?;
        }
        if sp.tracees.is_empty() {
            return Err(Error::ProcessExited { pid });
        }
        // Main thread first, then by tid.
        sp.tracees.sort_by_key(|t| (t.tid != pid, t.tid));
        Ok(sp)
    }

    /// Collects the stops of `pending` threads, polling all of them in turn (a thread that
    /// takes long to stop never holds up the others), yielding then sleeping briefly between
    /// passes so that the interrupted threads get the CPU they need to reach their stop.
    fn collect_stops(&mut self, mut pending: Vec<Pid>, deadline: Instant) -> Result<()> {
        let mut pass = 0u32;
        let grace = Instant::now() + Duration::from_millis(10);
        while !pending.is_empty() {
            let mut err = None;
            pending.retain(|&tid| {
                if err.is_some() {
                    return true;
                }
                match self.poll_stop(tid) {
                    Ok(done) => !done,
                    Err(e) => {
                        err = Some(e);
                        true
                    }
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            if pending.is_empty() {
                break;
            }
            if self.tolerate_blocked
                && Instant::now() >= grace
                && pending.iter().all(|&tid| {
                    proc::Status::read_thread(self.pid, tid).is_ok_and(|s| s.state == 'D')
                })
            {
                return Ok(()); // they stay in `unstopped`
            }
            if Instant::now() >= deadline {
                let tid = pending[0];
                let state = proc::Status::read_thread(self.pid, tid)
                    .map(|s| s.state.to_string())
                    .unwrap_or_else(|_| "?".into());
                return Err(Error::StopTimeout {
                    pid: self.pid,
                    tid,
                    millis: self.timeout.as_millis() as u64,
                    state,
                });
            }
            pass += 1;
            if pass < 8 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(if pass < 100 { 20 } else { 500 }));
            }
        }
        Ok(())
    }

    /// Checks one seized thread: `Ok(true)` once it is stopped (recorded) or gone.
    fn poll_stop(&mut self, tid: Pid) -> Result<bool> {
        let Some(st) = ptrace::try_wait(tid)? else {
            return Ok(false);
        };
        let kind = match st {
            WaitStatus::Stopped { sig, event } if event == ptrace::EVENT_STOP => {
                if sig == libc::SIGTRAP {
                    StopKind::Interrupt
                } else {
                    StopKind::GroupStop(sig)
                }
            }
            WaitStatus::Stopped { sig, event: 0 } => StopKind::Signal(sig),
            WaitStatus::Stopped { .. } | WaitStatus::SyscallStop => {
                // Not expected without options; resume it towards the interrupt stop.
                ptrace::cont(tid, 0)?;
                return Ok(false);
            }
            WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                self.unstopped.remove(&tid);
                return Ok(true);
            }
        };
        let siginfo = match kind {
            StopKind::Signal(_) => ptrace::get_siginfo(tid).ok(),
            _ => None,
        };
        self.unstopped.remove(&tid);
        self.tracees.push(Tracee { tid, kind, siginfo });
        Ok(true)
    }

    /// Wraps threads that the calling thread already traces and holds stopped (for a
    /// tracer that stays attached, such as `coreflect watch --signal`), so the snapshot code
    /// can use them. Get them back with [`StoppedProcess::into_tracees`]: dropping the
    /// result instead detaches them, like any `StoppedProcess`.
    pub fn from_seized(pid: Pid, mut tracees: Vec<Tracee>, timeout: Duration) -> StoppedProcess {
        tracees.sort_by_key(|t| (t.tid != pid, t.tid));
        StoppedProcess {
            pid,
            tracees,
            unstopped: HashSet::new(),
            timeout,
            tolerate_blocked: false,
        }
    }

    /// Gives the stopped threads back to the caller without releasing them (the inverse
    /// of [`StoppedProcess::from_seized`]).
    pub fn into_tracees(mut self) -> Vec<Tracee> {
        self.unstopped.clear();
        std::mem::take(&mut self.tracees)
    }

    /// The target's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The stopped threads, main thread first.
    pub fn tracees(&self) -> &[Tracee] {
        &self.tracees
    }

    /// Captures registers and FP/XSTATE of every stopped thread (two ptrace requests each;
    /// signal masks are read from /proc after the pause). `xbuf` is a
    /// scratch buffer at least as large as the CPU's XSAVE area.
    pub fn capture(&self, xbuf: &mut [u8]) -> Result<Vec<ThreadState>> {
        self.tracees
            .iter()
            .map(|t| capture_thread(t, xbuf))
            .collect()
    }

    /// The stopped thread `tid`, if held.
    pub fn tracee(&self, tid: Pid) -> Option<&Tracee> {
        self.tracees.iter().find(|t| t.tid == tid)
    }

    /// Forgets a thread without detaching it (the caller took it over).
    pub fn forget(&mut self, tid: Pid) -> Option<Tracee> {
        let i = self.tracees.iter().position(|t| t.tid == tid)?;
        Some(self.tracees.remove(i))
    }

    /// Takes a thread back (after [`StoppedProcess::forget`]), still stopped.
    pub fn adopt(&mut self, t: Tracee) {
        self.tracees.push(t);
        let pid = self.pid;
        self.tracees.sort_by_key(|t| (t.tid != pid, t.tid));
    }

    /// Releases every stopped thread (not the seized threads that never stopped: see
    /// [`StoppedProcess::release_all`]).
    pub fn release_stopped(&mut self) {
        for t in std::mem::take(&mut self.tracees) {
            let _ = detach_tracee(&t);
        }
    }

    /// Releases every thread still held. Errors (a thread that died) are ignored.
    pub fn release_all(&mut self) {
        self.release_stopped();
        // Threads seized but never seen stopped: wait briefly for their stop (tolerated
        // blocked threads: up to the stop timeout), then detach.
        let wait = if self.tolerate_blocked {
            self.timeout
        } else {
            Duration::from_millis(200)
        };
        let deadline = Instant::now() + wait;
        for tid in std::mem::take(&mut self.unstopped) {
            if let Ok(Some(WaitStatus::Stopped { sig, event })) = ptrace::wait_until(tid, deadline)
            {
                let redeliver = if event == 0 { sig } else { 0 };
                let _ = ptrace::detach(tid, redeliver);
            }
        }
    }
}

/// Captures registers and FP/XSTATE of one stopped thread.
pub fn capture_thread(t: &Tracee, xbuf: &mut [u8]) -> Result<ThreadState> {
    let regs = ptrace::get_regs(t.tid)?;
    let n = ptrace::get_regset(t.tid, ptrace::NT_X86_XSTATE, xbuf)?;
    let xstate = xbuf[..n].to_vec();
    // The fxsave area is the first 512 bytes of the XSAVE area; ask the kernel only when
    // XSTATE is not available.
    let fpregs = if n >= 512 {
        let mut f = xstate[..512].to_vec();
        f[464..].fill(0); // software-reserved bytes belong to XSTATE only
        f
    } else {
        let mut f = vec![0u8; 512];
        let m = ptrace::get_regset(t.tid, ptrace::NT_PRFPREG, &mut f)?;
        f.truncate(m);
        f
    };
    Ok(ThreadState {
        tid: t.tid,
        regs,
        fpregs,
        xstate,
        sigmask: ptrace::get_sigmask(t.tid)?,
        kind: t.kind,
        siginfo: t.siginfo,
    })
}

/// Detaches a tracee, re-delivering the signal it was stopped on.
pub fn detach_tracee(t: &Tracee) -> Result<()> {
    let sig = match t.kind {
        StopKind::Signal(s) => s,
        _ => 0,
    };
    match ptrace::detach(t.tid, sig) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r,
    }
}

impl Drop for StoppedProcess {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// True if thread `tid` of `pid` is gone or exiting (a zombie or dead thread).
fn exiting(pid: Pid, tid: Pid) -> bool {
    match proc::Status::read_thread(pid, tid) {
        Ok(s) => matches!(s.state, 'Z' | 'X' | 'x'),
        Err(_) => true,
    }
}

/// The error for a refused `PTRACE_SEIZE`: already traced, or not permitted.
pub fn seize_refused(pid: Pid, tid: Pid) -> Error {
    let tracer = proc::Status::read_thread(pid, tid)
        .map(|s| s.tracer_pid)
        .unwrap_or(0);
    if tracer != 0 {
        Error::AlreadyTraced {
            pid,
            tracer,
            tracer_comm: proc::Stat::read(tracer).map(|s| s.comm).unwrap_or_default(),
        }
    } else {
        Error::PermissionDenied {
            pid,
            what: "ptrace",
            hint: ptrace::permission_hint(pid),
        }
    }
}
