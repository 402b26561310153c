//! Staying a process's tracer while it runs, to intercept signals (`coreflect watch
//! --signal`): every thread is seized without being interrupted, new threads are followed
//! (`PTRACE_O_TRACECLONE`), signal-delivery stops of the watched signals are reported to
//! the caller ([`Event`]) and every other signal is passed through at once. The caller can
//! stop the whole process at any time ([`Tracer::stop_all`], which returns a [`Held`]
//! handle), dump it with the same tracer ([`dump_held`]) and let it go on
//! ([`Tracer::resume_all`]), delivering the intercepted signal unchanged.
//!
//! ```no_run
//! use coreflect::trace::{dump_held, Event, Tracer};
//! use coreflect::{DumpOptions, Level, Options};
//! use std::time::Duration;
//!
//! # fn main() -> coreflect::Result<()> {
//! let mut tracer = Tracer::attach(1234, &[libc::SIGSEGV])?;
//! loop {
//!     match tracer.next_event(Duration::from_millis(100))? {
//!         Some(Event::Signal { tid, .. }) => {
//!             // The crashing thread is held on its signal: dump the whole process while
//!             // every thread is stopped, then let the signal be delivered.
//!             let held = tracer.stop_all(Duration::from_secs(2))?;
//!             let opts = DumpOptions {
//!                 snapshot: Options::default(),
//!                 output: "/tmp/crash.core".into(),
//!                 overwrite: false,
//!                 filter: None,
//!                 level: Level::default(),
//!                 compress: None, // dump_held writes plain cores
//!                 stdout: false,
//!             };
//!             let report = dump_held(&held, Some(tid), &opts, &mut |_, _| true);
//!             tracer.resume_all()?;
//!             println!("{} bytes written", report?.bytes_written);
//!         }
//!         Some(Event::Exited(how)) => break println!("the target is gone: {how:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A [`Tracer`] detaches from every thread when dropped: running threads are interrupted
//! first (a tracee can only be detached while stopped), and a thread stopped on a signal is
//! detached with that signal, so nothing is lost and no thread is left stopped.
//!
//! Every ptrace request must come from the thread that created the `Tracer`. It only ever
//! waits for the threads it traces (by thread id), never for any child: other children of
//! the calling thread (a process it spawned) keep their exit status for their own waiter.

use crate::dump::{DumpOptions, DumpReport};
use crate::elf::writer::Progress;
use crate::error::{Error, Pid, Result};
use crate::output::OutputFile;
use crate::proc;
use crate::ptrace::{self, WaitStatus};
use crate::snapshot::Snapshot;
use crate::stop::{StopKind, StoppedProcess, Tracee};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The state of one traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Stopped and held by us; resumed according to the kind.
    Held(StopKind),
}

/// What [`Tracer::next_event`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Thread `tid` is about to receive the watched signal `sig`; it stays stopped until
    /// [`Tracer::resume_all`] (which delivers the signal) or [`Tracer::deliver`].
    Signal {
        /// The thread.
        tid: Pid,
        /// The signal.
        sig: i32,
    },
    /// The process is gone; the tracer traces nothing any more.
    Exited(Exit),
}

/// How a traced process ended (its last thread's wait status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// It exited with this status (`exit(code)`, the low 8 bits).
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It is gone, but its status could not be collected (another waiter took it).
    Unknown,
}

/// A process traced by the calling thread, all of its threads followed.
#[derive(Debug)]
pub struct Tracer {
    pid: Pid,
    watched: u64,
    threads: HashMap<Pid, State>,
    siginfo: HashMap<Pid, [u8; 128]>,
    /// Processes (not threads) the target created with `clone()` and an exit signal other
    /// than SIGCHLD: `PTRACE_O_TRACECLONE` attaches them too. They are detached at their
    /// first stop and never counted as threads of the target.
    foreign: std::collections::HashSet<Pid>,
    /// Threads held on a watched signal that arrived while every thread was being stopped
    /// (during another dump): not reported yet, so kept stopped by
    /// [`Tracer::resume_all`] and reported by the next [`Tracer::next_event`].
    pending: Vec<Pid>,
    /// How many times held threads were let go (see [`Held::is_current`]).
    resumes: Arc<AtomicU64>,
    /// Wait statuses collected (reaped) but not handled yet, oldest first.
    ready: std::collections::VecDeque<(Pid, Waited)>,
    /// The signalfd for SIGCHLD (a `File` so that it is closed and read without `unsafe`).
    sigfd: std::fs::File,
    /// Signals passed through since the start.
    pub passed: u64,
}

/// Every thread of a traced process, held stopped by [`Tracer::stop_all`]: pass it to
/// [`dump_held`] to dump the process, then let the threads go with
/// [`Tracer::resume_all`]. The threads stay held by the tracer, not by this handle:
/// dropping it releases nothing.
///
/// A handle is valid until the tracer lets any thread run again ([`Tracer::resume_all`],
/// [`Tracer::deliver`], [`Tracer::detach_all`]); [`dump_held`] panics on a stale one.
#[derive(Debug)]
pub struct Held {
    /// Always `Some` until drop, which takes it to give the threads back without releasing
    /// them (the tracer keeps them held).
    stopped: Option<StoppedProcess>,
    /// The tracer's resume count when the threads were stopped.
    epoch: u64,
    /// The tracer's resume count now.
    resumes: Arc<AtomicU64>,
}

impl Held {
    /// The traced process.
    pub fn pid(&self) -> Pid {
        self.stopped().pid()
    }

    /// The threads held, main thread first.
    pub fn threads(&self) -> Vec<Pid> {
        self.stopped().tracees().iter().map(|t| t.tid).collect()
    }

    /// The signal thread `tid` is held on (about to receive), if any: it is delivered when
    /// the tracer resumes the thread.
    pub fn signal(&self, tid: Pid) -> Option<i32> {
        match self.stopped().tracee(tid)?.kind {
            StopKind::Signal(sig) => Some(sig),
            _ => None,
        }
    }

    /// True while every thread is still held as [`Tracer::stop_all`] left it.
    pub fn is_current(&self) -> bool {
        self.resumes.load(Ordering::SeqCst) == self.epoch
    }

    fn stopped(&self) -> &StoppedProcess {
        self.stopped
            .as_ref()
            .expect("a Held handle keeps its threads until dropped")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(s) = self.stopped.take() {
            // The tracer keeps the threads: nothing is detached or resumed.
            let _ = s.into_tracees();
        }
    }
}

fn bit(sig: i32) -> u64 {
    if (1..=64).contains(&sig) {
        1u64 << (sig - 1)
    } else {
        0
    }
}

fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

fn listen(tid: Pid) -> Result<()> {
    // SAFETY: PTRACE_LISTEN takes no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid, 0, 0) };
    if r < 0 {
        return Err(Error::Ptrace {
            op: "PTRACE_LISTEN",
            tid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn ignore_gone(r: Result<()>) -> Result<()> {
    match r {
        Err(Error::Ptrace { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r,
    }
}

impl Tracer {
    /// Seizes every thread of `pid` (no interrupt: the process keeps running) with
    /// `PTRACE_O_TRACECLONE`, re-scanning its threads until no new one appears. `watched`
    /// lists the signals [`Tracer::next_event`] reports; all others are passed through.
    ///
    /// Blocks `SIGCHLD` in the calling thread (ptrace stops are awaited on a signalfd).
    pub fn attach(pid: Pid, watched: &[i32]) -> Result<Tracer> {
        // SAFETY: a zeroed sigset is a valid argument for sigemptyset/sigaddset, which
        // fully initialise it; pthread_sigmask and signalfd only read it.
        let sigfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if sigfd < 0 {
            return Err(Error::io(
                "creating a signalfd for SIGCHLD",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: signalfd just returned this descriptor (checked >= 0) and nothing else owns
        // it: the `File` takes sole ownership and closes it once.
        let sigfd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(sigfd) };
        let mut t = Tracer {
            pid,
            watched: watched.iter().fold(0, |m, &s| m | bit(s)),
            threads: HashMap::new(),
            siginfo: HashMap::new(),
            foreign: Default::default(),
            pending: Vec::new(),
            ready: Default::default(),
            resumes: Default::default(),
            sigfd,
            passed: 0,
        };
        for pass in 0.. {
            let tids = match proc::threads(pid) {
                Ok(v) => v,
                Err(Error::NoSuchProcess { .. }) => return Err(Error::ProcessExited { pid }),
                Err(e) => return Err(e),
            };
            let mut new = 0;
            for tid in tids {
                if t.threads.contains_key(&tid) {
                    continue;
                }
                match ptrace::seize(tid, ptrace::O_TRACECLONE) {
                    Ok(()) => {
                        new += 1;
                        t.threads.insert(tid, State::Running);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    // Already ours: a thread created since the last scan, auto-attached.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EPERM)
                            && proc::Status::read_thread(pid, tid).is_ok_and(|s| {
                                s.tracer_pid == std::process::id() as Pid
                                    || s.tracer_pid == gettid()
                            }) =>
                    {
                        t.threads.insert(tid, State::Running);
                    }
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) =>
                    {
                        return Err(crate::stop::seize_refused(pid, tid));
                    }
                    Err(e) => return Err(e),
                }
            }
            if new == 0 {
                break;
            }
            if pass >= crate::stop::MAX_SCAN_PASSES {
                return Err(Error::ThreadsKeptAppearing { pid, scans: pass });
            }
        }
        if t.threads.is_empty() {
            return Err(Error::ProcessExited { pid });
        }
        Ok(t)
    }

    /// The traced process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The threads followed now.
    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Waits up to `timeout` for a watched signal or the process's end, handling every
    /// other stop itself (new threads, group stops, signals passed through). `Ok(None)`
    /// on timeout.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        while let Some(tid) = self.pending.pop() {
            if let Some(State::Held(StopKind::Signal(sig))) = self.threads.get(&tid).copied() {
                return Ok(Some(Event::Signal { tid, sig }));
            }
        }
        loop {
            self.drain_sigfd();
            while let Some((tid, st)) = self.wait_any()? {
                if let Some(e) = self.handle(tid, st, false)? {
                    return Ok(Some(e));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let ms = (deadline - now).as_millis().clamp(1, 50) as i32;
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.sigfd),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    fn drain_sigfd(&self) {
        let mut buf = [0u8; 128 * 8];
        // Non-blocking: stops at EAGAIN (or any error), as read(2) returning <= 0 did.
        while matches!(std::io::Read::read(&mut &self.sigfd, &mut buf), Ok(n) if n > 0) {}
    }

    /// One pending wait status of one of our tracees, without blocking.
    ///
    /// Waits for each traced thread (and each foreign process not yet let go) by its id,
    /// never with `waitpid(-1)`: that took the exit status of any child of the calling
    /// thread (a process it spawned, which its own `wait` then never saw). `__WNOTHREAD`:
    /// only this thread's tracees, never those of another thread of the caller (a
    /// `Snapshot`'s tracer thread, another `Tracer`).
    ///
    /// One sweep collects every id's pending status into a queue, so that a thread that
    /// stops again at once cannot starve the others.
    fn wait_any(&mut self) -> Result<Option<(Pid, Waited)>> {
        if self.ready.is_empty() {
            let ids: Vec<Pid> = self
                .threads
                .keys()
                .chain(self.foreign.iter())
                .copied()
                .collect();
            for tid in ids {
                if let Some(st) = wait_one(tid)? {
                    self.ready.push_back((tid, st));
                }
            }
        }
        Ok(self.ready.pop_front())
    }

    /// Handles one wait status. With `holding`, every stop is kept (recorded as held),
    /// for [`Tracer::stop_all`]; otherwise only watched signals are.
    fn handle(&mut self, tid: Pid, st: Waited, holding: bool) -> Result<Option<Event>> {
        let st = match st {
            Waited::Status(st) => st,
            Waited::Lost => {
                // No longer ours and nothing to collect: the old id of a thread that
                // exec'd, or a status someone else took.
                self.foreign.remove(&tid);
                if self.threads.remove(&tid).is_some() {
                    self.siginfo.remove(&tid);
                    self.pending.retain(|&p| p != tid);
                    if (tid == self.pid && !pid_exists(self.pid)) || self.threads.is_empty() {
                        self.threads.clear();
                        // Statuses of foreign processes stay queued: they are still let go.
                        self.ready.retain(|(t, _)| self.foreign.contains(t));
                        return Ok(Some(Event::Exited(Exit::Unknown)));
                    }
                }
                return Ok(None);
            }
        };
        if self.foreign.contains(&tid) {
            // Another process: let it go at its first stop (with the signal it was about
            // to get, if any), or forget it once it is gone.
            match st {
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                    self.foreign.remove(&tid);
                }
                WaitStatus::Stopped { sig, event } => {
                    let sig = if event == 0 { sig } else { 0 };
                    if ptrace::detach(tid, sig).is_ok() || !pid_exists(tid) {
                        self.foreign.remove(&tid);
                    }
                }
                WaitStatus::SyscallStop => {
                    let _ = ptrace::detach(tid, 0);
                    self.foreign.remove(&tid);
                }
            }
            return Ok(None);
        }
        match st {
            WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                self.threads.remove(&tid);
                self.siginfo.remove(&tid);
                if tid == self.pid || self.threads.is_empty() {
                    self.threads.clear();
                    // Statuses of foreign processes stay queued: they are still let go.
                    self.ready.retain(|(t, _)| self.foreign.contains(t));
                    return Ok(Some(Event::Exited(match st {
                        WaitStatus::Signaled(sig) => Exit::Signal(sig),
                        WaitStatus::Exited(code) => Exit::Code(code),
                        _ => Exit::Unknown,
                    })));
                }
                Ok(None)
            }
            WaitStatus::SyscallStop => {
                self.threads.insert(tid, State::Running);
                ignore_gone(ptrace::cont(tid, 0)).map(|_| None)
            }
            WaitStatus::Stopped { sig, event } => {
                if event == ptrace::EVENT_CLONE {
                    if let Ok(new) = ptrace::event_msg(tid) {
                        let new = new as Pid;
                        let thread =
                            std::path::Path::new(&format!("/proc/{}/task/{new}", self.pid))
                                .exists();
                        if !thread && traced_by_us(new) {
                            self.foreign.insert(new);
                        } else if thread {
                            self.threads.entry(new).or_insert(State::Running);
                            if holding {
                                let _ = ptrace::interrupt(new);
                            }
                        }
                    }
                    if holding {
                        self.threads.insert(tid, State::Held(StopKind::Interrupt));
                        return Ok(None);
                    }
                    self.threads.insert(tid, State::Running);
                    return ignore_gone(ptrace::cont(tid, 0)).map(|_| None);
                }
                if event == ptrace::EVENT_STOP {
                    let kind = if is_stop_signal(sig) {
                        StopKind::GroupStop(sig)
                    } else {
                        StopKind::Interrupt
                    };
                    if holding {
                        self.threads.insert(tid, State::Held(kind));
                        return Ok(None);
                    }
                    self.threads.insert(tid, State::Running);
                    return match kind {
                        StopKind::GroupStop(_) => ignore_gone(listen(tid)).map(|_| None),
                        _ => ignore_gone(ptrace::cont(tid, 0)).map(|_| None),
                    };
                }
                if event != 0 {
                    self.threads.insert(tid, State::Running);
                    return ignore_gone(ptrace::cont(tid, 0)).map(|_| None);
                }
                // A signal-delivery stop.
                let watched = self.watched & bit(sig) != 0;
                if holding || watched {
                    if let Ok(si) = ptrace::get_siginfo(tid) {
                        self.siginfo.insert(tid, si);
                    }
                    self.threads.insert(tid, State::Held(StopKind::Signal(sig)));
                    if !holding {
                        return Ok(Some(Event::Signal { tid, sig }));
                    }
                    if watched && !self.pending.contains(&tid) {
                        // Caught while stopping everyone for a dump: reported afterwards,
                        // so that it gets its own dump before it is delivered.
                        self.pending.insert(0, tid);
                    }
                    return Ok(None);
                }
                self.passed += 1;
                self.threads.insert(tid, State::Running);
                ignore_gone(ptrace::cont(tid, sig)).map(|_| None)
            }
        }
    }

    /// Stops every thread (`PTRACE_INTERRUPT`), within `timeout`, and holds them: pass the
    /// result to [`dump_held`], then call [`Tracer::resume_all`]. Signals that arrive
    /// meanwhile are held and delivered at resume.
    ///
    /// On error (the process exited: [`Error::ProcessExited`]; a thread that did not stop:
    /// [`Error::StopTimeout`]) the threads already stopped stay held: let them go with
    /// [`Tracer::resume_all`].
    pub fn stop_all(&mut self, timeout: Duration) -> Result<Held> {
        self.hold_all(timeout)?;
        Ok(Held {
            stopped: Some(self.held_process(timeout)),
            epoch: self.resumes.load(Ordering::SeqCst),
            resumes: self.resumes.clone(),
        })
    }

    /// Stops every thread within `timeout`; each is then recorded as held.
    fn hold_all(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let running: Vec<Pid> = self
            .threads
            .iter()
            .filter(|(_, s)| **s == State::Running)
            .map(|(t, _)| *t)
            .collect();
        for tid in running {
            if let Err(e) = ptrace::interrupt(tid) {
                // Gone without a report we can collect (e.g. replaced by an exec in
                // another thread): forget it rather than wait for it.
                if e.raw_os_error() == Some(libc::ESRCH)
                    && !std::path::Path::new(&format!("/proc/{}/task/{tid}", self.pid)).exists()
                {
                    self.threads.remove(&tid);
                }
            }
        }
        loop {
            while let Some((tid, st)) = self.wait_any()? {
                if let Some(Event::Exited(_)) = self.handle(tid, st, true)? {
                    return Err(Error::ProcessExited { pid: self.pid });
                }
            }
            if self.threads.values().all(|s| *s != State::Running) {
                break;
            }
            if Instant::now() >= deadline {
                let tid = self
                    .threads
                    .iter()
                    .find(|(_, s)| **s == State::Running)
                    .map(|(t, _)| *t)
                    .unwrap_or(self.pid);
                let state = proc::Status::read_thread(self.pid, tid)
                    .map(|s| s.state.to_string())
                    .unwrap_or_else(|_| "?".into());
                return Err(Error::StopTimeout {
                    pid: self.pid,
                    tid,
                    millis: timeout.as_millis() as u64,
                    state,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The held threads as a [`StoppedProcess`] for the snapshot code (which must not
    /// release them: [`Held`]'s drop gives them back).
    fn held_process(&self, timeout: Duration) -> StoppedProcess {
        let tracees = self
            .threads
            .iter()
            .filter_map(|(&tid, s)| match s {
                State::Held(kind) => Some(Tracee {
                    tid,
                    kind: *kind,
                    siginfo: match kind {
                        StopKind::Signal(_) => self.siginfo.get(&tid).copied(),
                        _ => None,
                    },
                }),
                State::Running => None,
            })
            .collect();
        StoppedProcess::from_seized(self.pid, tracees, timeout)
    }

    /// Lets every held thread go on: a thread stopped on a signal gets it delivered
    /// unchanged, a group-stopped thread stays in its group stop, the others continue. A
    /// watched signal caught while [`Tracer::stop_all`] stopped the threads, not reported
    /// yet, stays held until [`Tracer::next_event`] reports it.
    pub fn resume_all(&mut self) -> Result<()> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        let held: Vec<(Pid, StopKind)> = self
            .threads
            .iter()
            .filter(|(t, _)| !self.pending.contains(t))
            .filter_map(|(&t, s)| match s {
                State::Held(k) => Some((t, *k)),
                State::Running => None,
            })
            .collect();
        let mut first_err = None;
        for (tid, kind) in held {
            let r = match kind {
                StopKind::Signal(sig) => {
                    if self.watched & bit(sig) == 0 {
                        self.passed += 1;
                    }
                    ptrace::cont(tid, sig)
                }
                StopKind::GroupStop(_) => listen(tid),
                StopKind::Interrupt => ptrace::cont(tid, 0),
            };
            self.siginfo.remove(&tid);
            self.threads.insert(tid, State::Running);
            if let Err(e) = ignore_gone(r) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Detaches from every thread (interrupting the running ones first), delivering any
    /// held signal. Called by `Drop`; call it to see the error.
    pub fn detach_all(&mut self) -> Result<()> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        if self.threads.is_empty() {
            return Ok(());
        }
        let _ = self.hold_all(Duration::from_secs(2));
        let mut first_err = None;
        for (tid, s) in std::mem::take(&mut self.threads) {
            let sig = match s {
                State::Held(StopKind::Signal(sig)) => sig,
                _ => 0,
            };
            if s == State::Running {
                // Never seen stopped (it did not stop within the timeout): the kernel
                // detaches it when this thread exits.
                continue;
            }
            if let Err(e) = ignore_gone(ptrace::detach(tid, sig)) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Delivers the signal thread `tid` is held on and lets it run.
    pub fn deliver(&mut self, tid: Pid) -> Result<()> {
        if let Some(State::Held(kind)) = self.threads.get(&tid).copied() {
            self.resumes.fetch_add(1, Ordering::SeqCst);
            self.threads.insert(tid, State::Running);
            self.siginfo.remove(&tid);
            let sig = match kind {
                StopKind::Signal(s) => s,
                _ => 0,
            };
            return ignore_gone(ptrace::cont(tid, sig));
        }
        Ok(())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.detach_all();
        // The signalfd is closed when the field drops, after this.
    }
}

/// True if a process or thread `id` exists (in our pid namespace).
fn pid_exists(id: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{id}")).exists()
}

/// True if `id` is still traced by this thread (not yet let go).
fn traced_by_us(id: Pid) -> bool {
    proc::Status::read(id).is_ok_and(|s| s.tracer_pid == gettid())
}

fn gettid() -> Pid {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as Pid }
}

/// What waiting for one traced id gave.
#[derive(Debug, Clone, Copy)]
enum Waited {
    Status(WaitStatus),
    /// `ECHILD`: not (or no longer) a tracee of this thread.
    Lost,
}

/// One pending wait status of `tid`, without blocking: `__WALL` (threads too),
/// `__WNOTHREAD` (only if this thread traces it).
fn wait_one(tid: Pid) -> Result<Option<Waited>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int through its pointer, which points to `status`, a
        // live local.
        let r = unsafe {
            libc::waitpid(
                tid,
                &mut status,
                libc::__WALL | libc::__WNOTHREAD | libc::WNOHANG,
            )
        };
        if r == tid {
            return Ok(Some(Waited::Status(WaitStatus::decode(status))));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(Some(Waited::Lost)),
            _ => {
                return Err(Error::Ptrace {
                    op: "waitpid",
                    tid,
                    source: e,
                })
            }
        }
    }
}

/// Dumps a process held by [`Tracer::stop_all`] to `opts.output`, as [`crate::dump()`]
/// does (in [`Mode::Suspend`](crate::Mode::Suspend), whatever `opts.snapshot.mode` says:
/// the memory is read from the held target): the file gets its name only once complete,
/// and nothing is left at the path on error or cancel. `first` is the thread to list
/// first (gdb's current thread): the crashing one, whose held signal and siginfo become
/// the core's `pr_cursig` and `NT_SIGINFO`, as in the kernel's crash cores. The target
/// stays stopped throughout; the caller resumes it ([`Tracer::resume_all`]). The core is
/// written plain to `opts.output`: `opts.compress` and `opts.stdout` are not used.
///
/// # Panics
/// If `held` is stale: the tracer let threads run since it was returned (see [`Held`]).
pub fn dump_held(
    held: &Held,
    first: Option<Pid>,
    opts: &DumpOptions,
    progress: &mut dyn Progress,
) -> Result<DumpReport> {
    assert!(
        held.is_current(),
        "dump_held: the tracer resumed threads since stop_all returned this Held; call stop_all again"
    );
    let stopped = held.stopped();
    let t0 = Instant::now();
    let out = OutputFile::create(&opts.output, opts.overwrite)?;
    let snap = Snapshot::capture_held(stopped, first, &opts.snapshot)?;
    let segs = crate::level::plan_for(&snap, opts.level, opts.filter);
    let notes = snap.notes();
    let cancel = opts.snapshot.cancel.clone();
    let cancelled = || {
        cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut prog = |done: u64, total: u64| progress.update(done, total) && !cancelled();
    let stats = snap.write_core_file_with(out.file(), &notes, &segs, false, &mut prog)?;
    if cancelled() {
        return Err(Error::Cancelled);
    }
    let path = out.commit()?;
    let mut pause = snap.pause();
    pause.total_us = t0.elapsed().as_micros() as u64;
    Ok(DumpReport {
        pid: stopped.pid(),
        path,
        mode: snap.mode(),
        threads: snap.threads().len(),
        segments: snap.mappings().len(),
        pause,
        bytes_written: stats.bytes_written,
        file_size: stats.file_size,
        unpopulated_bytes: stats.unpopulated_bytes,
        zero_bytes: stats.zero_bytes,
        written_by_clone: stats.written_by_clone,
        // Suspend mode: nothing is read while the target runs.
        live_bytes: 0,
        write_path: stats.path.clone(),
        duration_ms: t0.elapsed().as_millis() as u64,
        level: opts.level,
        compressed_size: None,
        warnings: snap
            .warnings()
            .iter()
            .cloned()
            .chain(crate::dump::unreadable_warnings(&stats))
            .collect(),
    })
}
