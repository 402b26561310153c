//! Calibrating the pause estimate on this machine.
//!
//! A reflected snapshot's pause is dominated by the injected `clone()`, which costs what a
//! `fork()` of the target costs: copying its page tables (per 4 KiB page of private
//! anonymous memory, much less per transparent huge page) plus a fixed cost. Those costs
//! differ several-fold between machines (CPU, virtualization, kernel, load), so fixed
//! constants ran 2–4× low on some. Instead, helper processes hold known amounts of memory
//! in 4 KiB pages, in huge pages (when THP is available), and many mappings, and time their
//! own `fork()`s in turns; the fixed, per-GiB and per-mapping costs come from the
//! differences. The result is cached
//! for an hour under `$XDG_CACHE_HOME/coreflect/` (or `~/.cache/coreflect/`), keyed by
//! kernel release and CPU; with no cache directory it is measured once per process.

use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The measured costs of a `fork()` on this machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForkCost {
    /// Fixed cost of a fork of a small process, in µs.
    pub fixed_us: f64,
    /// Cost per GiB of private anonymous memory in 4 KiB pages, in µs.
    pub per_gib_4k_us: f64,
    /// Cost per GiB of transparent huge pages, in µs.
    pub per_gib_thp_us: f64,
    /// Cost per mapping (VMA), in µs.
    pub per_map_us: f64,
}

impl ForkCost {
    /// Constants measured on 2-vCPU KVM guests when idle, used if calibration fails.
    pub const FALLBACK: ForkCost = ForkCost {
        fixed_us: 300.0,
        per_gib_4k_us: 15_000.0,
        per_gib_thp_us: 1_000.0,
        per_map_us: 1.0,
    };
}

/// Memory two helpers touch in 4 KiB pages (the cost per page grows with the page tables'
/// size, as page structures stop fitting in the caches: the rate is taken between the
/// two), and another in huge pages.
const SMALL_MIB: usize = 64;
const LARGE_MIB: usize = 512;
const HUGE_MIB: usize = 256;
/// Separate mappings a helper makes for the per-mapping cost.
const MAPS: usize = 2048;
/// Rounds of forks (the fastest of each helper is kept).
const FORKS: usize = 9;
/// How long a cached calibration is trusted.
const MAX_AGE: Duration = Duration::from_secs(3600);

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// In a helper process: the time (ns) of one fork of itself, the child exiting at once.
/// Only raw system calls: this runs in the child of a possibly multi-threaded process.
fn time_fork() -> u64 {
    let t0 = now_ns();
    // SAFETY: the child only calls _exit.
    let c = unsafe { libc::fork() };
    if c == 0 {
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(0) };
    }
    let t = now_ns() - t0;
    if c < 0 {
        return u64::MAX;
    }
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(c, std::ptr::null_mut(), 0) };
    t
}

/// Maps and touches `mib` MiB, in huge pages if `huge`; returns false if it could not.
fn touch(mib: usize, huge: bool) -> bool {
    let len = mib << 20;
    let extra = if huge { 2 << 20 } else { 0 };
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + extra,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    // Huge pages need 2 MiB alignment.
    let start = ((p as usize) + extra) & !(extra.max(1) - 1);
    let start = if huge { start } else { p as usize };
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: the range lies within the mapping just made.
    unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    let mut off = 0;
    while off < len {
        // SAFETY: within the mapping, which is writable.
        unsafe { std::ptr::write_volatile((start + off) as *mut u8, 1) };
        off += 4096;
    }
    true
}

/// Maps `MAPS` one-page mappings (alternating protections, so they stay separate), each
/// touched; returns false if it could not.
fn many_maps() -> bool {
    let len = MAPS * 4096;
    // SAFETY: a fresh private anonymous mapping.
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
        return false;
    }
    for i in 0..MAPS {
        let a = p as usize + i * 4096;
        // SAFETY: within the mapping, which is writable until the mprotect below.
        unsafe { std::ptr::write_volatile(a as *mut u8, 1) };
        if i % 2 == 1 {
            // SAFETY: one page of our mapping.
            if unsafe { libc::mprotect(a as *mut libc::c_void, 4096, libc::PROT_READ) } != 0 {
                return false;
            }
        }
    }
    true
}

/// The helper's `AnonHugePages` in KiB, read with raw system calls only.
fn anon_huge_kb() -> u64 {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/smaps_rollup".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return 0;
    }
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: reads into the rest of `buf`.
        let r = unsafe {
            libc::read(
                fd,
                buf[n..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - n,
            )
        };
        if r <= 0 {
            break;
        }
        n += r as usize;
    }
    // SAFETY: ours, closed once.
    unsafe { libc::close(fd) };
    parse_kb(&buf[..n], b"AnonHugePages:")
}

/// The number after `key` in a /proc text, without allocating.
fn parse_kb(text: &[u8], key: &[u8]) -> u64 {
    let Some(at) = text.windows(key.len()).position(|w| w == key) else {
        return 0;
    };
    text[at + key.len()..]
        .iter()
        .skip_while(|b| **b == b' ' || **b == b'\t')
        .take_while(|b| b.is_ascii_digit())
        .fold(0, |v, b| v * 10 + (b - b'0') as u64)
}

/// What a helper process holds.
#[derive(Clone, Copy)]
enum Kind {
    Bare,
    Small,
    Large,
    Huge,
    Maps,
}

fn write_u64(fd: i32, v: u64) -> bool {
    // SAFETY: writes the 8 bytes of `v`.
    unsafe { libc::write(fd, &v as *const u64 as *const libc::c_void, 8) == 8 }
}

fn read_u64(fd: i32) -> Option<u64> {
    let mut v = 0u64;
    let mut n = 0usize;
    while n < 8 {
        // SAFETY: reads into the rest of `v`'s bytes.
        let r = unsafe {
            libc::read(
                fd,
                (&mut v as *mut u64 as *mut u8).add(n) as *mut libc::c_void,
                8 - n,
            )
        };
        if r > 0 {
            n += r as usize;
        } else if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return None;
        }
    }
    Some(v)
}

/// A helper process: prepares its memory, reports (its `AnonHugePages`, or `u64::MAX` if
/// it could not), then times one fork per byte it reads until its command pipe closes.
struct Helper {
    pid: i32,
    cmd: i32,
    res: i32,
}

impl Helper {
    fn start(kind: Kind) -> Option<Helper> {
        let (mut c, mut r) = ([0i32; 2], [0i32; 2]);
        // SAFETY: each array receives two descriptors.
        if unsafe { libc::pipe2(c.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: as above.
        if unsafe { libc::pipe2(r.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            // SAFETY: ours.
            unsafe { libc::close(c[0]) };
            // SAFETY: ours.
            unsafe { libc::close(c[1]) };
            return None;
        }
        // SAFETY: the child makes only raw system calls (mmap, madvise, fork, read, write,
        // _exit) and never returns into the parent's code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the child's own copies of the descriptors; ends with _exit.
            unsafe {
                libc::close(c[1]);
                libc::close(r[0]);
                // The OOM killer's first choice, should memory run short.
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    libc::write(fd, b"1000".as_ptr() as *const libc::c_void, 4);
                    libc::close(fd);
                }
                let ok = match kind {
                    Kind::Bare => true,
                    Kind::Small => touch(SMALL_MIB, false),
                    Kind::Large => touch(LARGE_MIB, false),
                    Kind::Huge => touch(HUGE_MIB, true),
                    Kind::Maps => many_maps(),
                };
                let report = match (ok, kind) {
                    (false, _) => u64::MAX,
                    (true, Kind::Huge) => anon_huge_kb(),
                    _ => 0,
                };
                write_u64(r[1], report);
                let mut b = 0u8;
                while libc::read(c[0], &mut b as *mut u8 as *mut libc::c_void, 1) == 1 {
                    if !write_u64(r[1], time_fork()) {
                        break;
                    }
                }
                libc::_exit(0);
            }
        }
        // SAFETY: the child's ends, in the parent.
        unsafe {
            libc::close(c[0]);
            libc::close(r[1]);
        }
        let h = Helper {
            pid,
            cmd: c[1],
            res: r[0],
        };
        (pid > 0).then_some(h)
    }

    fn fork_once(&self) -> Option<u64> {
        // SAFETY: one byte to our helper's command pipe.
        if unsafe { libc::write(self.cmd, b"f".as_ptr() as *const libc::c_void, 1) } != 1 {
            return None;
        }
        read_u64(self.res).filter(|&t| t != u64::MAX)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // SAFETY: our descriptors; closing the command pipe ends the helper, which we reap.
        unsafe {
            libc::close(self.cmd);
            libc::close(self.res);
            if self.pid > 0 {
                libc::kill(self.pid, libc::SIGKILL);
                while libc::waitpid(self.pid, std::ptr::null_mut(), 0) < 0
                    && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
                {
                }
            }
        }
    }
}

/// Runs the measurement in five helper processes (so that coreflect's own memory, threads
/// and mappings do not count): one bare, two with `SMALL_MIB` and `LARGE_MIB` of 4 KiB
/// pages, one with `HUGE_MIB` asked for in huge pages, one with `MAPS` mappings. They fork in turns, round
/// after round, so a burst of load on a busy machine hits all alike, and the fastest fork
/// of each is kept (the target's own threads, which may be busy while this runs, are
/// stopped during the pause). With a real-time priority the helpers' forks ran 2× faster
/// than the clones of the benchmark's targets: the pause shares the machine with everything
/// else, so the helpers do too. Returns the times (ns: bare, small, large, huge) and the
/// huge helper's `AnonHugePages` (KiB), then the mappings' time; the huge time is 0 when
/// `thp` is false.
fn measure(thp: bool) -> Option<[u64; 6]> {
    let mut kinds = vec![Kind::Bare, Kind::Small, Kind::Maps, Kind::Large];
    if thp {
        kinds.push(Kind::Huge);
    }
    let mut helpers = Vec::new();
    let mut huge_kb = 0;
    for &k in &kinds {
        let h = Helper::start(k)?;
        let report = read_u64(h.res)?;
        if report == u64::MAX {
            return None;
        }
        if matches!(k, Kind::Huge) {
            huge_kb = report;
        }
        helpers.push(h);
    }
    let mut times = vec![Vec::with_capacity(FORKS); helpers.len()];
    for _ in 0..FORKS {
        for (h, t) in helpers.iter().zip(times.iter_mut()) {
            t.push(h.fork_once()?);
        }
    }
    let best: Vec<u64> = times
        .iter_mut()
        .map(|t| {
            t.sort_unstable();
            t[0]
        })
        .collect();
    let huge = if thp { best[4] } else { 0 };
    Some([best[0], best[1], best[3], huge, huge_kb, best[2]])
}

/// Turns the helpers' fork times (ns: bare; with `SMALL_MIB`, `LARGE_MIB` of 4 KiB pages; with
/// `HUGE_MIB` asked for in huge pages, of which it got `huge_kb` KiB; with `MAPS` mappings)
/// into costs.
fn model(t: [u64; 6]) -> Option<ForkCost> {
    let [bare, small, large, huge, huge_kb, maps] = t;
    if bare == 0 || small <= bare {
        return None;
    }
    let per_gib_4k = if large > small {
        (large - small) as f64 / 1e3 * (1024.0 / (LARGE_MIB - SMALL_MIB) as f64)
    } else {
        (small - bare) as f64 / 1e3 * (1024.0 / SMALL_MIB as f64)
    };
    // Whatever of the huge region did not get huge pages costs as 4 KiB pages.
    let region_kb = (HUGE_MIB as u64) << 10;
    let per_gib_thp = if huge > bare && huge_kb >= region_kb / 4 {
        let small_part_us =
            (region_kb - huge_kb.min(region_kb)) as f64 / (1u64 << 20) as f64 * per_gib_4k;
        let huge_us = ((huge - bare) as f64 / 1e3 - small_part_us).max(0.0);
        (huge_us / (huge_kb as f64 / (1u64 << 20) as f64)).max(per_gib_4k / 64.0)
    } else {
        per_gib_4k / 20.0
    };
    let per_map = if maps > bare {
        (maps - bare) as f64 / 1e3 / MAPS as f64
    } else {
        ForkCost::FALLBACK.per_map_us
    };
    Some(ForkCost {
        fixed_us: bare as f64 / 1e3,
        per_gib_4k_us: per_gib_4k,
        per_gib_thp_us: per_gib_thp,
        per_map_us: per_map,
    })
}

/// The machine's key: kernel release, CPU model and count.
fn key() -> String {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    format!("{} | {} | {n}", rel.trim(), cpu.trim())
}

fn cache_path() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| std::path::PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("coreflect").join("pause-calibration"))
}

fn load(path: &std::path::Path, key: &str) -> Option<ForkCost> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let age = f.metadata().ok()?.modified().ok()?;
    if SystemTime::now().duration_since(age).ok()? > MAX_AGE {
        return None;
    }
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    let mut lines = s.lines();
    if lines.next()? != key {
        return None;
    }
    let v: Vec<f64> = lines
        .next()?
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v.len() == 4 && v.iter().all(|x| x.is_finite() && *x > 0.0)).then(|| ForkCost {
        fixed_us: v[0],
        per_gib_4k_us: v[1],
        per_gib_thp_us: v[2],
        per_map_us: v[3],
    })
}

fn store(path: &std::path::Path, key: &str, c: &ForkCost) {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".pause-calibration.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            writeln!(
                f,
                "{key}\n{:.1} {:.1} {:.1} {:.3}",
                c.fixed_us, c.per_gib_4k_us, c.per_gib_thp_us, c.per_map_us
            )
        });
    if written.is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// This machine's fork costs: cached, else measured (about 0.1–0.3 s, in a helper
/// process), else [`ForkCost::FALLBACK`]. Measured at most once per process.
pub fn fork_cost() -> ForkCost {
    static COST: OnceLock<ForkCost> = OnceLock::new();
    *COST.get_or_init(|| {
        let key = key();
        let path = cache_path();
        if let Some(c) = path.as_deref().and_then(|p| load(p, &key)) {
            return c;
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"));
        let Some(c) = measure(thp).and_then(model) else {
            return ForkCost::FALLBACK;
        };
        if let Some(p) = &path {
            store(p, &key, &c);
        }
        c
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_from_fork_times() {
        // 0.2 ms bare; +0.8 ms for 64 MiB of 4K pages, +7 ms more for 448 MiB more
        // (16 ms/GiB); +1 ms for 256 MiB of THP, all huge; +2.048 ms for 2048 mappings.
        let t = [
            200_000,
            1_000_000,
            8_000_000,
            1_200_000,
            256 << 10,
            2_248_000,
        ];
        let c = model(t).unwrap();
        assert_eq!(c.fixed_us, 200.0);
        assert_eq!(c.per_gib_4k_us, 16_000.0);
        assert_eq!(c.per_gib_thp_us, 4_000.0);
        assert!((c.per_map_us - 1.0).abs() < 1e-9);
        // Half the huge region in 4K pages: 128 MiB of it costs 2 ms at 16 ms/GiB.
        let c = model([200_000, 1_000_000, 8_000_000, 2_700_000, 128 << 10, 0]).unwrap();
        assert!((c.per_gib_thp_us - 4_000.0).abs() < 1e-6, "{c:?}");
        assert_eq!(c.per_map_us, ForkCost::FALLBACK.per_map_us);
        // No huge pages at all: a ratio of the 4K cost.
        let c = model([200_000, 1_000_000, 8_000_000, 0, 0, 0]).unwrap();
        assert!((c.per_gib_thp_us - 800.0).abs() < 1e-6);
        // No large measurement: the small one's rate.
        let c = model([200_000, 1_200_000, 0, 0, 0, 0]).unwrap();
        assert_eq!(c.per_gib_4k_us, 16_000.0);
        assert!(model([200_000, 100_000, 0, 0, 0, 0]).is_none());
        assert_eq!(
            parse_kb(b"Rss: 5 kB\nAnonHugePages:  2048 kB\n", b"AnonHugePages:"),
            2048
        );
    }

    #[test]
    fn a_measurement_gives_plausible_costs() {
        // Not a timing assertion: only that the helper ran and reported ordered times.
        let t = measure(true).expect("the calibration helper ran");
        assert!(t[0] > 0 && t[1] > 0, "{t:?}");
        eprintln!("fork times {t:?}: {:?}", model(t));
    }

    #[test]
    fn the_cache_round_trips_and_checks_its_key() {
        let d = std::env::temp_dir().join(format!("coreflect-calib-{}", std::process::id()));
        let p = d.join("c");
        let c = ForkCost {
            fixed_us: 250.0,
            per_gib_4k_us: 20_000.0,
            per_gib_thp_us: 900.0,
            per_map_us: 1.5,
        };
        store(&p, "k1", &c);
        assert_eq!(load(&p, "k1"), Some(c));
        assert_eq!(load(&p, "k2"), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
