//! A multi-threaded test target for coreflect: the demo's sample process, the tests'
//! subject and the benchmarks' load.
//!
//! Each thread parks in a distinct, named, non-inlined function, so a backtrace shows where
//! it is; each counts what an intrusive dumper could do to it (EINTR, short sleeps, signals,
//! children it did not create), and reports the counters on `quit`.
//!
//! Protocol: once ready it prints one line on stdout
//! `READY pid=.. marker_addr=0x.. marker=0x.. pattern_addr=0x.. pattern_len=.. seq_addr=0x..
//! seq_pages=.. seq_stride=.. [wof_addr=0x.. wof_len=..] [sparse_addr=0x.. sparse_len=..]`.
//! It then reads commands on stdin: `quit` prints `STATS key=value ...` and exits 0;
//! `ping` prints `PONG`; `gapreset`/`gap` reset and print (`GAP us=N`) the longest stop
//! the heartbeat thread (`--heartbeat`) saw, `gaps` every stop of 300 µs or more
//! (`GAPS start:end,...` in CLOCK_MONOTONIC ns); `fork` times a bare `fork()` (`FORK us=N`);
//! `vfork MS` starts a thread that waits in `vfork` for MS ms (`VFORK tid=N`);
//! `cloneproc` starts a child process with `clone()` and exit signal 0
//! (`CLONEPROC child=N`).
//! End of stdin also quits.

pub mod drive;

use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod harm;

/// The marker a test reads back from the core.
pub const MARKER_VALUE: u64 = 0xC0DE_F1EC_7ED0_0D1E;

/// A global with a known value, at a known address.
#[no_mangle]
pub static COREFLECT_MARKER: AtomicU64 = AtomicU64::new(MARKER_VALUE);

/// The byte at offset `i` of the pattern buffer.
pub fn pattern_byte(i: usize) -> u8 {
    ((i.wrapping_mul(7) + 3) as u8) ^ 0x5a
}

/// Options of the target.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// Size of the heap pattern buffer, in MiB.
    pub heap_mib: usize,
    /// Pages the sequence writer stores into (1 MiB apart).
    pub seq_pages: usize,
    /// Size of a MADV_WIPEONFORK region (KiB), 0 for none.
    pub wipeonfork_kib: usize,
    /// Install a seccomp filter that kills the process on `clone`, on every thread.
    pub seccomp_kill_clone: bool,
    /// Reserve this many MiB of anonymous memory...
    pub sparse_reserve_mib: usize,
    /// ...and touch one page in every this many (0: touch none)...
    pub sparse_touch_every: usize,
    /// ...or every page of its first this many MiB.
    pub sparse_touch_mib: usize,
    /// Use transparent huge pages for the pattern buffer.
    pub thp: bool,
    /// Extra idle threads (to test many-thread targets).
    pub extra_threads: usize,
    /// Run a heartbeat thread that measures how long the process is stopped.
    pub heartbeat: bool,
    /// Create and end short-lived threads in a tight loop.
    pub churn_threads: bool,
    /// mmap/mprotect/munmap in a tight loop.
    pub churn_maps: bool,
    /// fork children that exit at once, and reap them, in a loop.
    pub fork_loop: bool,
    /// Exit on its own after this many ms (0: never).
    pub exit_after_ms: u64,
    /// exec `sleep 30` after this many ms (0: never).
    pub exec_after_ms: u64,
    /// Call prctl(PR_SET_DUMPABLE, 0).
    pub non_dumpable: bool,
    /// Size of a MADV_DONTFORK region (KiB), 0 for none.
    pub dontfork_kib: usize,
    /// Split a reservation into this many separate mappings (0: none).
    pub many_maps: usize,
    /// Give every thread a signal mask of its own (one real-time signal blocked each), and
    /// leave a blocked SIGUSR2 pending on the main thread.
    pub signal_masks: bool,
    /// One worker thread under a seccomp filter that kills the process on clone/clone3/wait4.
    pub seccomp_worker: bool,
    /// Private, unreserved hugetlb memory of this many MiB (0: none).
    pub hugetlb_private_mib: usize,
    /// Threads waiting for any child with `__WALL` (one blocked, one polling).
    pub wait_all: bool,
    /// The main thread calls `clone(CLONE_VM|CLONE_VFORK)` in a loop (children live 3 s).
    pub vfork_loop: bool,
    /// Unmap the vDSO ("unmap") or change its protection ("none", "r").
    pub vdso: Option<String>,
    /// The main thread exits (as with `pthread_exit`) once the others run.
    pub exit_main: bool,
    /// Size of a `MAP_SHARED` anonymous (shmem) region (KiB), 0 for none.
    pub shared_kib: usize,
    /// A populated region of this many KiB made PROT_NONE afterwards (0: none).
    pub protnone_kib: usize,
    /// A thread rewrites the pattern buffer (same bytes) at this many MiB/s (0: none).
    pub rewrite_mib_s: usize,
    /// Threads that spin all the time (a busy service).
    pub busy_threads: usize,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            heap_mib: 16,
            seq_pages: 64,
            wipeonfork_kib: 0,
            seccomp_kill_clone: false,
            sparse_reserve_mib: 0,
            sparse_touch_every: 0,
            sparse_touch_mib: 0,
            thp: false,
            extra_threads: 0,
            heartbeat: false,
            churn_threads: false,
            churn_maps: false,
            fork_loop: false,
            exit_after_ms: 0,
            exec_after_ms: 0,
            non_dumpable: false,
            dontfork_kib: 0,
            many_maps: 0,
            signal_masks: false,
            seccomp_worker: false,
            hugetlb_private_mib: 0,
            wait_all: false,
            vfork_loop: false,
            vdso: None,
            exit_main: false,
            shared_kib: 0,
            protnone_kib: 0,
            rewrite_mib_s: 0,
            busy_threads: 0,
        }
    }
}

impl TargetOptions {
    /// Parses `--key value` arguments.
    pub fn parse(args: &[String]) -> Result<TargetOptions, String> {
        let mut o = TargetOptions::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut num = |name: &str| -> Result<usize, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{name} needs a number"))
            };
            match a.as_str() {
                "--heap-mib" => o.heap_mib = num(a)?,
                "--seq-pages" => o.seq_pages = num(a)?,
                "--wipeonfork-kib" => o.wipeonfork_kib = num(a)?,
                "--sparse-reserve-mib" => o.sparse_reserve_mib = num(a)?,
                "--sparse-touch-every" => o.sparse_touch_every = num(a)?,
                "--sparse-touch-mib" => o.sparse_touch_mib = num(a)?,
                "--extra-threads" => o.extra_threads = num(a)?,
                "--seccomp-kill-clone" => o.seccomp_kill_clone = true,
                "--thp" => o.thp = true,
                "--heartbeat" => o.heartbeat = true,
                "--churn-threads" => o.churn_threads = true,
                "--churn-maps" => o.churn_maps = true,
                "--fork-loop" => o.fork_loop = true,
                "--non-dumpable" => o.non_dumpable = true,
                "--dontfork-kib" => o.dontfork_kib = num(a)?,
                "--many-maps" => o.many_maps = num(a)?,
                "--signal-masks" => o.signal_masks = true,
                "--shared-kib" => o.shared_kib = num(a)?,
                "--protnone-kib" => o.protnone_kib = num(a)?,
                "--rewrite-mib-s" => o.rewrite_mib_s = num(a)?,
                "--busy-threads" => o.busy_threads = num(a)?,
                "--exit-after-ms" => o.exit_after_ms = num(a)? as u64,
                "--exec-after-ms" => o.exec_after_ms = num(a)? as u64,
                "--seccomp-worker" => o.seccomp_worker = true,
                "--hugetlb-private" => o.hugetlb_private_mib = num(a)?,
                "--wait-all" => o.wait_all = true,
                "--vfork-loop" => o.vfork_loop = true,
                "--unmap-vdso" => o.vdso = Some("unmap".into()),
                "--vdso-prot" => {
                    let v = it.next().ok_or("--vdso-prot needs none or r")?;
                    if v != "none" && v != "r" {
                        return Err("--vdso-prot needs none or r".into());
                    }
                    o.vdso = Some(v.clone());
                }
                "--exit-main" => o.exit_main = true,
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }
}

#[derive(Default)]
struct Counters {
    sigchld: AtomicU64,
    read_eintr: AtomicU64,
    read_bad: AtomicU64,
    read_ok: AtomicU64,
    sleeps: AtomicU64,
    short_sleep: AtomicU64,
    sleep_err: AtomicU64,
    pause_returns: AtomicU64,
    waitpid_children: AtomicU64,
    waitpid_errors: AtomicU64,
    accept_ok: AtomicU64,
    accept_err: AtomicU64,
    condvar_ok: AtomicU64,
    spins: AtomicU64,
}

/// Largest gap (µs) the heartbeat thread saw between two of its clock reads.
static MAX_GAP_US: AtomicU64 = AtomicU64::new(0);

/// Reads the monotonic clock every ~50 µs and keeps the largest gap: how long the process
/// was stopped, as its own threads see it.
#[inline(never)]
pub fn heartbeat_worker() {
    let mut last = monotonic_ns();
    while !QUIT.load(Relaxed) {
        std::thread::sleep(Duration::from_micros(50));
        let now = monotonic_ns();
        let gap = (now - last) / 1000;
        MAX_GAP_US.fetch_max(gap, Relaxed);
        if gap >= 300 {
            let mut g = GAPS.lock().unwrap();
            if g.len() < 100_000 {
                g.push((last, now));
            }
        }
        last = now;
    }
}

/// Every gap of 300 µs or more the heartbeat saw since the last reset, as
/// (start, end) in CLOCK_MONOTONIC nanoseconds.
static GAPS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// CLOCK_MONOTONIC in nanoseconds (the clock coreflect reports its pause in).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    if harm::NO_VDSO.load(Relaxed) {
        // SAFETY: the raw syscall with a valid timespec pointer (the vDSO is unusable).
        unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
    } else {
        // SAFETY: clock_gettime writes one `timespec` to `ts`, a live local.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits in `vfork` for `ms` milliseconds: the child (sharing our memory, on a stack of its
/// own, exit signal 0 so no SIGCHLD and invisible to `waitpid` without `__WALL`) sleeps,
/// then exits. Meanwhile this thread cannot be stopped (it waits uninterruptibly).
#[inline(never)]
pub fn vfork_waiter(ms: u64) {
    extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
        let ms = arg as usize as i64;
        let ts = libc::timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        // A raw syscall: nothing that touches the parent's thread state.
        // SAFETY: nanosleep reads one `timespec` from `ts` (on this child's own stack, alive for
        // the call) and accepts a null remainder pointer; a raw syscall touches no libc state
        // shared with the suspended parent.
        unsafe {
            libc::syscall(
                libc::SYS_nanosleep,
                &ts as *const libc::timespec,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        0
    }
    let mut stack = vec![0u8; 64 << 10];
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: the child runs `child` on `stack` (64 KiB, 16-aligned top), which stays alive until
    // it exits: CLONE_VFORK suspends this thread until then, and `stack` is only dropped after the
    // waitpid. `child` only makes a raw syscall and returns (libc's clone then calls exit), so
    // nothing else in the shared address space is touched.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK,
            ms as usize as *mut libc::c_void,
        )
    };
    if pid > 0 {
        let mut st = 0;
        // SAFETY: waitpid writes one int to `st`, a live local.
        unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
    }
    drop(stack);
}

/// Forks; the child exits at once. Returns how long `fork()` took in the parent (µs).
#[inline(never)]
pub fn timed_fork() -> u64 {
    let t = Instant::now();
    // SAFETY: the child of this multi-threaded process only calls `_exit`, which is
    // async-signal-safe (no lock another thread might have held at the fork is taken).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: `_exit` has no preconditions and does not return.
        unsafe { libc::_exit(0) };
    }
    let us = t.elapsed().as_micros() as u64;
    if pid > 0 {
        // SAFETY: waitpid accepts a null status pointer (it then writes nothing).
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    us
}

static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
static QUIT: AtomicBool = AtomicBool::new(false);
/// `--signal-masks`: the next thread's real-time signal (0: leave masks alone).
static NEXT_MASK: AtomicU64 = AtomicU64::new(0);

/// Blocks `signals` in the calling thread.
fn block(signals: &[i32]) {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset; the calls only write
    // the local set and the thread's own mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// True once the target was asked to quit.
pub fn quitting() -> bool {
    QUIT.load(Relaxed)
}

fn c() -> &'static Counters {
    COUNTERS.get_or_init(Counters::default)
}

extern "C" fn on_sigchld(_: libc::c_int) {
    c().sigchld.fetch_add(1, Relaxed);
}

/// Busy loop in user mode.
#[inline(never)]
pub fn spin_worker() {
    // Busy in user mode ~1/3 of the time, so benchmarks on a small machine stay fair.
    while !QUIT.load(Relaxed) {
        let t = monotonic_ns();
        while monotonic_ns() - t < 500_000 {
            for _ in 0..1000 {
                std::hint::black_box(c().spins.fetch_add(1, Relaxed));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Blocks in `read(2)` on a pipe nobody writes until quit.
#[inline(never)]
pub fn read_worker(fd: i32) {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: read writes at most 1 byte to `b`, a live local 1-byte array.
        let r = unsafe { libc::read(fd, b.as_mut_ptr() as *mut _, 1) };
        if r == 1 && b[0] == b'Q' {
            c().read_ok.fetch_add(1, Relaxed);
            return;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            c().read_eintr.fetch_add(1, Relaxed);
        } else {
            c().read_bad.fetch_add(1, Relaxed);
            return;
        }
    }
}

/// Sleeps 300 ms at a time with `nanosleep(2)`, checking each sleep lasted.
#[inline(never)]
pub fn sleep_worker() {
    while !QUIT.load(Relaxed) {
        let t = monotonic_ns();
        let req = libc::timespec {
            tv_sec: 0,
            tv_nsec: 300_000_000,
        };
        // SAFETY: nanosleep reads one `timespec` from `req`, a live local, and accepts a null
        // remainder pointer.
        let r = unsafe { libc::nanosleep(&req, std::ptr::null_mut()) };
        if r != 0 {
            c().sleep_err.fetch_add(1, Relaxed);
        } else if monotonic_ns() - t < 300_000_000 {
            c().short_sleep.fetch_add(1, Relaxed);
        }
        c().sleeps.fetch_add(1, Relaxed);
    }
}

/// Waits on a condition variable until quit.
#[inline(never)]
pub fn condvar_worker(pair: &(Mutex<bool>, Condvar)) {
    let mut g = pair.0.lock().unwrap();
    while !*g {
        g = pair.1.wait(g).unwrap();
    }
    c().condvar_ok.fetch_add(1, Relaxed);
}

/// Blocks in `accept(2)`.
#[inline(never)]
pub fn accept_worker(l: &TcpListener) {
    match l.accept() {
        Ok(_) => c().accept_ok.fetch_add(1, Relaxed),
        Err(_) => c().accept_err.fetch_add(1, Relaxed),
    };
}

/// Sits in `pause(2)`, which returns only when a handler runs.
#[inline(never)]
pub fn pause_worker() {
    while !QUIT.load(Relaxed) {
        // SAFETY: pause takes no arguments and has no preconditions.
        unsafe { libc::pause() };
        if !QUIT.load(Relaxed) {
            c().pause_returns.fetch_add(1, Relaxed);
        }
    }
}

/// Polls `waitpid(-1, WNOHANG)`: it must never see a child (the target has none).
#[inline(never)]
pub fn waitpid_worker() {
    while !QUIT.load(Relaxed) {
        // SAFETY: waitpid accepts a null status pointer (it then writes nothing).
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r >= 0 {
            c().waitpid_children.fetch_add(1, Relaxed);
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD) {
            c().waitpid_errors.fetch_add(1, Relaxed);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stores an increasing sequence number into `pages` pages `stride` bytes apart, in order:
/// a consistent image shows all equal, or a prefix one ahead.
#[inline(never)]
pub fn seq_writer(base: usize, pages: usize, stride: usize) {
    let mut n: u64 = 1;
    while !QUIT.load(Relaxed) {
        for p in 0..pages {
            // SAFETY: the only caller (`run`) passes `base` = the `seq` mapping of at least `pages
            // * stride` read-write bytes, page-aligned and never unmapped, so every address written
            // is inside it and 8-aligned. This holds by the caller alone: this safe `pub fn` should
            // be private or `unsafe` (reported in issue 9's review).
            unsafe { std::ptr::write_volatile((base + p * stride) as *mut u64, n) };
        }
        n += 1;
        if n.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Starts and joins short-lived threads as fast as it can.
#[inline(never)]
pub fn thread_churner() {
    while !QUIT.load(Relaxed) {
        let hs: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| std::hint::black_box(1 + 1)))
            .collect();
        for h in hs {
            let _ = h.join();
        }
    }
}

/// Maps, protects and unmaps memory as fast as it can.
#[inline(never)]
pub fn map_churner() {
    let mut n = 0usize;
    while !QUIT.load(Relaxed) {
        let len = 4096 * (1 + n % 64);
        let p = mmap_anon(len);
        // SAFETY: `p` is a fresh private read-write mapping of `len` >= 4096 bytes from `mmap_anon`
        // (which asserts success), written once, then protected and unmapped by us alone: no
        // reference into it exists.
        unsafe {
            *(p as *mut u8) = 1;
            libc::mprotect(p as *mut _, len, libc::PROT_READ);
            libc::munmap(p as *mut _, len);
        }
        n += 1;
    }
}

/// Forks children that exit at once, and reaps each by its pid.
#[inline(never)]
pub fn fork_looper() {
    while !QUIT.load(Relaxed) {
        // SAFETY: the child of this multi-threaded process only calls `_exit`, which is
        // async-signal-safe (no lock another thread might have held at the fork is taken).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: `_exit` has no preconditions and does not return.
            unsafe { libc::_exit(0) };
        }
        if pid > 0 {
            // SAFETY: waitpid accepts a null status pointer (it then writes nothing).
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Parks forever (an idle extra thread).
#[inline(never)]
pub fn idle_worker() {
    while !QUIT.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Rewrites the pattern buffer with its own bytes at `mib_s` MiB/s, 1 MiB at a time, round
/// and round (every page it writes is a copy-on-write fault while a clone shares it).
fn rewrite_worker(buf: usize, len: usize, mib_s: usize) {
    // Every page of the pattern holds the same bytes (the pattern's period divides 4096).
    let page: Vec<u8> = (0..4096).map(pattern_byte).collect();
    let step = 1 << 20;
    let t0 = std::time::Instant::now();
    let mut written = 0u64;
    let mut off = 0;
    while !QUIT.load(Relaxed) {
        let end = (off + step).min(len);
        let mut p = off;
        while p + 4096 <= end {
            // SAFETY: [buf, buf+len) is the pattern buffer, mapped for the process's life;
            // p + 4096 <= len. Other threads only read it, and these are its own bytes.
            unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), (buf + p) as *mut u8, 4096) };
            p += 4096;
        }
        written += (end - off) as u64;
        off = if end >= len { 0 } else { end };
        let due = Duration::from_secs_f64(written as f64 / (mib_s as f64 * 1048576.0));
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

fn mmap_anon(len: usize) -> usize {
    // SAFETY: an anonymous private mapping at an address the kernel picks: no existing memory is
    // touched; the result is asserted to be no MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap of {len} bytes failed");
    p as usize
}

fn install_seccomp_kill_clone() {
    // BPF: load arch; != x86_64 -> allow; load nr; == clone -> kill process; allow.
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let prog = [
        f(0x20, 0, 0, 4),                 // ld [4] (arch)
        f(0x15, 0, 3, AUDIT_ARCH_X86_64), // jeq arch, next, allow
        f(0x20, 0, 0, 0),                 // ld [0] (nr)
        f(0x15, 0, 1, 56),                // jeq clone, kill, allow
        f(0x06, 0, 0, 0x8000_0000),       // ret KILL_PROCESS
        f(0x06, 0, 0, 0x7fff_0000),       // ret ALLOW
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    // On every thread (TSYNC): the threads already run. (seccomp is per thread: without
    // TSYNC only the calling thread would be filtered.)
    // SAFETY: the seccomp syscall with a filter program that lives until it returns (the
    // kernel copies it); no_new_privs first, as an unprivileged filter requires.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_TSYNC,
                &fprog as *const libc::sock_fprog
            ),
            0,
            "seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs the target until `quit` (or end of stdin); never returns.
pub fn run(o: TargetOptions) -> ! {
    // SAFETY: `libc::sigaction` is integers, a handler address and a sigset: all-zero bytes are a
    // valid value; sigaction reads it from `sa`, a live local, and accepts a null old-action
    // pointer. The handler only adds to an atomic counter.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
    }
    let _ = c();
    // The pattern buffer.
    let len = o.heap_mib << 20;
    let pattern = if o.thp {
        let p = mmap_anon(len + (2 << 20));
        let p = (p + (2 << 20) - 1) & !((2 << 20) - 1);
        // SAFETY: madvise(MADV_HUGEPAGE) only changes the paging policy of `len` bytes at `p`,
        // which lie inside the `len + 2 MiB` mapping just made; no contents change.
        unsafe { libc::madvise(p as *mut _, len, libc::MADV_HUGEPAGE) };
        p
    } else {
        // Initialized (zeroed, untouched pages stay unpopulated until the fill below), then
        // leaked: the buffer lives as long as the process.
        let v: &'static mut [u8] = vec![0u8; len].leak();
        v.as_mut_ptr() as usize
    };
    {
        // SAFETY: `pattern` points to `len` bytes owned by nobody else and never freed (the leaked
        // Vec's initialized buffer, or the zero-filled THP mapping), u8-aligned; `buf` is the only
        // reference.
        let buf = unsafe { std::slice::from_raw_parts_mut(pattern as *mut u8, len) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(i);
        }
    }
    let stride = 1 << 20;
    let seq = mmap_anon(o.seq_pages.max(1) * stride);
    let mut extra = String::new();
    if o.wipeonfork_kib > 0 {
        let n = o.wipeonfork_kib << 10;
        let p = mmap_anon(n);
        // SAFETY: `p` is a fresh private read-write mapping of `n` bytes (from `mmap_anon`, which
        // asserts success) that no reference points into; madvise only sets a flag on it.
        unsafe {
            std::ptr::write_bytes(p as *mut u8, 0xAB, n);
            assert_eq!(libc::madvise(p as *mut _, n, 18 /* MADV_WIPEONFORK */), 0);
        }
        extra += &format!(" wof_addr={p:#x} wof_len={n}");
    }
    if o.dontfork_kib > 0 {
        let n = o.dontfork_kib << 10;
        let p = mmap_anon(n);
        // SAFETY: `p` is a fresh private read-write mapping of `n` bytes (from `mmap_anon`, which
        // asserts success) that no reference points into; madvise only sets a flag on it.
        unsafe {
            std::ptr::write_bytes(p as *mut u8, 0xCD, n);
            assert_eq!(libc::madvise(p as *mut _, n, libc::MADV_DONTFORK), 0);
        }
        extra += &format!(" dof_addr={p:#x} dof_len={n}");
    }
    if o.shared_kib > 0 {
        let n = o.shared_kib << 10;
        // SAFETY: a new anonymous shared mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap MAP_SHARED");
        // SAFETY: `p` is the start of the n-byte writable mapping made just above.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0xE5, n) };
        extra += &format!(" shm_addr={:#x} shm_len={n}", p as usize);
    }
    if o.protnone_kib > 0 {
        let n = o.protnone_kib << 10;
        let p = mmap_anon(n);
        // SAFETY: a fresh mapping of n bytes, ours alone.
        unsafe {
            std::ptr::write_bytes(p as *mut u8, 0xEF, n);
            assert_eq!(libc::mprotect(p as *mut _, n, libc::PROT_NONE), 0);
        }
        extra += &format!(" protnone_addr={p:#x} protnone_len={n}");
    }
    if o.many_maps > 0 {
        // Alternate protections page by page: every page becomes a mapping of its own.
        let n = o.many_maps * 4096;
        let p = mmap_anon(n);
        for i in (1..o.many_maps).step_by(2) {
            // SAFETY: `p + i * 4096` is a page inside the `n`-byte mapping just made (i <
            // many_maps), which nothing reads or writes from Rust.
            let r = unsafe { libc::mprotect((p + i * 4096) as *mut _, 4096, libc::PROT_READ) };
            assert_eq!(r, 0, "mprotect: raise vm.max_map_count");
        }
        extra += &format!(" maps_addr={p:#x}");
    }
    if o.sparse_reserve_mib > 0 {
        let n = o.sparse_reserve_mib << 20;
        let p = mmap_anon(n);
        let page = 4096;
        if o.sparse_touch_every > 0 {
            let mut off = 0;
            while off < n {
                // SAFETY: `off < n` and page-aligned, so the u64 at `p + off` lies inside the
                // read-write `n`-byte mapping just made, aligned, and referenced by nothing else.
                unsafe { *((p + off) as *mut u64) = (off as u64) | 1 };
                off += page * o.sparse_touch_every;
            }
        }
        let mut off = 0;
        while off < (o.sparse_touch_mib << 20).min(n) {
            // SAFETY: `off < n` and page-aligned, so the u64 at `p + off` lies inside the
            // read-write `n`-byte mapping just made, aligned, and referenced by nothing else.
            unsafe { *((p + off) as *mut u64) = (off as u64) | 1 };
            off += page;
        }
        extra += &format!(" sparse_addr={p:#x} sparse_len={n}");
    }

    let (rfd, wfd) = {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two ints to `fds`, a live local `[c_int; 2]`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    };
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    let addr = listener.local_addr().unwrap();
    let pair = Arc::new((Mutex::new(false), Condvar::new()));
    if o.signal_masks {
        NEXT_MASK.store(40, SeqCst);
    }
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let sig = NEXT_MASK.load(SeqCst);
                if sig != 0 {
                    // Signals 40, 41, ...: a distinct mask per thread.
                    let sig = NEXT_MASK.fetch_add(1, SeqCst).min(64);
                    block(&[sig as i32]);
                }
                f()
            })
            .expect("spawn thread")
    };
    let mut hs = vec![
        spawn("spin", Box::new(spin_worker)),
        spawn("read", Box::new(move || read_worker(rfd))),
        spawn("sleep", Box::new(sleep_worker)),
        {
            let p = pair.clone();
            spawn("condvar", Box::new(move || condvar_worker(&p)))
        },
        {
            let l = listener.clone();
            spawn("accept", Box::new(move || accept_worker(&l)))
        },
        spawn("waitpid", Box::new(waitpid_worker)),
        spawn(
            "seq",
            Box::new(move || seq_writer(seq, o.seq_pages, stride)),
        ),
    ];
    let pause_thread = spawn("pause", Box::new(pause_worker));
    if o.heartbeat {
        hs.push(spawn("heartbeat", Box::new(heartbeat_worker)));
    }
    for i in 0..o.extra_threads {
        hs.push(spawn(&format!("idle{i}"), Box::new(idle_worker)));
    }
    if o.rewrite_mib_s > 0 {
        let rate = o.rewrite_mib_s;
        hs.push(spawn(
            "rewrite",
            Box::new(move || rewrite_worker(pattern, len, rate)),
        ));
    }
    for i in 0..o.busy_threads {
        hs.push(spawn(
            &format!("busy{i}"),
            Box::new(|| {
                while !QUIT.load(Relaxed) {
                    for _ in 0..10000 {
                        std::hint::black_box(c().spins.fetch_add(1, Relaxed));
                    }
                }
            }),
        ));
    }
    if o.churn_threads {
        hs.push(spawn("churn-threads", Box::new(thread_churner)));
    }
    if o.churn_maps {
        hs.push(spawn("churn-maps", Box::new(map_churner)));
    }
    if o.fork_loop {
        hs.push(spawn("fork-loop", Box::new(fork_looper)));
    }
    if o.exit_after_ms > 0 {
        let ms = o.exit_after_ms;
        spawn(
            "exit-later",
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(ms));
                std::process::exit(0)
            }),
        );
    }
    if o.exec_after_ms > 0 {
        let ms = o.exec_after_ms;
        spawn(
            "exec-later",
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(ms));
                let e = std::os::unix::process::CommandExt::exec(
                    std::process::Command::new("sleep").arg("30"),
                );
                panic!("exec sleep: {e}")
            }),
        );
    }
    if o.non_dumpable {
        // SAFETY: prctl(PR_SET_DUMPABLE) takes no pointers.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    }
    if o.seccomp_kill_clone {
        install_seccomp_kill_clone();
    }
    if o.signal_masks {
        block(&[libc::SIGUSR2]);
        // SAFETY: signals our own main thread, whose SIGUSR2 is blocked: it stays pending.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                std::process::id(),
                libc::gettid(),
                libc::SIGUSR2,
            )
        };
    }
    if o.seccomp_worker {
        let (tx, rx) = std::sync::mpsc::channel();
        hs.push(spawn("seccomp", Box::new(move || harm::seccomp_worker(tx))));
        rx.recv().expect("the seccomp worker started");
    }
    if o.wait_all {
        hs.push(spawn("waitall", Box::new(harm::wait_all_blocking)));
        hs.push(spawn("waitall-poll", Box::new(harm::wait_all_polling)));
    }
    let huge = if o.hugetlb_private_mib > 0 {
        let len = o.hugetlb_private_mib << 20;
        let p = harm::map_hugetlb_private(o.hugetlb_private_mib);
        extra += &format!(" huge_addr={p:#x} huge_len={len}");
        Some((p, len))
    } else {
        None
    };
    if let Some(how) = &o.vdso {
        harm::break_vdso(how);
    }
    // Let every thread reach its blocking call.
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "READY pid={} marker_addr={:#x} marker={:#x} pattern_addr={:#x} pattern_len={} seq_addr={:#x} seq_pages={} seq_stride={}{}",
        std::process::id(),
        &COREFLECT_MARKER as *const _ as usize,
        MARKER_VALUE,
        pattern,
        len,
        seq,
        o.seq_pages,
        stride,
        extra
    );
    std::io::stdout().flush().ok();

    let serve = move || -> ! {
        let mut huge_gen = 1;
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line.as_deref().map(str::trim) {
                Ok("quit") | Err(_) => break,
                Ok("ping") => {
                    println!("PONG spins={}", c().spins.load(Relaxed));
                    std::io::stdout().flush().ok();
                }
                Ok("gapreset") => {
                    MAX_GAP_US.store(0, SeqCst);
                    GAPS.lock().unwrap().clear();
                    println!("GAPRESET");
                    std::io::stdout().flush().ok();
                }
                Ok("gaps") => {
                    let g: Vec<String> = GAPS
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(a, b)| format!("{a}:{b}"))
                        .collect();
                    println!("GAPS {}", g.join(","));
                    std::io::stdout().flush().ok();
                }
                Ok("cloneproc") => {
                    // A child *process* made by clone() with exit signal 0 (not SIGCHLD): a
                    // tracer with PTRACE_O_TRACECLONE is attached to it automatically.
                    println!("CLONEPROC child={}", clone_process());
                    std::io::stdout().flush().ok();
                }
                Ok("hugewrite") => {
                    // Write every huge page again (a copy-on-write if a clone shares them), then
                    // check the whole range.
                    let ok = huge.is_some_and(|(p, len)| {
                        huge_gen += 1;
                        harm::hugetlb_fill(p, len, huge_gen);
                        harm::hugetlb_check(p, len, huge_gen)
                    });
                    println!("HUGE ok={}", ok as u8);
                    std::io::stdout().flush().ok();
                }
                Ok(l) if l.starts_with("vfork ") => {
                    let ms: u64 = l[6..].trim().parse().unwrap_or(1000);
                    let (tx, rx) = std::sync::mpsc::channel();
                    spawn(
                        "vfork",
                        Box::new(move || {
                            // SAFETY: gettid has no preconditions.
                            let _ = tx.send(unsafe { libc::gettid() });
                            vfork_waiter(ms)
                        }),
                    );
                    println!("VFORK tid={}", rx.recv().unwrap_or(0));
                    std::io::stdout().flush().ok();
                }
                Ok("gap") => {
                    println!("GAP us={}", MAX_GAP_US.load(SeqCst));
                    std::io::stdout().flush().ok();
                }
                Ok("fork") => {
                    // Not counted as the dumper's doing: the child is ours.
                    let (s0, w0) = (c().sigchld.load(SeqCst), c().waitpid_children.load(SeqCst));
                    let us = timed_fork();
                    std::thread::sleep(Duration::from_millis(20));
                    c().sigchld.store(s0, SeqCst);
                    c().waitpid_children.store(w0, SeqCst);
                    println!("FORK us={us}");
                    std::io::stdout().flush().ok();
                }
                Ok(other) => {
                    drive::command(other);
                }
            }
        }
        // Quit: wake every thread the way it expects.
        QUIT.store(true, SeqCst);
        // SAFETY: write reads 1 byte from a static byte string; `wfd` is the pipe's write end,
        // still open.
        unsafe { libc::write(wfd, b"Q".as_ptr() as *const _, 1) };
        *pair.0.lock().unwrap() = true;
        pair.1.notify_all();
        let _ = TcpStream::connect(addr);
        for h in hs {
            let _ = h.join();
        }
        // pause() returns only on a signal with a handler: send ourselves one (counted apart).
        let before = c().sigchld.load(SeqCst);
        // SAFETY: the pthread_t comes from `pause_thread`'s JoinHandle, not yet joined, so it still
        // names a live (or unjoined) thread; pthread_kill takes no pointers.
        unsafe {
            libc::pthread_kill(
                std::os::unix::thread::JoinHandleExt::as_pthread_t(&pause_thread),
                libc::SIGCHLD,
            )
        };
        let _ = pause_thread.join();
        let k = c();
        print!(
        "STATS sigchld={} read_ok={} read_eintr={} read_bad={} sleeps={} short_sleep={} sleep_err={} pause_returns={} waitpid_children={} waitpid_errors={} accept_ok={} accept_err={} condvar_ok={} spins={}",
        before,
        k.read_ok.load(SeqCst),
        k.read_eintr.load(SeqCst),
        k.read_bad.load(SeqCst),
        k.sleeps.load(SeqCst),
        k.short_sleep.load(SeqCst),
        k.sleep_err.load(SeqCst),
        k.pause_returns.load(SeqCst),
        k.waitpid_children.load(SeqCst),
        k.waitpid_errors.load(SeqCst),
        k.accept_ok.load(SeqCst),
        k.accept_err.load(SeqCst),
        k.condvar_ok.load(SeqCst),
        k.spins.load(SeqCst) > 0,
    );
        println!(
            " wall_children={} wall_poll_children={} vfork_foreign={} vforks={} seccomp_spins={}",
            harm::WALL_CHILDREN.load(SeqCst),
            harm::WALL_POLL_CHILDREN.load(SeqCst),
            harm::VFORK_FOREIGN.load(SeqCst),
            harm::VFORKS.load(SeqCst),
            harm::SECCOMP_SPINS.load(SeqCst) > 0,
        );
        std::io::stdout().flush().ok();
        std::process::exit(0)
    };
    if o.vfork_loop {
        // The main thread loops in vfork: the thread a dumper stops first.
        std::thread::Builder::new()
            .name("serve".into())
            .spawn(serve)
            .expect("spawn thread");
        harm::vfork_loop();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if o.exit_main {
        std::thread::Builder::new()
            .name("serve".into())
            .spawn(serve)
            .expect("spawn thread");
        harm::exit_main_thread()
    }
    serve()
}

/// Starts a child process with `clone(2)` and exit signal 0 (so neither `SIGCHLD` nor a
/// `wait` without `__WALL` sees it): it waits in `pause()` and dies with its parent.
/// Returns its pid (or a negative errno).
pub fn clone_process() -> i64 {
    extern "C" fn child(_: *mut libc::c_void) -> libc::c_int {
        // Only async-signal-safe calls: this is a copy of a multi-threaded process.
        // SAFETY: prctl and pause take no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            loop {
                libc::pause();
            }
        }
    }
    const STACK: usize = 64 << 10;
    // Leaked: the child runs on it (a copy of it, in its own address space) for good.
    let stack = Box::leak(vec![0u8; STACK].into_boxed_slice());
    // SAFETY: the stack is valid, 16-byte aligned at its top, and outlives the call; without
    // CLONE_VM the child gets its own copy of the address space.
    let r = unsafe {
        let top = stack.as_mut_ptr().add(STACK) as usize & !15;
        libc::clone(child, top as *mut libc::c_void, 0, std::ptr::null_mut())
    };
    if r < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64)
    } else {
        r as i64
    }
}
