//! `coreflect-bench`: measures how long coreflect pauses a live process, and compares it
//! with a bare `fork()` inside the process, with coreflect's own suspend mode, with gdb's
//! `gcore`, and with `dd` writing as much to the same filesystem.
//!
//! Each scenario starts a fresh test target (`coreflect __target --heartbeat ...`) whose
//! heartbeat thread reports the longest stop it saw; the tools run under `wait4` for wall
//! time and peak RSS. The result is a Markdown table on stdout (machine facts first, ratios
//! after); progress goes to stderr. Nothing here asserts a timing: it is a benchmark.
//!
//! ```text
//! coreflect-bench [--sizes 1,4] [--no-thp] [--sparse] [--threads 2000] [--quick]
//!                 [--runs N] [--dir DIR] [--no-gcore] [--coreflect PATH]
//! coreflect-bench --write-path [--sizes 1] [--no-thp] [--runs N] [--rewrite-mib-s 512]
//!                 [--busy-threads 1]
//! ```

mod exec;
mod report;
mod stats;
mod writepath;

use exec::{interrupted, run_measured, RemoveOnDrop, Target};
use stats::Sample;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The usage text.
const USAGE: &str = "\
usage: coreflect-bench [--sizes 1,4] [--no-thp] [--sparse] [--threads N] [--quick]
                       [--runs N] [--dir DIR] [--no-gcore] [--coreflect PATH]

Benchmarks `coreflect dump` (reflect and suspend modes) against a bare fork() inside the
target, gcore and dd, on fresh test targets; prints a Markdown table on stdout.

  --sizes LIST      heap sizes in GiB, comma-separated, fractions allowed (default 1,4)
  --no-thp          only 4 KiB pages (default: also transparent huge pages)
  --sparse          also compare a dense 256 MiB target with a 16 GiB reservation of
                    which one page in 64 (256 MiB) is touched
  --threads N       also measure a target with N extra threads (e.g. 2000)
  --quick           smoke run: sizes 0.25, runs 1, no gcore
  --runs N          runs per measurement; the median is reported (default 3)
  --dir DIR         where to write the cores (in a fresh subdirectory, removed at the
                    end; default: a fresh directory under /tmp)
  --no-gcore        skip gcore
  --coreflect PATH  the coreflect binary (default: next to this executable)
  --write-path      instead: the write phase on a busy target (spinning threads, heap
                    rewritten at --rewrite-mib-s, default 512; --busy-threads, default 1):
                    zero-copy path vs read path vs dd oflag=direct; CPU, page cache,
                    AnonPages growth (see src/writepath.rs)
";

/// Command-line options.
#[derive(Debug)]
pub struct Args {
    /// Heap sizes (GiB) of the size scenarios.
    pub sizes: Vec<f64>,
    /// Also run the size scenarios with transparent huge pages.
    pub thp: bool,
    /// Run the sparse-memory scenario.
    pub sparse: bool,
    /// Run the many-threads scenario with this many extra threads.
    pub threads: Option<usize>,
    /// Runs per measurement.
    pub runs: usize,
    /// Parent of the working directory.
    pub dir: Option<PathBuf>,
    /// Run gcore.
    pub gcore: bool,
    /// The coreflect binary.
    pub coreflect: Option<PathBuf>,
    /// Run the write-path benchmark instead.
    pub write_path: bool,
    /// Its target's heap rewrite rate (MiB/s).
    pub rewrite_mib_s: usize,
    /// Its target's spinning threads.
    pub busy_threads: usize,
}

impl Args {
    /// Parses the arguments (without the program name).
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let mut a = Args {
            sizes: vec![1.0, 4.0],
            thp: true,
            sparse: false,
            threads: None,
            runs: 3,
            dir: None,
            gcore: true,
            coreflect: None,
            write_path: false,
            rewrite_mib_s: 512,
            busy_threads: 1,
        };
        let mut quick = false;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match name {
                "--sizes" => {
                    let v = value()?;
                    a.sizes = v
                        .split(',')
                        .map(|s| match s.trim().parse::<f64>() {
                            Ok(g) if g > 0.0 && g <= 1024.0 => Ok(g),
                            _ => Err(format!("--sizes: '{s}' is not a size in GiB")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--no-thp" => a.thp = false,
                "--sparse" => a.sparse = true,
                "--threads" => {
                    let v = value()?;
                    a.threads = Some(
                        v.parse()
                            .map_err(|_| format!("--threads: '{v}' is not a number"))?,
                    );
                }
                "--quick" => quick = true,
                "--runs" => {
                    let v = value()?;
                    a.runs = match v.parse() {
                        Ok(n) if n >= 1 => n,
                        _ => return Err(format!("--runs: '{v}' is not a number ≥ 1")),
                    };
                }
                "--dir" => a.dir = Some(PathBuf::from(value()?)),
                "--no-gcore" => a.gcore = false,
                "--coreflect" => a.coreflect = Some(PathBuf::from(value()?)),
                "--write-path" => a.write_path = true,
                "--rewrite-mib-s" => {
                    let v = value()?;
                    a.rewrite_mib_s = v
                        .parse()
                        .map_err(|_| format!("--rewrite-mib-s: '{v}' is not a number"))?;
                }
                "--busy-threads" => {
                    let v = value()?;
                    a.busy_threads = v
                        .parse()
                        .map_err(|_| format!("--busy-threads: '{v}' is not a number"))?;
                }
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        if quick {
            a.sizes = vec![0.25];
            a.runs = 1;
            a.gcore = false;
        }
        Ok(a)
    }
}

/// A way of pausing or dumping the target, or a baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Nothing for 1 s: the heartbeat's noise floor (scheduling on a busy machine).
    Idle,
    /// A bare `fork()` inside the target (the child exits at once).
    Fork,
    /// `coreflect dump --mode reflect`.
    Reflect,
    /// `coreflect dump --mode suspend`.
    Suspend,
    /// gdb's `gcore`.
    Gcore,
    /// `dd` writing as many bytes as reflect did to the same filesystem.
    Dd,
}

impl Method {
    /// Its name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Method::Idle => "idle 1 s (noise floor)",
            Method::Fork => "bare fork()",
            Method::Reflect => "coreflect reflect",
            Method::Suspend => "coreflect suspend",
            Method::Gcore => "gcore",
            Method::Dd => "dd (same fs)",
        }
    }
}

/// What a scenario is about (for the ratios).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A heap of this many GiB, with 4 KiB or huge pages.
    Size {
        /// Heap size (GiB).
        gib: f64,
        /// Transparent huge pages.
        thp: bool,
    },
    /// The sparse comparison's dense target (A).
    SparseDense,
    /// The sparse comparison's sparse target (B).
    SparseSparse,
    /// A target with this many extra threads.
    Threads(usize),
}

/// One target configuration and the methods measured on it.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name in the table.
    pub label: String,
    /// What it is about.
    pub kind: Kind,
    /// Arguments of `coreflect __target` (besides `--heartbeat`).
    pub target_args: Vec<String>,
    /// Memory the target touches (GiB), for the timeouts.
    pub touched_gib: f64,
    /// Extra threads, for the timeouts.
    pub threads: usize,
    /// The methods, in the order they run in each run.
    pub methods: Vec<Method>,
}

/// The runs of one method in one scenario.
#[derive(Debug)]
pub struct Row {
    /// The method.
    pub method: Method,
    /// One entry per run: what it measured, or why it failed.
    pub runs: Vec<Result<Sample, String>>,
}

impl Row {
    /// The spread of the field `f` over the successful runs.
    pub fn spread(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<stats::Spread> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter_map(f)
            .collect();
        stats::Spread::of(&v)
    }

    /// The median of the field `f` over the successful runs.
    pub fn median(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        self.spread(f).map(|s| s.median)
    }

    /// The reasons of the failed runs.
    pub fn failures(&self) -> Vec<&str> {
        self.runs
            .iter()
            .filter_map(|r| r.as_ref().err().map(String::as_str))
            .collect()
    }
}

/// A scenario and what was measured in it.
#[derive(Debug)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// One row per method.
    pub rows: Vec<Row>,
    /// Observations for the notes section.
    pub notes: Vec<String>,
}

impl Outcome {
    /// The row of `m`, if the scenario measured it.
    pub fn row(&self, m: Method) -> Option<&Row> {
        self.rows.iter().find(|r| r.method == m)
    }
}

/// What the measurements need besides the scenario.
pub struct Ctx {
    /// The coreflect binary.
    pub coreflect: PathBuf,
    /// The working directory (ours; emptied after each measurement).
    pub dir: PathBuf,
    /// The gcore script, if it is to run.
    pub gcore: Option<PathBuf>,
    /// Runs per measurement.
    pub runs: usize,
}

/// The working directory: created fresh, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    /// Creates a fresh private directory under `parent`.
    fn create(parent: &Path) -> Result<WorkDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = parent.join(format!("coreflect-bench.{}.{nanos:09}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        Ok(WorkDir(p))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            let left: Vec<String> = rd
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !left.is_empty() {
                eprintln!(
                    "coreflect-bench: removing leftover files in {}: {}",
                    self.0.display(),
                    left.join(", ")
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!(
                "coreflect-bench: warning: cannot remove {}: {e}",
                self.0.display()
            );
        }
    }
}

/// The coreflect binary: `--coreflect`, else `coreflect` next to this executable.
fn find_coreflect(arg: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = arg {
        return if exec::is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(format!(
                "--coreflect {}: not an executable file",
                p.display()
            ))
        };
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find my own path: {e}"))?;
    let p = me.with_file_name("coreflect");
    if exec::is_executable(&p) {
        Ok(p)
    } else {
        Err(format!(
            "no coreflect binary at {}: run `cargo build --release -p coreflect-cli -p \
             coreflect-bench` first, or pass --coreflect PATH",
            p.display()
        ))
    }
}

/// `g` GiB as a label: `1 GiB`, `0.25 GiB`.
fn gib_label(g: f64) -> String {
    format!("{g} GiB")
}

/// The scenarios the arguments ask for, in order.
fn scenarios(a: &Args) -> Vec<Scenario> {
    use Method::*;
    let mut v = Vec::new();
    let mut size_methods = vec![Idle, Fork, Reflect, Suspend];
    if a.gcore {
        size_methods.push(Gcore);
    }
    size_methods.push(Dd);
    for &g in &a.sizes {
        let mib = ((g * 1024.0).round() as usize).max(1);
        for thp in [false, true] {
            if thp && !a.thp {
                continue;
            }
            let mut args = vec!["--heap-mib".to_string(), mib.to_string()];
            if thp {
                args.push("--thp".into());
            }
            v.push(Scenario {
                label: format!("{} {}", gib_label(g), if thp { "THP" } else { "4K" }),
                kind: Kind::Size { gib: g, thp },
                target_args: args,
                touched_gib: mib as f64 / 1024.0,
                threads: 0,
                methods: size_methods.clone(),
            });
        }
    }
    if a.sparse {
        v.push(Scenario {
            label: "sparse A: 256 MiB dense".into(),
            kind: Kind::SparseDense,
            target_args: ["--heap-mib", "256"].map(String::from).to_vec(),
            touched_gib: 0.25,
            threads: 0,
            methods: vec![Reflect],
        });
        v.push(Scenario {
            label: "sparse B: 16 GiB reserved, first 256 MiB touched".into(),
            kind: Kind::SparseSparse,
            target_args: [
                "--heap-mib",
                "1",
                "--sparse-reserve-mib",
                "16384",
                "--sparse-touch-mib",
                "256",
            ]
            .map(String::from)
            .to_vec(),
            touched_gib: 0.25,
            threads: 0,
            methods: vec![Reflect],
        });
    }
    if let Some(n) = a.threads {
        v.push(Scenario {
            label: format!("{n} extra threads, 16 MiB"),
            kind: Kind::Threads(n),
            target_args: vec![
                "--extra-threads".into(),
                n.to_string(),
                "--heap-mib".into(),
                "16".into(),
            ],
            touched_gib: 16.0 / 1024.0,
            threads: n,
            methods: vec![Idle, Fork, Reflect],
        });
    }
    v
}

/// The parts of `coreflect dump --json`'s output the benchmark reads: the report of a
/// dump, or `{"error": ...}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct DumpJson {
    error: Option<String>,
    mode: String,
    pause_us: f64,
    pause: PauseJson,
    bytes_written: f64,
    file_size: f64,
    warnings: Vec<String>,
}

/// The pause by phase (µs), and when it began (CLOCK_MONOTONIC ns).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct PauseJson {
    stop_us: f64,
    capture_us: f64,
    clone_us: f64,
    release_us: f64,
    estimate_us: f64,
    started_ns: u64,
}

impl DumpJson {
    /// Parses the last line of `stdout` that holds a JSON object.
    fn parse(stdout: &str) -> Result<DumpJson, String> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| format!("no JSON object in coreflect's output {stdout:?}"))?;
        serde_json::from_str(line).map_err(|e| format!("coreflect's JSON {line:?}: {e}"))
    }
}

/// Disk space of a file (`st_blocks` × 512) and its apparent size.
fn usage(p: &Path) -> Result<(u64, u64), String> {
    let m = std::fs::metadata(p).map_err(|e| format!("cannot stat {}: {e}", p.display()))?;
    Ok((m.blocks() * 512, m.len()))
}

/// The longest stop the target saw since the last `gapreset` (µs).
fn gap(t: &mut Target) -> Result<f64, String> {
    Ok(t.request_num("gap", "GAP", "us")? as f64)
}

/// The longest stop the target saw that overlaps `[from_ns, to_ns]` (CLOCK_MONOTONIC),
/// from its list of stops (µs); `None` if it saw none there.
fn gap_within(t: &mut Target, from_ns: u64, to_ns: u64) -> Result<Option<f64>, String> {
    let line = t.request("gaps", "GAPS", Duration::from_secs(10))?;
    let mut best: Option<f64> = None;
    for pair in line
        .trim_start_matches("GAPS")
        .trim()
        .split(',')
        .filter(|p| !p.is_empty())
    {
        let Some((a, b)) = pair.split_once(':') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
            continue;
        };
        if a <= to_ns && b >= from_ns {
            let us = (b - a) as f64 / 1000.0;
            best = Some(best.map_or(us, |x: f64| x.max(us)));
        }
    }
    Ok(best)
}

/// Resets the target's longest-stop record.
fn gapreset(t: &mut Target) -> Result<(), String> {
    t.request("gapreset", "GAPRESET", Duration::from_secs(10))
        .map(drop)
}

/// Timeout of a tool on a scenario's target: generous, scaled to the memory.
fn tool_timeout(sc: &Scenario, base_s: f64, per_gib_s: f64) -> Duration {
    Duration::from_secs_f64(base_s + per_gib_s * sc.touched_gib + 0.02 * sc.threads as f64)
}

/// One coreflect dump in `mode` (`reflect` or `suspend`).
fn dump(ctx: &Ctx, t: &mut Target, sc: &Scenario, mode: &str) -> Result<Sample, String> {
    let path = ctx.dir.join("c.core");
    let _rm = RemoveOnDrop(path.clone());
    gapreset(t)?;
    let mut cmd = Command::new(&ctx.coreflect);
    cmd.arg("dump")
        .arg(t.pid.to_string())
        .arg("-o")
        .arg(&path)
        .args(["--json", "--overwrite", "-q", "--mode", mode]);
    let m = run_measured(&mut cmd, tool_timeout(sc, 60.0, 30.0))?;
    let whole_run = gap(t)?;
    let json = DumpJson::parse(&m.stdout);
    if !m.success() {
        return Err(match json.ok().and_then(|j| j.error) {
            Some(e) => format!("coreflect {}: {e}", m.status()),
            None => format!("coreflect {}", m.failure()),
        });
    }
    let json = json?;
    if json.mode != mode {
        return Err(format!(
            "coreflect used mode '{}' where '{mode}' was asked (output {json:?})",
            json.mode
        ));
    }
    // What the target saw of the pause itself: its longest stop overlapping the pause
    // coreflect reports (+1 ms of slack), not scheduling noise later in the write.
    let seen = match json.pause.started_ns {
        from if from > 0 => {
            let to = from + (json.pause_us * 1000.0) as u64 + 1_000_000;
            gap_within(t, from, to)?.unwrap_or(0.0)
        }
        _ => whole_run,
    };
    let (blocks, size) = usage(&path)?;
    Ok(Sample {
        seen_us: Some(seen),
        tool_us: Some(json.pause_us),
        wall_s: Some(m.wall.as_secs_f64()),
        written: Some(json.bytes_written),
        file_size: Some(json.file_size.max(size as f64)),
        blocks: Some(blocks as f64),
        rss_kib: Some(m.maxrss_kib as f64),
        cpu_s: Some(m.cpu.as_secs_f64()),
        breakdown: Some([
            json.pause.stop_us,
            json.pause.capture_us,
            json.pause.clone_us,
            json.pause.release_us,
            json.pause.estimate_us,
        ]),
        warnings: (!json.warnings.is_empty()).then(|| json.warnings.join("; ")),
    })
}

/// One `gcore -o DIR/g PID`.
fn gcore(ctx: &Ctx, gcore: &Path, t: &mut Target, sc: &Scenario) -> Result<Sample, String> {
    let prefix = ctx.dir.join("g");
    let path = ctx.dir.join(format!("g.{}", t.pid));
    let _rm = RemoveOnDrop(path.clone());
    gapreset(t)?;
    let mut cmd = Command::new(gcore);
    cmd.arg("-o").arg(&prefix).arg(t.pid.to_string());
    let m = run_measured(&mut cmd, tool_timeout(sc, 120.0, 120.0))?;
    let seen = gap(t)?;
    if !m.success() {
        return Err(format!("gcore {}", m.failure()));
    }
    let (blocks, size) = usage(&path)?;
    Ok(Sample {
        seen_us: Some(seen),
        wall_s: Some(m.wall.as_secs_f64()),
        written: Some(size as f64),
        file_size: Some(size as f64),
        blocks: Some(blocks as f64),
        rss_kib: Some(m.maxrss_kib as f64),
        cpu_s: Some(m.cpu.as_secs_f64()),
        ..Sample::default()
    })
}

/// One `dd` of at least `bytes` from /dev/zero into the working directory.
fn dd(ctx: &Ctx, sc: &Scenario, bytes: u64) -> Result<Sample, String> {
    const BS: u64 = 16 << 20;
    let count = bytes.div_ceil(BS).max(1);
    let path = ctx.dir.join("dd");
    let _rm = RemoveOnDrop(path.clone());
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg({
            let mut o = std::ffi::OsString::from("of=");
            o.push(&path);
            o
        })
        .args(["bs=16M", &format!("count={count}"), "status=none"]);
    let m = run_measured(&mut cmd, tool_timeout(sc, 60.0, 30.0))?;
    if !m.success() {
        return Err(format!("dd {}", m.failure()));
    }
    let (blocks, size) = usage(&path)?;
    Ok(Sample {
        wall_s: Some(m.wall.as_secs_f64()),
        written: Some((count * BS) as f64),
        file_size: Some(size as f64),
        blocks: Some(blocks as f64),
        rss_kib: Some(m.maxrss_kib as f64),
        cpu_s: Some(m.cpu.as_secs_f64()),
        ..Sample::default()
    })
}

/// Runs method `m` once on the target.
fn measure(
    ctx: &Ctx,
    t: &mut Target,
    sc: &Scenario,
    m: Method,
    reflect_bytes: Option<f64>,
) -> Result<Sample, String> {
    match m {
        Method::Idle => {
            gapreset(t)?;
            exec::sleep_interruptible(Duration::from_secs(1));
            Ok(Sample {
                seen_us: Some(gap(t)?),
                ..Sample::default()
            })
        }
        Method::Fork => {
            gapreset(t)?;
            let us = t.request_num("fork", "FORK", "us")? as f64;
            Ok(Sample {
                seen_us: Some(gap(t)?),
                tool_us: Some(us),
                ..Sample::default()
            })
        }
        Method::Reflect => dump(ctx, t, sc, "reflect"),
        Method::Suspend => dump(ctx, t, sc, "suspend"),
        Method::Gcore => match &ctx.gcore {
            Some(g) => gcore(ctx, g, t, sc),
            None => Err("gcore is not installed".into()),
        },
        Method::Dd => {
            // The target is not touched: what it sees is the noise under a write load.
            let bytes = reflect_bytes.unwrap_or(sc.touched_gib * (1u64 << 30) as f64);
            gapreset(t)?;
            let mut s = dd(ctx, sc, bytes as u64)?;
            s.seen_us = Some(gap(t)?);
            Ok(s)
        }
    }
}

/// A one-line summary of a sample, for the progress messages.
fn summary(s: &Sample) -> String {
    let mut parts = Vec::new();
    if let Some(v) = s.tool_us {
        parts.push(format!("tool {} ms", stats::ms(v)));
    }
    if let Some(v) = s.seen_us {
        parts.push(format!("target saw {} ms", stats::ms(v)));
    }
    if let Some(v) = s.wall_s {
        parts.push(format!("wall {} s", stats::secs(v)));
    }
    if let Some(v) = s.written {
        parts.push(format!("{} MiB", stats::mib(v)));
    }
    parts.join(", ")
}

/// How much of the target's memory is in transparent huge pages (bytes).
fn anon_huge(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let l = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

/// The target's counters that show a disturbance (from its STATS line), if any is set.
fn disturbances(stats: &str) -> Option<String> {
    const KEYS: [&str; 9] = [
        "sigchld",
        "read_eintr",
        "read_bad",
        "short_sleep",
        "sleep_err",
        "pause_returns",
        "waitpid_children",
        "waitpid_errors",
        "accept_err",
    ];
    let set: Vec<String> = KEYS
        .iter()
        .filter_map(|k| {
            exec::field(stats, k)
                .filter(|&v| v > 0)
                .map(|v| format!("{k}={v}"))
        })
        .collect();
    (!set.is_empty()).then(|| set.join(" "))
}

/// Runs one scenario: a fresh target, `ctx.runs` runs of each method, the target stopped.
fn run_scenario(ctx: &Ctx, sc: &Scenario, index: usize, total: usize) -> Outcome {
    let mut out = Outcome {
        scenario: sc.clone(),
        rows: sc
            .methods
            .iter()
            .map(|&method| Row {
                method,
                runs: Vec::new(),
            })
            .collect(),
        notes: Vec::new(),
    };
    let fail_all = |out: &mut Outcome, why: String| {
        for r in &mut out.rows {
            if r.runs.is_empty() {
                r.runs.push(Err(why.clone()));
            }
        }
    };
    let mut args = vec!["--heartbeat".to_string()];
    args.extend(sc.target_args.iter().cloned());
    eprintln!(
        "[{index}/{total}] {}: starting the target ({})",
        sc.label,
        args.join(" ")
    );
    let ready_timeout =
        Duration::from_secs_f64(10.0 + 3.0 * sc.touched_gib + 0.01 * sc.threads as f64);
    let mut t = match Target::start(&ctx.coreflect, &args, ready_timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("  failed: {e}");
            fail_all(&mut out, format!("target: {e}"));
            return out;
        }
    };
    if let Kind::Size { gib, thp } = sc.kind {
        if let Some(h) = anon_huge(t.pid) {
            out.notes.push(format!(
                "{}: the target had {} MiB of its {} MiB heap in transparent huge pages{}.",
                sc.label,
                h >> 20,
                ((gib * 1024.0).round() as u64).max(1),
                if thp { "" } else { " (4K scenario)" }
            ));
        }
    }
    // Warm-up, not counted: write as much as a dump will, once. On a VM, memory the guest
    // has never touched costs a host fault per page on first use (here ~2 s per GiB of
    // page cache); without this, whichever method runs first after the target filled its
    // heap pays for it, and the others do not.
    let warm = (sc.touched_gib * (1u64 << 30) as f64) as u64 + (64 << 20);
    if let Err(e) = dd(ctx, sc, warm) {
        eprintln!("  warm-up failed: {e}");
    }
    'runs: for run in 1..=ctx.runs {
        let mut reflect_bytes = None;
        for (i, &m) in sc.methods.iter().enumerate() {
            if interrupted() {
                break 'runs;
            }
            let r = measure(ctx, &mut t, sc, m, reflect_bytes);
            match &r {
                Ok(s) => {
                    if m == Method::Reflect {
                        reflect_bytes = s.written;
                    }
                    eprintln!("  run {run}/{}: {}: {}", ctx.runs, m.label(), summary(s));
                }
                Err(e) => eprintln!("  run {run}/{}: {}: failed: {e}", ctx.runs, m.label()),
            }
            out.rows[i].runs.push(r);
        }
    }
    t.stop();
    if let Some(d) = t.stats.as_deref().and_then(disturbances) {
        out.notes.push(format!(
            "{}: the target's own counters show a disturbance by one of the methods: {d}.",
            sc.label
        ));
    }
    if interrupted() {
        fail_all(&mut out, "interrupted".into());
    }
    out
}

/// Machine facts: CPUs, memory, kernel, CPU model, THP setting, filesystem of `dir`.
fn machine_facts(dir: &Path) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / (1u64 << 20) as f64))
        .unwrap_or_else(|| "?".into());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let thp = read("/sys/kernel/mm/transparent_hugepage/enabled");
    let thp = thp
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(['[', ']']).to_string())
        .unwrap_or_else(|| "?".into());
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let fs = read("/proc/self/mounts")
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_, mnt, ty) = (w.next()?, w.next()?, w.next()?);
            let mnt = mnt.replace("\\040", " ");
            canon.starts_with(&mnt).then(|| (mnt.len(), ty.to_string()))
        })
        .max()
        .map(|(_, ty)| ty)
        .unwrap_or_else(|| "?".into());
    format!(
        "Machine: nproc {nproc}, MemTotal {mem}, kernel {kernel}, CPU {cpu}; THP {thp}; \
         cores written to {fs} ({})",
        dir.display()
    )
}

/// Runs the benchmark; returns the exit code.
fn run() -> i32 {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("coreflect-bench: {e}\n\n{USAGE}");
            return 2;
        }
    };
    let coreflect = match find_coreflect(a.coreflect.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("coreflect-bench: {e}");
            return 2;
        }
    };
    let gcore = if a.gcore {
        let g = exec::which("gcore");
        if g.is_none() {
            eprintln!("coreflect-bench: gcore is not installed (gdb); skipping it");
        }
        g
    } else {
        None
    };
    exec::install_interrupt_handler();
    let parent = a.dir.clone().unwrap_or_else(|| PathBuf::from("/tmp"));
    let work = match WorkDir::create(&parent) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("coreflect-bench: {e}");
            return 2;
        }
    };
    if a.write_path {
        let facts = machine_facts(&work.0);
        eprintln!("coreflect-bench: {facts}");
        let table = writepath::run(
            &coreflect,
            &work.0,
            &a.sizes,
            a.thp,
            a.runs,
            a.rewrite_mib_s,
            a.busy_threads,
        );
        drop(work);
        print!("{facts}\n\n{table}");
        return if interrupted() { 130 } else { 0 };
    }
    let ctx = Ctx {
        coreflect,
        dir: work.0.clone(),
        gcore,
        runs: a.runs,
    };
    let mut list = scenarios(&a);
    if ctx.gcore.is_none() {
        for s in &mut list {
            s.methods.retain(|&m| m != Method::Gcore);
        }
    }
    let facts = machine_facts(&ctx.dir);
    eprintln!("coreflect-bench: {facts}");
    eprintln!(
        "coreflect-bench: using {}; {} scenario(s), {} run(s) each",
        ctx.coreflect.display(),
        list.len(),
        ctx.runs
    );
    let mut outcomes = Vec::new();
    for (i, sc) in list.iter().enumerate() {
        if interrupted() {
            break;
        }
        outcomes.push(run_scenario(&ctx, sc, i + 1, list.len()));
    }
    drop(work);
    print!("{}", report::render(&facts, &outcomes, ctx.runs));
    if interrupted() {
        eprintln!("coreflect-bench: interrupted");
        130
    } else if outcomes
        .iter()
        .any(|o| o.rows.iter().any(|r| !r.failures().is_empty()))
    {
        1
    } else {
        0
    }
}

/// Entry point: runs the benchmark, then exits with its code (after every guard has run).
fn main() {
    let code = run();
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json() {
        let out = "noise\n{\"pid\":1,\"path\":\"/x\",\"mode\":\"reflect\",\"pause_us\":3560,\"pause\":{\"stop_us\":180,\"started_ns\":7},\"bytes_written\":17000000,\"warnings\":[\"a \\\"b\\\"\",\"c\"]}\n";
        let j = DumpJson::parse(out).unwrap();
        assert_eq!(j.pause_us, 3560.0);
        assert_eq!(j.pause.stop_us, 180.0);
        assert_eq!(j.pause.started_ns, 7);
        assert_eq!(j.bytes_written, 17e6);
        assert_eq!(j.mode, "reflect");
        assert_eq!(j.warnings, ["a \"b\"", "c"]);
        let e = DumpJson::parse(r#"{"error":"no \"such\" pid"}"#).unwrap();
        assert_eq!(e.error.as_deref(), Some("no \"such\" pid"));
        assert!(DumpJson::parse("no json").is_err());
    }

    #[test]
    fn parses_args() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let a = Args::parse(&s(&["--sizes", "0.5,2", "--runs=5", "--no-thp"])).unwrap();
        assert_eq!(a.sizes, vec![0.5, 2.0]);
        assert_eq!(a.runs, 5);
        assert!(!a.thp);
        let q = Args::parse(&s(&["--quick", "--threads", "10"])).unwrap();
        assert_eq!(
            (q.sizes.clone(), q.runs, q.gcore, q.threads),
            (vec![0.25], 1, false, Some(10))
        );
        assert!(Args::parse(&s(&["--runs", "0"])).is_err());
        assert!(Args::parse(&s(&["--bogus"])).is_err());
        let sc = scenarios(&q);
        assert_eq!(sc.len(), 3);
        assert_eq!(sc[0].target_args, s(&["--heap-mib", "256"]));
        assert_eq!(sc[1].label, "0.25 GiB THP");
    }
}
