//! The zero-copy write path: the clone `vmsplice`s its memory into pipes, coreflect
//! `splice`s the pipes into the core opened `O_DIRECT`, and the clone drops what it has
//! handed over (release-behind).
//!
//! - **No copy by the CPU.** An injected `vmsplice` (without `SPLICE_F_GIFT`) puts plain
//!   references to the clone's pages into a pipe; `splice` from the pipe into a file opened
//!   `O_DIRECT` hands those pages to the block layer, which reads them by DMA. No page is
//!   pinned (pinning a copy-on-write page would make the kernel copy it), none goes through
//!   the page cache. The clone gets the pipes' write ends over `SCM_RIGHTS` after its file
//!   table has been unshared and emptied (see the crate-internal `direct` module).
//! - **Release-behind.** Once a few pipe-fulls have been `vmsplice`d, the clone drops them
//!   (`madvise(MADV_DONTNEED)`), without waiting for the pipes to drain: the pipes'
//!   references keep the snapshot's bytes until they are on disk, and as soon as they are,
//!   the target's next write to such a page finds it mapped once and reuses it instead of
//!   copying it. Waiting for the drain would add nothing (the pipe's reference alone blocks
//!   reuse until the data is on disk) but a round trip.
//! - **Order.** The pass starts where the target is writing (see `hot_start`) and wraps
//!   around, so a writer moving forward meets released pages rather than copying the ones
//!   ahead of the dump.
//! - **Fallbacks**, silent but counted in [`WritePathStats`]: the output refuses `O_DIRECT`
//!   → the same splices into the file buffered; a run `vmsplice` cannot take (`EFAULT`:
//!   `PROT_NONE`, device memory…), memory read from the live target, and the pages holding
//!   the clone's rseq area (the kernel rewrites it at every injected syscall) → read through
//!   `/proc/CLONE/mem` and written from an aligned buffer; no injection possible → the
//!   whole core through the read path ([`crate::elf::writer::write_core`]).
//!
//! Each window of at most one pipe's capacity is classified from the clone's pagemap first:
//! never-populated pages and pages mapped to the kernel's zero page stay holes, as on the
//! read path.

use crate::arch::x86_64::Regs;
use crate::direct::{DirectWriter, RseqArea};
use crate::elf::writer::{
    fill_chunk, layout, note_unreadable, ChunkBuf, MemoryReader, Progress, SegmentPlan, Source,
    WriteStats, CHUNK,
};
use crate::error::{Error, Pid, Result};
use crate::proc::mem::{PM_PRESENT, PM_SWAPPED};
use crate::ptrace::{self, WaitStatus};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// How the memory of the image reaches the core file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WritePath {
    /// The zero-copy path where it works, else the read path.
    #[default]
    Auto,
    /// The zero-copy path (fails if the clone cannot be set up for it).
    Splice,
    /// Read the clone's memory through `/proc/CLONE/mem` and write it (the 0.1 default).
    Read,
    /// The clone `pwrite`s its own memory into the core (the former `--direct-write`; a
    /// diagnostic choice: one copy per page, charged to the clone).
    Pwrite,
}

impl WritePath {
    /// The path's name, as `--write-path` takes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            WritePath::Auto => "auto",
            WritePath::Splice => "splice",
            WritePath::Read => "read",
            WritePath::Pwrite => "pwrite",
        }
    }
}

/// What the write path did, for the report.
#[derive(Debug, Clone, Default)]
pub struct WritePathStats {
    /// The path used: `splice+direct`, `splice+buffered`, `read`, `pwrite`.
    pub used: String,
    /// Why the preferred path was not used for the whole file (empty if it was).
    pub fallback: String,
    /// Bytes moved by `vmsplice` + `splice`.
    pub spliced_bytes: u64,
    /// Bytes of the zero-copy path's runs that went through the read path instead.
    pub read_bytes: u64,
    /// Runs that went through the read path on the zero-copy path.
    pub read_runs: u64,
    /// Bytes the clone dropped after handing them over (release-behind).
    pub released_bytes: u64,
    /// Syscalls injected into the clone while writing.
    pub injections: u64,
    /// CPU time the clone used (it lands in the target's children's times), in ms.
    pub clone_cpu_ms: f64,
    /// Pages the target had copied by the time the writer reached them (the clone held
    /// them exclusively: pagemap bit 56), in bytes.
    pub cow_bytes: u64,
}

/// `PM_MMAP_EXCLUSIVE`: the page is mapped once (by the clone alone).
const PM_EXCLUSIVE: u64 = 1 << 56;
const PFN_MASK: u64 = (1 << 55) - 1;
const SYS_MMAP: u64 = 9;
const SYS_MADVISE: u64 = 28;
const SYS_VMSPLICE: u64 = 278;
const MADV_DONTNEED: u64 = 4;
const SPLICE_F_NONBLOCK: u64 = 2;
/// Pipes in flight: the clone fills one while coreflect drains the others.
const PIPES: usize = 8;

/// Pipe-fulls the clone drops at a time (one `madvise` instead of one per `vmsplice`).
const RELEASE_BATCH: u64 = 4;

/// The clone drops `[from, to)` (release-behind); errors are ignored (the range stays).
fn release(drv: &mut Driver, from: u64, to: u64, st: &mut WriteStats) {
    if let Ok(0) = drv.syscall(SYS_MADVISE, [from, to - from, MADV_DONTNEED, 0, 0, 0]) {
        st.path.released_bytes += to - from;
    }
}

/// Threads splicing pipes into the file (each has one write in flight; measured on a
/// virtio disk: four beat one and two).
const SPLICERS: usize = 4;

/// The page frame of the kernel's shared zero page (0 if pagemap hides frames).
fn zero_pfn() -> u64 {
    static Z: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *Z.get_or_init(|| {
        let page = crate::page_size() as usize;
        // SAFETY: a fresh private anonymous mapping of one page, read once and unmapped;
        // nothing else refers to it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return 0;
            }
            std::ptr::read_volatile(p as *const u8);
            let mut e = [0u64; 1];
            let ok = crate::proc::mem::Pagemap::open(std::process::id() as Pid)
                .and_then(|pm| {
                    pm.entries(p as u64, &mut e)
                        .map_err(|e| Error::io("reading our pagemap", e))
                })
                .is_ok();
            libc::munmap(p, page);
            if ok && e[0] & PM_PRESENT != 0 {
                e[0] & PFN_MASK
            } else {
                0
            }
        }
    })
}

/// CPU time a process has used, in ms (`/proc/PID/schedstat`, else `stat`'s ticks).
pub fn cpu_ms(pid: Pid) -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/schedstat")) {
        if let Some(ns) = s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            return Some(ns as f64 / 1e6);
        }
    }
    let st = crate::proc::Stat::read(pid).ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((st.utime + st.stime) as f64 * 1000.0 / hz)
}

/// The clone, stopped at a syscall stop (or an interrupt stop), driven syscall by syscall:
/// its signals stay blocked, it returns to user mode only to execute the borrowed `syscall`
/// instruction, and it is put back at `exit_group` when dropped.
struct Driver {
    clone: Pid,
    insn: u64,
    saved: Regs,
    injections: u64,
}

impl Driver {
    fn new(clone: Pid, insn: u64) -> Result<Driver> {
        let saved = ptrace::get_regs(clone)?;
        ptrace::set_sigmask(clone, !0)?;
        ptrace::set_options(clone, ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL)?;
        Ok(Driver {
            clone,
            insn,
            saved,
            injections: 0,
        })
    }

    fn wait(&self) -> Result<WaitStatus> {
        let mut status = 0;
        loop {
            // SAFETY: waitpid writes only `status`.
            let r = unsafe { libc::waitpid(self.clone, &mut status, libc::__WALL) };
            if r == self.clone {
                return Ok(WaitStatus::decode(status));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(Error::Ptrace {
                    op: "waitpid",
                    tid: self.clone,
                    source: e,
                });
            }
        }
    }

    /// Waits for the next syscall stop; other stops (signals, all blocked but SIGSTOP and
    /// the like) are suppressed.
    fn to_syscall_stop(&self) -> Result<()> {
        loop {
            ptrace::syscall(self.clone)?;
            match self.wait()? {
                WaitStatus::SyscallStop => return Ok(()),
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                    return Err(Error::ProcessExited { pid: self.clone })
                }
                WaitStatus::Stopped { .. } => continue,
            }
        }
    }

    /// Runs `nr(args)` in the clone; its return value (`-errno` on failure).
    fn syscall(&mut self, nr: u64, args: [u64; 6]) -> Result<i64> {
        ptrace::set_regs(self.clone, &self.saved.at_syscall(self.insn, nr, args))?;
        self.injections += 1;
        self.to_syscall_stop()?; // entry
        self.to_syscall_stop()?; // exit
        Ok(ptrace::get_regs(self.clone)?.ret())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Back to exit_group, should it ever run.
        let _ = ptrace::set_regs(self.clone, &self.saved);
    }
}

/// A page-aligned buffer mapped from the kernel (for `O_DIRECT` writes).
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> io::Result<Aligned> {
        let len = len.max(1);
        // SAFETY: a fresh anonymous mapping owned by this value.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Aligned {
            ptr: p as *mut u8,
            len,
        })
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live mapping of len bytes, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The core file: opened a second time `O_DIRECT` where the file system allows it.
struct Output<'a> {
    file: &'a File,
    direct: Option<File>,
    use_direct: AtomicBool,
}

impl Output<'_> {
    fn fd(&self) -> RawFd {
        match (&self.direct, self.use_direct.load(Ordering::Relaxed)) {
            (Some(d), true) => d.as_raw_fd(),
            _ => self.file.as_raw_fd(),
        }
    }
    fn is_direct(&self) -> bool {
        self.direct.is_some() && self.use_direct.load(Ordering::Relaxed)
    }
    /// `O_DIRECT` refused at the first I/O (EINVAL): go on buffered. True if that applied.
    fn refuse_direct(&self, e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::EINVAL) && self.use_direct.swap(false, Ordering::Relaxed)
    }
    /// Writes page-aligned `buf` at page-aligned `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        loop {
            let f = match (&self.direct, self.is_direct()) {
                (Some(d), true) => d,
                _ => self.file,
            };
            match f.write_all_at(buf, off) {
                Err(e) if self.refuse_direct(&e) => continue,
                r => return r,
            }
        }
    }
}

/// One pipe-full handed to the splicing thread: the pipe, and where its bytes go.
struct Job {
    pipe: usize,
    pieces: Vec<(u64, u64)>,
}

/// What the splicing threads report when one of them is gone without saying why.
const SPLICER_GONE: &str = "the thread splicing it stopped";

fn splice_all(out: &Output, pipe: RawFd, clone: Pid, mut off: u64, mut len: u64) -> Result<()> {
    while len > 0 {
        let mut o = off as i64;
        // SAFETY: plain fds and an offset we own.
        let n = unsafe {
            libc::splice(
                pipe,
                std::ptr::null_mut(),
                out.fd(),
                &mut o,
                len as usize,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) || out.refuse_direct(&e) {
                continue;
            }
            return Err(Error::io("splicing the clone's memory into the core", e));
        }
        if n == 0 {
            return Err(Error::SpliceBroken {
                clone,
                why: "the clone's pipe ended early",
            });
        }
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd, u64)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds, which we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(1 << 20);
    // Larger than pipe-max-size works with CAP_SYS_RESOURCE; 4 MiB is plenty.
    for want in [4 << 20, max] {
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETPIPE_SZ, want) } > 0 {
            break;
        }
    }
    // SAFETY: as above.
    let cap = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap <= 0 {
        return Err(io::Error::last_os_error());
    }
    // The read end blocks: the splicing thread waits for nothing but the disk.
    // SAFETY: as above.
    unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, 0) };
    Ok((r, w, cap as u64))
}

/// Writes a whole core into `file` on the zero-copy path. `Ok(Err(why))` if the clone could
/// not be set up for it (nothing was written or changed: use another path).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_core_splice(
    file: &File,
    notes: &[u8],
    segs: &[SegmentPlan],
    mem: &dyn MemoryReader,
    clone: Pid,
    insn: u64,
    rseq: Option<RseqArea>,
    release_behind: bool,
    progress: &mut dyn Progress,
) -> Result<std::result::Result<WriteStats, String>> {
    let page = crate::page_size();
    let mut pipes_r = Vec::new();
    let mut pipes_w = Vec::new();
    let mut cap = u64::MAX;
    for _ in 0..PIPES {
        let (r, w, c) = new_pipe().map_err(|e| Error::io("creating a pipe", e))?;
        pipes_r.push(r);
        pipes_w.push(w);
        cap = cap.min(c);
    }
    let cap = cap / page * page;
    let raw: Vec<RawFd> = pipes_w.iter().map(|w| w.as_raw_fd()).collect();
    // The pages holding the clone's rseq area go through the read path (see `RseqArea`).
    let rseq_pages = rseq.clone();
    let Some((setup, clone_fds)) = DirectWriter::setup_fds(clone, insn, &raw, rseq) else {
        return Ok(Err(
            "the clone could not be set up for splicing (needs root, no seccomp filter, \
             coreflect's network namespace and cgroups)"
                .into(),
        ));
    };
    // Only the clone holds the write ends now: if it dies, the pipes end.
    drop(pipes_w);
    let scratch_len = 2 * page;
    let scratch = setup.syscall(SYS_MMAP, [0, scratch_len, 3, 0x22, u64::MAX, 0])?;
    if scratch < 0 {
        return Ok(Err(format!(
            "mapping a scratch page in the clone failed: {}",
            io::Error::from_raw_os_error(-scratch as i32)
        )));
    }
    let scratch = scratch as u64;
    let clone_mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{clone}/mem"))
        .map_err(|e| Error::io("opening the clone's memory for writing", e))?;
    drop(setup);
    let mut drv = Driver::new(clone, insn)?;
    // Scheduling: see README ("The write path"). The clone runs only for an injected
    // syscall of microseconds at a time but must get the CPU at once: on top of the
    // ordinary policy and coreflect's CPUs (set up above), coreflect's own nice value, not
    // nice 10 (a nice-10 clone behind a busy target made dumps take 16-68 s per GiB).
    // SAFETY: scheduling calls on the clone's pid, no memory effects.
    unsafe {
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, clone as libc::id_t, nice);
    }

    let direct = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok();
    let mut fallback = String::new();
    if direct.is_none() {
        fallback = "the output file system refused O_DIRECT: spliced into the page cache".into();
    }
    let out = Output {
        file,
        use_direct: AtomicBool::new(direct.is_some()),
        direct,
    };

    let lay = layout(notes.len() as u64, segs, page);
    let mut st = WriteStats::default();
    // Headers and notes, padded to the first page of data, in one aligned write.
    let head_len = (lay.notes_offset + notes.len() as u64).div_ceil(page) * page;
    {
        let mut head =
            Aligned::new(head_len as usize).map_err(|e| Error::io("mapping a buffer", e))?;
        let b = head.bytes();
        b[..lay.headers.len()].copy_from_slice(&lay.headers);
        let n0 = lay.notes_offset as usize;
        b[n0..n0 + notes.len()].copy_from_slice(notes);
        out.write_at(&b[..head_len as usize], 0)
            .map_err(|e| Error::io("writing the core", e))?;
    }
    st.bytes_written = lay.notes_offset + notes.len() as u64;
    st.file_size = lay.total_len;
    let total: u64 = segs.iter().map(|s| s.filesz).sum();
    let zpfn = zero_pfn();

    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(PIPES);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Result<usize>>();
    let job_rx = std::sync::Mutex::new(job_rx);
    let result = std::thread::scope(|sc| -> Result<()> {
        let outr = &out;
        let pr = &pipes_r;
        let job_rx = &job_rx;
        let splicers: Vec<_> = (0..SPLICERS)
            .map(|_| {
                let free_tx = free_tx.clone();
                sc.spawn(move || loop {
                    let Ok(job) = job_rx
                        .lock()
                        .map_err(|_| ())
                        .and_then(|r| r.recv().map_err(|_| ()))
                    else {
                        return;
                    };
                    let p = pr[job.pipe].as_raw_fd();
                    let r = job
                        .pieces
                        .iter()
                        .try_for_each(|&(off, len)| splice_all(outr, p, clone, off, len));
                    let failed = r.is_err();
                    if free_tx.send(r.map(|_| job.pipe)).is_err() || failed {
                        return;
                    }
                })
            })
            .collect();
        drop(free_tx);
        let mut free: Vec<usize> = (0..PIPES).collect();
        let take_pipe = |free: &mut Vec<usize>| -> Result<usize> {
            if let Some(p) = free.pop() {
                return Ok(p);
            }
            match free_rx.recv() {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Error::SpliceBroken {
                    clone,
                    why: SPLICER_GONE,
                }),
            }
        };
        let mut broken = false;
        let mut done = 0u64;
        let mut pm = vec![0u64; (cap / page) as usize];
        let mut rbuf = Some(ChunkBuf::new());
        let mut rpm = Vec::new();
        let mut iov = vec![0u8; scratch_len as usize];
        // Reads [addr, addr+len) of `s` the usual way and writes it at its offset.
        let mut read_path = |s: &SegmentPlan,
                             addr: u64,
                             len: u64,
                             off: u64,
                             st: &mut WriteStats,
                             counted: bool|
         -> Result<()> {
            let mut a = 0;
            while a < len {
                let n = (len - a).min(CHUNK as u64) as usize;
                let buf = rbuf.take().unwrap_or_default();
                let c = fill_chunk(mem, s, addr + a, n, off + a, buf, &mut rpm);
                let mut i = 0;
                while i < c.data.len() {
                    if !c.data[i] {
                        i += 1;
                        continue;
                    }
                    let mut j = i;
                    while j < c.data.len() && c.data[j] {
                        j += 1;
                    }
                    let (x, y) = (i * page as usize, j * page as usize);
                    out.write_at(&c.buf[x..y], c.offset + x as u64)
                        .map_err(|e| Error::io("writing the core", e))?;
                    st.bytes_written += (y - x) as u64;
                    if counted {
                        st.path.read_bytes += (y - x) as u64;
                    }
                    i = j;
                }
                st.unpopulated_bytes += c.unpopulated;
                st.zero_bytes += c.zero;
                // (copy-on-write is counted from the window's pagemap)
                for u in &c.unreadable {
                    note_unreadable(st, s, u.start, u.end - u.start, &u.error);
                }
                rbuf = Some(c.buf);
                a += n as u64;
            }
            Ok(())
        };
        let hot = hot_start(mem, segs);
        for (si, (s, &off)) in segs.iter().zip(&lay.data_offsets).enumerate() {
            if s.filesz == 0 {
                continue;
            }
            // Memory only the live target holds, and unreadable mappings (vmsplice would
            // fail on every page): the read path, whole.
            if s.source == Source::Live || s.flags & 4 == 0 || broken {
                read_path(
                    s,
                    s.vaddr,
                    s.filesz,
                    off,
                    &mut st,
                    s.source == Source::Image,
                )?;
                if s.source == Source::Image {
                    st.path.read_runs += 1;
                }
                done += s.filesz;
                if !progress.update(done, total) {
                    return Err(Error::Cancelled);
                }
                continue;
            }
            // Where the target is writing, start there (see `hot_start`), then wrap around.
            let rot = if Some(si) == hot.map(|h| h.0) {
                hot.map_or(0, |h| h.1)
            } else {
                0
            };
            for (lo, hi) in [(rot, s.filesz), (0, rot)] {
                let (mut rel_from, mut rel_to) = (s.vaddr + lo, s.vaddr + lo);
                let mut a = lo;
                while a < hi {
                    let n = (hi - a).min(cap);
                    let base = s.vaddr + a;
                    let pages = (n / page) as usize;
                    let ents = &mut pm[..pages];
                    let have_pm = mem.pagemap(s.source, base, ents);
                    if !have_pm {
                        ents.fill(PM_PRESENT);
                    }
                    // Classify: (first page, end page, kind) with kind 0 hole, 1 splice, 2 read.
                    let mut runs: Vec<(usize, usize, u8)> = Vec::new();
                    for (k, &e) in ents.iter().enumerate() {
                        let addr = base + k as u64 * page;
                        let present = e & (PM_PRESENT | PM_SWAPPED) != 0;
                        if s.sparse && have_pm && e & PM_PRESENT != 0 && e & PM_EXCLUSIVE != 0 {
                            st.path.cow_bytes += page;
                        }
                        let kind = if !present && s.sparse {
                            st.unpopulated_bytes += page;
                            0
                        } else if e & PM_PRESENT != 0 && zpfn != 0 && e & PFN_MASK == zpfn {
                            st.zero_bytes += page;
                            0
                        } else if rseq_pages
                            .as_ref()
                            .is_some_and(|r| r.overlaps(addr, addr + page))
                        {
                            2
                        } else {
                            1
                        };
                        match runs.last_mut() {
                            Some(r) if r.1 == k && r.2 == kind => r.1 = k + 1,
                            _ => runs.push((k, k + 1, kind)),
                        }
                    }
                    // The splice runs, in one vmsplice.
                    let sp: Vec<(usize, usize)> = runs
                        .iter()
                        .filter(|r| r.2 == 1)
                        .map(|r| (r.0, r.1))
                        .collect();
                    let want: u64 = sp.iter().map(|r| (r.1 - r.0) as u64 * page).sum();
                    let mut got = 0u64;
                    if want > 0 && !broken {
                        let p = take_pipe(&mut free)?;
                        for (i, r) in sp.iter().enumerate() {
                            iov[i * 16..i * 16 + 8]
                                .copy_from_slice(&(base + r.0 as u64 * page).to_le_bytes());
                            iov[i * 16 + 8..i * 16 + 16]
                                .copy_from_slice(&((r.1 - r.0) as u64 * page).to_le_bytes());
                        }
                        clone_mem
                            .write_all_at(&iov[..sp.len() * 16], scratch)
                            .map_err(|e| Error::io("writing into the clone's scratch page", e))?;
                        let r = drv.syscall(
                            SYS_VMSPLICE,
                            [
                                clone_fds[p],
                                scratch,
                                sp.len() as u64,
                                SPLICE_F_NONBLOCK,
                                0,
                                0,
                            ],
                        );
                        match r {
                            Ok(v) if v >= 0 => got = v as u64,
                            // A page it cannot take (PROT_NONE…): the read path, below.
                            Ok(v) if v == -(libc::EFAULT as i64) => {}
                            Ok(_) => broken = true,
                            Err(e) => {
                                if crate::proc::Stat::read(clone)
                                    .is_ok_and(|x| matches!(x.state, 't' | 'T'))
                                {
                                    broken = true;
                                } else {
                                    return Err(e);
                                }
                            }
                        }
                        // What went into the pipe, as file pieces.
                        let mut pieces = Vec::new();
                        let mut left = got;
                        for r in &sp {
                            if left == 0 {
                                break;
                            }
                            let len = ((r.1 - r.0) as u64 * page).min(left);
                            pieces.push((off + a + r.0 as u64 * page, len));
                            left -= len;
                        }
                        if pieces.is_empty() {
                            free.push(p);
                        } else if job_tx.send(Job { pipe: p, pieces }).is_err() {
                            // Every splicing thread is gone: the first to fail said why.
                            return Err(free_rx.try_iter().find_map(|r| r.err()).unwrap_or(
                                Error::SpliceBroken {
                                    clone,
                                    why: SPLICER_GONE,
                                },
                            ));
                        }
                        st.path.spliced_bytes += got;
                        st.bytes_written += got;
                        if got > 0 {
                            // The end of what went into the pipe.
                            let mut left = got;
                            for r in &sp {
                                let len = ((r.1 - r.0) as u64 * page).min(left);
                                rel_to = base + r.0 as u64 * page + len;
                                left -= len;
                                if left == 0 {
                                    break;
                                }
                            }
                        }
                    }
                    // Whatever did not go into the pipe, and the rseq pages: the read path.
                    let mut left = got;
                    for r in &runs {
                        let (x, y) = (r.0 as u64 * page, r.1 as u64 * page);
                        match r.2 {
                            0 => {}
                            1 => {
                                let taken = left.min(y - x);
                                left -= taken;
                                if taken < y - x {
                                    read_path(
                                        s,
                                        base + x + taken,
                                        y - x - taken,
                                        off + a + x + taken,
                                        &mut st,
                                        true,
                                    )?;
                                    st.path.read_runs += 1;
                                }
                            }
                            _ => read_path(s, base + x, y - x, off + a + x, &mut st, false)?,
                        }
                    }
                    // Release-behind: everything below rel_to is on its way to disk (the
                    // pipes keep the pages until it is there) or written: the clone drops it,
                    // a few pipe-fulls at a time.
                    if release_behind && rel_to - rel_from >= RELEASE_BATCH * cap {
                        release(&mut drv, rel_from, rel_to, &mut st);
                        rel_from = rel_to;
                    }
                    a += n;
                    done += n;
                    if !progress.update(done, total) {
                        return Err(Error::Cancelled);
                    }
                }
                if release_behind && rel_to > rel_from {
                    release(&mut drv, rel_from, rel_to, &mut st);
                }
            }
        }
        drop(job_tx);
        for h in splicers {
            let _ = h.join();
        }
        // Anything the splicing thread reported.
        for r in free_rx.try_iter() {
            r?;
        }
        Ok(())
    });
    st.path.injections = drv.injections;
    drop(drv);
    // (A clone killed meanwhile is named by the caller, which knows the target.)
    result?;
    file.set_len(lay.total_len)
        .map_err(|e| Error::io("writing the core", e))?;
    st.path.used = if out.is_direct() {
        "splice+direct".into()
    } else {
        if fallback.is_empty() {
            fallback = "O_DIRECT writes were refused: spliced into the page cache".into();
        }
        "splice+buffered".into()
    };
    st.path.fallback = fallback;
    Ok(Ok(st))
}

/// Where to start writing: the target's writes since the snapshot show in the clone's
/// pagemap as pages the clone now maps alone. A writer that moves forward through its
/// memory (a log, a ring buffer, an arena, a rewrite) is at the end of the longest such run;
/// starting the dump there keeps the dump ahead of it (every page it reaches has already
/// been released) instead of letting it copy the pages in front of the dump. Returns the
/// segment's index and the offset in it (page-aligned), or `None` if nothing was written.
fn hot_start(mem: &dyn MemoryReader, segs: &[SegmentPlan]) -> Option<(usize, u64)> {
    let page = crate::page_size();
    let mut pm = vec![0u64; 4096];
    // (length, segment, end offset) of the longest run of exclusive pages.
    let mut best: Option<(u64, usize, u64)> = None;
    for (i, s) in segs.iter().enumerate() {
        if !(s.sparse && s.source == Source::Image) {
            continue;
        }
        let (mut run, mut a) = (0u64, 0u64);
        while a < s.filesz {
            let k = ((s.filesz - a) / page).min(pm.len() as u64) as usize;
            if !mem.pagemap(s.source, s.vaddr + a, &mut pm[..k]) {
                return None;
            }
            for (j, &e) in pm[..k].iter().enumerate() {
                if e & PM_PRESENT != 0 && e & PM_EXCLUSIVE != 0 {
                    run += 1;
                    let end = a + (j as u64 + 1) * page;
                    if best.is_none_or(|b| run > b.0) {
                        best = Some((run, i, end));
                    }
                } else if e & PM_PRESENT != 0 {
                    run = 0;
                }
            }
            a += k as u64 * page;
        }
    }
    best.filter(|b| b.0 >= 4)
        .map(|b| (b.1, b.2 % segs[b.1].filesz))
}

/// Bytes of private anonymous memory the image maps alone (the target has copied them).
fn exclusive_bytes(mem: &dyn MemoryReader, segs: &[SegmentPlan]) -> u64 {
    let page = crate::page_size();
    let mut pm = vec![0u64; 4096];
    let mut n = 0;
    for s in segs
        .iter()
        .filter(|s| s.sparse && s.source == Source::Image)
    {
        let mut a = 0;
        while a < s.filesz {
            let k = ((s.filesz - a) / page).min(pm.len() as u64) as usize;
            if !mem.pagemap(s.source, s.vaddr + a, &mut pm[..k]) {
                break;
            }
            n += pm[..k]
                .iter()
                .filter(|&&e| e & PM_PRESENT != 0 && e & PM_EXCLUSIVE != 0)
                .count() as u64;
            a += k as u64 * page;
        }
    }
    n * page
}

/// Writes a whole core into `file` by `path`: `clone` is the image's clone and its
/// `syscall` instruction (reflect mode), `rseq` its rseq area as the snapshot holds it.
/// With `release_behind` the clone drops what it handed over (the image can no longer be
/// read afterwards: only for the last use of a snapshot).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_core_file(
    mem: &dyn MemoryReader,
    clone: Option<(Pid, u64)>,
    path: WritePath,
    rseq: Option<RseqArea>,
    file: &File,
    segs: &[SegmentPlan],
    notes: &[u8],
    release_behind: bool,
    progress: &mut dyn Progress,
) -> Result<WriteStats> {
    use crate::elf::writer::{write_core, write_core_direct, FileSink};
    let read = |progress: &mut dyn Progress, why: String| -> Result<WriteStats> {
        let mut sink = FileSink::new(file);
        let mut st = write_core(&mut sink, notes, segs, mem, progress)?;
        st.path.used = "read".into();
        st.path.fallback = why;
        // The clone kept every page to the end: all it holds alone now was copied.
        st.path.cow_bytes = exclusive_bytes(mem, segs);
        Ok(st)
    };
    let Some((clone, insn)) = clone else {
        let why = if path == WritePath::Read {
            String::new()
        } else {
            "no clone (suspend mode): read from the stopped target".into()
        };
        return read(progress, why);
    };
    match path {
        WritePath::Read => read(progress, String::new()),
        WritePath::Pwrite => {
            let Some(d) = DirectWriter::setup(clone, insn, file, rseq) else {
                return read(progress, "the clone could not be set up to write".into());
            };
            match write_core_direct(file, notes, segs, mem, &d, progress) {
                Ok(mut st) => {
                    st.path.used = "pwrite".into();
                    st.path.cow_bytes = exclusive_bytes(mem, segs);
                    Ok(st)
                }
                Err(Error::Cancelled) => Err(Error::Cancelled),
                // It stopped working: the whole core the usual way (every byte it writes
                // replaces what the clone wrote at the same place).
                Err(e) => read(progress, format!("the clone's writes failed: {e}")),
            }
        }
        WritePath::Auto | WritePath::Splice => {
            match write_core_splice(
                file,
                notes,
                segs,
                mem,
                clone,
                insn,
                rseq,
                release_behind,
                progress,
            )? {
                Ok(st) => Ok(st),
                Err(why) if path == WritePath::Auto => read(progress, why),
                Err(reason) => Err(Error::WritePathUnavailable { clone, reason }),
            }
        }
    }
}
