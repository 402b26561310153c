//! The pause: every thread stopped and captured, one of them borrowed to run the injected
//! `clone()`, then everyone released — as short as the kernel's copy of the page tables.
//!
//! [`Snapshot::capture`] is its three stages: [`prepare`] (preflight, the target lock, the
//! memory map, whether and how to reflect, the estimate — nothing stopped yet),
//! [`pause_target`] ([`StoppedProcess::stop`], [`pick_thread`], [`reflect`]) and
//! [`release`] (the clone set up by [`super::clone::setup_clone`], the image's map read
//! from it).

use super::clone::{
    image_mappings, leftover_clones, setup_clone, CloneGuard, PhaseHookDebug, CLONE_FILES,
};
use super::preflight::{estimate_pause, preflight, reflect_blocker, Injectable};
use super::{Mode, Options, PauseBreakdown, Phase, Snapshot};
use crate::arch::x86_64::{self as arch};
use crate::error::{Error, Pid, Result};
use crate::inject;
use crate::lock::TargetLock;
use crate::proc::{self, mem::Pagemap, Mapping, ProcMem, ProcessInfo, ThreadTimes};
use crate::ptrace;
use crate::stop::{StoppedProcess, ThreadState};
use crate::warning::Warning;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` to `ts`, a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(super) fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Snapshot {
    /// Takes a snapshot of process `pid`.
    ///
    /// On error the target is released. One exception the kernel imposes: a thread that did
    /// not stop within `opts.stop_timeout` (uninterruptible sleep, `vfork`) cannot be
    /// detached while it runs; it stays seized, and stops when it leaves its wait, until this
    /// thread exits. A long-lived caller should retry later or exit.
    pub fn capture(pid: Pid, opts: &Options) -> Result<Snapshot> {
        let prepared = prepare(pid, opts)?;
        let (prepared, paused) = pause_target(pid, opts, prepared)?;
        release(pid, opts, prepared, paused)
    }
}

/// Before the pause: everything read and decided while the target still runs.
struct Prepared {
    process: ProcessInfo,
    lock: TargetLock,
    warnings: Vec<Warning>,
    /// The thread whose /proc files show the memory.
    mm: Pid,
    target_maps: Vec<Mapping>,
    target_mem: ProcMem,
    mode: Mode,
    inj: Injectable,
    vdso_insn: Option<u64>,
    xbuf: Vec<u8>,
    pause: PauseBreakdown,
}

/// After the pause: the target (still stopped in suspend mode), the clone if one was made,
/// every thread's state.
struct Paused {
    t0: Instant,
    stopped: StoppedProcess,
    clone: Option<CloneGuard>,
    threads: Vec<ThreadState>,
}

/// Prepare: preflight, the target lock, the memory map, whether and how to reflect
/// (leftover zombies reaped), the pause estimate against `max_pause`; nothing is stopped.
fn prepare(pid: Pid, opts: &Options) -> Result<Prepared> {
    let process = preflight(pid)?;
    // One coreflect at a time stops a given target; the lock is held until the target
    // is released (reflect) or the snapshot dropped (suspend).
    let lock = TargetLock::acquire(pid, process.stat.start_time, Duration::from_secs(10))?;
    let process = match proc::Status::read(pid)?.tracer_pid {
        0 => process,
        _ => preflight(pid)?,
    };
    let mut warnings: Vec<Warning> = lock.warning().cloned().into_iter().collect();
    // The thread whose /proc files show the memory (the main thread unless it exited).
    let mm = proc::live_thread(pid).ok_or(Error::ProcessExited { pid })?;
    let target_maps = proc::maps::read_smaps(mm)?;
    let target_mem = ProcMem::open(mm)?;
    let mut mode = opts.mode;
    let mut inj = Injectable::default();
    if mode != Mode::Suspend {
        match reflect_blocker(&process, &target_maps) {
            Ok(o) => inj = o,
            Err(reason) if mode == Mode::Reflect => {
                return Err(Error::ReflectUnavailable { pid, reason })
            }
            Err(reason) => {
                warnings.push(Warning::SuspendedInstead { reason });
                mode = Mode::Suspend;
            }
        }
    }
    let extra_opts = inj.options;
    let vdso_insn = if mode != Mode::Suspend {
        inject::find_syscall_in_vdso(&target_maps, &target_mem)
    } else {
        None
    };
    if let Some(insn) = vdso_insn {
        let z = leftover_clones(pid);
        if !z.is_empty() {
            match inject::reap_in_target(pid, &z, insn, extra_opts, opts.stop_timeout) {
                Ok(0) => {}
                Ok(count) => warnings.push(Warning::LeftoverClonesReaped { count }),
                Err(e) => warnings.push(Warning::LeftoverClonesNotReaped {
                    error: e.with_causes(),
                }),
            }
        }
    }
    let estimate = estimate_pause(&process.status, &target_maps, mode);
    if let Some(max) = opts.max_pause {
        if estimate > max {
            return Err(Error::PauseTooLong {
                pid,
                estimate_ms: estimate.as_secs_f64() * 1e3,
                limit_ms: max.as_secs_f64() * 1e3,
            });
        }
    }
    if opts.cancelled() {
        return Err(Error::Cancelled);
    }
    let xbuf = vec![0u8; arch::xstate_buffer_size()];
    let pause = PauseBreakdown {
        estimate_us: us(estimate),
        ..Default::default()
    };
    Ok(Prepared {
        process,
        lock,
        warnings,
        mm,
        target_maps,
        target_mem,
        mode,
        inj,
        vdso_insn,
        xbuf,
        pause,
    })
}

/// The pause: stop every thread, borrow one for the injected `clone()` (the others are
/// captured meanwhile) and release them all; in suspend mode (or when `Auto` falls back)
/// capture every thread and keep them stopped.
fn pause_target(pid: Pid, opts: &Options, p: Prepared) -> Result<(Prepared, Paused)> {
    let Prepared {
        process,
        lock,
        mut warnings,
        mm,
        target_maps,
        target_mem,
        mode,
        inj,
        vdso_insn,
        mut xbuf,
        mut pause,
    } = p;
    let extra_opts = inj.options;
    let first = proc::threads(pid)?;

    // ---- the pause begins ----
    let t0 = Instant::now();
    pause.started_ns = monotonic_ns();
    let mut stopped = StoppedProcess::stop(pid, first, opts.stop_timeout)?;
    pause.stop_us = us(t0.elapsed());
    // Everyone is stopped: from here on nothing of the target needs a CPU until it is
    // released, so the tracer may hold one.
    let boost = PauseBoost::new();
    opts.phase(Phase::Stopped);

    let mut clone = None;
    let mut threads = None;
    if mode != Mode::Suspend {
        let mut all = None;
        let insn = match vdso_insn {
            Some(i) => Some(i),
            None => {
                // No vDSO: borrow the instruction a blocked thread sits behind.
                let t = stopped.capture(&mut xbuf)?;
                let i = inject::find_syscall_behind(&t, &target_mem);
                all = Some(t);
                i
            }
        };
        // Never borrow a thread whose seccomp filter could kill the process for the
        // injected clone (unless filters are suspended); prefer threads without one.
        let unfiltered = |tid: Pid| !inj.filtered || inject::thread_seccomp(pid, tid) == 0;
        let chosen = match pick_thread(&stopped, &mut xbuf, &unfiltered)? {
            None if inj.options != 0 => pick_thread(&stopped, &mut xbuf, &|_| true)?,
            c => c,
        };
        let attempt = match (insn, chosen) {
            (None, _) => Err(Error::ReflectUnavailable {
                pid,
                reason: "no syscall instruction to borrow (no [vdso], no thread blocked in a syscall)".into(),
            }),
            (_, None) => Err(Error::ReflectUnavailable {
                pid,
                reason: "no thread can safely run the injected clone (all are delivering signals, group-stopped, in mask-swapping syscalls, or under a seccomp filter)".into(),
            }),
            (Some(insn), Some(t)) => {
                // The address was found before the pause: make sure it still holds a
                // `syscall` (an exec since then would have replaced the address space,
                // and the descriptor opened before no longer reads it).
                let mut b = [0u8; 2];
                match target_mem.read_at(insn, &mut b) {
                    Ok(2) if b == [0x0f, 0x05] => {
                        reflect(&mut stopped, t, insn, extra_opts, t0, &mut pause, &mut xbuf)
                    }
                    _ => return Err(Error::TargetExeced { pid }),
                }
            }
        };
        match attempt {
            Ok((c, captured)) => {
                pause.total_us = us(t0.elapsed());
                threads = Some(captured);
                clone = Some(CloneGuard {
                    target: pid,
                    target_start: process.stat.start_time,
                    clone: c,
                    clone_ns: c,
                    insn: insn.unwrap_or(0),
                    options: extra_opts,
                    stop_timeout: opts.stop_timeout,
                    hook: opts.hook.clone().map(PhaseHookDebug),
                });
            }
            Err(Error::ReflectUnavailable { reason, .. })
                if mode == Mode::Auto && !stopped.tracees().is_empty() =>
            {
                warnings.push(Warning::SuspendedInstead { reason });
                threads = all;
            }
            Err(e) => return Err(e),
        }
    }
    let threads = match threads {
        Some(t) => t,
        None => {
            let t1 = Instant::now();
            let t = stopped.capture(&mut xbuf)?;
            pause.capture_us = us(t1.elapsed());
            t
        }
    };
    // ---- the pause ends (reflect mode) ----
    drop(boost);
    Ok((
        Prepared {
            process,
            lock,
            warnings,
            mm,
            target_maps,
            target_mem,
            mode,
            inj,
            vdso_insn,
            xbuf,
            pause,
        },
        Paused {
            t0,
            stopped,
            clone,
            threads,
        },
    ))
}

/// Release: set the clone up (or keep the target stopped, in suspend mode) and read the
/// image's map, the threads' times and the rseq area.
fn release(pid: Pid, opts: &Options, p: Prepared, paused: Paused) -> Result<Snapshot> {
    let Prepared {
        process,
        lock,
        mut warnings,
        mm,
        target_maps,
        target_mem,
        pause,
        ..
    } = p;
    let Paused {
        t0,
        stopped,
        mut clone,
        threads,
    } = paused;
    let mode;
    let (image_pid, stopped, lock) = match clone.as_ref().map(|c| (c.clone, c.insn)) {
        Some((c, insn)) => {
            drop(lock);
            mode = Mode::Reflect;
            let ns = setup_clone(pid, c, insn, &mut warnings)?;
            if let Some(g) = clone.as_mut() {
                g.clone_ns = ns;
            }
            opts.phase(Phase::Released);
            (c, None, None)
        }
        None => {
            mode = Mode::Suspend;
            (mm, Some(stopped), Some(lock))
        }
    };
    let times = threads
        .iter()
        .map(|t| ThreadTimes::read(pid, t.tid))
        .collect();
    let (mappings, live) = if clone.is_some() {
        image_mappings(image_pid, &target_maps, &mut warnings)?
    } else {
        (proc::maps::read_smaps(mm)?, Vec::new())
    };
    let rseq_orig = match &clone {
        Some(_) => crate::direct::RseqArea::capture(image_pid),
        None => None,
    };
    let image = ProcMem::open(image_pid)?;
    let image_pagemap = Pagemap::open(image_pid).ok();
    Ok(Snapshot {
        pid,
        mode,
        process,
        threads,
        times,
        mappings,
        live,
        image,
        image_pagemap,
        target_mem,
        clone,
        stopped,
        _lock: lock,
        write_path: opts.write_path,
        rseq_orig,
        stopped_at: t0,
        pause,
        warnings,
        _not_send: PhantomData,
    })
}

/// Picks the thread to borrow for the injection and captures its state: the first one
/// `allowed` interrupted in user mode among the first 64 threads, else the first one
/// eligible at all (in a restartable syscall). Only the candidates' registers are read here; the others
/// are captured while the clone runs.
fn pick_thread(
    stopped: &StoppedProcess,
    xbuf: &mut [u8],
    allowed: &dyn Fn(Pid) -> bool,
) -> Result<Option<ThreadState>> {
    let mut fallback = None;
    for (i, t) in stopped.tracees().iter().enumerate() {
        if t.kind != crate::stop::StopKind::Interrupt {
            continue;
        }
        let regs = ptrace::get_regs(t.tid)?;
        if !inject::eligible(t.kind, &regs) || !allowed(t.tid) {
            continue;
        }
        if regs.syscall_nr().is_none() {
            return crate::stop::capture_thread(t, xbuf).map(Some);
        }
        fallback.get_or_insert(t.tid);
        if i >= 64 && fallback.is_some() {
            break;
        }
    }
    match fallback.and_then(|tid| stopped.tracee(tid)) {
        Some(t) => crate::stop::capture_thread(t, xbuf).map(Some),
        None => Ok(None),
    }
}

/// Injects the clone into thread `t` (captured), capturing every other thread while the
/// clone syscall runs, then releases `t` and every other thread. Returns the clone's pid
/// and every thread's state, main thread first.
fn reflect(
    stopped: &mut StoppedProcess,
    t: ThreadState,
    insn: u64,
    extra_opts: u32,
    t0: Instant,
    pause: &mut PauseBreakdown,
    xbuf: &mut [u8],
) -> Result<(Pid, Vec<ThreadState>)> {
    let tid = t.tid;
    let options = ptrace::O_TRACECLONE | ptrace::O_EXITKILL | extra_opts;
    // Borrowed, not owned: the thread stays attached; it is released (or given back to
    // the stop) below.
    let mut thread =
        inject::InjectedThread::borrow(tid, t.regs, insn, options, Duration::from_secs(60))?;
    let tracee = stopped.forget(tid).expect("chosen thread is stopped");
    let mut clone_at = 0;
    let mut child_seen = None;
    let mut others = None;
    let mut capture_us = 0;
    let r = {
        let held: &StoppedProcess = stopped;
        thread
            .clone_with(
                [CLONE_FILES, 0, 0, 0, 0, 0],
                &mut |child| {
                    clone_at = us(t0.elapsed());
                    child_seen = Some(child);
                    Ok(())
                },
                &mut || {
                    // The other threads hold still while the kernel copies the address
                    // space: read their registers now instead of before.
                    let t1 = Instant::now();
                    others = Some(held.capture(xbuf)?);
                    capture_us = us(t1.elapsed());
                    Ok(())
                },
            )
            .and_then(|inj| thread.restore().map(|()| inj))
    };
    pause.capture_us = capture_us;
    match r {
        // (clone returns the child's pid in the target's pid namespace, the event gives it
        // in ours: they differ in a container.)
        Ok(inject::Injected {
            ret,
            child: Some(c),
        }) if ret > 0 => {
            // The clone's memory is fixed. The borrowed thread is released first, while the
            // others still hold still, so it never waits for a CPU behind them. (A failed
            // detach means the thread is gone; the clone is still ours to clean up.)
            let _ = crate::stop::detach_tracee(&tracee);
            stopped.release_all();
            pause.clone_us = clone_at - pause.stop_us;
            pause.release_us = us(t0.elapsed()) - clone_at;
            let mut all = others.unwrap_or_default();
            all.push(t);
            all.sort_by_key(|x| (x.tid != stopped.pid(), x.tid));
            Ok((c, all))
        }
        other => {
            if let Some(c) = child_seen {
                // Never leave a clone behind: kill it and wait for it as its tracer (its
                // zombie, marked by SIGKILL, is reaped by the next dump).
                // SAFETY: kill has no memory preconditions; `c` is the new clone, traced by this
                // thread and not yet reaped (its zombie holds the pid), so it names no other
                // process.
                unsafe { libc::kill(c, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(30);
                while let Ok(Some(st)) = ptrace::wait_until(c, deadline) {
                    if st.is_gone() {
                        break;
                    }
                }
            }
            stopped.adopt(tracee);
            match other {
                // The vDSO (or the borrowed instruction) is not executable: the thread never
                // ran the syscall and was restored; suspend mode still works.
                Err(e) if inject::is_fault(&e) => Err(Error::ReflectUnavailable {
                    pid: stopped.pid(),
                    reason: e.to_string(),
                }),
                Err(e) => Err(e),
                Ok(inj) => Err(Error::ReflectUnavailable {
                    pid: stopped.pid(),
                    reason: format!(
                        "the injected clone {}",
                        inject::describe_return(arch::SYS_CLONE, inj.ret)
                    ),
                }),
            }
        }
    }
}

/// Runs the calling thread under `SCHED_FIFO` for the pause, so the target threads it
/// releases one by one (and wakes) cannot preempt it while the others still wait. Without
/// the privilege it does nothing.
pub(crate) struct PauseBoost(Option<(i32, libc::sched_param)>);

impl PauseBoost {
    pub(crate) fn new() -> PauseBoost {
        // SAFETY: the scheduler calls take pid 0 (this thread) and pointers to live local
        // `sched_param`s; `sched_param` is one int, so all-zero bytes are a valid value.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut old: libc::sched_param = std::mem::zeroed();
            if policy < 0 || libc::sched_getparam(0, &mut old) != 0 {
                return PauseBoost(None);
            }
            let p = libc::sched_param { sched_priority: 1 };
            if policy == libc::SCHED_OTHER && libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0
            {
                PauseBoost(Some((policy, old)))
            } else {
                PauseBoost(None)
            }
        }
    }
}

impl Drop for PauseBoost {
    fn drop(&mut self) {
        if let Some((policy, old)) = self.0.take() {
            // SAFETY: sched_setscheduler reads one `sched_param` from `old`, a live local; pid 0 is
            // this thread.
            unsafe { libc::sched_setscheduler(0, policy, &old) };
        }
    }
}
