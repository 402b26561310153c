//! Reading `/proc/PID/...`: the memory map, status, threads, auxv, memory.
//!
//! Everything here is read-only and works on any process we may ptrace; nothing here stops
//! the target.

pub mod maps;
pub mod mem;
pub mod status;

use crate::error::{Error, Pid, Result};
use std::path::PathBuf;

pub use maps::{Mapping, MappingKind};
pub use mem::ProcMem;
pub use status::{Stat, Status};

/// `/proc/<pid>/<what>`.
pub fn path(pid: Pid, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

/// Reads a whole /proc file as bytes, mapping ENOENT/ESRCH to [`Error::NoSuchProcess`].
/// (/proc files report size 0, so no size hint is asked for.)
pub fn read_bytes(pid: Pid, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let p = path(pid, what);
    let mut v = Vec::with_capacity(4096);
    std::fs::File::open(&p)
        .and_then(|mut f| f.read_to_end(&mut v))
        .map_err(|e| proc_error(pid, p, e))?;
    Ok(v)
}

/// Reads a whole /proc file as text (lossy UTF-8).
pub fn read_text(pid: Pid, what: &str) -> Result<String> {
    read_bytes(pid, what).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Turns an I/O error on a /proc file into the most helpful [`Error`].
pub fn proc_error(pid: Pid, path: PathBuf, e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => Error::NoSuchProcess { pid },
        Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied {
            pid,
            what: "read /proc of",
            hint: crate::ptrace::permission_hint(pid),
        },
        _ => Error::Proc { path, source: e },
    }
}

/// The thread ids of a process, from `/proc/PID/task`, sorted.
pub fn threads(pid: Pid) -> Result<Vec<Pid>> {
    let p = path(pid, "task");
    let rd = std::fs::read_dir(&p).map_err(|e| proc_error(pid, p.clone(), e))?;
    let mut tids: Vec<Pid> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The direct children of a process (all threads), from `/proc/PID/task/*/children`.
pub fn children(pid: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    for tid in threads(pid).unwrap_or_default() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            out.extend(s.split_whitespace().filter_map(|w| w.parse::<Pid>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The process's command line with NULs turned into spaces, trailing NUL removed.
pub fn cmdline(pid: Pid) -> String {
    let b = read_bytes(pid, "cmdline").unwrap_or_default();
    let b = b.strip_suffix(b"\0").unwrap_or(&b);
    String::from_utf8_lossy(b).replace('\0', " ")
}

/// The raw auxiliary vector (`/proc/PID/auxv`), cut after its `AT_NULL` entry.
pub fn auxv(pid: Pid) -> Result<Vec<u8>> {
    let mut b = read_bytes(pid, "auxv")?;
    let mut end = b.len() - b.len() % 16;
    for (i, chunk) in b.chunks_exact(16).enumerate() {
        if chunk[..8] == [0u8; 8] {
            end = (i + 1) * 16;
            break;
        }
    }
    b.truncate(end);
    Ok(b)
}

/// The process's `coredump_filter` bits (default 0x33 when unreadable).
pub fn coredump_filter(pid: Pid) -> u32 {
    read_text(pid, "coredump_filter")
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0x33)
}

/// The executable's path (`/proc/PID/exe`), if readable.
pub fn exe(pid: Pid) -> Option<PathBuf> {
    std::fs::read_link(path(pid, "exe")).ok()
}

/// What the core's process-wide notes need to know about the target, read before it is
/// stopped (none of it changes while it runs, except times).
#[derive(Debug, Clone, Default)]
pub struct ProcessInfo {
    /// Process id (thread-group id).
    pub pid: Pid,
    /// `stat` of the main thread.
    pub stat: Stat,
    /// `status` of the process.
    pub status: Status,
    /// Command line, NULs turned to spaces.
    pub cmdline: String,
    /// Raw auxv up to and including `AT_NULL`.
    pub auxv: Vec<u8>,
    /// `coredump_filter` bits.
    pub coredump_filter: u32,
    /// The executable path, if readable.
    pub exe: Option<PathBuf>,
}

impl ProcessInfo {
    /// Reads everything for `pid`.
    pub fn read(pid: Pid) -> Result<ProcessInfo> {
        Ok(ProcessInfo {
            pid,
            stat: Stat::read(pid)?,
            status: Status::read(pid)?,
            cmdline: cmdline(pid),
            auxv: auxv(pid).unwrap_or_default(),
            coredump_filter: coredump_filter(pid),
            exe: exe(pid),
        })
    }
}

/// Per-thread figures read after the target was released (times, pending signals).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadTimes {
    /// User time in clock ticks.
    pub utime: u64,
    /// System time in clock ticks.
    pub stime: u64,
    /// Pending signals (thread and shared).
    pub sig_pending: u64,
    /// Blocked signals.
    pub sig_blocked: u64,
}

impl ThreadTimes {
    /// Reads the figures of thread `tid` of `pid` (zeros if it is gone).
    pub fn read(pid: Pid, tid: Pid) -> ThreadTimes {
        let st = Stat::read_thread(pid, tid).unwrap_or_default();
        let s = Status::read_thread(pid, tid).unwrap_or_default();
        ThreadTimes {
            utime: st.utime,
            stime: st.stime,
            sig_pending: s.sig_pending,
            sig_blocked: s.sig_blocked,
        }
    }
}
