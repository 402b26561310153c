//! The public [`Snapshot`]: `Send` and `Sync`, because every ptrace request of a capture is
//! made by a tracer thread of its own.
//!
//! ptrace binds a tracee to the thread that attached it. [`Snapshot::capture`] therefore
//! starts a thread (named `coreflect`) that takes the snapshot ([`super::Snapshot`], the
//! thread-bound state) and keeps it: writing a core file (where the clone may be made to
//! write itself) and the end (killing and reaping the clone, or releasing a suspended
//! target) are requests to that thread. Reading memory only `pread`s `/proc` files and
//! happens on the caller's thread.
//!
//! When a capture fails, its tracer thread exits, and the kernel detaches every thread it
//! still held — also one that never reached its stop (in `vfork`, or in uninterruptible
//! sleep), which would otherwise stay seized as long as the caller's thread lives — so the
//! next capture can succeed.

use super::{Mode, Options, PauseBreakdown, Snapshot as Bound};
use crate::elf::writer::{self, MemoryReader, Progress, SegmentPlan, Sink, Source, WriteStats};
use crate::error::{Error, Pid, Result};
use crate::inspect::{self, AuxvEntry, Freshness, LiveReason, Module, Thread};
use crate::proc::{Mapping, ProcessInfo};
use crate::select::{KernelPolicy, RegionPolicy};
use crate::warning::Warning;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A frozen image of a live process: the threads' state captured during a pause of
/// milliseconds, and memory readable from a copy-on-write clone while the process runs on —
/// the Linux counterpart of ClrMD's `DataTarget.CreateSnapshotAndAttach` or Windows'
/// `PssCaptureSnapshot`.
///
/// The snapshot is `Send` and `Sync`: it may be moved to, shared with, and dropped on any
/// thread (an async runtime's included). Dropping it (or [`Snapshot::finish`]) kills the
/// clone and reaps its zombie inside the target, so the target never sees a child.
///
/// ```no_run
/// use coreflect::{Options, Snapshot};
///
/// # fn main() -> coreflect::Result<()> {
/// let snap = Snapshot::capture(1234, &Options::default())?;
/// // The target runs again here; the snapshot stays as it was during the pause.
/// for t in snap.threads() {
///     println!("{} {} pc={:#x}", t.tid(), t.name(), t.pc());
/// }
/// println!("{:?}", snap.argv());
/// let value = snap.read_u64(0x7f00_0000_1000)?;
/// std::thread::spawn(move || drop(snap)); // Send: finish it anywhere
/// # let _ = value;
/// # Ok(()) }
/// ```
pub struct Snapshot {
    /// The thread-bound snapshot, owned by the tracer thread (see the `Send` impl).
    bound: NonNull<Bound>,
    threads: Vec<Thread>,
    argv: Vec<OsString>,
    environ: Vec<OsString>,
    auxv: Vec<AuxvEntry>,
    modules: OnceLock<Vec<Module>>,
    tracer: Option<Tracer>,
}

// SAFETY: `bound` points to a `Bound` the tracer thread allocated (Box::into_raw) and frees
// only when it receives `Request::Finish`, which only `finish`/`Drop` send (the handle is
// unusable after). Until then it is only ever accessed through `&Bound`, which may be used
// from any thread since `Bound: Sync` (its shared methods only `pread` /proc files); its
// thread-bound parts (ptrace) are used by the tracer thread alone. If the tracer thread
// panics the allocation is leaked, never freed, so the pointer stays valid.
unsafe impl Send for Snapshot {}
// SAFETY: as above; every `&self` method only reads through `&Bound` or sends a request.
unsafe impl Sync for Snapshot {}

struct Tracer {
    tx: mpsc::Sender<Request>,
    join: std::thread::JoinHandle<()>,
    tid: Pid,
}

enum Request {
    WriteFile {
        file: File,
        notes: Vec<u8>,
        segs: Vec<SegmentPlan>,
        release_behind: bool,
        events: mpsc::Sender<Event>,
        answers: mpsc::Receiver<bool>,
    },
    Finish {
        reply: mpsc::Sender<(Option<Warning>, Option<u64>)>,
    },
}

enum Event {
    Progress(u64, u64),
    Done(Result<WriteStats>),
}

struct Captured {
    bound: SendPtr,
    threads: Vec<Thread>,
    argv: Vec<OsString>,
    environ: Vec<OsString>,
}

struct SendPtr(NonNull<Bound>);
// SAFETY: the pointer is handed from the tracer thread to the handle, see `Snapshot`'s
// `Send` impl; the pointee is never moved or dropped by the receiver.
unsafe impl Send for SendPtr {}

fn gettid() -> Pid {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn split_nul(b: &[u8]) -> Vec<OsString> {
    let b = b.strip_suffix(b"\0").unwrap_or(b);
    if b.is_empty() {
        return Vec::new();
    }
    b.split(|&c| c == 0)
        .map(|s| OsString::from_vec(s.to_vec()))
        .collect()
}

/// Waits (briefly) until thread `tid` of this process is gone, so that the kernel has
/// detached whatever it still traced.
fn wait_thread_gone(tid: Pid) {
    let p = format!("/proc/self/task/{tid}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&p).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn tracer_main(
    pid: Pid,
    opts: Options,
    ready: mpsc::SyncSender<std::result::Result<Captured, Error>>,
    rx: mpsc::Receiver<Request>,
) {
    let bound = match Bound::capture(pid, &opts) {
        Ok(b) => b,
        Err(e) => {
            // Returning ends this thread, and the kernel detaches any thread of the target
            // it still holds (one that never stopped).
            let _ = ready.send(Err(e));
            return;
        }
    };
    // After the pause: names, command line and environment. In reflect mode they come from
    // the clone, so they are those of the moment of the snapshot.
    let image = bound.clone_pid().unwrap_or(pid);
    let threads = bound
        .threads
        .iter()
        .zip(bound.times.iter())
        .map(|(t, times)| {
            let name = std::fs::read(format!("/proc/{pid}/task/{}/comm", t.tid))
                .map(|b| String::from_utf8_lossy(b.strip_suffix(b"\n").unwrap_or(&b)).into_owned())
                .unwrap_or_default();
            Thread::new(t.clone(), name, times)
        })
        .collect();
    let argv = split_nul(&crate::proc::read_bytes(image, "cmdline").unwrap_or_default());
    let environ = split_nul(&crate::proc::read_bytes(image, "environ").unwrap_or_default());
    let ptr = NonNull::from(Box::leak(Box::new(bound)));
    let captured = Captured {
        bound: SendPtr(ptr),
        threads,
        argv,
        environ,
    };
    if ready.send(Ok(captured)).is_err() {
        // The caller is gone (it cannot be: it waits for this answer).
        // SAFETY: no handle was made, so nothing else points to it.
        let _ = unsafe { Box::from_raw(ptr.as_ptr()) }.finish();
        return;
    }
    serve(ptr, rx);
}

fn serve(ptr: NonNull<Bound>, rx: mpsc::Receiver<Request>) {
    for req in rx.iter() {
        match req {
            Request::WriteFile {
                file,
                notes,
                segs,
                release_behind,
                events,
                answers,
            } => {
                // SAFETY: valid until Finish, which is handled below on this thread.
                let bound = unsafe { ptr.as_ref() };
                let mut progress = |done: u64, total: u64| {
                    events.send(Event::Progress(done, total)).is_ok()
                        && answers.recv().unwrap_or(false)
                };
                let r =
                    bound.write_core_file_with(&file, &notes, &segs, release_behind, &mut progress);
                let _ = events.send(Event::Done(r));
            }
            Request::Finish { reply } => {
                // SAFETY: allocated by Box::leak in tracer_main; the handle sent Finish and
                // never uses the pointer again.
                let bound = unsafe { Box::from_raw(ptr.as_ptr()) };
                let _ = reply.send(bound.finish_timed());
                return;
            }
        }
    }
    // The sender is gone without Finish: the handle was dropped and is not reading. (Drop
    // always sends Finish; this is only the end of a forgotten handle's process.)
    // SAFETY: as for Finish.
    let _ = unsafe { Box::from_raw(ptr.as_ptr()) }.finish();
}

impl Snapshot {
    /// Takes a snapshot of process `pid`: stops every thread, captures their registers,
    /// makes one thread run an injected `clone()` so that a copy-on-write image exists, and
    /// lets the process go (see [`crate::snapshot`] for what happens when).
    ///
    /// The work is done by a new thread named `coreflect`, which stays until the snapshot
    /// is dropped. On error the target is released; a thread that could not be stopped in
    /// time ([`Error::StopTimeout`]: uninterruptible sleep, `vfork`) is released too, so a
    /// later capture can succeed.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # fn main() -> coreflect::Result<()> {
    /// let opts = coreflect::Options {
    ///     stop_timeout: Duration::from_millis(500),
    ///     ..Default::default()
    /// };
    /// let snap = coreflect::Snapshot::capture(1234, &opts)?;
    /// println!("paused {} µs", snap.pause().total_us);
    /// # Ok(()) }
    /// ```
    pub fn capture(pid: Pid, opts: &Options) -> Result<Snapshot> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let o = opts.clone();
        let join = std::thread::Builder::new()
            .name("coreflect".into())
            .spawn(move || {
                let _ = tid_tx.send(gettid());
                tracer_main(pid, o, ready_tx, rx)
            })
            .map_err(|e| Error::io("starting the snapshot's tracer thread", e))?;
        let tid = tid_rx.recv().unwrap_or(0);
        match ready_rx.recv() {
            Ok(Ok(c)) => Ok(Snapshot {
                bound: c.bound.0,
                auxv: inspect::parse_auxv(
                    // SAFETY: just allocated by the tracer thread, see the Send impl.
                    &unsafe { c.bound.0.as_ref() }.process.auxv,
                ),
                threads: c.threads,
                argv: c.argv,
                environ: c.environ,
                modules: OnceLock::new(),
                tracer: Some(Tracer { tx, join, tid }),
            }),
            Ok(Err(e)) => {
                let _ = join.join();
                wait_thread_gone(tid);
                Err(e)
            }
            Err(_) => {
                let _ = join.join();
                wait_thread_gone(tid);
                Err(Error::TracerThreadEnded { pid })
            }
        }
    }

    pub(crate) fn bound(&self) -> &Bound {
        // SAFETY: see the Send impl: valid while `self` is.
        unsafe { self.bound.as_ref() }
    }

    /// The target's pid.
    pub fn pid(&self) -> Pid {
        self.bound().pid()
    }

    /// The mode actually used: [`Mode::Reflect`] or [`Mode::Suspend`].
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// if snap.mode() == coreflect::Mode::Suspend {
    ///     eprintln!("the target stays stopped until the snapshot is dropped");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn mode(&self) -> Mode {
        self.bound().mode()
    }

    /// The clone's pid (reflect mode).
    pub fn clone_pid(&self) -> Option<Pid> {
        self.bound().clone_pid()
    }

    /// Process information read before the pause (`/proc/PID/stat`, `status`, command
    /// line, auxv, `coredump_filter`, executable).
    pub fn process(&self) -> &ProcessInfo {
        self.bound().process()
    }

    /// Every thread, main thread first.
    pub fn threads(&self) -> &[Thread] {
        &self.threads
    }

    /// The thread `tid`, if the snapshot has it.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// if let Some(t) = snap.thread(1234) {
    ///     println!("main thread at {:#x}", t.pc());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn thread(&self, tid: Pid) -> Option<&Thread> {
        self.threads.iter().find(|t| t.tid() == tid)
    }

    /// The command line as a list (`/proc/PID/cmdline` split at NULs), as of the snapshot.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// println!("{:?}", snap.argv());
    /// # Ok(()) }
    /// ```
    pub fn argv(&self) -> &[OsString] {
        &self.argv
    }

    /// The environment, one `KEY=value` entry each (`/proc/PID/environ`), as of the
    /// snapshot.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// for e in snap.environ() {
    ///     println!("{}", e.to_string_lossy());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn environ(&self) -> &[OsString] {
        &self.environ
    }

    /// The value of environment variable `key` in the snapshot.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let path = snap.env_var("PATH");
    /// # let _ = path; Ok(()) }
    /// ```
    pub fn env_var(&self, key: &str) -> Option<&OsStr> {
        self.environ.iter().find_map(|e| {
            let b = e.as_bytes();
            let rest = b.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
            Some(OsStr::from_bytes(rest))
        })
    }

    /// The auxiliary vector as `(key, value)` pairs, without the final `AT_NULL`.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let page = snap.auxv().iter().find(|e| e.name() == Some("AT_PAGESZ"));
    /// # let _ = page; Ok(()) }
    /// ```
    pub fn auxv(&self) -> &[AuxvEntry] {
        &self.auxv
    }

    /// The mapped ELF objects — the executable, shared libraries, the vDSO — with their
    /// load bias and build-id (read from the snapshot's memory, or from the mapped file when
    /// the notes are not in memory). Computed on first use.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// for m in snap.modules() {
    ///     println!("{} {:?}", m.path, m.build_id_hex());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn modules(&self) -> &[Module] {
        self.modules.get_or_init(|| {
            let read = |addr: u64, buf: &mut [u8]| self.read_memory(addr, buf).unwrap_or(0);
            inspect::find_modules(
                self.clone_pid().unwrap_or(self.pid()),
                self.mappings(),
                &read,
            )
        })
    }

    /// The module containing address `addr`, if any.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let pc = snap.threads()[0].pc();
    /// if let Some(m) = snap.module_at(pc) {
    ///     println!("in {} at offset {:#x}", m.path, pc - m.load_bias);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn module_at(&self, addr: u64) -> Option<&Module> {
        self.modules()
            .iter()
            .find(|m| addr >= m.start && addr < m.end)
    }

    /// The memory map of the image.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// for m in snap.mappings() {
    ///     println!("{:#x}-{:#x} {}", m.start, m.end, m.name);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn mappings(&self) -> &[Mapping] {
        self.bound().mappings()
    }

    /// How long the target was stopped. In suspend mode, `total_us` grows until the
    /// snapshot ends.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let p = snap.pause();
    /// println!("paused {} µs (stop {} µs, clone {} µs)", p.total_us, p.stop_us, p.clone_us);
    /// # Ok(()) }
    /// ```
    pub fn pause(&self) -> PauseBreakdown {
        self.bound().pause()
    }

    /// Problems that did not stop the snapshot (memory read live, a fallback to suspend
    /// mode, leftovers reaped).
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// for w in snap.warnings() {
    ///     eprintln!("warning: {w}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn warnings(&self) -> &[Warning] {
        self.bound().warnings()
    }

    /// The region policy the kernel would apply to this process: its own
    /// `coredump_filter`. Pass it to [`Snapshot::write_core`] for a core like the kernel's.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// println!("coredump_filter {:#x}", snap.default_policy().filter);
    /// # Ok(()) }
    /// ```
    pub fn default_policy(&self) -> KernelPolicy {
        KernelPolicy {
            filter: self.process().coredump_filter,
        }
    }

    fn live_reason(&self, m: &Mapping) -> Option<LiveReason> {
        if self
            .bound()
            .live
            .iter()
            .any(|&(s, e)| m.start < e && s < m.end)
        {
            return Some(if m.has_flag("dc") {
                LiveReason::DontFork
            } else {
                LiveReason::WipeOnFork
            });
        }
        m.shared.then_some(LiveReason::Shared)
    }

    /// Whether the bytes at `addr` are frozen or read live; `None` if `addr` is not mapped.
    ///
    /// ```no_run
    /// use coreflect::Freshness;
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// if let Some(Freshness::Live(why)) = snap.freshness(0x7f00_0000_0000) {
    ///     println!("read live: {why:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn freshness(&self, addr: u64) -> Option<Freshness> {
        let m = self
            .mappings()
            .iter()
            .find(|m| addr >= m.start && addr < m.end)?;
        Some(match self.live_reason(m) {
            Some(r) => Freshness::Live(r),
            None => Freshness::Frozen,
        })
    }

    /// The parts of `range` that are mapped, each with where its bytes come from, in address
    /// order (unmapped gaps are left out).
    pub fn freshness_of(&self, range: Range<u64>) -> Vec<(Range<u64>, Freshness)> {
        let mut out: Vec<(Range<u64>, Freshness)> = Vec::new();
        for m in self
            .mappings()
            .iter()
            .filter(|m| m.start < range.end && range.start < m.end)
        {
            let f = match self.live_reason(m) {
                Some(r) => Freshness::Live(r),
                None => Freshness::Frozen,
            };
            let r = m.start.max(range.start)..m.end.min(range.end);
            match out.last_mut() {
                Some((last, lf)) if last.end == r.start && *lf == f => last.end = r.end,
                _ => out.push((r, f)),
            }
        }
        out
    }

    /// True if all of `range` is mapped and frozen.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let sp = snap.threads()[0].sp();
    /// assert!(snap.is_frozen(sp..sp + 64)); // a stack is private memory
    /// for (r, f) in snap.freshness_of(sp..sp + 4096) {
    ///     println!("{r:x?} {f:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_frozen(&self, range: Range<u64>) -> bool {
        let parts = self.freshness_of(range.clone());
        let mut at = range.start;
        for (r, f) in &parts {
            if r.start != at || *f != Freshness::Frozen {
                return false;
            }
            at = r.end;
        }
        at >= range.end
    }

    fn source(&self, addr: u64) -> Source {
        if self.bound().is_live(addr) {
            Source::Live
        } else {
            Source::Image
        }
    }

    /// Reads the snapshot's memory at `addr` into `buf`; returns how many bytes were
    /// readable (short when the range runs into unmapped or unreadable memory). Fails if
    /// not even the first byte is readable.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let mut buf = [0u8; 64];
    /// let n = snap.read_memory(0x7f00_0000_1000, &mut buf)?;
    /// # let _ = n; Ok(()) }
    /// ```
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<usize> {
        let src = self.source(addr);
        let r = MemoryReader::read_at(self.bound(), src, addr, buf);
        match r {
            Ok(0) if !buf.is_empty() => Err(self.mem_error(
                addr,
                buf.len(),
                0,
                io::Error::new(io::ErrorKind::UnexpectedEof, "nothing is mapped there"),
            )),
            Ok(n) => Ok(n),
            Err(e) => Err(self.mem_error(addr, buf.len(), 0, e)),
        }
    }

    fn mem_error(&self, addr: u64, len: usize, readable: usize, source: io::Error) -> Error {
        Error::Memory {
            pid: self.pid(),
            addr,
            len,
            live: self.source(addr) == Source::Live,
            readable,
            source,
        }
    }

    /// Fills all of `buf` from `addr`, or fails naming the address.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let mut header = [0u8; 16];
    /// snap.read_exact(0x5555_5555_4000, &mut header)?;
    /// # Ok(()) }
    /// ```
    pub fn read_exact(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = addr + done as u64;
            match self.read_memory(at, &mut buf[done..]) {
                Ok(n) => done += n,
                Err(Error::Memory { source, .. }) => {
                    return Err(self.mem_error(addr, buf.len(), done, source))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads `len` bytes from `addr` into a new vector (all of them, or an error).
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_exact(addr, &mut v)?;
        Ok(v)
    }

    /// Reads a NUL-terminated string at `addr` (at most `max` bytes, without the NUL).
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let name = snap.read_c_string(0x5555_5555_6000, 256)?;
    /// let bytes = snap.read_vec(0x5555_5555_6000, 16)?;
    /// # let _ = (name, bytes);
    /// # Ok(()) }
    /// ```
    pub fn read_c_string(&self, addr: u64, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 256];
        while out.len() < max {
            let want = chunk.len().min(max - out.len());
            let n = self.read_memory(addr + out.len() as u64, &mut chunk[..want])?;
            if let Some(z) = chunk[..n].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk[..n]);
        }
        Ok(out)
    }

    /// A `Read + Seek` view of `range` of the snapshot's memory (positions are relative to
    /// `range.start`).
    ///
    /// ```no_run
    /// use std::io::{Read, Seek, SeekFrom};
    /// # fn main() -> std::io::Result<()> {
    /// # let snap = coreflect::Snapshot::capture(1234, &Default::default()).unwrap();
    /// let mut v = snap.view(0x5555_5555_4000..0x5555_5555_5000);
    /// v.seek(SeekFrom::Start(0x40))?;
    /// let mut phdr = [0u8; 56];
    /// v.read_exact(&mut phdr)?;
    /// # Ok(()) }
    /// ```
    pub fn view(&self, range: Range<u64>) -> MemoryView<'_> {
        MemoryView {
            snap: self,
            range,
            pos: 0,
        }
    }

    /// The segments a core of this snapshot has under `policy`.
    pub fn plan(&self, policy: &dyn RegionPolicy) -> Vec<SegmentPlan> {
        self.bound().plan(policy)
    }

    /// The core's notes (`NT_PRSTATUS` per thread, `NT_PRPSINFO`, `NT_AUXV`, `NT_FILE`…).
    pub fn notes(&self) -> Vec<u8> {
        self.bound().notes()
    }

    /// Writes a complete ELF core of the snapshot to `sink` (a pipe, a compressor, a
    /// `Vec`), on the calling thread. `progress` may cancel it by returning `false`.
    ///
    /// ```no_run
    /// use coreflect::elf::writer::StreamSink;
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let mut sink = StreamSink::new(Vec::new());
    /// let stats = snap.write_core(&mut sink, &snap.default_policy(), &mut |_, _| true)?;
    /// assert_eq!(sink.into_inner().len() as u64, stats.file_size);
    /// # Ok(()) }
    /// ```
    pub fn write_core(
        &self,
        sink: &mut dyn Sink,
        policy: &dyn RegionPolicy,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        let segs = self.plan(policy);
        let notes = self.notes();
        writer::write_core(sink, &notes, &segs, self.bound(), progress)
    }

    /// Writes a complete ELF core of the snapshot into `file` (new or empty), as a sparse
    /// file, by the write path of [`Options::write_path`] (by default the clone `vmsplice`s
    /// its pages and they are spliced into the file opened `O_DIRECT`). The writing is done by the snapshot's tracer thread (one such write at a time);
    /// `progress` is called on this thread, and must not start another `write_core_file` of
    /// the same snapshot (it would wait for itself).
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// let file = std::fs::File::options().write(true).create_new(true).open("/tmp/x.core")
    ///     .map_err(|e| coreflect::Error::io("creating /tmp/x.core", e))?;
    /// snap.write_core_file(&file, &snap.default_policy(), &mut |_, _| true)?;
    /// # Ok(()) }
    /// ```
    pub fn write_core_file(
        &self,
        file: &File,
        policy: &dyn RegionPolicy,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        let segs = self.plan(policy);
        let notes = self.notes();
        self.write_core_file_with(file, &notes, &segs, progress)
    }

    /// As [`Snapshot::write_core_file_with`], as the snapshot's last use: the clone drops
    /// each part of its memory once it is on its way to the file (release-behind), so that
    /// a busy target's later writes reuse their pages instead of copying them. The image
    /// cannot be read afterwards (reads of it return what the clone then maps: zeros for
    /// anonymous memory); only thread state, notes and mappings remain. What `dump()` uses.
    pub fn write_final_core_file_with(
        &self,
        file: &File,
        notes: &[u8],
        segs: &[SegmentPlan],
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        self.send_write(file, notes, segs, true, progress)
    }

    /// Writes a core with these `notes` and segments (e.g. from [`crate::level::plan`], with
    /// extra notes) to `sink` on the calling thread.
    pub fn write_core_with(
        &self,
        sink: &mut dyn Sink,
        notes: &[u8],
        segs: &[SegmentPlan],
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        self.bound().write_core_with(sink, notes, segs, progress)
    }

    /// Writes a core with these `notes` and segments into `file` (new or empty), as
    /// [`Snapshot::write_core_file`] does, on the snapshot's tracer thread.
    pub fn write_core_file_with(
        &self,
        file: &File,
        notes: &[u8],
        segs: &[SegmentPlan],
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        self.send_write(file, notes, segs, false, progress)
    }

    fn send_write(
        &self,
        file: &File,
        notes: &[u8],
        segs: &[SegmentPlan],
        release_behind: bool,
        progress: &mut dyn Progress,
    ) -> Result<WriteStats> {
        let file = file
            .try_clone()
            .map_err(|e| Error::io("duplicating the core file's descriptor", e))?;
        let (ev_tx, ev_rx) = mpsc::channel();
        let (ans_tx, ans_rx) = mpsc::channel();
        self.send(Request::WriteFile {
            file,
            notes: notes.to_vec(),
            segs: segs.to_vec(),
            release_behind,
            events: ev_tx,
            answers: ans_rx,
        })?;
        loop {
            match ev_rx.recv() {
                Ok(Event::Progress(done, total)) => {
                    let _ = ans_tx.send(progress.update(done, total));
                }
                Ok(Event::Done(r)) => return r,
                Err(_) => return Err(self.tracer_gone()),
            }
        }
    }

    fn send(&self, r: Request) -> Result<()> {
        match &self.tracer {
            Some(t) if t.tx.send(r).is_ok() => Ok(()),
            _ => Err(self.tracer_gone()),
        }
    }

    fn tracer_gone(&self) -> Error {
        Error::TracerThreadEnded { pid: self.pid() }
    }

    /// Fails if the clone died (killed by the OOM killer, which picks it first) so that its
    /// memory can no longer be read.
    pub fn check_image_alive(&self) -> Result<()> {
        self.bound().check_image_alive()
    }

    /// Sends the clone SIGKILL without waiting for it: its address space is torn down while
    /// the caller finishes up. The image can no longer be read; [`Snapshot::finish`] (or
    /// drop) then reaps it.
    pub fn release_image(&mut self) {
        if let Some(c) = self.clone_pid() {
            // SAFETY: kill has no memory preconditions; the clone is ours (a traced,
            // stopped child of the target that nobody else reaps).
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
    }

    /// Ends the snapshot now: kills the clone and reaps it inside the target (or releases
    /// the suspended target). Returns a warning if something was left for the next
    /// snapshot to clean up.
    ///
    /// ```no_run
    /// # fn main() -> coreflect::Result<()> {
    /// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
    /// if let Some(w) = snap.finish() {
    ///     eprintln!("warning: {w}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn finish(self) -> Option<Warning> {
        self.finish_timed().0
    }

    /// As [`Snapshot::finish`], also returning how long the target was stopped while the
    /// clone's zombie was reaped (reflect mode; see [`PauseBreakdown::reap_us`]).
    pub fn finish_timed(mut self) -> (Option<Warning>, Option<u64>) {
        self.end()
    }

    fn end(&mut self) -> (Option<Warning>, Option<u64>) {
        let Some(t) = self.tracer.take() else {
            return (None, None);
        };
        let (pid, start) = (self.pid(), self.process().stat.start_time);
        let (tx, rx) = mpsc::channel();
        let (w, reap_us) = match t.tx.send(Request::Finish { reply: tx }) {
            Ok(()) => rx.recv().unwrap_or((None, None)),
            Err(_) => (None, None),
        };
        let _ = t.join.join();
        wait_thread_gone(t.tid);
        // Nothing is left in a process that no longer exists (gone, replaced by another
        // process with its pid, or a zombie itself, whose children went to a reaper).
        let w = w.filter(|_| {
            crate::proc::Stat::read(pid)
                .is_ok_and(|s| s.start_time == start && !matches!(s.state, 'Z' | 'X' | 'x'))
        });
        (w, reap_us)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tracer.is_none() {
            return f.write_str("Snapshot { finished }");
        }
        f.debug_struct("Snapshot")
            .field("pid", &self.pid())
            .field("mode", &self.mode())
            .field("clone", &self.clone_pid())
            .field("threads", &self.threads.len())
            .field("mappings", &self.mappings().len())
            .field("pause_us", &self.pause().total_us)
            .field("warnings", &self.warnings().len())
            .finish()
    }
}

impl MemoryReader for Snapshot {
    fn read_at(&self, source: Source, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.bound().read_at(source, addr, buf)
    }
    fn pagemap(&self, source: Source, addr: u64, out: &mut [u64]) -> bool {
        self.bound().pagemap(source, addr, out)
    }
}

/// A `Read + Seek` view of a range of a [`Snapshot`]'s memory, from [`Snapshot::view`].
///
/// Reading past the range's end returns 0 (end of file); reading unmapped memory inside it
/// fails with the address in the error.
#[derive(Debug)]
pub struct MemoryView<'a> {
    snap: &'a Snapshot,
    range: Range<u64>,
    pos: u64,
}

impl io::Read for MemoryView<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.range.end.saturating_sub(self.range.start);
        if self.pos >= len || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min((len - self.pos) as usize);
        let n = self
            .snap
            .read_memory(self.range.start + self.pos, &mut buf[..want])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for MemoryView<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let len = self.range.end.saturating_sub(self.range.start) as i128;
        let p = match to {
            io::SeekFrom::Start(o) => o as i128,
            io::SeekFrom::End(o) => len + o as i128,
            io::SeekFrom::Current(o) => self.pos as i128 + o as i128,
        };
        if p < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the view",
            ));
        }
        self.pos = p as u64;
        Ok(self.pos)
    }
}

macro_rules! read_int {
    ($($name:ident $t:ty),*) => {
        impl Snapshot {
            $(
                #[doc = concat!("Reads a little-endian `", stringify!($t), "` at `addr`.")]
                ///
                /// ```no_run
                /// # fn main() -> coreflect::Result<()> {
                /// # let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
                #[doc = concat!("let v = snap.", stringify!($name), "(0x7f00_0000_1000)?;")]
                /// # let _ = v; Ok(()) }
                /// ```
                pub fn $name(&self, addr: u64) -> Result<$t> {
                    let mut b = [0u8; std::mem::size_of::<$t>()];
                    self.read_exact(addr, &mut b)?;
                    Ok(<$t>::from_le_bytes(b))
                }
            )*
        }
    };
}

read_int!(read_u8 u8, read_u16 u16, read_u32 u32, read_u64 u64, read_i32 i32, read_i64 i64);
