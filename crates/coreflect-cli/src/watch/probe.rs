//! Sampling a watched process (CPU over the last interval, RSS, threads, descriptors),
//! its cgroup v2 limits, finding processes by name, and the trigger state machines.

use super::args::Size;
use coreflect::proc::{Stat, Status};
use coreflect::Pid;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One sample of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// CPU use since the previous sample, in percent of one core (of the cgroup's CPU
    /// limit with `--cgroup`); `None` on the first sample.
    pub cpu: Option<f64>,
    /// Resident set size, bytes.
    pub rss: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// The cgroup v2 limits that apply to a process (the nearest ancestor with a limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `cpu.max` as a number of CPUs (quota / period).
    pub cpus: Option<f64>,
    /// `memory.max` in bytes.
    pub memory: Option<u64>,
}

/// Reads the cgroup limits of `pid`: cgroup v2 (`cpu.max`, `memory.max`), or on a
/// cgroup v1 host the `cpu` (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) and `memory`
/// (`memory.limit_in_bytes`) hierarchies. Returns the cgroup directory it started from.
pub fn cgroup_limits(pid: Pid) -> Result<(PathBuf, Limits), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("reading /proc/{pid}/cgroup: {e}"))?;
    let root = Path::new("/sys/fs/cgroup");
    let mut lim = Limits::default();
    if root.join("cgroup.controllers").exists() {
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| format!("no cgroup v2 entry in /proc/{pid}/cgroup"))?;
        let dir = root.join(rel.trim_start_matches('/'));
        walk_up(&dir, root, |d| {
            if lim.cpus.is_none() {
                lim.cpus = read_cpu_max(&d.join("cpu.max"));
            }
            if lim.memory.is_none() {
                lim.memory = read_limit(&d.join("memory.max"));
            }
        });
        return Ok((dir, lim));
    }
    // cgroup v1: one hierarchy per controller.
    let path_of = |ctrl: &str| {
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, p) = (f.next()?, f.next()?, f.next()?);
            c.split(',')
                .any(|x| x == ctrl)
                .then(|| (c.to_string(), p.to_string()))
        })
    };
    let mut first = None;
    if let Some((c, p)) = path_of("cpu") {
        let mount = [root.join("cpu"), root.join(&c)]
            .into_iter()
            .find(|m| m.exists());
        if let Some(m) = mount {
            let dir = m.join(p.trim_start_matches('/'));
            walk_up(&dir, &m, |d| {
                if lim.cpus.is_none() {
                    let q = read_limit(&d.join("cpu.cfs_quota_us"));
                    let per = read_limit(&d.join("cpu.cfs_period_us"));
                    if let (Some(q), Some(per)) = (q, per) {
                        if per > 0 {
                            lim.cpus = Some(q as f64 / per as f64);
                        }
                    }
                }
            });
            first.get_or_insert(dir);
        }
    }
    if let Some((_, p)) = path_of("memory") {
        let m = root.join("memory");
        let dir = m.join(p.trim_start_matches('/'));
        walk_up(&dir, &m, |d| {
            if lim.memory.is_none() {
                lim.memory = read_limit(&d.join("memory.limit_in_bytes"));
            }
        });
        first.get_or_insert(dir);
    }
    match first {
        Some(d) => Ok((d, lim)),
        None => Err(format!(
            "pid {pid} is in no cgroup v2 hierarchy and no cgroup v1 cpu or memory hierarchy is mounted under /sys/fs/cgroup; drop --cgroup"
        )),
    }
}

/// Calls `f` on `dir` and each parent up to `top`.
fn walk_up(dir: &Path, top: &Path, mut f: impl FnMut(&Path)) {
    let mut d = dir;
    loop {
        f(d);
        if d == top {
            break;
        }
        match d.parent() {
            Some(p) if p.starts_with(top) => d = p,
            _ => break,
        }
    }
}

/// `cpu.max` ("max 100000" or "50000 100000") as CPUs.
fn read_cpu_max(p: &Path) -> Option<f64> {
    let s = std::fs::read_to_string(p).ok()?;
    let mut w = s.split_whitespace();
    let (q, per) = (
        w.next()?.parse::<f64>().ok()?,
        w.next()?.parse::<f64>().ok()?,
    );
    (per > 0.0).then_some(q / per)
}

/// A numeric limit; "max", -1 and v1's "unlimited" (near 2^63) are none.
fn read_limit(p: &Path) -> Option<u64> {
    let v: i64 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
    (v > 0 && v < (1i64 << 60)).then_some(v as u64)
}

/// Samples one process.
#[derive(Debug)]
pub struct Probe {
    pid: Pid,
    start_time: u64,
    last: Option<(Instant, u64)>,
    hz: f64,
    cpus: Option<f64>,
}

impl Probe {
    /// A probe of `pid` (started at `start_time`); CPU is scaled to `cpus` if given.
    pub fn new(pid: Pid, start_time: u64, cpus: Option<f64>) -> Probe {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Probe {
            pid,
            start_time,
            last: None,
            hz,
            cpus,
        }
    }

    /// A sample now, or `None` once the process is gone (exited, a zombie, or its pid
    /// reused).
    pub fn sample(&mut self) -> Option<Sample> {
        let st = Stat::read(self.pid).ok()?;
        if st.start_time != self.start_time || matches!(st.state, 'Z' | 'X' | 'x') {
            return None;
        }
        let status = Status::read(self.pid).ok()?;
        let now = Instant::now();
        let ticks = st.utime + st.stime;
        let cpu = self.last.map(|(t, k)| {
            let secs = now.duration_since(t).as_secs_f64().max(1e-3);
            let pct = 100.0 * ticks.saturating_sub(k) as f64 / self.hz / secs;
            match self.cpus {
                Some(c) if c > 0.0 => pct / c,
                _ => pct,
            }
        });
        self.last = Some((now, ticks));
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Some(Sample {
            cpu,
            rss: status.vm_rss_kb * 1024,
            threads: status.threads as u64,
            fds,
        })
    }
}

/// What a trigger looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// CPU at least.
    Cpu(f64),
    /// CPU below.
    CpuBelow(f64),
    /// RSS at least.
    Mem(Size),
    /// RSS below.
    MemBelow(Size),
    /// Threads at least.
    Threads(u64),
    /// Descriptors at least.
    Fds(u64),
    /// Every -s seconds.
    Timer,
}

impl Kind {
    /// The trigger's name in file names and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Cpu(_) => "cpu",
            Kind::CpuBelow(_) => "cpu-below",
            Kind::Mem(_) => "mem",
            Kind::MemBelow(_) => "mem-below",
            Kind::Threads(_) => "threads",
            Kind::Fds(_) => "fds",
            Kind::Timer => "timer",
        }
    }

    /// Whether the condition holds for `s` (`None`: not known yet).
    fn holds(&self, s: &Sample, mem_limit: Option<u64>) -> Option<bool> {
        let mem = |sz: &Size| match sz {
            Size::Bytes(b) => Some(*b as f64),
            Size::Percent(p) => mem_limit.map(|l| l as f64 * p / 100.0),
        };
        Some(match self {
            Kind::Cpu(p) => s.cpu? >= *p,
            Kind::CpuBelow(p) => s.cpu? < *p,
            Kind::Mem(sz) => s.rss as f64 >= mem(sz)?,
            Kind::MemBelow(sz) => (s.rss as f64) < mem(sz)?,
            Kind::Threads(n) => s.threads >= *n,
            Kind::Fds(n) => s.fds >= *n,
            Kind::Timer => true,
        })
    }
}

/// One trigger's state.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// What it looks at.
    pub kind: Kind,
    since: Option<Instant>,
    last_fire: Option<Instant>,
}

impl Trigger {
    /// A trigger that has not fired yet.
    pub fn new(kind: Kind) -> Trigger {
        Trigger {
            kind,
            since: None,
            last_fire: None,
        }
    }

    /// Feeds a sample at `now`: true if the trigger fires. A threshold fires once its
    /// condition has held at every sample for `sustain` seconds, and at least `sustain`
    /// after its previous firing; the timer fires at once, then every `sustain` seconds.
    /// Firing (dumped or skipped) restarts the sustain period.
    pub fn feed(&mut self, s: &Sample, mem_limit: Option<u64>, sustain: f64, now: Instant) -> bool {
        let gap_ok = self
            .last_fire
            .is_none_or(|t| now.duration_since(t).as_secs_f64() >= sustain);
        if self.kind == Kind::Timer {
            if gap_ok {
                self.last_fire = Some(now);
                return true;
            }
            return false;
        }
        match self.kind.holds(s, mem_limit) {
            Some(true) => {
                let since = *self.since.get_or_insert(now);
                if gap_ok && now.duration_since(since).as_secs_f64() >= sustain {
                    self.since = None;
                    self.last_fire = Some(now);
                    return true;
                }
                false
            }
            _ => {
                self.since = None;
                false
            }
        }
    }
}

/// Processes whose comm or executable name is `name` (kernel threads, zombies and the
/// processes in `exclude` left out), as (pid, comm).
pub fn find_by_name(name: &str, exclude: &[Pid]) -> Vec<(Pid, String)> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<Pid>().ok()) else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Ok(st) = Stat::read(pid) else { continue };
        if st.is_kernel_thread() || matches!(st.state, 'Z' | 'X' | 'x') {
            continue;
        }
        let comm_match = st.comm == name
            || (name.len() > 15 && name.starts_with(&st.comm) && st.comm.len() == 15);
        let exe_match = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .is_some_and(|f| f == name || f.strip_suffix(" (deleted)") == Some(name));
        if comm_match || exe_match {
            v.push((pid, st.comm));
        }
    }
    v.sort();
    v
}

/// The processes of process group `pgid`.
pub fn group_members(pgid: Pid, exclude: &[Pid]) -> Vec<Pid> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<Pid>().ok()) else {
                continue;
            };
            if exclude.contains(&pid) {
                continue;
            }
            if Stat::read(pid).is_ok_and(|s| s.pgrp == pgid && !matches!(s.state, 'Z' | 'X' | 'x'))
            {
                v.push(pid);
            }
        }
    }
    v.sort();
    v
}

/// `<comm>_<trigger>_<yymmdd_HHMMSS>.<pid>` (local time), the comm made safe for a file
/// name.
pub fn base_name(comm: &str, trigger: &str, pid: Pid) -> String {
    use coreflect::output::{file_safe_comm, local_stamp, now_secs};
    format!(
        "{}_{}_{}.{}",
        file_safe_comm(comm),
        trigger,
        local_stamp(now_secs()),
        pid
    )
}

/// The path for a new dump: `<base>.core`, else `<base>-2.core`, `-3`… (never an existing
/// file or symlink, nor one in `reserved`), or `<base>.core` itself with `overwrite`.
pub fn pick_path(
    dir: &Path,
    base: &str,
    ext: &str,
    overwrite: bool,
    reserved: &[PathBuf],
) -> PathBuf {
    let first = dir.join(format!("{base}.{ext}"));
    if overwrite && !reserved.contains(&first) {
        return first;
    }
    for n in 1.. {
        let p = if n == 1 {
            first.clone()
        } else {
            dir.join(format!("{base}-{n}.{ext}"))
        };
        if reserved.contains(&p) {
            continue;
        }
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return p,
            _ => continue,
        }
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn s(cpu: f64) -> Sample {
        Sample {
            cpu: Some(cpu),
            ..Default::default()
        }
    }

    #[test]
    fn sustained_cpu() {
        let mut t = Trigger::new(Kind::Cpu(50.0));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!t.feed(&s(90.0), None, 2.0, at(0)));
        assert!(!t.feed(&s(90.0), None, 2.0, at(1000)));
        assert!(!t.feed(&s(10.0), None, 2.0, at(1500))); // interrupted: restart
        assert!(!t.feed(&s(90.0), None, 2.0, at(2000)));
        assert!(!t.feed(&s(90.0), None, 2.0, at(3000)));
        assert!(t.feed(&s(90.0), None, 2.0, at(4000)));
        // After firing, the condition must be sustained again.
        assert!(!t.feed(&s(90.0), None, 2.0, at(5000)));
        assert!(t.feed(&s(90.0), None, 2.0, at(7000)));
    }

    #[test]
    fn timer_and_unknown() {
        let mut t = Trigger::new(Kind::Timer);
        let t0 = Instant::now();
        assert!(t.feed(&Sample::default(), None, 5.0, t0));
        assert!(!t.feed(&Sample::default(), None, 5.0, t0 + Duration::from_secs(4)));
        assert!(t.feed(&Sample::default(), None, 5.0, t0 + Duration::from_secs(5)));
        let mut c = Trigger::new(Kind::CpuBelow(5.0));
        assert!(!c.feed(&Sample::default(), None, 0.0, t0)); // no CPU figure yet
        let mut m = Trigger::new(Kind::Mem(Size::Percent(50.0)));
        let big = Sample {
            rss: 600,
            ..Default::default()
        };
        assert!(!m.feed(&big, None, 0.0, t0));
        assert!(m.feed(&big, Some(1000), 0.0, t0));
    }

    #[test]
    fn names() {
        let d = std::env::temp_dir().join(format!("coreflect-names-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let b = base_name("my prog", "cpu", 42);
        assert!(b.starts_with("my_prog_cpu_") && b.ends_with(".42"), "{b}");
        let p1 = pick_path(&d, &b, "core", false, &[]);
        assert_eq!(p1, d.join(format!("{b}.core")));
        std::fs::write(&p1, b"x").unwrap();
        let p2 = pick_path(&d, &b, "core", false, &[]);
        assert_eq!(p2, d.join(format!("{b}-2.core")));
        assert_eq!(
            pick_path(&d, &b, "core", false, std::slice::from_ref(&p2)),
            d.join(format!("{b}-3.core"))
        );
        assert_eq!(pick_path(&d, &b, "core", true, &[]), p1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
