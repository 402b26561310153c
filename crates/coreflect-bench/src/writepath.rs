//! `coreflect-bench --write-path`: the write phase against a busy target.
//!
//! The target has its heap (4 KiB pages or THP), threads spinning all the time and one
//! thread rewriting the heap at a fixed rate (the service you dump is busy). Measured for
//! each write path (`--write-path auto` = zero-copy splice into O_DIRECT, and `read`), and
//! for `dd if=/dev/zero bs=16M oflag=direct` of the same byte count:
//! - wall time, CPU of coreflect (wait4) and of the clone (coreflect's report);
//! - the page cache: `Cached` in /proc/meminfo before and after (machine-wide, so other
//!   activity shows too), and how much of the core itself is in the page cache right after
//!   (mincore);
//! - `AnonPages` in /proc/meminfo sampled every 5 ms during the dump: the peak growth over
//!   the value before is the extra anonymous memory (copy-on-write) the dump cost;
//! - `cow_bytes` as coreflect reports it; the pause; coreflect's peak RSS.

use crate::exec::{run_measured, RemoveOnDrop, Target};
use crate::stats::Spread;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One measurement.
#[derive(Debug, Default, Clone)]
struct M {
    wall: f64,
    cpu: f64,
    clone_cpu: f64,
    cached_mib: f64,
    core_cached_mib: f64,
    anon_mib: f64,
    cow_mib: f64,
    pause_ms: f64,
    rss_mib: f64,
    bytes: f64,
    used: String,
}

fn meminfo(key: &str) -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// MiB of `path` in the page cache (mincore).
fn cached_of(path: &Path) -> f64 {
    let Ok(f) = std::fs::File::open(path) else {
        return 0.0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    if len == 0 {
        return 0.0;
    }
    // SAFETY: a read-only shared mapping of a file we hold open, unmapped below; mincore
    // writes one byte per page into `vec`, which has that many.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return 0.0;
        }
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        let ok = libc::mincore(p, len, vec.as_mut_ptr()) == 0;
        libc::munmap(p, len);
        if !ok {
            return 0.0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() as f64 * 4096.0 / 1048576.0
    }
}

/// Samples AnonPages every 5 ms until stopped; returns the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    h: std::thread::JoinHandle<f64>,
}

impl Sampler {
    fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            let mut peak = meminfo("AnonPages");
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(meminfo("AnonPages"));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        Sampler { stop, h }
    }
    fn peak(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.h.join().unwrap_or(0.0)
    }
}

/// The number at `key` anywhere in coreflect's JSON report (0 if absent).
fn json_num(s: &str, key: &str) -> f64 {
    find(&serde_json::from_str(s).unwrap_or_default(), key)
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0)
}

/// The string at `key` anywhere in coreflect's JSON report.
fn json_str(s: &str, key: &str) -> Option<String> {
    find(&serde_json::from_str(s).ok()?, key)?
        .as_str()
        .map(str::to_owned)
}

/// The first value named `key`, searching nested objects depth-first.
fn find(v: &serde_json::Value, key: &str) -> Option<serde_json::Value> {
    let o = v.as_object()?;
    if let Some(x) = o.get(key) {
        return Some(x.clone());
    }
    o.values().find_map(|x| find(x, key))
}

fn dump(coreflect: &Path, dir: &Path, pid: i32, path_arg: &str) -> Result<M, String> {
    let core = dir.join("w.core");
    let _rm = RemoveOnDrop(core.clone());
    let mut cmd = Command::new(coreflect);
    cmd.arg("dump")
        .arg(pid.to_string())
        .arg("-o")
        .arg(&core)
        .args(["--json", "-q", "--write-path", path_arg]);
    let (c0, a0) = (meminfo("Cached"), meminfo("AnonPages"));
    let s = Sampler::start();
    let m = run_measured(&mut cmd, Duration::from_secs(600))?;
    let peak = s.peak();
    let c1 = meminfo("Cached");
    if !m.success() {
        return Err(format!("coreflect {}", m.failure()));
    }
    let j = m.stdout.trim().to_string();
    Ok(M {
        wall: m.wall.as_secs_f64(),
        cpu: m.cpu.as_secs_f64(),
        clone_cpu: json_num(&j, "clone_cpu_ms") / 1000.0,
        cached_mib: c1 - c0,
        core_cached_mib: cached_of(&core),
        anon_mib: (peak - a0).max(0.0),
        cow_mib: json_num(&j, "cow_bytes") / 1048576.0,
        pause_ms: json_num(&j, "pause_us") / 1000.0,
        rss_mib: m.maxrss_kib as f64 / 1024.0,
        bytes: json_num(&j, "bytes_written"),
        used: json_str(&j, "used").unwrap_or_default(),
    })
}

fn dd_direct(dir: &Path, bytes: f64) -> Result<M, String> {
    let out = dir.join("dd");
    let _rm = RemoveOnDrop(out.clone());
    let count = ((bytes / (16u64 << 20) as f64).ceil() as u64).max(1);
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .args([
            "bs=16M",
            &format!("count={count}"),
            "oflag=direct",
            "status=none",
        ]);
    let c0 = meminfo("Cached");
    let m = run_measured(&mut cmd, Duration::from_secs(600))?;
    if !m.success() {
        return Err(format!("dd {}", m.failure()));
    }
    Ok(M {
        wall: m.wall.as_secs_f64(),
        cpu: m.cpu.as_secs_f64(),
        cached_mib: meminfo("Cached") - c0,
        core_cached_mib: cached_of(&out),
        rss_mib: m.maxrss_kib as f64 / 1024.0,
        bytes: (count << 24) as f64,
        used: "dd oflag=direct".into(),
        ..M::default()
    })
}

/// Lets the previous measurement's dirty pages reach the disk before the next one starts
/// (the read path leaves a whole core of them, which would slow down whatever follows).
fn settle() {
    // SAFETY: sync has no memory effects.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}

fn show(v: &[f64], f: impl Fn(f64) -> String) -> String {
    match Spread::of(v) {
        Some(s) if s.n > 1 => format!("{} ({}–{})", f(s.median), f(s.min), f(s.max)),
        Some(s) => f(s.median),
        None => "–".into(),
    }
}

/// Runs the write-path benchmark; returns the Markdown table.
pub fn run(
    coreflect: &Path,
    dir: &Path,
    sizes: &[f64],
    thp: bool,
    runs: usize,
    rewrite: usize,
    busy: usize,
) -> String {
    let mut out = format!(
        "Write path, busy target ({busy} spinning thread(s), heap rewritten at {rewrite} MiB/s); \
         medians (min–max) of {runs} run(s)\n\n\
         | target | path | wall s | vs dd direct | CPU s: coreflect + clone | per GiB | Cached Δ MiB (machine) | core in page cache MiB | AnonPages peak Δ MiB | cow_bytes MiB | pause ms | dumper RSS MiB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for &g in sizes {
        for huge in [false, true] {
            if huge && !thp {
                continue;
            }
            let mib = ((g * 1024.0).round() as usize).max(1);
            let mut args: Vec<String> = vec![
                "--heap-mib".into(),
                mib.to_string(),
                "--seq-pages".into(),
                "1".into(),
                "--busy-threads".into(),
                busy.to_string(),
                "--rewrite-mib-s".into(),
                rewrite.to_string(),
            ];
            if huge {
                args.push("--thp".into());
            }
            let label = format!("{g} GiB {}", if huge { "THP" } else { "4K" });
            eprintln!(
                "write path: {label}: starting the target ({})",
                args.join(" ")
            );
            let mut t = match Target::start(
                coreflect,
                &args,
                Duration::from_secs(60 + 10 * mib as u64 / 1024),
            ) {
                Ok(t) => t,
                Err(e) => {
                    out += &format!("| {label} | target failed: {e} |\n");
                    continue;
                }
            };
            let mut rows: Vec<(String, Vec<M>)> = vec![
                ("coreflect (auto: splice)".into(), vec![]),
                ("coreflect --write-path read".into(), vec![]),
                ("dd bs=16M oflag=direct".into(), vec![]),
            ];
            for run in 1..=runs {
                let mut bytes = (mib as f64) * 1048576.0;
                for (i, p) in ["auto", "read"].iter().enumerate() {
                    match dump(coreflect, dir, t.pid, p) {
                        Ok(m) => {
                            eprintln!(
                                "  run {run}: {p}: {} wall {:.2} s, CPU {:.2}+{:.2} s, Cached Δ {:.0} MiB, anon Δ {:.0} MiB, cow {:.0} MiB",
                                m.used, m.wall, m.cpu, m.clone_cpu, m.cached_mib, m.anon_mib, m.cow_mib
                            );
                            if i == 0 {
                                bytes = m.bytes;
                            }
                            rows[i].1.push(m);
                        }
                        Err(e) => eprintln!("  run {run}: {p}: failed: {e}"),
                    }
                    settle();
                }
                match dd_direct(dir, bytes) {
                    Ok(m) => {
                        eprintln!("  run {run}: dd oflag=direct: wall {:.2} s", m.wall);
                        rows[2].1.push(m)
                    }
                    Err(e) => eprintln!("  run {run}: dd: failed: {e}"),
                }
                settle();
            }
            t.stop();
            let dd_wall: Vec<f64> = rows[2].1.iter().map(|m| m.wall).collect();
            let dd_med = Spread::of(&dd_wall).map(|s| s.median);
            for (name, ms) in &rows {
                if ms.is_empty() {
                    continue;
                }
                let col = |f: &dyn Fn(&M) -> f64| ms.iter().map(f).collect::<Vec<f64>>();
                let gib = ms[0].bytes / (1u64 << 30) as f64;
                let is_dd = name.starts_with("dd");
                let dash = |s: String| if is_dd { "–".to_string() } else { s };
                let used = ms.last().map(|m| m.used.clone()).unwrap_or_default();
                out += &format!(
                    "| {label} | {name}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    if is_dd || used.is_empty() {
                        String::new()
                    } else {
                        format!(" [{used}]")
                    },
                    show(&col(&|m| m.wall), |v| format!("{v:.2}")),
                    match dd_med {
                        Some(d) if d > 0.0 => show(&col(&|m| m.wall / d), |v| format!("{v:.2}×")),
                        _ => "–".into(),
                    },
                    show(&col(&|m| m.cpu + m.clone_cpu), |v| format!("{v:.2}"))
                        + &if is_dd {
                            String::new()
                        } else {
                            format!(
                                " (clone {})",
                                show(&col(&|m| m.clone_cpu), |v| format!("{v:.3}"))
                            )
                        },
                    show(
                        &col(&|m| (m.cpu + m.clone_cpu) / gib.max(1e-9)),
                        |v| format!("{v:.2}")
                    ),
                    show(&col(&|m| m.cached_mib), |v| format!("{v:.0}")),
                    show(&col(&|m| m.core_cached_mib), |v| format!("{v:.0}")),
                    dash(show(&col(&|m| m.anon_mib), |v| format!("{v:.0}"))),
                    dash(show(&col(&|m| m.cow_mib), |v| format!("{v:.0}"))),
                    dash(show(&col(&|m| m.pause_ms), |v| format!("{v:.1}"))),
                    show(&col(&|m| m.rss_mib), |v| format!("{v:.1}")),
                );
            }
        }
    }
    out
}
