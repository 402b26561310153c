//! `coreflect watch` arguments and their parsers.

use crate::{parse_compress, parse_duration, parse_hex, LevelArg, ModeArg};
use std::path::PathBuf;
use std::time::Duration;

/// A memory threshold: bytes, or a percentage of the cgroup's `memory.max` (`--cgroup`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// Percent of the cgroup limit.
    Percent(f64),
}

/// Parses `500M`, `2G`, `1.5G`, `4096`, `512K`, `80%`.
pub fn parse_size(s: &str) -> Result<Size, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a percentage (e.g. 80%)"))?;
        return Ok(Size::Percent(v));
    }
    let t = t
        .trim_end_matches(['B', 'b'])
        .trim_end_matches('i')
        .to_string();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (&t[..], 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 500M, 2G)"))?;
    if !(0.0..1e18).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Size::Bytes((v * mul as f64) as u64))
}

/// Parses a signal name or number: `SEGV`, `SIGSEGV`, `sigsegv`, `11`.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        if (1..=64).contains(&n) && n != libc::SIGKILL && n != libc::SIGSTOP {
            return Ok(n);
        }
        return Err(format!("signal {n} cannot be intercepted"));
    }
    let up = t.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            if name == "KILL" || name == "STOP" {
                format!("SIG{name} cannot be intercepted (the kernel never shows it to a tracer)")
            } else {
                format!("'{s}' is not a signal name (e.g. SEGV, TERM, USR1) or number")
            }
        })
}

/// Signal names (without `SIG`) and numbers, x86_64.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// The name of a signal (`SIGSEGV`), or `SIG<n>`.
pub fn signal_name(sig: i32) -> String {
    SIGNALS
        .iter()
        .find(|(_, v)| *v == sig)
        .map(|(n, _)| format!("SIG{n}"))
        .unwrap_or_else(|| format!("SIG{sig}"))
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=86400.0 * 365.0).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v)
}

/// Arguments of `coreflect watch`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Triggers may be combined; a dump is taken when any fires. Without a trigger, \
--timer. Dumps are named <comm>_<trigger>_<yymmdd_HHMMSS>.<pid>.core in -o DIR."
)]
pub struct WatchArgs {
    /// The process: a pid, or a name (its comm or executable name) that must match
    /// exactly one process (see --wait). With --pgid, a process group id.
    pub target: String,
    /// Dump when CPU use over the last poll interval is at least PCT (100 = one core),
    /// sustained for -s seconds.
    #[arg(long, value_name = "PCT")]
    pub cpu: Option<f64>,
    /// Dump when CPU use is below PCT, sustained for -s seconds.
    #[arg(long, value_name = "PCT")]
    pub cpu_below: Option<f64>,
    /// Dump when the resident set size is at least SIZE (500M, 2G; with --cgroup also
    /// 80%), sustained for -s seconds.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<Size>,
    /// Dump when the resident set size is below SIZE, sustained for -s seconds.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem_below: Option<Size>,
    /// Dump when the process has at least N threads, sustained for -s seconds.
    #[arg(long, value_name = "N")]
    pub threads: Option<u64>,
    /// Dump when the process has at least N open file descriptors, sustained for -s
    /// seconds.
    #[arg(long, value_name = "N")]
    pub fds: Option<u64>,
    /// Dump every -s seconds (the first at once). The default without another trigger.
    #[arg(long)]
    pub timer: bool,
    /// Dump when the process is about to receive one of these signals (SEGV,ABRT,TERM,…),
    /// then deliver it unchanged. Fatal signals give a crash dump taken before death.
    #[arg(long, value_name = "SIG[,SIG…]", value_delimiter = ',', value_parser = parse_signal)]
    pub signal: Vec<i32>,
    /// Take this many dumps, then exit.
    #[arg(short = 'n', long = "count", value_name = "COUNT", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Sustain time of thresholds, interval of --timer, and minimum gap between two dumps
    /// of the same trigger.
    #[arg(short = 's', long = "seconds", value_name = "SECONDS", default_value = "10",
          value_parser = parse_seconds)]
    pub seconds: f64,
    /// The directory for the dumps (default: the current directory).
    #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Replace an existing file of the same name (never through a symlink) instead of
    /// adding a numeric suffix.
    #[arg(long)]
    pub overwrite: bool,
    /// One JSON object per event (dump, skip, error, exit) on stdout.
    #[arg(long)]
    pub json: bool,
    /// How to take each snapshot (with --signal every dump is taken in suspend mode, by
    /// the tracer).
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: ModeArg,
    /// How much memory each dump holds: mini, default or full (as for `dump`).
    #[arg(long, value_enum, default_value = "default")]
    pub level: LevelArg,
    /// Compress each core into one zstd frame: `zstd` or `zstd:LEVEL` (`.core.zst`; not
    /// for --signal dumps).
    #[arg(long, value_parser = parse_compress)]
    pub compress: Option<i32>,
    /// coredump_filter bits to use instead of the target's (hex); overrides --level.
    #[arg(long, value_parser = parse_hex)]
    pub filter: Option<u32>,
    /// Skip a dump (with a logged line) whose estimated pause is longer (e.g. 50ms). Not
    /// for --signal dumps, which hold the target stopped by design.
    #[arg(long, value_parser = parse_duration)]
    pub max_pause: Option<Duration>,
    /// How often to sample the process (e.g. 500ms, 2s).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub poll: Duration,
    /// Wait for a process of this NAME to appear.
    #[arg(long)]
    pub wait: bool,
    /// Watch every process of process group TARGET, each with its own triggers.
    #[arg(long)]
    pub pgid: bool,
    /// How many reflected dumps may be writing at once (1–5); a trigger that fires with
    /// that many writing is skipped, with a logged line. (Suspend-mode dumps of one target
    /// queue on its lock.)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub clones: u8,
    /// CPU relative to the target's cgroup CPU limit (cpu.max; v1: cpu.cfs_quota_us), and
    /// memory percentages of its memory limit (memory.max; v1: memory.limit_in_bytes).
    #[arg(long)]
    pub cgroup: bool,
    /// No status line.
    #[arg(short, long)]
    pub quiet: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M"), Ok(Size::Bytes(500 << 20)));
        assert_eq!(parse_size("2G"), Ok(Size::Bytes(2 << 30)));
        assert_eq!(parse_size("2GiB"), Ok(Size::Bytes(2 << 30)));
        assert_eq!(parse_size("1.5k"), Ok(Size::Bytes(1536)));
        assert_eq!(parse_size("4096"), Ok(Size::Bytes(4096)));
        assert_eq!(parse_size("80%"), Ok(Size::Percent(80.0)));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SEGV"), Ok(libc::SIGSEGV));
        assert_eq!(parse_signal("sigabrt"), Ok(libc::SIGABRT));
        assert_eq!(parse_signal("15"), Ok(libc::SIGTERM));
        assert!(parse_signal("KILL").is_err());
        assert!(parse_signal("9").is_err());
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
    }
}
