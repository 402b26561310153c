//! The whole job: snapshot a process, write its core to a file safely, report what
//! happened.

use crate::elf::meta::{self, Metadata};
use crate::elf::writer::Progress;
use crate::elf::writer::Source;
use crate::elf::writer::{StreamSink, WriteStats};
use crate::error::{Error, Pid, Result};
use crate::level::Level;
use crate::output::OutputFile;
use crate::select::KernelPolicy;
use crate::snapshot::{Mode, Options, PauseBreakdown, Phase};
use crate::warning::Warning;
use crate::Snapshot;
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
    /// Override the target's `coredump_filter` (and `level`).
    pub filter: Option<u32>,
    /// How much memory goes into the core.
    pub level: Level,
    /// Compress the core into one zstd frame at this level (1-22; 3 is zstd's default).
    pub compress: Option<i32>,
    /// Write the core to standard output (a pipe or socket) instead of `output`:
    /// sequentially, holes as zeros.
    pub stdout: bool,
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
    /// Bytes of the core read from memory that was live, not frozen, in reflect mode:
    /// shared mappings (`MAP_SHARED` files, memfd, shmem, System V shared memory: the
    /// clone shares them with the target, which kept writing them) and what the clone
    /// cannot hold (`MADV_DONTFORK`, `MADV_WIPEONFORK`: read from the target). 0 in
    /// suspend mode, where the target was stopped throughout.
    pub live_bytes: u64,
    /// How memory reached the file (path used, fallbacks, clone CPU, copy-on-write).
    pub write_path: crate::write_path::WritePathStats,
    /// Wall time of the whole dump, in milliseconds.
    pub duration_ms: u64,
    /// Problems that did not stop the dump, in the order they happened.
    pub warnings: Vec<Warning>,
    /// The level used (`filter` overrides it).
    pub level: Level,
    /// Bytes of the zstd frame, when compressed (`file_size` is the core's own length).
    pub compressed_size: Option<u64>,
}

/// Dumps process `pid` to `opts.output`.
///
/// The output is created (unnamed) before the target is touched, so a bad path costs the
/// target nothing; it gets its name only once complete. On any error the target is
/// released, the clone killed and reaped, and nothing is left at the path.
///
/// ```no_run
/// use coreflect::{DumpOptions, Options};
/// # fn main() -> coreflect::Result<()> {
/// let opts = DumpOptions {
///     snapshot: Options::default(),
///     output: "/var/tmp/app.core".into(),
///     overwrite: false,
///     filter: None, // the target's own coredump_filter
///     level: coreflect::Level::Default,
///     compress: None, // or Some(3): one zstd frame at level 3
///     stdout: false,
/// };
/// let report = coreflect::dump(1234, &opts, &mut |_done, _total| true)?;
/// println!("paused {} µs, wrote {} bytes", report.pause.total_us, report.bytes_written);
/// # Ok(()) }
/// ```
pub fn dump(pid: Pid, opts: &DumpOptions, progress: &mut dyn Progress) -> Result<DumpReport> {
    let t0 = Instant::now();
    let out = if opts.stdout {
        None
    } else {
        Some(OutputFile::create(&opts.output, opts.overwrite)?)
    };
    tracing::debug!("output file prepared in {:.2} ms", ms(t0));
    let t = Instant::now();
    let mut snap = Snapshot::capture(pid, &opts.snapshot)?;
    log_capture(&snap, t);
    if opts.level == Level::Default || opts.filter.is_some() {
        crate::explain::log_plan(
            &snap,
            &KernelPolicy {
                filter: opts.filter.unwrap_or(snap.process().coredump_filter),
            },
        );
    }
    let t = Instant::now();
    let segs = crate::level::plan(&snap, opts.level, opts.filter);
    // The write path applies to uncompressed core files; streams are read from the clone.
    let file_out = out.is_some() && opts.compress.is_none();
    let requested = if file_out {
        opts.snapshot.write_path.as_str()
    } else {
        "read"
    };
    let mut notes = snap.notes();
    let meta_at = notes.len();
    let meta = metadata(&snap, opts, requested);
    crate::elf::notes::push_note(&mut notes, meta::NOTE_NAME, meta::NT_COREFLECT, &meta);
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
    let out_path = if opts.stdout {
        PathBuf::from("(standard output)")
    } else {
        opts.output.clone()
    };
    let mut compressed_size = None;
    let stats = match (&out, opts.compress) {
        (Some(out), None) => {
            let st = snap.write_final_core_file_with(out.file(), &notes, &segs, &mut prog);
            if let Ok(st) = &st {
                // The note said what was asked for; say what was used.
                if !st.path.used.is_empty() && st.path.used != requested {
                    fix_write_path(out.file(), &notes, meta_at, segs.len(), &st.path.used)?;
                }
            }
            st
        }
        (Some(out), Some(level)) => {
            let (st, n) = write_core_zstd(&snap, out.file(), level, &notes, &segs, &mut prog)?;
            compressed_size = Some(n);
            Ok(st)
        }
        (None, c) => {
            // SAFETY: fd 1 stays open for the whole process; ManuallyDrop never closes it.
            let stdout = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(1)
            });
            match c {
                Some(level) => {
                    let (st, n) =
                        write_core_zstd(&snap, &*stdout, level, &notes, &segs, &mut prog)?;
                    compressed_size = Some(n);
                    Ok(st)
                }
                None => {
                    let mut sink =
                        StreamSink::new(std::io::BufWriter::with_capacity(1 << 20, &*stdout));
                    snap.write_core_with(&mut sink, &notes, &segs, &mut prog)
                }
            }
        }
    };
    let stats = stats
        .and_then(|st| snap.check_image_alive().map(|_| st))
        .map_err(|e| match e {
            Error::Io { what, source } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Error::Output {
                    what: "writing the core to",
                    path: out_path.clone(),
                    source,
                    hint: format!(
                        "; the filesystem is full ({what}): free space or choose another path"
                    ),
                }
            }
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe => {
                Error::Output {
                    what: "writing the core to",
                    path: out_path.clone(),
                    source,
                    hint: "; the reader of the pipe went away before the end: the core it got is incomplete".into(),
                }
            }
            Error::Io { source, .. } => Error::Output {
                what: "writing the core to",
                path: out_path.clone(),
                source,
                hint: String::new(),
            },
            e => e,
        })?;
    tracing::debug!(
        "core written in {:.2} ms: {} bytes of data, {} left as holes (never populated), {} as zero pages, {} by the clone itself",
        ms(t),
        stats.bytes_written,
        stats.unpopulated_bytes,
        stats.zero_bytes,
        stats.written_by_clone
    );
    let t = Instant::now();
    let mode = snap.mode();
    let threads = snap.threads().len();
    let segments = snap.mappings().len();
    let mut warnings = snap.warnings().to_vec();
    if matches!(
        opts.snapshot.write_path,
        crate::write_path::WritePath::Splice | crate::write_path::WritePath::Pwrite
    ) && !file_out
    {
        warnings.push(Warning::WritePathNotApplicable {
            path: opts.snapshot.write_path,
        });
    }
    warnings.extend(unreadable_warnings(&stats));
    let live_bytes = if mode == Mode::Reflect {
        live_bytes(&snap, &segs)
    } else {
        0
    };
    let mut pause = snap.pause();
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
    let path = match out {
        Some(out) => out.commit(),
        None => Ok(PathBuf::from("-")),
    };
    let (w, reap_us) = snap.finish_timed();
    warnings.extend(w);
    pause.reap_us = reap_us.unwrap_or(0);
    let path = path?;
    tracing::debug!(
        "named {} and the clone reaped in {:.2} ms",
        path.display(),
        ms(t)
    );
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
        live_bytes,
        write_path: stats.path.clone(),
        duration_ms: t0.elapsed().as_millis() as u64,
        warnings,
        level: opts.level,
        compressed_size,
    })
}

/// The `COREFLECT` note's descriptor for this dump.
fn metadata(snap: &Snapshot, opts: &DumpOptions, write_path: &str) -> Vec<u8> {
    let mut m = Metadata::default();
    m.push("version", env!("CARGO_PKG_VERSION"));
    m.push("mode", snap.mode().as_str());
    m.push("level", opts.level.as_str());
    if let Some(f) = opts.filter {
        m.push("filter", format!("{f:#x}"));
    }
    if snap.mode() == crate::snapshot::Mode::Suspend {
        // Stopped until the end of the write, which has not begun.
        m.push("pause", "the whole write (suspend mode)");
    } else {
        m.push("pause_us", snap.pause().total_us);
    }
    m.push("write_path", meta::write_path_value(write_path));
    m.push("output", if opts.stdout { "stream" } else { "file" });
    m.push(
        "compression",
        match opts.compress {
            Some(l) => format!("zstd:{l}"),
            None => "none".into(),
        },
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    m.push("created", now);
    for w in snap.warnings() {
        m.push("warning", w);
    }
    m.encode()
}

/// Rewrites the note's `write_path` value in place (same width) with the path `used`.
fn fix_write_path(
    file: &std::fs::File,
    notes: &[u8],
    meta_at: usize,
    nsegs: usize,
    used: &str,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let key = b"write_path=";
    let Some(k) = notes[meta_at..].windows(key.len()).position(|w| w == key) else {
        return Ok(());
    };
    // Where the layout puts the notes: after the ELF header, the program headers (one
    // PT_NOTE and the loads) and, past PN_XNUM of them, one section header.
    let nphdr = nsegs + 1;
    let xnum = nphdr >= crate::elf::PN_XNUM as usize;
    let notes_offset = crate::elf::EHDR_SIZE
        + nphdr * crate::elf::PHDR_SIZE
        + if xnum { crate::elf::SHDR_SIZE } else { 0 };
    let at = (notes_offset + meta_at + k + key.len()) as u64;
    file.write_all_at(meta::write_path_value(used).as_bytes(), at)
        .map_err(|e| Error::io("correcting the COREFLECT note", e))
}

/// Counts the bytes written through it.
struct Counter<W: std::io::Write> {
    w: W,
    n: u64,
}

impl<W: std::io::Write> std::io::Write for Counter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.w.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Writes the core of `snap` as one zstd frame at `level` into `w` (multithreaded encoder:
/// compression runs on worker threads while the reader threads fill the next chunks; holes
/// are compressed zeros). Decompressed, it is byte for byte what [`Snapshot::write_core_with`]
/// writes. Returns the stats and the frame's length.
pub fn write_core_zstd<W: std::io::Write>(
    snap: &Snapshot,
    w: W,
    level: i32,
    notes: &[u8],
    segs: &[crate::elf::writer::SegmentPlan],
    prog: &mut dyn crate::elf::writer::Progress,
) -> Result<(WriteStats, u64)> {
    let zerr = |e: std::io::Error| Error::io("starting the zstd compressor", e);
    let counter = Counter {
        w: std::io::BufWriter::with_capacity(1 << 20, w),
        n: 0,
    };
    let mut enc = zstd::stream::write::Encoder::new(counter, level).map_err(zerr)?;
    let workers = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    enc.multithread(workers).map_err(zerr)?;
    let mut sink = StreamSink::new(enc);
    let st = snap.write_core_with(&mut sink, notes, segs, prog)?;
    let enc = sink.into_inner();
    let mut counter = enc
        .finish()
        .map_err(|e| Error::io("finishing the zstd frame", e))?;
    std::io::Write::flush(&mut counter).map_err(|e| Error::io("writing the core", e))?;
    Ok((st, counter.n))
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The `-v` line for the snapshot: how long it took and where the pause went.
fn log_capture(snap: &Snapshot, t: Instant) {
    let p = snap.pause();
    tracing::debug!(
        "snapshot ({}, {} threads, {} mappings) taken in {:.2} ms; target paused {:.2} ms: stop {:.2} ms, clone {:.2} ms, release {:.2} ms, registers {:.2} ms (estimated {:.2} ms)",
        snap.mode().as_str(),
        snap.threads().len(),
        snap.mappings().len(),
        ms(t),
        p.total_us as f64 / 1e3,
        p.stop_us as f64 / 1e3,
        p.clone_us as f64 / 1e3,
        p.release_us as f64 / 1e3,
        p.capture_us as f64 / 1e3,
        p.estimate_us as f64 / 1e3
    );
}

/// The bytes of the core's segments that a reflected snapshot reads live: shared mappings
/// and the ranges read from the target itself.
fn live_bytes(snap: &Snapshot, segs: &[crate::elf::writer::SegmentPlan]) -> u64 {
    segs.iter()
        .filter(|s| {
            s.source == Source::Live
                || snap
                    .mappings()
                    .iter()
                    .any(|m| m.shared && m.start <= s.vaddr && s.vaddr < m.end)
        })
        .map(|s| s.filesz)
        .sum()
}

/// One warning per range the writer could not read (left as a hole in the core).
pub(crate) fn unreadable_warnings(stats: &crate::elf::writer::WriteStats) -> Vec<Warning> {
    stats
        .unreadable
        .iter()
        .map(|u| Warning::Unreadable {
            start: u.start,
            end: u.end,
            name: u.name.clone(),
            error: u.error.clone(),
        })
        .collect()
}
