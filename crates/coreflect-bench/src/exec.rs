//! Child processes with timeouts: measured commands (wall time and peak RSS through
//! `wait4`), the test target behind a guard that always stops it, and interruption
//! (SIGINT/SIGTERM/SIGHUP) handling.
//!
//! Every wait here has a deadline; every child is reaped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Set by the signal handler when the user asks the benchmark to stop.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The handler of SIGINT/SIGTERM/SIGHUP: sets [`INTERRUPTED`].
extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set a flag instead of killing the benchmark, so it can
/// stop the current command, the target, and remove its files before it exits.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether the user asked the benchmark to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps for `d`, waking early if the benchmark is interrupted.
pub fn sleep_interruptible(d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() {
        let now = Instant::now();
        if now >= end {
            return;
        }
        thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Sends `sig` to the process group `pgid`.
fn kill_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, sig) };
}

/// What a measured command did.
#[derive(Debug)]
pub struct Measured {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// From just before spawning it to the moment it was reaped.
    pub wall: Duration,
    /// Peak resident set size (KiB) of it and of the descendants it waited for.
    pub maxrss_kib: u64,
    /// CPU time (user + system) of it and of the descendants it waited for.
    pub cpu: Duration,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Measured {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// How it ended: `exit code N` or `killed by signal N`.
    pub fn status(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "unknown status".to_string(),
        }
    }

    /// A one-line description of how it failed: exit status and the last line of stderr.
    pub fn failure(&self) -> String {
        let status = self.status();
        match self.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(l) => format!("{status}: {}", l.trim()),
            None => status,
        }
    }
}

/// Reads all of `r` in a thread; the receiver gets the text once `r` reaches its end.
fn read_all_in_thread<R: Read + Send + 'static>(mut r: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Runs `cmd` in its own process group with stdin closed and its output captured, and
/// waits for it with `wait4` to get its wall time and peak RSS.
///
/// After `timeout`, or if the benchmark is interrupted, the group gets SIGTERM (coreflect
/// then releases its target and cleans up), then SIGKILL 5 s later; the command is always
/// reaped before this returns, unless it survives SIGKILL for 30 s.
pub fn run_measured(cmd: &mut Command, timeout: Duration) -> Result<Measured, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id() as i32;
    let out = read_all_in_thread(child.stdout.take().expect("piped stdout"));
    let err = read_all_in_thread(child.stderr.take().expect("piped stderr"));
    // We reap it ourselves with wait4 (std's Child never waits on drop).
    drop(child);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut status = 0;
        // SAFETY: rusage is plain data; all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: valid pointers to locals; pid is our own unreaped child.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            if r == pid {
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
                };
                let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
                let _ = tx.send(Ok((status, ru.ru_maxrss as u64, cpu, Instant::now())));
                return;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                let _ = tx.send(Err(format!("wait4({pid}): {e}")));
                return;
            }
        }
    });

    let deadline = t0 + timeout;
    let mut reason: Option<String> = None;
    let mut term_at: Option<Instant> = None;
    let mut kill_at: Option<Instant> = None;
    let (status, maxrss_kib, cpu, end) = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Ok(v)) => break v,
            Ok(Err(e)) => return Err(e),
            Err(RecvTimeoutError::Disconnected) => return Err("wait4 thread vanished".into()),
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        match (term_at, kill_at) {
            (None, _) if interrupted() || now >= deadline => {
                reason = Some(if interrupted() {
                    "interrupted".to_string()
                } else {
                    format!("timed out after {:.0} s", timeout.as_secs_f64())
                });
                kill_group(pid, libc::SIGTERM);
                term_at = Some(now);
            }
            (Some(t), None) if now.duration_since(t) > Duration::from_secs(5) => {
                kill_group(pid, libc::SIGKILL);
                kill_at = Some(now);
            }
            (_, Some(k)) if now.duration_since(k) > Duration::from_secs(30) => {
                return Err(format!(
                    "{program} (pid {pid}) survived SIGKILL for 30 s; left behind"
                ));
            }
            _ => {}
        }
    };
    // Anything still in its group (e.g. gdb under gcore) goes too.
    if term_at.is_some() {
        kill_group(pid, libc::SIGKILL);
    }
    let grab = |rx: Receiver<String>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let m = Measured {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        wall: end.duration_since(t0),
        maxrss_kib,
        cpu,
        stdout: grab(out),
        stderr: grab(err),
    };
    match reason {
        Some(r) => Err(format!("{program} {r} ({})", m.failure())),
        None => Ok(m),
    }
}

/// Finds an executable called `name` in `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Whether `p` is a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running test target (`coreflect __target --heartbeat ...`).
///
/// Dropping it stops it: `quit` on stdin, then SIGKILL if it has not exited within 10 s,
/// and it is always waited for.
pub struct Target {
    /// The process.
    child: Child,
    /// Its stdin (commands), until it is stopped.
    stdin: Option<ChildStdin>,
    /// The lines of its stdout.
    lines: Receiver<String>,
    /// Its pid.
    pub pid: i32,
    /// Its READY line.
    pub ready: String,
    /// Its STATS line, once it has quit.
    pub stats: Option<String>,
}

impl Target {
    /// Starts `exe __target <args>` and waits up to `timeout` for its READY line.
    pub fn start(exe: &Path, args: &[String], timeout: Duration) -> Result<Target, String> {
        let mut child = Command::new(exe)
            .arg("__target")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: a Ctrl-C reaches only the benchmark, which stops it in order.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the target {}: {e}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // Pass its stderr on, marked, so a panic in it is visible.
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [target] {l}");
            }
        });
        let mut t = Target {
            pid: child.id() as i32,
            stdin: child.stdin.take(),
            child,
            lines,
            ready: String::new(),
            stats: None,
        };
        let line = t.expect_line("READY", timeout)?;
        t.ready = line;
        Ok(t)
    }

    /// Waits up to `timeout` for a line starting with `prefix`, skipping others.
    fn expect_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if interrupted() {
                return Err("interrupted".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "the target did not answer {prefix} within {:.0} s",
                    timeout.as_secs_f64()
                ));
            }
            match self
                .lines
                .recv_timeout((deadline - now).min(Duration::from_millis(100)))
            {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = match self.child.try_wait() {
                        Ok(Some(s)) => format!(" ({s})"),
                        _ => String::new(),
                    };
                    return Err(format!(
                        "the target closed its stdout before {prefix}{status}"
                    ));
                }
            }
        }
    }

    /// Sends `cmd` and returns the first line starting with `prefix` (within `timeout`).
    pub fn request(
        &mut self,
        cmd: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let stdin = self.stdin.as_mut().ok_or("the target was stopped")?;
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("cannot send {cmd:?} to the target: {e}"))?;
        self.expect_line(prefix, timeout)
    }

    /// Sends `cmd` and returns the number in the `key=N` field of its answer.
    pub fn request_num(&mut self, cmd: &str, prefix: &str, key: &str) -> Result<u64, String> {
        let line = self.request(cmd, prefix, Duration::from_secs(10))?;
        field(&line, key).ok_or_else(|| format!("no {key}= in the target's answer {line:?}"))
    }

    /// Stops the target (see the type's documentation); idempotent.
    pub fn stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
            // Dropping stdin closes it: end of stdin also makes the target quit.
        } else if self.stats.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut killed = false;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                if l.starts_with("STATS") {
                    self.stats = Some(l);
                }
            }
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => {}
            }
            if Instant::now() >= deadline {
                if killed {
                    eprintln!(
                        "coreflect-bench: warning: target pid {} survived SIGKILL; left behind",
                        self.pid
                    );
                    break;
                }
                eprintln!(
                    "coreflect-bench: target pid {} did not quit; killing it",
                    self.pid
                );
                let _ = self.child.kill();
                killed = true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            if l.starts_with("STATS") {
                self.stats = Some(l);
            }
        }
        if self.stats.is_none() {
            self.stats = Some(String::new());
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The number in the `key=N` (or `key=0xN`) field of a line of words.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

/// Removes a file when dropped (a missing file is fine).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!(
                "coreflect-bench: warning: cannot remove {}: {e}",
                self.0.display()
            ),
        }
    }
}
