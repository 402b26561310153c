//! Ending the clone without the target ever seeing it.
//!
//! The clone is the target's child. Its exit signal is 0, so no SIGCHLD is sent and plain
//! `wait`s skip it — but `waitpid(-1, …, __WALL)` (or `__WCLONE`) sees it as soon as it is
//! the target's zombie. While coreflect traces it, its zombie is held for the tracer: the
//! target's waits neither see nor reap it (a blocked `waitpid` keeps waiting, `WNOHANG`
//! returns 0). So:
//!
//! 1. SIGKILL the clone while the target runs, and wait for its exit *without collecting
//!    it* (`waitid(WNOWAIT)`): the expensive part — tearing down its address space — happens
//!    here, outside any pause.
//! 2. Stop every thread of the target (a thread in uninterruptible sleep, e.g. in `vfork`,
//!    is left seized and interrupted: it cannot reach user mode, let alone `wait`, without
//!    stopping first).
//! 3. Collect the clone as its tracer (now it is the target's zombie), and make one stopped
//!    thread — one without a seccomp filter, unless filters are suspended — run
//!    `wait4(clone, NULL, __WALL|WNOHANG)`.
//! 4. Release every thread. A thread that was blocked in `wait4` was interrupted by the stop
//!    and restarts its wait: the zombie is gone by then.
//!
//! The second stop costs a few ptrace round trips per thread; its length is reported as
//! [`crate::PauseBreakdown::reap_us`].

use crate::arch::x86_64::{self as arch, Regs};
use crate::error::{Error, Pid};
use crate::inject;
use crate::lock::TargetLock;
use crate::proc::{self, ProcMem};
use crate::ptrace;
use crate::stop::StoppedProcess;
use std::time::{Duration, Instant};

/// `__WALL` for wait4/waitid.
const WALL: i32 = 0x4000_0000;

/// What ending the clone did.
#[derive(Debug, Default)]
pub(crate) struct Reaped {
    /// Why the zombie may have been left (for the next dump to reap), if it was.
    pub warning: Option<crate::warning::Warning>,
    /// How long the target was stopped for the reap, in microseconds.
    pub reap_us: Option<u64>,
}

/// Waits until `clone` has exited, without collecting it. False if it had already been
/// collected (or never existed) or did not exit within `limit`.
fn wait_exit_nowait(clone: Pid, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes at most one into it.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on a pid we trace, with a valid siginfo pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                clone as libc::id_t,
                &mut si,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG | WALL,
            )
        };
        if r != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        // SAFETY: waitid filled in si (si_pid stays 0 when nothing has exited yet).
        if unsafe { si.si_pid() } == clone {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Collects the exited clone as its tracer: from here on it is the target's zombie.
fn collect(clone: Pid) {
    let mut st = 0;
    loop {
        // SAFETY: waitpid with a valid status pointer; the clone has exited, so it does not
        // block.
        let r = unsafe { libc::waitpid(clone, &mut st, WALL) };
        if r == clone
            || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return;
        }
    }
}

/// A `syscall` instruction to borrow, looked up before the stop: the vDSO's if executable,
/// else the one the clone used if it is still there in executable memory. `mm` is a live
/// thread's id (its /proc files describe the process's memory even when the main thread
/// has exited). Returns the memory handle it was read through, to check it again inside
/// the stop (after an `exec` that handle no longer reads the process).
fn candidate_insn(mm: Pid, known: u64) -> (Option<ProcMem>, Option<u64>) {
    let Ok(mem) = ProcMem::open(mm) else {
        return (None, None);
    };
    let Ok(maps) = proc::maps::read_maps(mm) else {
        return (Some(mem), None);
    };
    if let Some(i) = inject::find_syscall_in_vdso(&maps, &mem) {
        return (Some(mem), Some(i));
    }
    let executable = maps
        .iter()
        .any(|m| m.exec && m.start <= known && known + 2 <= m.end);
    (Some(mem), (known != 0 && executable).then_some(known))
}

/// Inside the stop: the candidate if it still holds `syscall`, else one a stopped thread is
/// blocked behind.
fn find_insn(pre: &(Option<ProcMem>, Option<u64>), mm: Pid, regs: &[Regs]) -> Option<u64> {
    let mut b = [0u8; 2];
    if let (Some(mem), Some(i)) = pre {
        if mem.read_at(*i, &mut b).ok() == Some(2) && b == [0x0f, 0x05] {
            return Some(*i);
        }
    }
    let fresh;
    let mem = match &pre.0 {
        Some(m) if pre.1.is_none() => m,
        _ => {
            fresh = ProcMem::open(mm).ok()?;
            &fresh
        }
    };
    inject::find_syscall_behind_regs(regs, mem)
}

/// Kills the clone and reaps its zombie inside the target while every thread of the target
/// is stopped (see the module documentation). `clone_ns` is the clone's pid in the
/// target's pid namespace; `insn` the instruction the clone syscall was borrowed from;
/// `options` extra ptrace options for the injection (`PTRACE_O_SUSPEND_SECCOMP`).
/// The least time the reap's stop gives running threads to stop.
const REAP_MIN_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the injected `wait4` may take to enter the kernel.
const REAP_INJECT_TIMEOUT: Duration = Duration::from_secs(2);

#[allow(clippy::too_many_arguments)]
pub(crate) fn kill_and_reap(
    target: Pid,
    target_start: u64,
    clone: Pid,
    clone_ns: Pid,
    insn: u64,
    options: u32,
    stop_timeout: Duration,
    hook: &dyn Fn(),
) -> Reaped {
    // SAFETY: kill(2) on the clone we created and trace.
    unsafe { libc::kill(clone, libc::SIGKILL) };
    if !wait_exit_nowait(clone, Duration::from_secs(30)) {
        // Not ours to collect any more (or stuck): make sure it is not left traced.
        collect(clone);
        return Reaped {
            warning: proc::Stat::read(target)
                .ok()
                .map(|_| crate::warning::Warning::CloneDidNotExit { clone, pid: target }),
            reap_us: None,
        };
    }
    hook();
    let left = |why: String| crate::warning::Warning::CloneZombieLeft {
        clone,
        pid: target,
        why,
    };
    let _lock = TargetLock::acquire(target, target_start, Duration::from_secs(10)).ok();
    let first = match proc::threads(target) {
        Ok(t) => t,
        Err(_) => {
            collect(clone);
            return Reaped::default(); // the target is gone, and its zombie with it
        }
    };
    let mm = proc::live_thread(target).unwrap_or(target);
    let pre = candidate_insn(mm, insn);
    let t0 = Instant::now();
    // Running threads stop within milliseconds; the caller's timeout (which may be 0) is
    // for the first pause. Blocked ones are tolerated (see the module documentation).
    let stop_timeout = stop_timeout.max(REAP_MIN_STOP_TIMEOUT);
    let mut stopped = match StoppedProcess::stop_tolerating_blocked(target, first, stop_timeout) {
        Ok(s) => s,
        Err(Error::ProcessExited { .. }) | Err(Error::NoSuchProcess { .. }) => {
            collect(clone);
            return Reaped::default();
        }
        Err(e) => {
            collect(clone);
            return Reaped {
                warning: Some(left(format!(
                    "could not stop it to reap unseen: {}",
                    e.with_causes()
                ))),
                reap_us: None,
            };
        }
    };
    // Everyone is stopped (as in the first pause): hold the CPU until they are released.
    let boost = crate::snapshot::PauseBoost::new();
    // Registers of the stopped threads: eligibility and a fallback instruction.
    let regs: Vec<(usize, Regs)> = stopped
        .tracees()
        .iter()
        .enumerate()
        .filter_map(|(i, t)| ptrace::get_regs(t.tid).ok().map(|r| (i, r)))
        .collect();
    let all_regs: Vec<Regs> = regs.iter().map(|(_, r)| *r).collect();
    let mm = stopped.tracees().first().map(|t| t.tid).unwrap_or(mm);
    let syscall_insn = find_insn(&pre, mm, &all_regs);
    let ok = |i: usize, r: &Regs| {
        let t = &stopped.tracees()[i];
        inject::eligible(t.kind, r) && inject::may_inject(target, t.tid, options)
    };
    let chosen = regs
        .iter()
        .find(|(i, r)| r.syscall_nr().is_none() && ok(*i, r))
        .or_else(|| regs.iter().find(|(i, r)| ok(*i, r)))
        .map(|(i, r)| (stopped.tracees()[*i].tid, *r));
    collect(clone);
    let warning = match (syscall_insn, chosen) {
        (None, _) => Some(left(
            "no syscall instruction to borrow: no executable [vdso], no thread blocked in a syscall".into(),
        )),
        (_, None) => Some(left(
            "no thread could run wait4: all are stopped by a signal, in mask-swapping syscalls, or under a seccomp filter".into(),
        )),
        (Some(insn), Some((tid, r))) => {
            // A thread of the stop: borrowed, put back, and released with the others.
            // Not the caller's stop timeout (it may be 0): once the thread runs the
            // borrowed instruction, the injection is waited out.
            let res = inject::InjectedThread::borrow(tid, r, insn, options, REAP_INJECT_TIMEOUT)
                .and_then(|mut thread| {
                    let ret = thread.syscall(
                        arch::SYS_WAIT4,
                        [
                            clone_ns as u64,
                            0,
                            (WALL | libc::WNOHANG) as u64,
                            0,
                            0,
                            0,
                        ],
                    )?;
                    thread.restore()?;
                    Ok(ret)
                });
            match res {
                Ok(ret) if ret == clone_ns as i64 => None,
                Ok(ret) => Some(left(format!(
                    "the injected wait4 {}",
                    inject::describe_return(arch::SYS_WAIT4, ret)
                ))),
                Err(Error::ProcessExited { .. }) | Err(Error::NoSuchProcess { .. }) => None,
                Err(e) => Some(left(format!("the injected wait4 failed: {}", e.with_causes()))),
            }
        }
    };
    stopped.release_stopped();
    let reap_us = t0.elapsed().as_micros() as u64;
    drop(boost);
    stopped.release_all();
    Reaped {
        warning,
        reap_us: Some(reap_us.max(1)),
    }
}
