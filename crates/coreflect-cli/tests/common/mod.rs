//! Shared helpers of the integration tests: real target processes, the real `coreflect`
//! binary, real gdb and elfutils.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The coreflect binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coreflect"))
}

/// A running test target (`coreflect __target`).
pub struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Its pid.
    pub pid: i32,
    /// The fields of its READY line.
    pub ready: HashMap<String, String>,
}

fn parse_fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(v: &str) -> u64 {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

fn reader_thread(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Target {
    /// Starts a target with these options and waits for READY.
    pub fn spawn(args: &[&str]) -> Target {
        Target::spawn_with(args, |_| {})
    }

    /// Starts a target with these options, `setup` adjusting its command first, and waits
    /// for READY.
    pub fn spawn_with(args: &[&str], setup: impl FnOnce(&mut Command)) -> Target {
        let mut cmd = Command::new(exe());
        cmd.arg("__target").args(args);
        setup(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the test target");
        let lines = reader_thread(child.stdout.take().unwrap());
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the test target did not print READY");
        assert!(line.starts_with("READY"), "unexpected first line {line:?}");
        let ready = parse_fields(&line);
        Target {
            pid: child.id() as i32,
            stdin: child.stdin.take(),
            child,
            lines,
            ready,
        }
    }

    /// A numeric READY field.
    pub fn get(&self, key: &str) -> u64 {
        num(self
            .ready
            .get(key)
            .unwrap_or_else(|| panic!("READY has no {key}")))
    }

    /// Checks it still answers (its main thread runs and reads stdin).
    pub fn ping(&mut self) -> bool {
        let Some(i) = self.stdin.as_mut() else {
            return false;
        };
        if writeln!(i, "ping").is_err() {
            return false;
        }
        matches!(self.lines.recv_timeout(Duration::from_secs(10)), Ok(l) if l.starts_with("PONG"))
    }

    /// Sends one command line and returns the next line it prints (within 10 s).
    pub fn command(&mut self, cmd: &str) -> Option<String> {
        writeln!(self.stdin.as_mut()?, "{cmd}").ok()?;
        self.lines.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Asks it to quit and returns its counters.
    pub fn quit(mut self) -> HashMap<String, u64> {
        let mut i = self.stdin.take().unwrap();
        writeln!(i, "quit").unwrap();
        drop(i);
        let line = loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the target did not report its counters");
            if l.starts_with("STATS") {
                break l;
            }
        };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "target exited with {status}");
        parse_fields(&line)
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    if v == "true" {
                        1
                    } else {
                        v.parse().unwrap_or(0)
                    },
                )
            })
            .collect()
    }

    /// Sends it `sig` and waits until it is gone; returns how it ended.
    pub fn kill_and_wait(mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid, sig) };
        self.child.wait().expect("wait for the target")
    }

    /// The threads of the target now.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .unwrap()
            .count()
    }

    /// Asserts the target is not stopped, not traced.
    pub fn assert_free(&self) {
        assert_free(self.pid);
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of /proc/PID/status.
pub fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Asserts every thread of `pid` is untraced and not stopped.
pub fn assert_free(pid: i32) {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = t.unwrap().file_name().to_string_lossy().to_string();
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue; // the thread has just exited
        };
        let get = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            get("TracerPid:"),
            "0",
            "thread {tid} of {pid} is still traced"
        );
        let state = get("State:");
        assert!(
            !state.starts_with('t') && !state.starts_with('T'),
            "thread {tid} of {pid} is stopped: {state}"
        );
    }
}

/// The children of `pid` (all threads).
pub fn children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = t.unwrap().file_name().to_string_lossy().to_string();
        let s =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        v.extend(s.split_whitespace().map(|w| w.parse::<i32>().unwrap()));
    }
    v
}

/// Runs coreflect with these arguments.
pub fn coreflect(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run coreflect")
}

/// A JSON report (`coreflect dump --json`'s stdout).
#[derive(Debug)]
pub struct Json(pub String);

impl Json {
    fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.0))
    }

    /// A field of the report or of its `pause` object: a string's text, a number's digits.
    pub fn get(&self, key: &str) -> Option<String> {
        let f = self.field(key)?;
        Some(match f {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
    }

    /// The field `key` at the top level, or in one of the nested objects (`pause`,
    /// `write_path`).
    fn field(&self, key: &str) -> Option<serde_json::Value> {
        let v = self.value();
        v.get(key).cloned().or_else(|| {
            v.as_object()?
                .values()
                .find_map(|o| o.as_object()?.get(key).cloned())
        })
    }

    /// A numeric field.
    pub fn num(&self, key: &str) -> u64 {
        self.field(key)
            .and_then(|n| n.as_u64())
            .unwrap_or_else(|| panic!("no number {key} in {}", self.0))
    }

    /// The warnings, one a line ("" when there are none).
    pub fn warnings(&self) -> String {
        let v = self.value();
        let w = v
            .get("warnings")
            .and_then(|w| w.as_array())
            .unwrap_or_else(|| panic!("no warnings array in {}", self.0));
        w.iter()
            .map(|x| x.as_str().expect("a warning is a string"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The warnings' kinds, in order (as many as there are warnings).
    pub fn warning_kinds(&self) -> Vec<String> {
        let v = self.value();
        let k: Vec<String> = v
            .get("warning_kinds")
            .and_then(|w| w.as_array())
            .unwrap_or_else(|| panic!("no warning_kinds array in {}", self.0))
            .iter()
            .map(|x| x.as_str().expect("a warning kind is a string").to_string())
            .collect();
        let n = v["warnings"].as_array().map_or(0, Vec::len);
        assert_eq!(k.len(), n, "one kind per warning: {}", self.0);
        k
    }
}

/// Dumps `pid` to `out` with `--json` and extra arguments; panics with stderr on failure.
pub fn dump(pid: i32, out: &Path, extra: &[&str]) -> Json {
    let mut args = vec![
        "dump".to_string(),
        pid.to_string(),
        "-o".into(),
        out.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = coreflect(&argv);
    assert!(
        o.status.success(),
        "coreflect {argv:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Json(String::from_utf8(o.stdout).unwrap().trim().to_string())
}

/// A fresh, empty directory for one test.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coreflect-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs gdb in batch mode on `core` with these commands; returns stdout+stderr.
pub fn gdb(core: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("gdb");
    c.args([
        "-batch",
        "-nx",
        "-iex",
        "set debuginfod enabled off",
        "-iex",
        "set pagination off",
    ]);
    for x in cmds {
        c.args(["-ex", x]);
    }
    c.arg(exe()).arg(core);
    let o = c
        .output()
        .expect("gdb must be installed (apt-get install gdb)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a tool and returns stdout+stderr (panics if it cannot start).
pub fn run_tool(prog: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// True when running as root (tests that mount filesystems or switch users need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends signal `sig` to process `pid` (errors ignored: the process may be gone).
pub fn send_signal(pid: i32, sig: i32) {
    // SAFETY: kill takes no pointers and has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Reports that a test cannot run here because `why`: when the `CI` environment variable
/// is set this fails the test (CI must run every test); otherwise it prints a visible
/// `SKIPPED` line and the caller returns.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run: {why} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED {test}: {why} (set CI=1 to make this a failure)");
}

/// True when root; otherwise [`skip`]s (fails under CI) with `why` and returns false.
pub fn require_root(test: &str, why: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(test, &format!("needs root {why}"));
    false
}

/// The functions each test-target thread parks in.
pub const WORKERS: &[&str] = &[
    "spin_worker",
    "read_worker",
    "sleep_worker",
    "condvar_worker",
    "accept_worker",
    "pause_worker",
    "waitpid_worker",
    "seq_writer",
];

/// Asserts the counters a target reports show nothing an intrusive dumper would cause.
pub fn assert_undisturbed(stats: &HashMap<String, u64>) {
    let want = [
        ("sigchld", 0),
        ("read_ok", 1),
        ("read_eintr", 0),
        ("read_bad", 0),
        ("short_sleep", 0),
        ("sleep_err", 0),
        ("pause_returns", 0),
        ("waitpid_children", 0),
        ("waitpid_errors", 0),
        ("accept_ok", 1),
        ("accept_err", 0),
        ("condvar_ok", 1),
    ];
    for (k, v) in want {
        assert_eq!(stats.get(k), Some(&v), "target counter {k} in {stats:?}");
    }
}

/// Starts `cmd` with piped stdin/stdout and waits for its first line (READY for a target).
pub fn spawn_first_line(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// Waits until no `coreflect dump <pid>` process is left (the warden of a killed coreflect
/// finishes its cleanup first); false if one is still there after `limit`.
pub fn wait_no_dumper(pid: i32, limit: std::time::Duration) -> bool {
    let needle = format!("dump\0{pid}\0");
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        let running = std::fs::read_dir("/proc").unwrap().any(|e| {
            let p = e.unwrap().path().join("cmdline");
            std::fs::read(p)
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        });
        if !running {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}
