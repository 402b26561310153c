//! The whole job: snapshot a process, write its core to a file safely, report what
//! happened.

use crate::elf::writer::Progress;
use crate::error::{Error, Pid, Result};
use crate::output::OutputFile;
use crate::select::KernelPolicy;
use crate::snapshot::{Mode, Options, PauseBreakdown, Phase, Snapshot};
use std::path::PathBuf;
use std::time::Instant;

/// What to dump and where.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// How to take the snapshot.
    pub snapshot: Options,
    /// The core file's path.
    pub output: PathBuf,
    /// Replace an existing file at `output`.
    pub overwrite: bool,
    /// Override the target's `coredump_filter`.
    pub filter: Option<u32>,
}

/// What a dump did.
#[derive(Debug, Clone)]
pub struct DumpReport {
    /// The target.
    pub pid: Pid,
    /// The core file.
    pub path: PathBuf,
    /// The mode actually used.
    pub mode: Mode,
    /// Threads in the core.
    pub threads: usize,
    /// Mappings (PT_LOAD segments) in the core.
    pub segments: usize,
    /// How long the target was stopped, by phase.
    pub pause: PauseBreakdown,
    /// Data bytes written (holes excluded).
    pub bytes_written: u64,
    /// The file's length.
    pub file_size: u64,
    /// Bytes left as holes because the pages were never populated.
    pub unpopulated_bytes: u64,
    /// Bytes left as holes because they read as zeros.
    pub zero_bytes: u64,
    /// Bytes the clone wrote into the core itself (direct writing).
    pub written_by_clone: u64,
    /// How memory reached the file (path used, fallbacks, clone CPU, copy-on-write).
    pub write_path: crate::write_path::WritePathStats,
    /// Wall time of the whole dump, in milliseconds.
    pub duration_ms: u64,
    /// Problems that did not stop the dump.
    pub warnings: Vec<String>,
}

/// Dumps process `pid` to `opts.output`.
///
/// The output is created (unnamed) before the target is touched, so a bad path costs the
/// target nothing; it gets its name only once complete. On any error the target is
/// released, the clone killed and reaped, and nothing is left at the path.
pub fn dump(pid: Pid, opts: &DumpOptions, progress: &mut dyn Progress) -> Result<DumpReport> {
    let t0 = Instant::now();
    let out = OutputFile::create(&opts.output, opts.overwrite)?;
    let mut snap = Snapshot::capture(pid, &opts.snapshot)?;
    let policy = KernelPolicy {
        filter: opts.filter.unwrap_or(snap.process().coredump_filter),
    };
    if let Some(h) = &opts.snapshot.hook {
        h(Phase::Writing)
    }
    let cancel = opts.snapshot.cancel.clone();
    let mut prog = |done: u64, total: u64| {
        progress.update(done, total)
            && !cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    };
    let stats = snap
        .write_core_file(out.file(), &policy, &mut prog)
        .map_err(|e| match e {
            Error::Io { what, source } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Error::Output {
                    what: "writing the core to",
                    path: opts.output.clone(),
                    source,
                    hint: format!(
                        "; the filesystem is full ({what}): free space or choose another -o"
                    ),
                }
            }
            Error::Io { source, .. } => Error::Output {
                what: "writing the core to",
                path: opts.output.clone(),
                source,
                hint: String::new(),
            },
            e => e,
        })?;
    let mode = snap.mode();
    let threads = snap.threads().len();
    let segments = snap.mappings().len();
    let mut warnings = snap.warnings().to_vec();
    for u in &stats.unreadable {
        warnings.push(format!(
            "{:#x}-{:#x} ({}) could not be read ({}); left as a hole",
            u.start,
            u.end,
            if u.name.is_empty() {
                "anonymous"
            } else {
                &u.name
            },
            u.error
        ));
    }
    let pause = snap.pause();
    // The image is written: let the clone's teardown run while the file gets its name.
    snap.release_image();
    if opts
        .snapshot
        .cancel
        .as_ref()
        .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    {
        return Err(Error::Cancelled);
    }
    let path = out.commit();
    if let Some(w) = snap.finish() {
        warnings.push(w);
    }
    let path = path?;
    Ok(DumpReport {
        pid,
        path,
        mode,
        threads,
        segments,
        pause,
        bytes_written: stats.bytes_written,
        file_size: stats.file_size,
        unpopulated_bytes: stats.unpopulated_bytes,
        zero_bytes: stats.zero_bytes,
        written_by_clone: stats.written_by_clone,
        write_path: stats.path.clone(),
        duration_ms: t0.elapsed().as_millis() as u64,
        warnings,
    })
}
