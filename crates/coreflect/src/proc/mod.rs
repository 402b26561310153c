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

/// A thread of `pid` whose /proc files describe the process's memory: `pid` itself, unless
/// the main thread has exited (called `pthread_exit`: a zombie leader has no memory map,
/// auxv, exe or mem of its own) while other threads run — then the first live thread.
/// `None` if no thread of it is alive.
pub fn live_thread(pid: Pid) -> Option<Pid> {
    let alive =
        |tid: Pid| Status::read_thread(pid, tid).is_ok_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'));
    if alive(pid) {
        return Some(pid);
    }
    threads(pid)
        .ok()?
        .into_iter()
        .find(|&t| t != pid && alive(t))
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

/// The thread of `ppid` that created `pid`: the one whose `/proc/PPID/task/TID/children`
/// lists it (`ppid` itself when none does, or the files are missing).
pub fn parent_thread(pid: Pid, ppid: Pid) -> Pid {
    let listed = |tid: Pid| {
        std::fs::read_to_string(format!("/proc/{ppid}/task/{tid}/children"))
            .map(|s| s.split_whitespace().any(|w| w.parse() == Ok(pid)))
            .unwrap_or(false)
    };
    if ppid <= 0 || listed(ppid) {
        return ppid;
    }
    threads(ppid)
        .unwrap_or_default()
        .into_iter()
        .find(|&t| listed(t))
        .unwrap_or(ppid)
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
    /// The thread of the parent that created the process (the kernel's `real_parent`, whose
    /// thread id the kernel's cores give as `pr_ppid`); the parent's pid if unknown.
    pub parent_tid: Pid,
    /// The raw argument area (`/proc/PID/cmdline`, NULs included), for `pr_psargs`.
    pub args: Vec<u8>,
    /// Raw auxv up to and including `AT_NULL`.
    pub auxv: Vec<u8>,
    /// `coredump_filter` bits.
    pub coredump_filter: u32,
    /// The executable path, if readable.
    pub exe: Option<PathBuf>,
}

impl ProcessInfo {
    /// Reads everything for `pid`. The main thread's `stat` describes the process; the
    /// rest is read through a live thread when the main thread has exited (see
    /// [`live_thread`]).
    pub fn read(pid: Pid) -> Result<ProcessInfo> {
        let mm = live_thread(pid).unwrap_or(pid);
        let stat = Stat::read(pid)?;
        Ok(ProcessInfo {
            pid,
            parent_tid: parent_thread(pid, stat.ppid),
            stat,
            status: Status::read(mm)?,
            cmdline: cmdline(mm),
            args: read_bytes(mm, "cmdline").unwrap_or_default(),
            auxv: auxv(mm).unwrap_or_default(),
            coredump_filter: coredump_filter(mm),
            exe: exe(mm),
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
    /// The thread's own pending signals (`SigPnd:`; the kernel's `pr_sigpend` leaves out
    /// the process-wide ones).
    pub sig_pending: u64,
}

impl ThreadTimes {
    /// Reads the figures of thread `tid` of `pid` (zeros if it is gone). As in the
    /// kernel's cores, the main thread's times are the whole process's.
    pub fn read(pid: Pid, tid: Pid) -> ThreadTimes {
        let st = if tid == pid {
            Stat::read(pid)
        } else {
            Stat::read_thread(pid, tid)
        }
        .unwrap_or_default();
        let s = Status::read_thread(pid, tid).unwrap_or_default();
        ThreadTimes {
            utime: st.utime,
            stime: st.stime,
            sig_pending: s.thread_pending,
        }
    }
}
