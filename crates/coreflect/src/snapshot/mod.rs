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
//!
//! The stages, one file each: `options.rs` (what is asked), `preflight.rs` (before anything
//! is stopped: can it be dumped, can it be reflected, what the pause will cost), `pause.rs`
//! (stop, inject the clone, release), `clone.rs` (the clone's setup, its image's map, its
//! guard and reaping); this file holds the thread-bound snapshot and what is
//! read and written from it, `handle.rs` the public `Send + Sync` [`crate::Snapshot`].

use crate::arch::x86_64::{self as arch};
use crate::elf::notes::{self, NoteInput};
use crate::elf::writer::{self, MemoryReader, Progress, SegmentPlan, Sink, Source, WriteStats};
use crate::error::{Error, Pid, Result};
use crate::lock::TargetLock;
use crate::proc::{self, mem::Pagemap, Mapping, MappingKind, ProcMem, ProcessInfo, ThreadTimes};
use crate::select::{Extent, RegionPolicy};
use crate::stop::{StoppedProcess, ThreadState};
use crate::warning::Warning;
use clone::CloneGuard;
use pause::{monotonic_ns, us};
use std::marker::PhantomData;
use std::time::Instant;

mod clone;
pub(crate) mod handle;
mod options;
mod pause;
mod preflight;

pub use clone::{leftover_clones, CLONE_EXIT_CODE};
pub use options::{Mode, Options, PauseBreakdown, Phase, PhaseHook};
pub(crate) use pause::PauseBoost;
pub use preflight::{estimate_pause, preflight};

/// An address range `[start, end)`.
pub type Range = (u64, u64);

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
    write_path: crate::write_path::WritePath,
    /// The clone's rseq area as the snapshot holds it: the kernel rewrites it whenever the
    /// clone passes through its return-to-user path (injected syscalls), so reads put it
    /// back.
    rseq_orig: Option<crate::direct::RseqArea>,
    stopped_at: Instant,
    pause: PauseBreakdown,
    warnings: Vec<Warning>,
    _not_send: PhantomData<*const ()>,
}

#[allow(dead_code)] // the handle uses most, not all, of these
impl Snapshot {
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
            write_path: crate::write_path::WritePath::Read,
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
    pub fn warnings(&self) -> &[Warning] {
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
    /// mode, on the capturing thread, by the path [`Options::write_path`] chooses (see
    /// [`crate::write_path`]); otherwise as [`Snapshot::write_core`] with a sparse-file sink.
    /// On the zero-copy path the clone drops each range once handed over: the image reads
    /// as zeros there afterwards.
    pub fn write_core_file(
        &self,
        file: &std::fs::File,
        policy: &dyn RegionPolicy,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        self.write_core_file_with(file, &self.notes(), &self.plan(policy), false, progress)
    }

    /// [`Snapshot::write_core_file`] with given notes and segments, by the write path the
    /// options chose (see [`crate::write_path`]); with `release_behind` the clone drops its
    /// memory as it is written (the image cannot be read afterwards).
    pub fn write_core_file_with(
        &self,
        file: &std::fs::File,
        notes: &[u8],
        segs: &[SegmentPlan],
        release_behind: bool,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        let mut st = crate::write_path::write_core_file(
            self,
            self.clone.as_ref().map(|c| (c.clone, c.insn)),
            self.write_path,
            self.rseq_orig.clone(),
            file,
            segs,
            notes,
            release_behind,
            progress,
        )
        .map_err(|e| match e {
            // A clone killed meanwhile (the OOM killer picks it first) explains the failure.
            Error::Cancelled => e,
            e if self.clone.is_some() => self.check_image_alive().err().unwrap_or(e),
            e => e,
        })?;
        self.check_image_alive()?;
        if let Some(c) = &self.clone {
            st.path.clone_cpu_ms = crate::write_path::cpu_ms(c.clone).unwrap_or(0.0);
        }
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
            _ => Err(Error::CloneKilled {
                pid: self.pid,
                clone: c.clone,
            }),
        }
    }

    /// Sends the clone SIGKILL without waiting for it: its address space is torn down on
    /// another CPU while the caller finishes up (e.g. names the core). The image can no
    /// longer be read; [`Snapshot::finish`] (or drop) then reaps it.
    pub fn release_image(&mut self) {
        if let Some(c) = &self.clone {
            if c.clone != 0 {
                // SAFETY: kill has no memory preconditions; `c.clone` is the clone, traced by us
                // and not yet reaped (its zombie holds the pid), so it names no other process.
                unsafe { libc::kill(c.clone, libc::SIGKILL) };
            }
        }
    }

    /// Ends the snapshot now: kills and reaps the clone (or releases the stopped target).
    /// Returns a warning if something was left for the next dump to clean.
    pub fn finish(self) -> Option<Warning> {
        self.finish_timed().0
    }

    /// As [`Snapshot::finish`], also returning how long the target was stopped for the
    /// reap (reflect mode; see [`PauseBreakdown::reap_us`]).
    pub fn finish_timed(mut self) -> (Option<Warning>, Option<u64>) {
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
                if let Some(rseq) = &self.rseq_orig {
                    // Put back the snapshot's rseq bytes where they overlap this read.
                    rseq.restore_into(addr, &mut buf[..n]);
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

// SAFETY: `Sync`
// concerns data races only, and there are none: every field is itself `Sync` (plain data, `File`s,
// a `Send + Sync` hook) and no `&self` method mutates anything (no `Cell`, no interior mutability);
// `_not_send` exists only to keep the type `!Send`. ptrace's binding of a tracee to its tracer
// thread is not a memory rule (a request from another thread fails with ESRCH), and the type is
// `pub(crate)`: only `handle::Snapshot` holds it, which makes every ptrace-making call
// (`write_core_file*`, `finish`, drop) on the tracer thread and, from other threads, only methods
// that read /proc files.
unsafe impl Sync for Snapshot {}
