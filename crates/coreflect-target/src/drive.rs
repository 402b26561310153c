//! Commands that drive the target into the conditions `coreflect watch` triggers on, read
//! from stdin like the others:
//! - `burn` starts a thread that spins (100 % of one core); `calm` stops every burner;
//! - `grow N` allocates and touches N MiB more (kept until exit);
//! - `threads N` starts N more idle threads (named `extra-idle`);
//! - `fds N` opens N more descriptors on /dev/null;
//! - `segv` makes a new thread named `crasher` write through a null pointer (in
//!   `coreflect_target_crash_segv`); `abort` makes it call `abort()`;
//! - `sigstorm S` sends SIGUSR1 to itself (handled) in a loop for S seconds and prints
//!   `SIGSTORM n=N per_s=R`, the cost of signal delivery as the target sees it.
//!
//! Each prints one line when done (`BURN`, `CALM`, `GROW rss_kib=..`, `THREADS n=..`,
//! `FDS n=..`); a crash prints nothing.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static CALM: AtomicBool = AtomicBool::new(false);
static BURNERS: AtomicU64 = AtomicU64::new(0);
static STORM: AtomicU64 = AtomicU64::new(0);
static KEEP: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static FDS: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

fn say(s: String) {
    println!("{s}");
    std::io::stdout().flush().ok();
}

#[inline(never)]
#[no_mangle]
extern "C" fn coreflect_target_burn() {
    let mut x = 1u64;
    while !CALM.load(Relaxed) {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// Dereferences a null pointer: SIGSEGV in this named function.
#[inline(never)]
#[no_mangle]
pub extern "C" fn coreflect_target_crash_segv() {
    // SAFETY: none: the write through a null pointer is the point (the test crash).
    unsafe { std::ptr::write_volatile(std::hint::black_box(std::ptr::null_mut::<u64>()), 1) };
}

/// Calls `abort()` in this named function.
#[inline(never)]
#[no_mangle]
pub extern "C" fn coreflect_target_crash_abort() {
    std::process::abort();
}

extern "C" fn on_usr1(_: libc::c_int) {
    STORM.fetch_add(1, Relaxed);
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("start a thread");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Handles one command line; returns false if it is not one of these commands.
pub fn command(line: &str) -> bool {
    let mut w = line.split_whitespace();
    let cmd = w.next().unwrap_or("");
    let n: u64 = w.next().and_then(|v| v.parse().ok()).unwrap_or(1);
    match cmd {
        "burn" => {
            CALM.store(false, SeqCst);
            BURNERS.fetch_add(1, SeqCst);
            spawn("burner", || coreflect_target_burn());
            say("BURN".into());
        }
        "calm" => {
            CALM.store(true, SeqCst);
            say("CALM".into());
        }
        "grow" => {
            let mut v = vec![0u8; (n as usize) << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            KEEP.lock().unwrap().push(v);
            say(format!("GROW rss_kib={}", rss_kib()));
        }
        "threads" => {
            for _ in 0..n {
                spawn("extra-idle", || loop {
                    std::thread::park();
                });
            }
            let t = std::fs::read_dir("/proc/self/task").map(|d| d.count());
            say(format!("THREADS n={}", t.unwrap_or(0)));
        }
        "fds" => {
            let mut f = FDS.lock().unwrap();
            for _ in 0..n {
                f.push(std::fs::File::open("/dev/null").expect("open /dev/null"));
            }
            let t = std::fs::read_dir("/proc/self/fd").map(|d| d.count());
            say(format!("FDS n={}", t.unwrap_or(0)));
        }
        "segv" => spawn("crasher", || coreflect_target_crash_segv()),
        "abort" => spawn("crasher", || coreflect_target_crash_abort()),
        "sigstorm" => {
            // SAFETY: installs a handler that only increments an atomic.
            unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
            STORM.store(0, SeqCst);
            let t0 = Instant::now();
            let end = t0 + Duration::from_secs(n);
            let mut sent = 0u64;
            while Instant::now() < end {
                for _ in 0..100 {
                    // SAFETY: raise() on a signal with a handler installed above.
                    unsafe { libc::raise(libc::SIGUSR1) };
                }
                sent += 100;
            }
            let secs = t0.elapsed().as_secs_f64();
            let got = STORM.load(SeqCst);
            say(format!(
                "SIGSTORM n={got} sent={sent} per_s={:.0}",
                got as f64 / secs
            ));
        }
        _ => return false,
    }
    true
}
