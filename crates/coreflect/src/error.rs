//! Errors of the coreflect library.
//!
//! Every variant names what failed and, where there is one, what the user can do about it.
//! Problems that do not stop a dump (an unreadable range, a thread that vanished) are not
//! errors: they are collected as [`crate::Warning`]s in the [`crate::dump::DumpReport`].
//!
//! A message does not repeat its cause: the underlying OS error is the variant's
//! [`std::error::Error::source`], for the caller to print after it (`{:#}` with anyhow, or
//! walking the chain). Messages name no command-line option: a front end adds its own hints.

use std::io;
use std::path::PathBuf;

/// A process id or thread id as the kernel uses it.
pub type Pid = i32;

/// The error type of every fallible coreflect operation.
///
/// ```no_run
/// use coreflect::{Error, Snapshot};
/// # fn main() {
/// let snap = Snapshot::capture(1234, &Default::default()).unwrap();
/// match snap.read_u64(0x10) {
///     Ok(v) => println!("{v:#x}"),
///     Err(Error::Memory { addr, live, .. }) => eprintln!("{addr:#x} unreadable (live: {live})"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pid is not a process on this system.
    #[error("no process with pid {pid}: check the pid (it may have exited)")]
    NoSuchProcess {
        /// The pid asked for.
        pid: Pid,
    },
    /// The pid is not a valid process id at all.
    #[error(
        "invalid pid {pid}: a pid is a positive number no larger than /proc/sys/kernel/pid_max"
    )]
    InvalidPid {
        /// The pid asked for.
        pid: i64,
    },
    /// The pid is a thread of another process, not a process.
    #[error("{tid} is a thread of process {tgid}, not a process: dump {tgid} instead")]
    NotAProcess {
        /// The id asked for.
        tid: Pid,
        /// Its process.
        tgid: Pid,
    },
    /// The pid names a kernel thread, which has no user memory to dump.
    #[error("pid {pid} ({comm}) is a kernel thread: it has no user address space to dump")]
    KernelThread {
        /// The pid asked for.
        pid: Pid,
        /// Its command name.
        comm: String,
    },
    /// The process has exited and waits to be reaped by its parent.
    #[error("pid {pid} ({comm}) is a zombie: it has exited and has no memory left to dump")]
    Zombie {
        /// The pid asked for.
        pid: Pid,
        /// Its command name.
        comm: String,
    },
    /// The process asked to dump itself.
    #[error("pid {pid} is coreflect itself: a process cannot ptrace itself; dump it from another process")]
    SelfDump {
        /// Our own pid.
        pid: Pid,
    },
    /// The process (or one of its threads) is already traced by a debugger or tracer.
    #[error("pid {pid} is already traced by pid {tracer} ({tracer_comm}): detach that debugger/tracer first (only one tracer at a time)")]
    AlreadyTraced {
        /// The pid asked for.
        pid: Pid,
        /// The tracer's pid from `TracerPid`.
        tracer: Pid,
        /// The tracer's command name, if known.
        tracer_comm: String,
    },
    /// ptrace or /proc access was refused.
    #[error("permission denied to {what} pid {pid}: {hint}")]
    PermissionDenied {
        /// The pid asked for.
        pid: Pid,
        /// What was refused.
        what: &'static str,
        /// What to do about it.
        hint: String,
    },
    /// The target exited while it was being dumped.
    #[error("pid {pid} exited while it was being dumped; nothing was written")]
    ProcessExited {
        /// The pid of the target.
        pid: Pid,
    },
    /// The target executed a new program (`execve`) while it was being stopped: the
    /// address space the snapshot was prepared for is gone.
    #[error("pid {pid} executed a new program (exec) while it was being stopped; it was released and nothing was written: try again")]
    TargetExeced {
        /// The target.
        pid: Pid,
    },
    /// The target kept creating threads faster than they could be stopped.
    #[error("pid {pid} kept creating threads through {scans} scans of /proc/{pid}/task while it was being stopped; it was released and nothing was written: try again (at a quieter time)")]
    ThreadsKeptAppearing {
        /// The target.
        pid: Pid,
        /// How many times its thread list was read.
        scans: usize,
    },
    /// The copy-on-write clone did not reach its first stop after it was created.
    #[error("the clone {clone} of pid {pid} did not stop after it was created ({status}); the target was released and nothing was written: try again")]
    CloneNotStopped {
        /// The target.
        pid: Pid,
        /// The clone.
        clone: Pid,
        /// What it did instead.
        status: String,
    },
    /// The copy-on-write clone was killed (by the OOM killer, which picks it first, or by
    /// someone else) before all of its memory was in the core.
    #[error("the clone {clone} of pid {pid} was killed before its memory was all read (by the out-of-memory killer?); the core was not kept: free memory and try again, or take a suspended snapshot")]
    CloneKilled {
        /// The target.
        pid: Pid,
        /// The clone.
        clone: Pid,
    },
    /// The thread that holds the snapshot (its ptrace tracer) ended unexpectedly: a bug.
    #[error("the tracer thread of pid {pid}'s snapshot ended unexpectedly (it panicked: a bug in coreflect, please report it); the target was released")]
    TracerThreadEnded {
        /// The target.
        pid: Pid,
    },
    /// The zero-copy write path cannot be set up for this clone.
    #[error("the zero-copy write path cannot be used with the clone {clone}: {reason}; the automatic write path falls back to reading the clone's memory")]
    WritePathUnavailable {
        /// The clone.
        clone: Pid,
        /// Why.
        reason: String,
    },
    /// The zero-copy write of the clone's memory broke off in the middle of the core.
    #[error("splicing the clone {clone}'s memory into the core broke off: {why}; the core was not kept: try again, or read the clone's memory instead")]
    SpliceBroken {
        /// The clone.
        clone: Pid,
        /// What happened.
        why: &'static str,
    },
    /// A thread did not stop within the time allowed.
    #[error("thread {tid} of pid {pid} did not stop within {millis} ms (state {state}: {}): {}", state_meaning(.state), state_advice(.state))]
    StopTimeout {
        /// The target.
        pid: Pid,
        /// The thread that did not stop.
        tid: Pid,
        /// How long we waited.
        millis: u64,
        /// The thread's state letter from /proc.
        state: String,
    },
    /// A ptrace request failed unexpectedly.
    #[error("ptrace {op} on thread {tid} failed")]
    Ptrace {
        /// The request name.
        op: &'static str,
        /// The thread it was made on.
        tid: Pid,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a /proc file failed.
    #[error("cannot read {path}")]
    Proc {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A /proc file had content we could not parse.
    #[error("cannot parse {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Creating or writing the output failed.
    #[error("{what} {path}")]
    Output {
        /// What we were doing.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
        /// What to do (with a leading "; "), or empty; it names no command-line option.
        /// Not in the message, as it reads after the cause: [`Error::with_causes`] ends with it.
        hint: String,
    },
    /// Reflection (the copy-on-write clone) cannot be used for this target.
    #[error("cannot reflect pid {pid}: {reason}; a suspended snapshot (the target stopped while it is read) still works")]
    ReflectUnavailable {
        /// The target.
        pid: Pid,
        /// Why.
        reason: String,
    },
    /// The estimated pause exceeds the caller's limit.
    #[error("estimated pause {estimate_ms:.1} ms for pid {pid} exceeds the limit {limit_ms:.1} ms; nothing was stopped (allow a longer pause, or try at a quieter time)")]
    PauseTooLong {
        /// The target.
        pid: Pid,
        /// Our estimate in milliseconds.
        estimate_ms: f64,
        /// The caller's limit in milliseconds.
        limit_ms: f64,
    },
    /// Another coreflect holds the target (it is stopping it, or dumping it in suspend mode).
    #[error("pid {pid} is already being dumped by another coreflect (waited {waited_ms} ms for it); try again when it is done")]
    Busy {
        /// The target.
        pid: Pid,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The target runs 32-bit code, which this x86_64 core writer does not describe.
    #[error("pid {pid} is a 32-bit process: coreflect writes x86_64 cores only; use gcore for it")]
    Not64Bit {
        /// The target.
        pid: Pid,
    },
    /// The target is not dumpable and we lack the privilege to dump it anyway.
    #[error("pid {pid} is not dumpable (a set-user-ID/set-group-ID program, or one that called prctl(PR_SET_DUMPABLE, 0)): only root or a process with CAP_SYS_PTRACE may dump it")]
    NotDumpable {
        /// The target.
        pid: Pid,
    },
    /// The operation was cancelled (Ctrl-C, SIGTERM, or the caller's flag).
    #[error("cancelled: the target was released")]
    Cancelled,
    /// Reading the snapshot's memory failed: the range is not (or not wholly) mapped or
    /// readable in the snapshot.
    #[error("cannot read {len} bytes at {addr:#x} of pid {pid}'s snapshot ({}){}", if *.live { "read live from the target" } else { "frozen image" }, only_readable(*.readable))]
    Memory {
        /// The target.
        pid: Pid,
        /// The first address asked for.
        addr: u64,
        /// How many bytes were asked for.
        len: usize,
        /// True if the range is read live from the target rather than from the frozen image.
        live: bool,
        /// How many bytes from `addr` on were readable (0, or fewer than `len`).
        readable: usize,
        /// The OS error at `addr + readable` (`UnexpectedEof` where nothing is mapped).
        #[source]
        source: io::Error,
    },
    /// Any other I/O error, with context.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A syscall injected into a stopped thread (the `clone` of the pause, the clone's own
    /// writes, the `wait4` that reaps the clone) did not run, or the thread could not be put
    /// back afterwards.
    #[error("{}", injection_message(*.tid, .syscall, .kind))]
    Injection {
        /// The thread borrowed for it.
        tid: Pid,
        /// The syscall's name (`clone`, `wait4`, `pwrite64`…).
        syscall: &'static str,
        /// What went wrong.
        kind: InjectionFailure,
    },
}

/// Shorthand for `Result<T, coreflect::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The message followed by each of its causes, then what to do where the message
    /// could not say it before the cause: `message: cause: cause; advice`.
    pub fn with_causes(&self) -> String {
        let mut s = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        if let Error::Output { hint, .. } = self {
            s.push_str(hint);
        }
        s
    }

    /// The raw OS error number underneath, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Ptrace { source, .. }
            | Error::Proc { source, .. }
            | Error::Output { source, .. }
            | Error::Io { source, .. }
            | Error::Memory { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// How an injected syscall failed (see [`Error::Injection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InjectionFailure {
    /// The borrowed `syscall` instruction raised `signal` (it is not executable, or not a
    /// `syscall` any more): the thread never ran the syscall, and was put back unchanged.
    Faulted {
        /// The signal the instruction raised (suppressed).
        signal: i32,
    },
    /// The thread did not enter the syscall within `millis` ms.
    NotEntered {
        /// How long we waited.
        millis: u64,
    },
    /// After the syscall the thread did not come back to a stop within `millis` ms, so
    /// its registers and signal mask could not be put back.
    NotBack {
        /// How long we waited.
        millis: u64,
    },
    /// An earlier injection into the same thread failed: no more are made.
    EarlierFailed,
}

fn injection_message(tid: Pid, syscall: &str, kind: &InjectionFailure) -> String {
    match kind {
        InjectionFailure::Faulted { signal } => format!(
            "the borrowed syscall instruction faulted (signal {signal}) when thread {tid} was to run an injected {syscall}: the thread never ran it and was put back unchanged"
        ),
        InjectionFailure::NotEntered { millis } => format!(
            "thread {tid} did not enter the injected {syscall} within {millis} ms and was put back: try again when the system is less loaded"
        ),
        InjectionFailure::NotBack { millis } => format!(
            "thread {tid} did not stop again within {millis} ms after the injected {syscall}, so its registers and signal mask could not be put back: check the process, it may have to be restarted"
        ),
        InjectionFailure::EarlierFailed => format!(
            "no {syscall} was injected into thread {tid}: an earlier injected syscall there failed (that error says why)"
        ),
    }
}

/// The end of [`Error::Memory`]'s message: how much was readable, if anything.
fn only_readable(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(": only {n} bytes readable"),
    }
}

/// What a thread state letter from `/proc/PID/task/TID/stat` means (proc(5)).
pub fn state_meaning(state: &str) -> &'static str {
    match state {
        "R" => "running",
        "S" => "sleeping in an interruptible wait",
        "D" => "in uninterruptible sleep, waiting in the kernel (disk or network I/O, a vfork child)",
        "t" => "in a tracing stop, i.e. stopping for coreflect itself, but the stop had not been reported yet",
        "T" => "stopped by a job-control signal",
        "Z" => "a zombie: it has exited",
        "X" | "x" => "dead",
        "W" => "waking",
        "P" => "parked",
        "I" => "idle",
        "K" => "wakekill",
        _ => "unknown",
    }
}

/// What to do when a thread in `state` did not stop in time.
fn state_advice(state: &str) -> &'static str {
    match state {
        "D" => "it stops once the kernel call it waits in returns: try again later, or allow a longer stop timeout",
        "Z" | "X" | "x" => "it is exiting: try again",
        _ => "allow a longer stop timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_print_once_after_the_message() {
        let e = Error::Output {
            what: "cannot create",
            path: "/x/y".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
            hint: "; the directory does not exist: create it".into(),
        };
        assert_eq!(e.to_string(), "cannot create /x/y");
        let full = e.with_causes();
        assert!(
            full.starts_with("cannot create /x/y: No such file or directory"),
            "{full}"
        );
        assert!(
            full.ends_with("; the directory does not exist: create it"),
            "{full}"
        );
        let p = Error::Ptrace {
            op: "GETREGS",
            tid: 7,
            source: io::Error::from_raw_os_error(libc::ESRCH),
        };
        assert_eq!(p.with_causes().matches("No such process").count(), 1);
    }

    #[test]
    fn every_cause_prints_once() {
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        let with_source = [
            Error::Memory {
                pid: 1,
                addr: 0x1000,
                len: 16,
                live: false,
                readable: 8,
                source: eio(),
            },
            Error::Memory {
                pid: 1,
                addr: 0x10,
                len: 8,
                live: true,
                readable: 0,
                source: eio(),
            },
            Error::Ptrace {
                op: "GETREGS",
                tid: 7,
                source: eio(),
            },
            Error::Proc {
                path: "/proc/1/maps".into(),
                source: eio(),
            },
            Error::Output {
                what: "writing the core to",
                path: "/x".into(),
                source: eio(),
                hint: String::new(),
            },
            Error::io("writing the core", eio()),
        ];
        for e in &with_source {
            let full = e.with_causes();
            assert!(!e.to_string().contains("os error"), "{e}");
            assert_eq!(full.matches("Input/output error").count(), 1, "{full}");
            assert!(full.starts_with(&e.to_string()), "{full}");
        }
        assert!(with_source[0]
            .with_causes()
            .starts_with("cannot read 16 bytes at 0x1000 of pid 1's snapshot (frozen image): only 8 bytes readable: Input/output error"));
        assert_eq!(
            with_source[1].to_string(),
            "cannot read 8 bytes at 0x10 of pid 1's snapshot (read live from the target)"
        );
    }

    #[test]
    fn the_new_variants_say_what_failed_and_what_to_do_without_options() {
        let all = [
            Error::TargetExeced { pid: 5 },
            Error::ThreadsKeptAppearing { pid: 5, scans: 30 },
            Error::CloneNotStopped {
                pid: 5,
                clone: 6,
                status: "it was killed by signal 9".into(),
            },
            Error::CloneKilled { pid: 5, clone: 6 },
            Error::TracerThreadEnded { pid: 5 },
            Error::WritePathUnavailable {
                clone: 6,
                reason: "the clone could not be set up for splicing".into(),
            },
            Error::SpliceBroken {
                clone: 6,
                why: "the clone's pipe ended early",
            },
        ];
        for e in &all {
            let m = e.to_string();
            assert!(std::error::Error::source(e).is_none());
            assert_eq!(e.with_causes(), m);
            assert!(m.contains('5') || m.contains('6'), "names no process: {m}");
            assert!(!m.contains("--"), "names a command-line option: {m}");
            assert!(
                m.contains("try again") || m.contains("report it") || m.contains("falls back"),
                "says nothing to do: {m}"
            );
        }
        assert!(all[0].to_string().contains("exec"));
        assert!(all[2].to_string().contains("killed by signal 9"));
        assert!(all[3].to_string().contains("the core was not kept"));
    }

    #[test]
    fn stop_timeout_names_the_state_it_saw() {
        let e = |state: &str| {
            Error::StopTimeout {
                pid: 1,
                tid: 2,
                millis: 0,
                state: state.into(),
            }
            .to_string()
        };
        assert!(e("D").contains("uninterruptible sleep"), "{}", e("D"));
        for s in ["t", "R", "S", "T", "?"] {
            assert!(!e(s).contains("uninterruptible"), "{}", e(s));
            assert!(e(s).contains("longer stop timeout"), "{}", e(s));
        }
        assert!(e("t").contains("tracing stop"), "{}", e("t"));
    }
}
