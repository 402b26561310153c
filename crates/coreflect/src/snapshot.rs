//! Reflection: a frozen, copy-on-write image of a live process, taken with a pause of
//! milliseconds — the Linux analogue of Windows' `PssCaptureSnapshot`.
//!
//! [`crate::Snapshot::capture`] stops every thread, captures their registers, makes one thread run
//! an injected `clone(CLONE_FILES, exit signal 0)`, restores and releases the target, and
//! keeps the clone stopped (it never runs the target's code). Memory is then read from the
//! clone while the target runs; thread state comes from the target. Dropping the snapshot
//! kills the clone and reaps its zombie inside the target, so the target never sees a child.
//!
//! In [`Mode::Suspend`] (or when `Auto` falls back) no clone is made: the target stays
//! stopped until the snapshot is dropped.

use crate::arch::x86_64::{self as arch};
use crate::elf::notes::{self, NoteInput};
use crate::elf::writer::{self, MemoryReader, Progress, SegmentPlan, Sink, Source, WriteStats};
use crate::error::{Error, Pid, Result};
use crate::inject;
use crate::lock::TargetLock;
use crate::proc::{self, mem::Pagemap, Mapping, MappingKind, ProcMem, ProcessInfo, ThreadTimes};
use crate::ptrace::{self, WaitStatus};
use crate::select::{Extent, RegionPolicy};
use crate::stop::{StoppedProcess, ThreadState};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) mod handle;

/// How to take the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Reflect if possible, else suspend (with a warning saying why).
    #[default]
    Auto,
    /// Reflect, or fail with the reason.
    Reflect,
    /// Keep the target stopped for the snapshot's whole life.
    Suspend,
}

impl Mode {
    /// The name used on the command line and in reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Reflect => "reflect",
            Mode::Suspend => "suspend",
        }
    }
}

/// Named points of a dump, for progress displays and fault-injection tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Every thread is stopped and captured; nothing injected yet (inside the pause).
    Stopped,
    /// The target is released and the clone exists (reflect mode).
    Released,
    /// The core's data is being written.
    Writing,
    /// The clone was killed; its zombie is about to be reaped in the target.
    Reaping,
}

impl Phase {
    /// The phase's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Released => "released",
            Phase::Writing => "writing",
            Phase::Reaping => "reaping",
        }
    }
}

/// A callback at each [`Phase`].
pub type PhaseHook = Arc<dyn Fn(Phase) + Send + Sync>;

/// Options of [`crate::Snapshot::capture`].
///
/// ```
/// use std::time::Duration;
/// let opts = coreflect::Options {
///     mode: coreflect::Mode::Reflect,            // fail rather than keep the target stopped
///     max_pause: Some(Duration::from_millis(50)), // refuse, before stopping, if longer
///     ..Default::default()
/// };
/// assert_eq!(opts.stop_timeout, Duration::from_secs(2));
/// ```
#[derive(Clone)]
pub struct Options {
    /// Reflect, suspend, or choose.
    pub mode: Mode,
    /// How long stopping all threads may take before giving up.
    pub stop_timeout: Duration,
    /// Refuse (before stopping anything) if the estimated pause is longer.
    pub max_pause: Option<Duration>,
    /// Checked before stopping the target and while writing: set it to cancel.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Called at each phase.
    pub hook: Option<PhaseHook>,
    /// Let the clone write its own memory into a core file (see [`crate::direct`]) when it
    /// can; otherwise (and always for streams) it is read through `/proc/CLONE/mem`. Off by
    /// default: the clone's CPU time then counts in the target's children's times when the
    /// target reaps it.
    pub direct_write: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Auto,
            stop_timeout: Duration::from_secs(2),
            max_pause: None,
            cancel: None,
            hook: None,
            direct_write: false,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("mode", &self.mode)
            .field("stop_timeout", &self.stop_timeout)
            .field("max_pause", &self.max_pause)
            .finish()
    }
}

impl Options {
    fn phase(&self, p: Phase) {
        if let Some(h) = &self.hook {
            h(p)
        }
    }
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }
}

/// Where the pause went, in microseconds from the first `PTRACE_SEIZE`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseBreakdown {
    /// Seizing and stopping every thread.
    pub stop_us: u64,
    /// Reading registers and XSTATE. In reflect mode this overlaps the clone syscall and
    /// is not part of the total.
    pub capture_us: u64,
    /// From the last stop to the clone's `PTRACE_EVENT_CLONE` (choosing the thread, the
    /// injected syscall).
    pub clone_us: u64,
    /// Restoring and releasing the injection thread, then every other thread.
    pub release_us: u64,
    /// The whole pause: first stop to last release (in suspend mode: until the snapshot
    /// is dropped).
    pub total_us: u64,
    /// The estimate made before stopping.
    pub estimate_us: u64,
    /// When the pause began, in CLOCK_MONOTONIC nanoseconds (to match it with what the
    /// target observed).
    pub started_ns: u64,
    /// The second, short stop at the end (reflect mode): every thread is stopped while the
    /// clone's zombie is collected and reaped inside the target, so that no `wait` of the
    /// target can see it. 0 until the snapshot is finished, or if no reap was needed.
    pub reap_us: u64,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An address range `[start, end)`.
pub type Range = (u64, u64);

/// `CLONE_FILES`: share the fd table, so the clone holds no extra file references.
const CLONE_FILES: u64 = 0x400;

/// The clone: stopped, traced by us, set to `exit_group(0)` if it ever runs. Killed and
/// reaped when dropped.
#[derive(Debug)]
struct CloneGuard {
    target: Pid,
    target_start: u64,
    clone: Pid,
    /// The clone's pid in the target's pid namespace (what `wait4` there needs).
    clone_ns: Pid,
    /// The `syscall` instruction the clone's registers point at.
    insn: u64,
    options: u32,
    stop_timeout: Duration,
    hook: Option<PhaseHookDebug>,
}

#[derive(Clone)]
struct PhaseHookDebug(PhaseHook);
impl std::fmt::Debug for PhaseHookDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hook")
    }
}

impl CloneGuard {
    /// Kills the clone and reaps its zombie inside the target, unseen by the target's
    /// `wait`s (see [`crate::reap`]). Returns a warning if the zombie was left for the next
    /// dump, and the length of the reap's stop.
    fn finish(&mut self) -> crate::reap::Reaped {
        if self.clone == 0 {
            return Default::default();
        }
        let clone = std::mem::take(&mut self.clone);
        let hook = || {
            if let Some(h) = &self.hook {
                (h.0)(Phase::Reaping)
            }
        };
        crate::reap::kill_and_reap(
            self.target,
            self.target_start,
            clone,
            self.clone_ns,
            self.insn,
            self.options,
            self.stop_timeout,
            &hook,
        )
    }
}

impl Drop for CloneGuard {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A frozen image of a process: thread state captured from the target while it was
/// stopped, memory readable from the clone (or the stopped target in suspend mode).
///
/// The snapshot must be dropped on the thread that captured it when it holds a stopped
/// target (suspend mode): ptrace binds tracees to the thread that attached them.
/// (Internal: the thread-bound state, owned by the tracer thread of [`crate::Snapshot`].)
#[derive(Debug)]
pub(crate) struct Snapshot {
    pid: Pid,
    mode: Mode,
    process: ProcessInfo,
    threads: Vec<ThreadState>,
    times: Vec<ThreadTimes>,
    mappings: Vec<Mapping>,
    live: Vec<Range>,
    image: ProcMem,
    image_pagemap: Option<Pagemap>,
    target_mem: ProcMem,
    clone: Option<CloneGuard>,
    stopped: Option<StoppedProcess>,
    _lock: Option<TargetLock>,
    direct_write: bool,
    /// The clone's rseq area as the snapshot holds it: the kernel rewrites it whenever the
    /// clone passes through its return-to-user path (injected syscalls), so reads put it
    /// back.
    rseq_orig: Option<(u64, Vec<u8>)>,
    stopped_at: Instant,
    pause: PauseBreakdown,
    warnings: Vec<String>,
    _not_send: PhantomData<*const ()>,
}

/// Checks that `pid` can be dumped at all and reads its process information.
pub fn preflight(pid: Pid) -> Result<ProcessInfo> {
    if pid <= 0 {
        return Err(Error::InvalidPid { pid: pid as i64 });
    }
    if pid as u32 == std::process::id() {
        return Err(Error::SelfDump { pid });
    }
    let stat = proc::Stat::read(pid)?;
    if stat.is_kernel_thread() {
        return Err(Error::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    // A zombie main thread with live threads (it called pthread_exit) is a live process:
    // the kernel dumps it too. Its memory is read through a live thread.
    let Some(mm) = proc::live_thread(pid) else {
        return Err(Error::Zombie {
            pid,
            comm: stat.comm,
        });
    };
    let status = proc::Status::read(mm)?;
    if status.tgid != pid {
        return Err(Error::NotAProcess {
            tid: pid,
            tgid: status.tgid,
        });
    }
    if status.no_mm {
        return Err(Error::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    if status.tracer_pid != 0 {
        let tracer_comm = proc::Stat::read(status.tracer_pid)
            .map(|s| s.comm)
            .unwrap_or_default();
        // Another coreflect in its pause: the target lock serializes us behind it.
        if tracer_comm != "coreflect" {
            return Err(Error::AlreadyTraced {
                pid,
                tracer: status.tracer_pid,
                tracer_comm,
            });
        }
    }
    check_dumpable(mm, &status)?;
    let info = ProcessInfo::read(pid)?;
    // A 32-bit program (its executable's ELF class is 1) cannot be described by this writer.
    let class = info
        .exe
        .as_ref()
        .and_then(|e| std::fs::File::open(e).ok())
        .and_then(|f| {
            let mut b = [0u8; 5];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).ok()?;
            (&b[..4] == b"\x7fELF").then_some(b[4])
        });
    if class == Some(1) {
        return Err(Error::Not64Bit { pid });
    }
    Ok(info)
}

/// Refuses a non-dumpable target (set-uid, or `PR_SET_DUMPABLE` 0) when we lack
/// CAP_SYS_PTRACE: the kernel then hands its /proc files to root, whatever its user.
fn check_dumpable(pid: Pid, status: &proc::Status) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    let me = proc::Status::read(std::process::id() as Pid).unwrap_or_default();
    if me.cap_eff & CAP_SYS_PTRACE != 0 {
        return Ok(());
    }
    if status.uid == 0 || status.uid != me.uid {
        return Ok(()); // another user's process: ptrace itself says no, with its own hint
    }
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .unwrap_or(status.uid);
    // Our own user's process whose private /proc files we may not open: not dumpable.
    let refused = std::fs::File::open(format!("/proc/{pid}/auxv"))
        .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)));
    if owner == 0 || refused {
        return Err(Error::NotDumpable { pid });
    }
    Ok(())
}

/// How the injections must treat seccomp filters.
#[derive(Debug, Clone, Copy, Default)]
struct Injectable {
    /// Extra ptrace options for the injections (`PTRACE_O_SUSPEND_SECCOMP`).
    options: u32,
    /// Some thread runs under a seccomp filter: inject only into threads without one
    /// (unless the filter is suspended), checked again on each candidate while it is
    /// stopped.
    filtered: bool,
}

/// Why reflection cannot be used for this target, if it cannot; else how to inject.
fn reflect_blocker(p: &ProcessInfo, maps: &[Mapping]) -> std::result::Result<Injectable, String> {
    if let Some(m) = maps
        .iter()
        .find(|m| m.has_flag("um") || m.has_flag("uw") || m.has_flag("ui"))
    {
        return Err(format!(
            "memory at {:#x}-{:#x} is registered with userfaultfd (the clone syscall would wait for the target's own, stopped, fault handler)",
            m.start, m.end
        ));
    }
    if let Some(m) = maps.iter().find(|m| m.has_flag("ht") && !m.shared) {
        return Err(format!(
            "memory at {:#x}-{:#x} ({} KiB) is private hugetlb memory (MAP_HUGETLB): a clone would share its huge pages, so the target's next write to one needs a free huge page for its copy-on-write (SIGBUS when the pool is exhausted), and the kernel unmaps them from the clone",
            m.start,
            m.end,
            m.len() / 1024
        ));
    }
    // Seccomp is per thread: look at every thread, not only the main one.
    let tids = proc::threads(p.pid).unwrap_or_default();
    let modes: Vec<u32> = tids
        .iter()
        .map(|&t| inject::thread_seccomp(p.pid, t))
        .collect();
    let filtered = modes.iter().filter(|&&m| m != 0).count();
    if filtered == 0 {
        return Ok(Injectable::default());
    }
    let me = proc::Status::read(std::process::id() as Pid).unwrap_or_default();
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    if me.cap_eff & CAP_SYS_ADMIN != 0 && me.seccomp == 0 {
        return Ok(Injectable {
            options: ptrace::O_SUSPEND_SECCOMP,
            filtered: true,
        });
    }
    if filtered < modes.len() {
        // Threads without a filter can run the injections.
        return Ok(Injectable {
            options: 0,
            filtered: true,
        });
    }
    Err(format!(
        "every thread of the target runs under a seccomp filter (Seccomp: {}) that may kill it on the injected clone, and coreflect lacks CAP_SYS_ADMIN to suspend seccomp (PTRACE_O_SUSPEND_SECCOMP)",
        modes.first().copied().unwrap_or(2)
    ))
}

/// The pause a snapshot of this process is expected to cost. The clone copies the page
/// tables of anonymous memory: ~15 ms per GiB mapped with 4 KiB pages, ~1 ms per GiB of
/// transparent huge pages (measured on 2-vCPU KVM guests); stopping, capturing and
/// releasing cost ~17 µs per thread. In suspend mode the target is stopped for the whole
/// write (~1.5 GB/s).
pub fn estimate_pause(status: &proc::Status, maps: &[Mapping], mode: Mode) -> Duration {
    let anon: u64 = maps.iter().map(|m| m.anonymous_kb).sum();
    let huge: u64 = maps.iter().map(|m| m.anon_huge_kb).sum::<u64>().min(anon);
    let us = match mode {
        Mode::Suspend => 1000 + status.vm_rss_kb * 2 / 3, // 1 KiB at 1.5 GB/s is ~0.68 µs
        _ => 300 + 17 * status.threads as u64 + (anon - huge) * 15 / 1024 + huge / 1024,
    };
    Duration::from_micros(us)
}

/// Children of `pid` that look like clones left by an interrupted coreflect: zombies created
/// with exit signal 0 (`PTRACE_EVENT_CLONE`), invisible to the target's own `wait`.
/// Returns their pids in the target's pid namespace. A coreflect clone exits with status
/// [`CLONE_EXIT_CODE`] (or is killed by SIGKILL when its tracer died).
///
/// A zombie still traced belongs to a snapshot that is alive (another coreflect, or another
/// snapshot in this process, between killing its clone and reaping it): it is not a
/// leftover — that snapshot reaps it, and nobody else can before its tracer lets go.
pub fn leftover_clones(pid: Pid) -> Vec<Pid> {
    proc::children(pid)
        .into_iter()
        .filter(|&c| {
            proc::Stat::read(c).is_ok_and(|s| {
                s.state == 'Z'
                    && s.exit_signal == 0
                    && (s.exit_code == CLONE_EXIT_CODE << 8 || s.exit_code == libc::SIGKILL)
            })
        })
        .filter_map(|c| match proc::Status::read(c) {
            Ok(st) if st.ns_pid > 0 && st.tracer_pid == 0 => Some(st.ns_pid),
            _ => None,
        })
        .collect()
}

/// The exit code coreflect's clones exit with: it marks their zombies as ours.
pub const CLONE_EXIT_CODE: i32 = 0xCF;

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

#[allow(dead_code)] // the handle uses most, not all, of these
impl Snapshot {
    /// Takes a snapshot of process `pid`.
    ///
    /// On error the target is released. One exception the kernel imposes: a thread that did
    /// not stop within `opts.stop_timeout` (uninterruptible sleep, `vfork`) cannot be
    /// detached while it runs; it stays seized, and stops when it leaves its wait, until this
    /// thread exits. A long-lived caller should retry later or exit.
    pub fn capture(pid: Pid, opts: &Options) -> Result<Snapshot> {
        let process = preflight(pid)?;
        // One coreflect at a time stops a given target; the lock is held until the target
        // is released (reflect) or the snapshot dropped (suspend).
        let lock = TargetLock::acquire(pid, process.stat.start_time, Duration::from_secs(10))?;
        let process = match proc::Status::read(pid)?.tracer_pid {
            0 => process,
            _ => preflight(pid)?,
        };
        let mut warnings = Vec::new();
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
                    warnings.push(format!(
                        "reflection unavailable: {reason}; dumped in suspend mode (target stopped for the whole write)"
                    ));
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
                    Ok(n) => warnings.push(format!(
                        "reaped {n} leftover clone zombie(s) of an earlier interrupted dump"
                    )),
                    Err(e) => warnings.push(format!(
                        "could not reap leftover clone zombies: {}",
                        e.with_causes()
                    )),
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
        let mut xbuf = vec![0u8; arch::xstate_buffer_size()];
        let mut pause = PauseBreakdown {
            estimate_us: us(estimate),
            ..Default::default()
        };

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
                        _ => {
                            return Err(Error::io(
                                format!("stopping pid {pid}"),
                                std::io::Error::other(
                                    "it executed a new program (exec) while being stopped; try again",
                                ),
                            ))
                        }
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
                Err(e @ Error::ReflectUnavailable { .. })
                    if mode == Mode::Auto && !stopped.tracees().is_empty() =>
                {
                    warnings.push(format!("{e}: dumped in suspend mode instead"));
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

        let (image_pid, stopped, lock) = match clone.as_ref().map(|c| (c.clone, c.insn)) {
            Some((c, insn)) => {
                drop(lock);
                mode = Mode::Reflect;
                let ns = setup_clone(c, insn)?;
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
            Some(_) => crate::direct::rseq_area(image_pid),
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
            direct_write: opts.direct_write,
            rseq_orig,
            stopped_at: t0,
            pause,
            warnings,
            _not_send: PhantomData,
        })
    }

    /// Takes a snapshot of a target the caller already holds stopped (it is its tracer):
    /// nothing is seized, injected or released, and no target lock is taken; the snapshot
    /// is in [`Mode::Suspend`] and reads the target's memory directly, so the caller must
    /// keep every thread stopped until the snapshot is dropped. `first` names the thread
    /// the core lists first (gdb's current thread): the crashing thread of a crash dump,
    /// whose [`crate::stop::StopKind::Signal`] and siginfo become `pr_cursig` (of every
    /// thread, as in the kernel's crash cores) and `NT_SIGINFO`.
    pub fn capture_held(
        stopped: &StoppedProcess,
        first: Option<Pid>,
        opts: &Options,
    ) -> Result<Snapshot> {
        let pid = stopped.pid();
        if opts.cancelled() {
            return Err(Error::Cancelled);
        }
        let t0 = Instant::now();
        let process = ProcessInfo::read(pid)?;
        let mut xbuf = vec![0u8; arch::xstate_buffer_size()];
        let mut threads = stopped.capture(&mut xbuf)?;
        if let Some(i) = first.and_then(|f| threads.iter().position(|t| t.tid == f)) {
            let t = threads.remove(i);
            // A crash core as the kernel writes it: every thread's pr_cursig is the fatal
            // signal (gdb takes it from the last NT_PRSTATUS); only the first thread has
            // the siginfo.
            if let crate::stop::StopKind::Signal(sig) = t.kind {
                for o in threads.iter_mut() {
                    o.kind = crate::stop::StopKind::Signal(sig);
                    o.siginfo = None;
                }
            }
            threads.insert(0, t);
        }
        opts.phase(Phase::Stopped);
        let times = threads
            .iter()
            .map(|t| ThreadTimes::read(pid, t.tid))
            .collect();
        let mappings = proc::maps::read_smaps(pid)?;
        Ok(Snapshot {
            pid,
            mode: Mode::Suspend,
            process,
            threads,
            times,
            mappings,
            live: Vec::new(),
            image: ProcMem::open(pid)?,
            image_pagemap: Pagemap::open(pid).ok(),
            target_mem: ProcMem::open(pid)?,
            clone: None,
            stopped: None,
            _lock: None,
            direct_write: false,
            rseq_orig: None,
            stopped_at: t0,
            pause: PauseBreakdown {
                started_ns: monotonic_ns(),
                ..Default::default()
            },
            warnings: Vec::new(),
            _not_send: PhantomData,
        })
    }

    /// The target's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The mode actually used (`Reflect` or `Suspend`).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The clone's pid (reflect mode).
    pub fn clone_pid(&self) -> Option<Pid> {
        self.clone.as_ref().map(|c| c.clone)
    }

    /// Process information read before the pause.
    pub fn process(&self) -> &ProcessInfo {
        &self.process
    }

    /// Every thread's state, main thread first.
    pub fn threads(&self) -> &[ThreadState] {
        &self.threads
    }

    /// The memory map of the image.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// How long the target was stopped. In suspend mode, `total_us` grows until drop.
    pub fn pause(&self) -> PauseBreakdown {
        let mut p = self.pause;
        if self.stopped.is_some() {
            p.total_us = us(self.stopped_at.elapsed());
        }
        p
    }

    /// Problems that did not stop the snapshot.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Reads the image's memory at `addr`; returns how many bytes were readable.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let src = if self.is_live(addr) {
            Source::Live
        } else {
            Source::Image
        };
        MemoryReader::read_at(self, src, addr, buf)
    }

    fn is_live(&self, addr: u64) -> bool {
        self.live.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// The segments a core of this snapshot has under `policy`.
    pub fn plan(&self, policy: &dyn RegionPolicy) -> Vec<SegmentPlan> {
        let page = crate::page_size();
        self.mappings
            .iter()
            .map(|m| {
                let source = if m.kind() == MappingKind::Special {
                    Source::Hole
                } else if self.is_live(m.start) {
                    Source::Live
                } else {
                    Source::Image
                };
                let mut is_elf = || {
                    let mut b = [0u8; 4];
                    self.read_at(source, m.start, &mut b).ok() == Some(4) && &b == b"\x7fELF"
                };
                let filesz = match policy.extent(m, &mut is_elf) {
                    Extent::None => 0,
                    Extent::Whole => m.len(),
                    Extent::FirstPage => page.min(m.len()),
                };
                SegmentPlan {
                    vaddr: m.start,
                    memsz: m.len(),
                    filesz,
                    flags: m.elf_flags(),
                    source,
                    sparse: !m.shared && m.kind() == MappingKind::Anonymous,
                    name: m.name.clone(),
                }
            })
            .collect()
    }

    /// The core's notes.
    pub fn notes(&self) -> Vec<u8> {
        notes::build(&NoteInput {
            process: &self.process,
            threads: &self.threads,
            times: &self.times,
            mappings: &self.mappings,
        })
    }

    /// Writes a complete ELF core of the snapshot to `sink`.
    pub fn write_core(
        &self,
        sink: &mut dyn Sink,
        policy: &dyn RegionPolicy,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        self.write_core_with(sink, &self.notes(), &self.plan(policy), progress)
    }

    /// [`Snapshot::write_core`] with given notes and segments (e.g. a
    /// `crate::level::mini_plan`, or extra notes appended to [`Snapshot::notes`]).
    pub fn write_core_with(
        &self,
        sink: &mut dyn Sink,
        notes: &[u8],
        segs: &[SegmentPlan],
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        writer::write_core(sink, notes, segs, self, progress)
    }

    /// Writes a complete ELF core of the snapshot into `file` (new or empty). In reflect
    /// mode, on the capturing thread, the clone writes its own memory when it can (see
    /// [`crate::direct`]); otherwise as [`Snapshot::write_core`] with a sparse-file sink.
    pub fn write_core_file(
        &self,
        file: &std::fs::File,
        policy: &dyn RegionPolicy,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        self.write_core_file_with(file, &self.notes(), &self.plan(policy), progress)
    }

    /// [`Snapshot::write_core_file`] with given notes and segments.
    pub fn write_core_file_with(
        &self,
        file: &std::fs::File,
        notes: &[u8],
        segs: &[SegmentPlan],
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        let direct = self
            .clone
            .as_ref()
            .filter(|_| self.direct_write)
            .and_then(|c| {
                crate::direct::DirectWriter::setup(c.clone, c.insn, file, self.rseq_orig.clone())
            });
        let direct_result = direct
            .as_ref()
            .map(|d| writer::write_core_direct(file, notes, segs, self, d, progress));
        let st = match direct_result {
            Some(Ok(st)) => st,
            Some(Err(Error::Cancelled)) => return Err(Error::Cancelled),
            // Not set up, or it stopped working: the whole core the usual way (every byte
            // it writes replaces what the clone wrote at the same place).
            _ => {
                let mut sink = writer::FileSink::new(file);
                writer::write_core(&mut sink, notes, segs, self, progress)?
            }
        };
        self.check_image_alive()?;
        Ok(st)
    }

    /// Fails if the clone died while the core was being written (the OOM killer picks it
    /// first, by design): its memory could not all be read, so the core is not complete.
    ///
    /// Without a clone (suspend mode, or a process held by a tracer) the image is the
    /// target itself, held in trace stops that only SIGKILL ends: if none of its captured
    /// threads is still stopped, it was killed while being read, and the rest of its memory
    /// was read back as holes — fail rather than keep a core that looks complete.
    pub fn check_image_alive(&self) -> Result<()> {
        let Some(c) = &self.clone else {
            let held = self.threads.iter().any(|t| {
                proc::Status::read_thread(self.pid, t.tid)
                    .is_ok_and(|s| matches!(s.state, 't' | 'T'))
            });
            if held || self.threads.is_empty() {
                return Ok(());
            }
            return Err(Error::ProcessExited { pid: self.pid });
        };
        match proc::Stat::read(c.clone) {
            Ok(st) if matches!(st.state, 't' | 'T') => Ok(()),
            _ => Err(Error::io(
                format!("writing the core of pid {}", self.pid),
                std::io::Error::other(format!(
                    "the clone {} was killed before its memory was all read (out of memory?); the core was not kept",
                    c.clone
                )),
            )),
        }
    }

    /// Sends the clone SIGKILL without waiting for it: its address space is torn down on
    /// another CPU while the caller finishes up (e.g. names the core). The image can no
    /// longer be read; [`Snapshot::finish`] (or drop) then reaps it.
    pub fn release_image(&mut self) {
        if let Some(c) = &self.clone {
            if c.clone != 0 {
                unsafe { libc::kill(c.clone, libc::SIGKILL) };
            }
        }
    }

    /// Ends the snapshot now: kills and reaps the clone (or releases the stopped target).
    /// Returns a warning if something was left for the next dump to clean.
    pub fn finish(self) -> Option<String> {
        self.finish_timed().0
    }

    /// As [`Snapshot::finish`], also returning how long the target was stopped for the
    /// reap (reflect mode; see [`PauseBreakdown::reap_us`]).
    pub fn finish_timed(mut self) -> (Option<String>, Option<u64>) {
        self.stopped.take();
        match self.clone.as_mut().map(|c| c.finish()) {
            Some(r) => (r.warning, r.reap_us),
            None => (None, None),
        }
    }
}

impl MemoryReader for Snapshot {
    fn read_at(&self, source: Source, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match source {
            Source::Image => {
                let n = self.image.read_at(addr, buf)?;
                if let Some((at, orig)) = &self.rseq_orig {
                    // Put back the snapshot's rseq bytes where they overlap this read.
                    let (s, e) = (addr.max(*at), (addr + n as u64).min(at + orig.len() as u64));
                    if s < e {
                        buf[(s - addr) as usize..(e - addr) as usize]
                            .copy_from_slice(&orig[(s - at) as usize..(e - at) as usize]);
                    }
                }
                Ok(n)
            }
            Source::Live => self.target_mem.read_at(addr, buf),
            Source::Hole => Ok(0),
        }
    }
    fn pagemap(&self, source: Source, addr: u64, out: &mut [u64]) -> bool {
        match (source, &self.image_pagemap) {
            (Source::Image, Some(pm)) => pm.entries(addr, out).is_ok(),
            _ => false,
        }
    }
}

// The snapshot is !Send (ptrace binds to a thread) but may be shared for reading: its
// reading methods only `pread` files.
unsafe impl Sync for Snapshot {}

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
    let sigmask = ptrace::get_sigmask(tid)?;
    let tracee = stopped.forget(tid).expect("chosen thread is stopped");
    let mut clone_at = 0;
    let mut child_seen = None;
    let mut others = None;
    let mut capture_us = 0;
    let options = ptrace::O_TRACECLONE | ptrace::O_EXITKILL | extra_opts;
    let r = {
        let held: &StoppedProcess = stopped;
        inject::inject_syscall(
            tid,
            &t.regs,
            sigmask,
            insn,
            arch::SYS_CLONE,
            [CLONE_FILES, 0, 0, 0, 0, 0],
            options,
            Duration::from_secs(60),
            &mut |child| {
                clone_at = us(t0.elapsed());
                child_seen = Some(child);
                Ok(())
            },
            &mut || {
                // The other threads hold still while the kernel copies the address space:
                // read their registers now instead of before.
                let t1 = Instant::now();
                others = Some(held.capture(xbuf)?);
                capture_us = us(t1.elapsed());
                Ok(())
            },
        )
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
            unsafe { libc::sched_setscheduler(0, policy, &old) };
        }
    }
}

/// At the clone's first stop: point it at `exit_group(CLONE_EXIT_CODE)` so it can never run the target's
/// code, kill it if we die, and make it the OOM killer's first choice.
fn setup_clone(clone: Pid, insn: u64) -> Result<Pid> {
    let deadline = Instant::now() + Duration::from_secs(10);
    match ptrace::wait_until(clone, deadline)? {
        Some(WaitStatus::Stopped { .. }) => {}
        other => {
            return Err(Error::io(
                format!("waiting for the clone {clone} to stop"),
                std::io::Error::other(format!("unexpected status {other:?}")),
            ))
        }
    }
    let mut r = ptrace::get_regs(clone)?;
    r.0.rip = insn;
    r.0.rax = arch::SYS_EXIT_GROUP;
    r.0.orig_rax = u64::MAX;
    r.0.rdi = CLONE_EXIT_CODE as u64;
    ptrace::set_regs(clone, &r)?;
    ptrace::set_options(clone, ptrace::O_EXITKILL)?;
    let _ = std::fs::write(format!("/proc/{clone}/oom_score_adj"), "1000");
    // In a container the target knows the clone by another pid.
    Ok(proc::Status::read(clone)
        .ok()
        .map(|s| s.ns_pid)
        .filter(|&p| p > 0)
        .unwrap_or(clone))
}

/// The clone's memory map, plus what only the live target holds (MADV_DONTFORK ranges are
/// absent from the clone, MADV_WIPEONFORK ranges are zero there): those are read live. The
/// target's map is the one read just before the pause.
fn image_mappings(
    clone: Pid,
    target_maps: &[Mapping],
    warnings: &mut Vec<String>,
) -> Result<(Vec<Mapping>, Vec<Range>)> {
    let mut maps = proc::maps::read_smaps(clone)?;
    let mut live = Vec::new();
    for m in target_maps
        .iter()
        .filter(|m| m.has_flag("dc") || m.has_flag("wf"))
    {
        let overlaps = maps.iter().any(|c| c.start < m.end && m.start < c.end);
        if m.has_flag("dc") && overlaps {
            continue;
        }
        if m.has_flag("dc") {
            maps.push(m.clone());
        } else if let Some(c) = maps
            .iter_mut()
            .find(|c| c.start == m.start && c.end == m.end)
        {
            // Wiped in the clone: describe it by the target's contents.
            c.anonymous_kb = m.anonymous_kb;
            c.swap_kb = m.swap_kb;
            c.rss_kb = m.rss_kb;
        }
        live.push((m.start, m.end));
        warnings.push(format!(
            "{:#x}-{:#x} ({} KiB, {}) is {} and was read from the live target, not the frozen image",
            m.start,
            m.end,
            m.len() / 1024,
            if m.name.is_empty() { "anonymous" } else { &m.name },
            if m.has_flag("dc") { "MADV_DONTFORK" } else { "MADV_WIPEONFORK" }
        ));
    }
    maps.sort_by_key(|m| m.start);
    Ok((maps, live))
}
