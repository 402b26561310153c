//! `coreflect crash-handler`: coreflect as the kernel's post-mortem core handler (the
//! Linux side of `procdump -i`).
//!
//! `install` points `/proc/sys/kernel/core_pattern` at `|<coreflect> crash-handler handle …`
//! after saving the previous pattern byte for byte; `uninstall` writes it back; `status`
//! shows both. When a process crashes, the kernel runs `handle` (as root, without a
//! terminal, cwd `/`) with the core on stdin: it is written sparse (zero pages become holes)
//! into the dump directory, named like coreflect's other dumps, 0600, after old dumps are
//! rotated out by count and total size; it gives up — leaving nothing — rather than go
//! below the free-space floor, past the size budget, or past a time limit (the crashing
//! process cannot exit until its core is read). One line per crash goes to the kernel log
//! (`/dev/kmsg`: `dmesg`, `journalctl -k`) and to stderr.

use clap::{Args, Subcommand};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where `install` keeps its state by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/coreflect";
/// Where the dumps go by default.
pub const DEFAULT_DIR: &str = "/var/lib/coreflect/crashes";
const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";
/// The kernel's limit for `core_pattern` (`CORENAME_MAX_SIZE`, with its NUL).
const PATTERN_MAX: usize = 127;
/// The words after the binary that mark a pattern as ours.
const SIGNATURE: &str = " crash-handler handle";
/// The handler's configuration, in the state directory.
const CONF: &str = "crash-handler.conf";
/// The previous `core_pattern`, exactly as read, in the state directory.
const SAVED: &str = "core_pattern.saved";

/// The `crash-handler` subcommands.
#[derive(Subcommand)]
pub enum CrashCmd {
    /// Register coreflect as the kernel's core handler (core_pattern), saving the previous one.
    Install(InstallArgs),
    /// Restore the core_pattern that was there before `install`, exactly.
    Uninstall(UninstallArgs),
    /// Show the current core_pattern, whether it is coreflect's, and the saved dumps.
    Status(StateArg),
    /// Write one core from stdin (what the kernel runs when a process crashes).
    Handle(HandleArgs),
}

/// The state directory option.
#[derive(Args)]
pub struct StateArg {
    /// Where the saved core_pattern and the handler's configuration are kept.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Arguments of `crash-handler install`.
#[derive(Args)]
pub struct InstallArgs {
    /// Directory for the dumps (created 0700).
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Keep at most this many dumps (the oldest are deleted first).
    #[arg(long, default_value_t = 10)]
    max_files: u32,
    /// Keep the dumps' disk usage under this (e.g. 500M, 20G); a core that alone would
    /// exceed it is not kept.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    max_size: u64,
    /// Never let the filesystem's free space go below this (e.g. 2G, or 10%).
    #[arg(long, default_value = "1G", value_parser = parse_floor)]
    min_free: Floor,
    /// Give up on a core (and delete it) after this many seconds, so the crashing
    /// process's exit is never held up longer.
    #[arg(long, default_value_t = 120)]
    max_time: u64,
    /// Compress the dumps (`zstd`: `.core.zst`, read with `zstd -d` or `unzstd`; no holes
    /// then, zero pages compress to almost nothing).
    #[arg(long, value_enum, default_value = "none")]
    compress: Compress,
    #[command(flatten)]
    state: StateArg,
}

/// Compression choices.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum Compress {
    /// Sparse, uncompressed cores.
    None,
    /// zstd (level 3, multi-threaded).
    Zstd,
}

/// Arguments of `crash-handler uninstall`.
#[derive(Args)]
pub struct UninstallArgs {
    /// Restore the saved pattern even if core_pattern was changed by someone else since.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    state: StateArg,
}

/// Makes the kernel's command line for `crash-handler handle` safe to parse: the options
/// the installed pattern may carry (`-c DIR`) come first, then `--` is put before the
/// positionals if it is missing (patterns installed before it was added), so a command
/// name (%e, which any process sets with `prctl(PR_SET_NAME)`) such as `--state-dir=/x` or
/// `--help` is never taken for an option. Other command lines are returned unchanged.
pub fn guard_handle_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if args.get(1).is_none_or(|a| a != "crash-handler") || args.get(2).is_none_or(|a| a != "handle")
    {
        return args;
    }
    let mut i = 3;
    while args.get(i).is_some_and(|a| a == "-c" || a == "--state-dir") {
        i += 2;
    }
    // The kernel's %P is a number: only then is this the kernel's command line (so
    // `crash-handler handle --help` typed by hand still shows the help).
    let pid_next = args
        .get(i)
        .and_then(|a| a.to_str())
        .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()));
    if pid_next {
        args.insert(i, "--".into());
    }
    args
}

/// Arguments of `crash-handler handle` (the kernel passes %P %s %t %e).
#[derive(Args)]
pub struct HandleArgs {
    /// The state directory holding the configuration.
    #[arg(short = 'c', long = "state-dir", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The crashing process's pid (in the initial pid namespace, %P).
    pid: i64,
    /// The signal that killed it (%s).
    signal: i32,
    /// The time of the crash in seconds since the epoch (%t).
    time: i64,
    /// Its command name (%e; may contain spaces, or start with '-': any process may name
    /// itself with prctl(PR_SET_NAME)).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    comm: Vec<String>,
}

/// A free-space floor: bytes, or a percentage of the filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// Bytes.
    Bytes(u64),
    /// Percent of the filesystem's size.
    Percent(u8),
}

/// Parses `512`, `64K`, `500M`, `20G`, `1T` (powers of 1024; a trailing `B`/`iB` is fine).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 500M, 20G)"))?;
    if !(0.0..1e19).contains(&(v * mul as f64)) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok((v * mul as f64) as u64)
}

fn parse_floor(s: &str) -> Result<Floor, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => match p.trim().parse::<u8>() {
            Ok(p) if p < 100 => Ok(Floor::Percent(p)),
            _ => Err(format!("'{s}' is not a percentage below 100")),
        },
        None => parse_size(s).map(Floor::Bytes),
    }
}

fn floor_text(f: Floor) -> String {
    match f {
        Floor::Bytes(b) => b.to_string(),
        Floor::Percent(p) => format!("{p}%"),
    }
}

/// The handler's configuration (the state directory's `crash-handler.conf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Dump directory.
    pub dir: PathBuf,
    /// Most dumps kept.
    pub max_files: u32,
    /// Most disk bytes the dumps may use.
    pub max_size: u64,
    /// Free-space floor.
    pub min_free: Floor,
    /// Seconds before a core is given up.
    pub max_time: u64,
    /// Compression.
    pub compress: Compress,
}

impl Config {
    fn render(&self) -> String {
        format!(
            "# written by coreflect crash-handler install; read by crash-handler handle\ndir={}\nmax_files={}\nmax_size={}\nmin_free={}\nmax_time={}\ncompress={}\n",
            self.dir.display(),
            self.max_files,
            self.max_size,
            floor_text(self.min_free),
            self.max_time,
            match self.compress {
                Compress::None => "none",
                Compress::Zstd => "zstd",
            }
        )
    }

    fn parse(text: &str) -> Result<Config, String> {
        let mut c = Config {
            dir: PathBuf::from(DEFAULT_DIR),
            max_files: 10,
            max_size: 10 << 30,
            min_free: Floor::Bytes(1 << 30),
            max_time: 120,
            compress: Compress::None,
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            let bad = |_| format!("bad value in {line:?}");
            match k {
                "dir" => c.dir = PathBuf::from(v),
                "max_files" => c.max_files = v.parse().map_err(bad)?,
                "max_size" => c.max_size = v.parse().map_err(bad)?,
                "min_free" => c.min_free = parse_floor(v)?,
                "max_time" => c.max_time = v.parse().map_err(bad)?,
                "compress" => {
                    c.compress = match v {
                        "none" => Compress::None,
                        "zstd" => Compress::Zstd,
                        _ => return Err(format!("unknown compression in {line:?}")),
                    }
                }
                _ => {} // newer keys: ignored
            }
        }
        Ok(c)
    }

    fn load(state_dir: &Path) -> Result<Config, String> {
        let p = state_dir.join(CONF);
        let text =
            std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", p.display()))
    }
}

/// Runs a `crash-handler` subcommand; returns the exit code.
pub fn run(cmd: &CrashCmd) -> i32 {
    let r = match cmd {
        CrashCmd::Install(a) => install(a),
        CrashCmd::Uninstall(a) => uninstall(a),
        CrashCmd::Status(a) => status(&a.state_dir),
        CrashCmd::Handle(a) => return handle(a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("coreflect: error: {e}");
            1
        }
    }
}

fn read_pattern() -> Result<Vec<u8>, String> {
    std::fs::read(CORE_PATTERN).map_err(|e| format!("cannot read {CORE_PATTERN}: {e}"))
}

fn write_pattern(p: &[u8]) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(CORE_PATTERN)
        .and_then(|mut f| f.write_all(p))
        .map_err(|e| {
            format!(
                "cannot write {CORE_PATTERN}: {e}{}",
                if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) {
                    ": it takes root (sudo)"
                } else if e.raw_os_error() == Some(libc::EROFS) {
                    ": /proc/sys is read-only here (a container?): install on the host"
                } else {
                    ""
                }
            )
        })
}

/// The pattern as one line of text, for messages.
fn show(p: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(p.strip_suffix(b"\n").unwrap_or(p))
    )
}

/// True if `pattern` runs a coreflect crash handler.
pub fn is_ours(pattern: &[u8]) -> bool {
    let s = String::from_utf8_lossy(pattern);
    s.trim_start().starts_with('|') && s.contains(SIGNATURE)
}

/// Writes `data` to `path` atomically (a temporary file, renamed), mode 0600.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

fn make_dir(d: &Path) -> Result<(), String> {
    std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    let m = std::fs::symlink_metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
    if !m.is_dir() {
        return Err(format!("{} is not a directory", d.display()));
    }
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot make {} private (0700): {e}", d.display()))
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// True if we run as root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn install(a: &InstallArgs) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "installing the crash handler writes {CORE_PATTERN}, which takes root: run sudo coreflect crash-handler install …"
        ));
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find coreflect's own path: {e}"))?;
    let exe_s = exe.display().to_string();
    if exe_s.contains(char::is_whitespace) || exe_s.ends_with(" (deleted)") {
        return Err(format!(
            "coreflect's path {exe_s:?} contains a space or was deleted: the kernel splits core_pattern at spaces; install coreflect at a plain path (e.g. /usr/bin/coreflect)"
        ));
    }
    let state = absolute(&a.state.state_dir)?;
    let dir = absolute(&a.dir)?;
    let mut pattern = format!("|{exe_s}{SIGNATURE}");
    if state != Path::new(DEFAULT_STATE_DIR) {
        pattern.push_str(&format!(" -c {}", state.display()));
    }
    // `--` ends the options: the command name (%e) is chosen by the crashing process and
    // may look like one (`--state-dir=/x`, `--help`).
    pattern.push_str(" -- %P %s %t %e");
    if pattern.len() > PATTERN_MAX {
        return Err(format!(
            "the core_pattern would be {} bytes, over the kernel's limit of {PATTERN_MAX}: {pattern:?}; install coreflect at a shorter path (e.g. /usr/bin/coreflect){}",
            pattern.len(),
            if state != Path::new(DEFAULT_STATE_DIR) {
                " or use a shorter --state-dir"
            } else {
                ""
            }
        ));
    }
    let current = read_pattern()?;
    make_dir(&state)?;
    make_dir(&dir)?;
    let saved_path = state.join(SAVED);
    if is_ours(&current) {
        if !saved_path.exists() {
            return Err(format!(
                "core_pattern already runs a coreflect handler ({}) but {} is missing, so the pattern before it is unknown: write the pattern you want into {CORE_PATTERN} first",
                show(&current),
                saved_path.display()
            ));
        }
        // A re-install: the originally saved pattern stays.
    } else {
        write_atomic(&saved_path, &current)?;
    }
    let conf = Config {
        dir: dir.clone(),
        max_files: a.max_files.max(1),
        max_size: a.max_size,
        min_free: a.min_free,
        max_time: a.max_time.max(1),
        compress: a.compress,
    };
    write_atomic(&state.join(CONF), conf.render().as_bytes())?;
    write_pattern(pattern.as_bytes())?;
    let now = read_pattern()?;
    if now.strip_suffix(b"\n").unwrap_or(&now) != pattern.as_bytes() {
        return Err(format!(
            "wrote core_pattern but it reads back as {}: another tool may manage it (systemd-coredump's sysctl.d file, a container runtime)",
            show(&now)
        ));
    }
    let previous = std::fs::read(&saved_path).unwrap_or_default();
    println!("coreflect: crash handler installed: core_pattern is {pattern:?}");
    println!(
        "  previous pattern {} saved in {} (coreflect crash-handler uninstall restores it)",
        show(&previous),
        saved_path.display()
    );
    println!(
        "  dumps go to {} (0600{}): at most {} files and {} on disk, never below {} free, at most {} s per core",
        dir.display(),
        if conf.compress == Compress::Zstd {
            ", zstd"
        } else {
            ""
        },
        conf.max_files,
        crate::report::bytes(conf.max_size),
        match conf.min_free {
            Floor::Bytes(b) => crate::report::bytes(b),
            Floor::Percent(p) => format!("{p}%"),
        },
        conf.max_time
    );
    println!(
        "  a pipe handler gets every crash's core whatever the process's RLIMIT_CORE (ulimit -c), except the value 1 (the kernel's recursion guard)"
    );
    if String::from_utf8_lossy(&previous).contains("systemd-coredump") {
        println!("  note: systemd-coredump receives no cores until uninstall");
    }
    Ok(())
}

fn uninstall(a: &UninstallArgs) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "restoring {CORE_PATTERN} takes root: run sudo coreflect crash-handler uninstall"
        ));
    }
    let state = absolute(&a.state.state_dir)?;
    let saved_path = state.join(SAVED);
    let saved = std::fs::read(&saved_path).map_err(|e| {
        format!(
            "no saved core_pattern at {} ({e}): the crash handler is not installed with this --state-dir",
            saved_path.display()
        )
    })?;
    let current = read_pattern()?;
    if !is_ours(&current) && !a.force {
        return Err(format!(
            "core_pattern was changed since install (it is {}), so it is left alone; the pattern saved at install is {}: pass --force to restore that anyway",
            show(&current),
            show(&saved)
        ));
    }
    // The kernel takes the text up to a newline: write back exactly what was read.
    write_pattern(&saved)?;
    let now = read_pattern()?;
    if now != saved {
        return Err(format!(
            "wrote {} back but core_pattern reads {}; the saved copy stays in {}",
            show(&saved),
            show(&now),
            saved_path.display()
        ));
    }
    let conf = Config::load(&state).ok();
    let _ = std::fs::remove_file(&saved_path);
    let _ = std::fs::remove_file(state.join(CONF));
    println!(
        "coreflect: crash handler removed: core_pattern is {} again",
        show(&saved)
    );
    if let Some(c) = conf {
        println!("  the dumps in {} are kept", c.dir.display());
    }
    Ok(())
}

fn status(state_dir: &Path) -> Result<(), String> {
    let current = read_pattern()?;
    let ours = is_ours(&current);
    println!("core_pattern: {}", show(&current));
    if let Ok(l) = std::fs::read_to_string("/proc/sys/kernel/core_pipe_limit") {
        println!("core_pipe_limit: {}", l.trim());
    }
    println!(
        "coreflect crash handler: {}",
        if ours { "installed" } else { "not installed" }
    );
    match std::fs::read(state_dir.join(SAVED)) {
        Ok(s) => println!("saved previous pattern: {}", show(&s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => println!(
            "saved previous pattern: cannot read {}: {e}",
            state_dir.join(SAVED).display()
        ),
    }
    if let Ok(c) = Config::load(state_dir) {
        let dumps = list_dumps(&c.dir);
        let total: u64 = dumps.iter().map(|d| d.disk).sum();
        println!(
            "dumps: {} in {} ({} on disk; limits {} files, {})",
            dumps.len(),
            c.dir.display(),
            crate::report::bytes(total),
            c.max_files,
            crate::report::bytes(c.max_size)
        );
        if let Some(d) = dumps.last() {
            println!("newest: {}", d.path.display());
        }
    }
    Ok(())
}

/// A dump in the dump directory.
#[derive(Debug)]
struct Dump {
    path: PathBuf,
    mtime: i64,
    disk: u64,
}

/// Our dumps in `dir` (regular files named `*.core` or `*.core.zst`), oldest first.
fn list_dumps(dir: &Path) -> Vec<Dump> {
    let mut v: Vec<Dump> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".core") || n.ends_with(".core.zst")
                })
                .filter_map(|e| {
                    let m = std::fs::symlink_metadata(e.path()).ok()?;
                    m.is_file().then(|| Dump {
                        path: e.path(),
                        mtime: m.mtime(),
                        disk: m.blocks() * 512,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.mtime.cmp(&b.mtime).then(a.path.cmp(&b.path)));
    v
}

/// Deletes the oldest dumps (never `keep`) until at most `max_files` remain and they use at
/// most `max_size` bytes; returns how many were deleted.
fn rotate(dir: &Path, max_files: usize, max_size: u64, keep: Option<&Path>) -> usize {
    let mut dumps = list_dumps(dir);
    let mut deleted = 0;
    loop {
        let total: u64 = dumps.iter().map(|d| d.disk).sum();
        if dumps.len() <= max_files && total <= max_size {
            return deleted;
        }
        let Some(i) = dumps.iter().position(|d| Some(d.path.as_path()) != keep) else {
            return deleted;
        };
        let d = dumps.remove(i);
        if std::fs::remove_file(&d.path).is_ok() {
            deleted += 1;
        }
    }
}

/// Free bytes for unprivileged users, and the size of the filesystem holding `dir`.
fn space(f: &File) -> Option<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: statvfs is plain integers: all zeros is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs fills the valid, exclusively borrowed `s` for an open descriptor.
    if unsafe { libc::fstatvfs(f.as_raw_fd(), &mut s) } != 0 {
        return None;
    }
    Some((
        s.f_bavail as u64 * s.f_frsize as u64,
        s.f_blocks as u64 * s.f_frsize as u64,
    ))
}

/// `<comm>_<yymmdd_HHMMSS>.<pid>.core` with the crash time in local time.
pub fn dump_name(comm: &str, pid: i64, time: i64) -> String {
    use coreflect::output::{file_safe_comm, local_stamp};
    format!(
        "{}_{}.{}.core",
        file_safe_comm(comm),
        local_stamp(time),
        pid
    )
}

/// Gives up when the filesystem holding `f` has fallen to the free-space `floor`.
fn above_floor(f: &File, floor: u64) -> Result<(), GiveUp> {
    match space(f) {
        Some((free, _)) if free < floor => Err(GiveUp(format!(
            "the filesystem's free space fell to the floor ({} free, floor {})",
            crate::report::bytes(free),
            crate::report::bytes(floor)
        ))),
        _ => Ok(()),
    }
}

/// Gives up once `deadline` has passed (`read` bytes of the core read so far).
fn within_time(deadline: Instant, read: u64) -> Result<(), GiveUp> {
    if Instant::now() > deadline {
        return Err(GiveUp(format!(
            "it took longer than the time limit ({} read)",
            crate::report::bytes(read)
        )));
    }
    Ok(())
}

/// One log line: to the kernel log (`/dev/kmsg`, where the journal picks it up) and stderr
/// (which is /dev/null when the kernel runs us).
fn log(line: &str) {
    // <3> error, <6> info: the priority prefix of /dev/kmsg.
    let prio = if line.contains("not saved") { 3 } else { 6 };
    if let Ok(mut k) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = k.write_all(format!("<{prio}>coreflect: {line}\n").as_bytes());
    }
    eprintln!("coreflect: {line}");
}

/// Why a core was not kept.
#[derive(Debug)]
struct GiveUp(String);

/// Copies stdin into `f` leaving zero pages as holes; checks the budget every 32 MiB.
/// Returns (logical length, data bytes written).
fn copy_sparse(
    input: &mut dyn Read,
    f: &File,
    budget: u64,
    floor: u64,
    deadline: Instant,
) -> Result<(u64, u64), GiveUp> {
    const PAGE: usize = 4096;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut off: u64 = 0;
    let mut data: u64 = 0;
    let mut next_check: u64 = 0;
    let zero = [0u8; PAGE];
    // Slice equality is a memcmp, fast even in a debug build.
    let is_zero = |b: &[u8]| b == &zero[..b.len()];
    loop {
        // Fill the whole chunk (pipes return at most 64 KiB at a time) or reach the end.
        let mut n = 0;
        while n < CHUNK {
            match input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(GiveUp(format!("reading the core from the kernel: {e}"))),
            }
        }
        if n == 0 {
            break;
        }
        let mut i = 0;
        while i < n {
            let end = (i + PAGE).min(n);
            if is_zero(&buf[i..end]) {
                i = end;
                continue;
            }
            // A run of non-zero pages, written at once.
            let mut j = end;
            while j < n {
                let e = (j + PAGE).min(n);
                if is_zero(&buf[j..e]) {
                    break;
                }
                j = e;
            }
            if data + (j - i) as u64 > budget {
                return Err(GiveUp(format!(
                    "the core is larger than --max-size ({})",
                    crate::report::bytes(budget)
                )));
            }
            f.write_all_at(&buf[i..j], off + i as u64)
                .map_err(|e| GiveUp(format!("writing: {e}")))?;
            data += (j - i) as u64;
            i = j;
        }
        off += n as u64;
        if data >= next_check {
            next_check = data + 32 * CHUNK as u64;
            above_floor(f, floor)?;
        }
        within_time(deadline, off)?;
    }
    f.set_len(off)
        .map_err(|e| GiveUp(format!("setting the file's length: {e}")))?;
    Ok((off, data))
}

/// Counts the bytes written through it.
struct Counting<'a> {
    f: &'a File,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = (&mut &*self.f).write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies stdin into `f` compressed with zstd; the same checks as [`copy_sparse`] on the
/// compressed size. Returns (bytes read, compressed bytes written).
fn copy_zstd(
    input: &mut dyn Read,
    f: &File,
    budget: u64,
    floor: u64,
    deadline: Instant,
) -> Result<(u64, u64), GiveUp> {
    const CHUNK: usize = 1 << 20;
    let zerr = |e: std::io::Error| GiveUp(format!("compressing: {e}"));
    let mut enc = zstd::stream::Encoder::new(Counting { f, n: 0 }, 3).map_err(zerr)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if threads > 1 {
        // Best effort: a zstd built without threads compresses on this one.
        let _ = enc.multithread(threads as u32);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut read: u64 = 0;
    let mut next_check: u64 = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(GiveUp(format!("reading the core from the kernel: {e}"))),
        };
        enc.write_all(&buf[..n]).map_err(zerr)?;
        read += n as u64;
        let written = enc.get_ref().n;
        if written > budget {
            return Err(GiveUp(format!(
                "the compressed core is larger than --max-size ({})",
                crate::report::bytes(budget)
            )));
        }
        if read >= next_check {
            next_check = read + 32 * CHUNK as u64;
            above_floor(f, floor)?;
            within_time(deadline, read)?;
        }
    }
    let out = enc.finish().map_err(zerr)?;
    if out.n > budget {
        return Err(GiveUp(format!(
            "the compressed core is larger than --max-size ({})",
            crate::report::bytes(budget)
        )));
    }
    Ok((read, out.n))
}

/// An exclusive lock on the dump directory for the rotation and size accounting (crashes
/// may come in bursts). Released when dropped.
fn lock_dir(dir: &Path) -> Option<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(".lock"))
        .ok()?;
    // At most ~2 s: a stuck lock must not hold the crashing process.
    for _ in 0..200 {
        // flock(LOCK_EX | LOCK_NB) on Linux.
        if f.try_lock().is_ok() {
            return Some(f);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn handle(a: &HandleArgs) -> i32 {
    let start = Instant::now();
    let comm = a.comm.join(" ");
    let who = format!(
        "pid {} ({}) killed by signal {}",
        a.pid,
        crate::report::esc(&comm),
        a.signal
    );
    let conf = match Config::load(&a.state_dir) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("{who}: core not saved: {e}"));
            return 1;
        }
    };
    match handle_with(a, &conf, &comm, start, &mut std::io::stdin().lock()) {
        Ok(line) => {
            log(&format!("{who}: {line}"));
            0
        }
        Err(GiveUp(why)) => {
            log(&format!("{who}: core not saved: {why}"));
            1
        }
    }
}

fn handle_with(
    a: &HandleArgs,
    conf: &Config,
    comm: &str,
    start: Instant,
    input: &mut dyn Read,
) -> Result<String, GiveUp> {
    let deadline = start + Duration::from_secs(conf.max_time);
    let dir_meta = std::fs::symlink_metadata(&conf.dir)
        .map_err(|e| GiveUp(format!("the dump directory {}: {e}", conf.dir.display())))?;
    if !dir_meta.is_dir() {
        return Err(GiveUp(format!("{} is not a directory", conf.dir.display())));
    }
    let mut name = dump_name(comm, a.pid, a.time);
    if conf.compress == Compress::Zstd {
        name.push_str(".zst");
    }
    let path = conf.dir.join(name);
    let out =
        coreflect::output::OutputFile::create(&path, false).map_err(|e| GiveUp(e.to_string()))?;
    let (free, size) = space(out.file()).unwrap_or((u64::MAX, 0));
    let floor = match conf.min_free {
        Floor::Bytes(b) => b,
        Floor::Percent(p) => size / 100 * p as u64,
    };
    if free < floor {
        return Err(GiveUp(format!(
            "only {} free on {}, under the floor of {}",
            crate::report::bytes(free),
            conf.dir.display(),
            crate::report::bytes(floor)
        )));
    }
    // Older dumps make room only once this one is complete and kept: a refused core never
    // costs an old one. Meanwhile the free-space floor protects the filesystem.
    let (len, data) = match conf.compress {
        Compress::None => copy_sparse(input, out.file(), conf.max_size, floor, deadline)?,
        Compress::Zstd => copy_zstd(input, out.file(), conf.max_size, floor, deadline)?,
    };
    if len == 0 {
        return Err(GiveUp("the kernel sent an empty core".into()));
    }
    let path = out.commit().map_err(|e| GiveUp(e.to_string()))?;
    // Room for it: the oldest others go until the count and total size fit.
    let lock = lock_dir(&conf.dir);
    let rotated = rotate(
        &conf.dir,
        conf.max_files as usize,
        conf.max_size,
        Some(&path),
    );
    drop(lock);
    Ok(format!(
        "core saved to {} ({} {}, {:.2} s{})",
        path.display(),
        crate::report::bytes(data),
        match conf.compress {
            Compress::None => format!("of data in a {} sparse file", crate::report::bytes(len)),
            Compress::Zstd => format!("compressed from {}", crate::report::bytes(len)),
        },
        start.elapsed().as_secs_f64(),
        if rotated > 0 {
            format!("; {rotated} older dump(s) deleted")
        } else {
            String::new()
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_floor("10%").unwrap(), Floor::Percent(10));
        assert_eq!(parse_floor("2G").unwrap(), Floor::Bytes(2 << 30));
        assert!(parse_floor("100%").is_err());
    }

    #[test]
    fn config_round_trip() {
        let c = Config {
            dir: PathBuf::from("/srv/cores"),
            max_files: 3,
            max_size: 12345,
            min_free: Floor::Percent(7),
            max_time: 9,
            compress: Compress::Zstd,
        };
        assert_eq!(Config::parse(&c.render()).unwrap(), c);
    }

    #[test]
    fn ours() {
        assert!(is_ours(
            b"|/usr/bin/coreflect crash-handler handle %P %s %t %e\n"
        ));
        assert!(!is_ours(b"core\n"));
        assert!(!is_ours(
            b"|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h\n"
        ));
    }

    #[test]
    fn names() {
        let n = dump_name("my prog/x", 42, 0);
        assert!(n.starts_with("my_prog_x_"), "{n}");
        assert!(n.ends_with(".42.core"), "{n}");
        assert_eq!(n.len(), "my_prog_x_".len() + 13 + ".42.core".len());
        assert!(dump_name("-x", 1, 0).starts_with("_x_"));
        assert!(dump_name(".hidden", 1, 0).starts_with("_hidden_"));
    }

    #[test]
    fn sparse_copy_keeps_bytes_and_makes_holes() {
        let dir = std::env::temp_dir().join(format!("cf-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        // 8 MiB: data at the start, in the middle and at the very end; zeros elsewhere.
        let mut src = vec![0u8; 8 << 20];
        src[..100].fill(7);
        src[(4 << 20) + 5000..(4 << 20) + 9000].fill(9);
        let n = src.len();
        src[n - 1] = 1;
        let far = Instant::now() + Duration::from_secs(60);
        let (len, data) = copy_sparse(&mut &src[..], &f, u64::MAX, 0, far).unwrap();
        assert_eq!(len, src.len() as u64);
        assert_eq!(data, 4 * 4096, "data pages: first, two in the middle, last");
        assert_eq!(std::fs::read(&p).unwrap(), src);
        let m = std::fs::metadata(&p).unwrap();
        assert!(
            m.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            m.blocks()
        );
        // Over the budget: refused.
        assert!(copy_sparse(&mut &src[..], &f, 8192, 0, far).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
