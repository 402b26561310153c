//! `coreflect`: dump a live process with a millisecond pause.
//!
//! A thin layer over the `coreflect` library: argument parsing, signal handling, progress
//! and reports. All the work is in the library.

mod crash_handler;
mod demo;
mod info;
mod man;
mod progress;
mod report;
mod warden;
mod watch;

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
lldb and elfutils) from the frozen clone.",
    after_help = man::AFTER_HELP
)]
pub struct Cli {
    /// More detail on stderr: phase timings and why each mapping is in the core (-vv: all).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump a running process to an ELF core file.
    #[command(after_help = man::DUMP_AFTER_HELP)]
    Dump(DumpArgs),
    /// Show what a core file (or a .zst of one) holds: process, threads, mappings, notes.
    Info(info::InfoArgs),
    /// Watch a process and dump it when a trigger fires (CPU, memory, threads, fds, a
    /// signal, a timer), like procdump.
    Watch(watch::args::WatchArgs),
    /// Start a sample multi-threaded process, dump it, and show how to open the core.
    Demo(demo::DemoArgs),
    /// Keep a core of every crash: coreflect as the kernel's core_pattern handler.
    CrashHandler {
        #[command(subcommand)]
        cmd: crash_handler::CrashCmd,
    },
    /// Print the manual page (roff): coreflect man | man -l -
    Man,
    /// Print shell completions: coreflect completions bash|zsh|fish
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run the built-in test target (used by the demo, the tests and the benchmarks).
    #[command(name = "__target", hide = true)]
    Target {
        /// Target options (see coreflect-target).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
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
    /// Output path (default: <comm>_<yymmdd_HHMMSS>.<pid>.core in the current directory);
    /// `-` writes the core to standard output (a pipe or socket, not a terminal).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// How much memory: mini (stacks, ELF headers, loader data: backtraces and libraries),
    /// default (what the kernel would dump), full (every readable mapping, like gcore -a).
    #[arg(long, value_enum, default_value = "default")]
    level: LevelArg,
    /// Compress the core into one zstd frame: `zstd` or `zstd:LEVEL` (1-19; default 3).
    /// `.zst` is appended to the default name.
    #[arg(long, value_parser = parse_compress)]
    compress: Option<i32>,
    /// Also write the JSON report to this file (with `-o -`, the report never goes to stdout).
    #[arg(long)]
    json_file: Option<PathBuf>,
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
    /// coredump_filter bits to use instead of the target's (hex, e.g. 0x33); overrides --level.
    #[arg(long, value_parser = parse_hex)]
    filter: Option<u32>,
    /// Print nothing but errors (no progress bar, no summary, no warnings).
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

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LevelArg {
    /// Stacks from SP, ELF headers, the loader's data, the vDSO.
    Mini,
    /// The kernel's rules with the target's coredump_filter.
    Default,
    /// Every readable mapping, file-backed ones included.
    Full,
}

impl From<LevelArg> for coreflect::Level {
    fn from(l: LevelArg) -> Self {
        match l {
            LevelArg::Mini => coreflect::Level::Mini,
            LevelArg::Default => coreflect::Level::Default,
            LevelArg::Full => coreflect::Level::Full,
        }
    }
}

pub(crate) fn parse_compress(s: &str) -> Result<i32, String> {
    let bad = || format!("'{s}' is not a compression (zstd or zstd:LEVEL with LEVEL 1-19)");
    match s.split_once(':') {
        None if s == "zstd" => Ok(3),
        Some(("zstd", l)) => match l.parse::<i32>() {
            Ok(l) if (1..=19).contains(&l) => Ok(l),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
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

/// The bits `/proc/PID/coredump_filter` knows (MMF_DUMP_FILTER_BITS = 9).
const FILTER_MASK: u64 = 0x1ff;

fn parse_hex(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("'{s}' is not a hex number (e.g. 0x33)"));
    }
    let v = u64::from_str_radix(digits.trim_start_matches('0'), 16)
        .or_else(|_| {
            if digits.trim_start_matches('0').is_empty() {
                Ok(0)
            } else {
                Err(())
            }
        })
        .map_err(|_| {
            format!("{s} is out of range: coredump_filter has 9 bits (0x0 to {FILTER_MASK:#x})")
        })?;
    if v & !FILTER_MASK != 0 {
        return Err(format!(
            "{s} is out of range: coredump_filter has 9 bits (0x0 to {FILTER_MASK:#x}); the kernel knows no bit {:#x}",
            v & !FILTER_MASK
        ));
    }
    Ok(v as u32)
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
    let to_stdout = a.output.as_deref() == Some(std::path::Path::new("-"));
    if to_stdout && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        eprintln!(
            "coreflect: error: refusing to write a core to a terminal: redirect standard output to a file or pipe (e.g. `-o - | zstd > core.zst`), or give a path with -o"
        );
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
            let mut name = coreflect::output::default_name(&comm, pid);
            if a.compress.is_some() {
                name.push_str(".zst");
            }
            PathBuf::from(name)
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
    warden::run_guarded(|cancel| dump_in_warden(a, pid, output, to_stdout, cancel))
}

fn dump_in_warden(
    a: &DumpArgs,
    pid: i32,
    output: PathBuf,
    to_stdout: bool,
    cancel: Arc<AtomicBool>,
) -> i32 {
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
        level: a.level.into(),
        compress: a.compress,
        stdout: to_stdout,
    };
    // With the core on stdout, the report goes to stderr.
    let json_stdout = a.json && !to_stdout;
    let mut progress = progress::Bar::new(!a.quiet && !a.json);
    let mut stall = test_stall(cancel_for_stall);
    match coreflect::dump(pid, &opts, &mut |d, t| {
        stall(d, t);
        progress.update(d, t)
    }) {
        Ok(r) => {
            progress.clear();
            if let Some(p) = &a.json_file {
                if let Err(e) = std::fs::write(p, report::report_json(&r) + "\n") {
                    eprintln!(
                        "coreflect: error: writing the JSON report to {}: {e} (the core itself is complete)",
                        p.display()
                    );
                    return 1;
                }
            }
            if a.json && to_stdout {
                eprintln!("{}", report::report_json(&r));
            } else if !a.quiet || a.json {
                report::success(json_stdout, &r);
            }
            0
        }
        Err(e) => {
            progress.clear();
            report::error(json_stdout, &e);
            match e {
                coreflect::Error::Cancelled => 130,
                _ => 1,
            }
        }
    }
}

fn main() {
    let cli = Cli::parse_from(crash_handler::guard_handle_args(
        std::env::args_os().collect(),
    ));
    progress::init_log(cli.verbose);
    let code = match &cli.cmd {
        Cmd::Dump(a) => run_dump(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Watch(a) => watch::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::CrashHandler { cmd } => crash_handler::run(cmd),
        Cmd::Man => man::run_man(),
        Cmd::Completions { shell } => man::run_completions(*shell),
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
