//! `coreflect`: dump a live process with a millisecond pause.
//!
//! A thin layer over the `coreflect` library: argument parsing, signal handling, progress
//! and reports. All the work is in the library.

mod demo;
mod report;
mod warden;

use clap::{Parser, Subcommand, ValueEnum};
use coreflect::write_path::WritePath;
use coreflect::{DumpOptions, Mode, Options, Phase};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "coreflect",
    version,
    about = "Full core dumps of live Linux processes with a millisecond pause",
    long_about = "coreflect stops a process only long enough to capture its threads and create a \
copy-on-write clone of it, lets it run again, and writes a complete ELF core (readable by gdb, \
lldb and elfutils) from the frozen clone."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump a running process to an ELF core file.
    Dump(DumpArgs),
    /// Start a sample multi-threaded process, dump it, and show how to open the core.
    Demo(demo::DemoArgs),
    /// Run the built-in test target (used by the demo, the tests and the benchmarks).
    #[command(name = "__target", hide = true)]
    Target {
        /// Target options (see coreflect-target).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Reflect when possible, else suspend with a warning.
    Auto,
    /// Reflect (copy-on-write clone), or fail.
    Reflect,
    /// Keep the target stopped for the whole write (like gcore).
    Suspend,
}

/// Arguments of `coreflect dump`.
#[derive(clap::Args)]
pub struct DumpArgs {
    /// The process to dump.
    #[arg(allow_negative_numbers = true)]
    pid: i64,
    /// Output path (default: <comm>_<yymmdd_HHMMSS>.<pid>.core in the current directory).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// How to take the snapshot.
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Print one JSON object with the report on stdout.
    #[arg(long)]
    json: bool,
    /// Replace an existing file at the output path (never through a symlink).
    #[arg(long)]
    overwrite: bool,
    /// Refuse, before stopping anything, if the estimated pause is longer (e.g. 50ms, 1s).
    #[arg(long, value_parser = parse_duration)]
    max_pause: Option<Duration>,
    /// Give up if the threads do not all stop within this time (e.g. 2s).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    stop_timeout: Duration,
    /// coredump_filter bits to use instead of the target's (hex, e.g. 0x33).
    #[arg(long, value_parser = parse_hex)]
    filter: Option<u32>,
    /// No progress display.
    #[arg(short, long)]
    quiet: bool,
    /// How memory reaches the core: auto (zero-copy splice where possible, else read),
    /// splice (or fail), read (/proc/CLONE/mem), pwrite (the clone writes; diagnostic).
    #[arg(long, value_enum, default_value = "auto")]
    write_path: WritePathArg,
    /// Former opt-in for the clone writing its memory: now the default; same as
    /// `--write-path splice`.
    #[arg(long, hide = true)]
    direct_write: bool,
    /// Run coreflect (and the clone's injected syscalls) at this nice value (-20..19).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: Option<i32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WritePathArg {
    /// Zero-copy splice where it works, else read.
    Auto,
    /// The clone vmsplices, coreflect splices into the core opened O_DIRECT; fail if impossible.
    Splice,
    /// Read /proc/CLONE/mem and write (two kernel copies per page).
    Read,
    /// The clone pwrites its own memory (one copy per page; diagnostic).
    Pwrite,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        (s, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 50ms, 1.5s)"))?;
    if !(0.0..1e6).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn parse_hex(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("'{s}' is not a hex number (e.g. 0x33)"))
}

/// Registers SIGINT/SIGTERM/SIGHUP to set the returned flag instead of killing us, so a
/// dump in progress can release the target and clean up.
pub fn cancel_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

/// The test hook: `COREFLECT_TEST_PAUSE_AT=<phase>` makes the tool announce the phase on
/// stderr and wait there until it is killed or cancelled (SIGINT/SIGTERM), so fault tests
/// can act at a known point.
pub fn test_hook(cancel: Arc<AtomicBool>) -> Option<coreflect::snapshot::PhaseHook> {
    let want = std::env::var("COREFLECT_TEST_PAUSE_AT").ok()?;
    Some(Arc::new(move |p: Phase| {
        if p.as_str() == want {
            eprintln!("coreflect: test pause at {}", p.as_str());
            while !cancel.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }))
}

/// The progress test hook: with `COREFLECT_TEST_STALL_AT=<percent>` and
/// `COREFLECT_TEST_RESUME=<path>`, the write stops once that share of the memory is
/// processed, says so on stderr, and goes on when the file at `<path>` exists (or on
/// cancel), so tests can look at (or kill) the clone mid-write.
fn test_stall(cancel: Arc<AtomicBool>) -> impl FnMut(u64, u64) {
    let at: Option<u64> = std::env::var("COREFLECT_TEST_STALL_AT")
        .ok()
        .and_then(|v| v.parse().ok());
    let resume = std::env::var_os("COREFLECT_TEST_RESUME").map(PathBuf::from);
    let mut fired = false;
    move |done, total| {
        let (Some(at), Some(resume)) = (at, resume.as_ref()) else {
            return;
        };
        if fired || total == 0 || done * 100 < at * total {
            return;
        }
        fired = true;
        eprintln!("coreflect: test stall at {at}%");
        while !resume.exists() && !cancel.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `coreflect dump`; returns the exit code.
pub fn run_dump(a: &DumpArgs) -> i32 {
    let pid = match i32::try_from(a.pid) {
        Ok(p) if p > 0 => p,
        _ => {
            report::error(a.json, &coreflect::Error::InvalidPid { pid: a.pid });
            return 1;
        }
    };
    if pid as u32 == std::process::id() {
        // The dump runs in a child process (the warden): check against this one too.
        report::error(a.json, &coreflect::Error::SelfDump { pid });
        return 1;
    }
    let output = match &a.output {
        Some(p) => p.clone(),
        None => {
            let comm = match coreflect::snapshot::preflight(pid) {
                Ok(p) => p.stat.comm,
                Err(e) => {
                    report::error(a.json, &e);
                    return 1;
                }
            };
            PathBuf::from(coreflect::output::default_name(&comm, pid))
        }
    };
    if let Some(n) = a.nice {
        // SAFETY: setpriority on this process only. Threads started later inherit it.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) } != 0 {
            eprintln!(
                "coreflect: error: setting nice {n}: {} (raising priority needs root)",
                std::io::Error::last_os_error()
            );
            return 1;
        }
    }
    warden::run_guarded(|cancel| dump_in_warden(a, pid, output, cancel))
}

fn dump_in_warden(a: &DumpArgs, pid: i32, output: PathBuf, cancel: Arc<AtomicBool>) -> i32 {
    let cancel_for_stall = cancel.clone();
    let opts = DumpOptions {
        snapshot: Options {
            mode: match a.mode {
                ModeArg::Auto => Mode::Auto,
                ModeArg::Reflect => Mode::Reflect,
                ModeArg::Suspend => Mode::Suspend,
            },
            stop_timeout: a.stop_timeout,
            max_pause: a.max_pause,
            cancel: Some(cancel.clone()),
            hook: test_hook(cancel.clone()),
            write_path: match (a.write_path, a.direct_write) {
                (WritePathArg::Auto, true) | (WritePathArg::Splice, _) => WritePath::Splice,
                (WritePathArg::Auto, false) => WritePath::Auto,
                (WritePathArg::Read, _) => WritePath::Read,
                (WritePathArg::Pwrite, _) => WritePath::Pwrite,
            },
        },
        output,
        overwrite: a.overwrite,
        filter: a.filter,
    };
    let mut progress = report::ProgressLine::new(!a.quiet && !a.json);
    let mut stall = test_stall(cancel_for_stall);
    match coreflect::dump(pid, &opts, &mut |d, t| {
        stall(d, t);
        progress.update(d, t)
    }) {
        Ok(r) => {
            progress.clear();
            report::success(a.json, &r);
            0
        }
        Err(e) => {
            progress.clear();
            report::error(a.json, &e);
            match e {
                coreflect::Error::Cancelled => 130,
                _ => 1,
            }
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match &cli.cmd {
        Cmd::Dump(a) => run_dump(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Target { args } => match coreflect_target::TargetOptions::parse(args) {
            Ok(o) => coreflect_target::run(o),
            Err(e) => {
                eprintln!("coreflect __target: {e}");
                2
            }
        },
    };
    std::process::exit(code);
}
