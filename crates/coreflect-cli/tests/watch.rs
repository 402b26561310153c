//! `coreflect watch` against real targets driven into each trigger's condition, real
//! signals and real crashes, with gdb reading every dump. No test depends on precise
//! timing: each waits for lines, files and process states with generous bounds.

mod common;

use common::{exe, gdb, tmpdir};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

fn lines_of(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// A target this test is the parent of (so it sees the wait status), driven on stdin.
struct Driven {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
    pid: i32,
}

impl Driven {
    /// Starts `prog __target` (prog: the coreflect binary or a copy under another name)
    /// with RLIMIT_CORE set to `core_limit`, in `dir`.
    fn start(prog: &Path, dir: &Path, core_limit: u64) -> Driven {
        let mut cmd = Command::new(prog);
        cmd.arg("__target")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: core_limit,
                    rlim_max: core_limit,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &l);
                // Ahead of the other builds and tests on a loaded machine, so that a
                // burning thread gets the CPU the --cpu triggers look for.
                libc::setpriority(libc::PRIO_PROCESS, 0, -10);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start the target");
        let out = lines_of(child.stdout.take().unwrap());
        let ready = out.recv_timeout(LONG).expect("target READY");
        assert!(ready.starts_with("READY"), "{ready}");
        Driven {
            stdin: child.stdin.take().unwrap(),
            pid: child.id() as i32,
            child,
            out,
        }
    }

    /// Sends a command and waits for the line starting with `reply` (if any).
    fn cmd(&mut self, c: &str, reply: Option<&str>) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let Some(r) = reply else {
            return String::new();
        };
        loop {
            let l = self
                .out
                .recv_timeout(LONG)
                .unwrap_or_else(|_| panic!("no {r} reply to {c}"));
            if l.starts_with(r) {
                return l;
            }
        }
    }

    /// Waits (generously) for the target to end.
    fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + LONG;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "the target did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `coreflect watch --json`, its events read line by line.
struct Watch {
    child: Child,
    events: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watch {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Watch {
        let mut c = Command::new(exe());
        c.arg("watch")
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("start coreflect watch");
        let events = lines_of(child.stdout.take().unwrap());
        let err = lines_of(child.stderr.take().unwrap());
        Watch {
            child,
            events,
            err,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event containing `needle`; panics with all events so far.
    fn expect(&mut self, needle: &str) -> String {
        let end = Instant::now() + LONG;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no event with {needle:?}; events: {:#?}; stderr: {:?}",
                    self.seen,
                    self.err.try_iter().collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Waits for the watcher's exit code.
    fn wait(&mut self) -> i32 {
        let end = Instant::now() + LONG;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.events.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(l);
                }
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "watch did not exit: {:#?}", self.seen);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON string field of an event line (our own flat output; enough for tests).
fn field(line: &str, key: &str) -> String {
    let k = format!("\"{key}\":");
    let at = line
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + k.len();
    let rest = &line[at..];
    if let Some(r) = rest.strip_prefix('"') {
        r[..r.find('"').unwrap()].to_string()
    } else {
        rest[..rest.find([',', '}']).unwrap()].to_string()
    }
}

fn cores_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "core"))
        .collect();
    v.sort();
    v
}

/// Checks `<comm>_<trigger>_<yymmdd_HHMMSS>.<pid>[-N].core`.
fn assert_name(p: &Path, comm: &str, trigger: &str, pid: i32) {
    let n = p.file_name().unwrap().to_string_lossy().to_string();
    let prefix = format!("{comm}_{trigger}_");
    let rest = n
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{n} does not start with {prefix}"));
    let (stamp, tail) = rest.split_at(13);
    assert!(
        stamp.len() == 13
            && stamp.as_bytes()[6] == b'_'
            && stamp
                .chars()
                .enumerate()
                .all(|(i, c)| i == 6 || c.is_ascii_digit()),
        "bad timestamp in {n}"
    );
    let tail = tail.strip_suffix(".core").expect(".core suffix");
    let tail = tail.strip_prefix('.').expect(".pid");
    let pid_part = tail.split('-').next().unwrap();
    assert_eq!(pid_part, pid.to_string(), "pid in {n}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{n} must be 0600");
}

/// gdb opens the core and shows the target's threads.
fn assert_opens(core: &Path) -> String {
    let out = gdb(core, &["info threads", "bt"]);
    assert!(
        out.contains("Core was generated by") && out.contains("__target"),
        "gdb could not read {}:\n{out}",
        core.display()
    );
    assert!(
        !out.contains("is not a core dump") && !out.contains("Cannot access memory at address 0x7"),
        "{out}"
    );
    out
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + LONG;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn timer_takes_count_dumps_with_names() {
    let dir = tmpdir("watch-timer");
    let t = Driven::start(&exe(), &dir, 0);
    let pid = t.pid.to_string();
    let mut w = Watch::start(
        &[
            &pid,
            "-n",
            "3",
            "-s",
            "0.3",
            "--poll",
            "100ms",
            "-o",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    w.expect("\"event\":\"watch\"");
    for _ in 0..3 {
        let d = w.expect("\"event\":\"dump\"");
        assert_eq!(field(&d, "trigger"), "timer");
        assert_eq!(field(&d, "mode"), "reflect");
    }
    let e = w.expect("\"event\":\"exit\"");
    assert_eq!(field(&e, "reason"), "count");
    assert_eq!(w.wait(), 0);
    let cores = cores_in(&dir);
    assert_eq!(cores.len(), 3, "{cores:?}");
    for c in &cores {
        assert_name(c, "coreflect", "timer", t.pid);
        assert_opens(c);
    }
    common::assert_free(t.pid);
    wait_until("the clones to be reaped", || {
        common::children(t.pid).is_empty()
    });
}

/// (trigger arguments, the command that brings the condition about and its reply, the
/// trigger's name)
type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a str)>, &'a str);

#[test]
fn threshold_triggers_fire_on_their_condition() {
    let dir = tmpdir("watch-thresholds");
    let mut t = Driven::start(&exe(), &dir, 0);
    let pid = t.pid.to_string();
    let d = dir.to_str().unwrap();
    let base = ["-n", "1", "-s", "0.3", "--poll", "100ms", "-o", d];
    let cases: &[Case] = &[
        (
            &["--threads", "40"],
            Some(("threads 40", "THREADS")),
            "threads",
        ),
        (&["--fds", "200"], Some(("fds 200", "FDS")), "fds"),
        (&["--mem", "300M"], Some(("grow 320", "GROW")), "mem"),
        (&["--cpu", "50"], Some(("burn", "BURN")), "cpu"),
        (&["--mem-below", "64G"], None, "mem-below"),
    ];
    for (trig, drive, name) in cases {
        let mut args = vec![pid.as_str()];
        args.extend_from_slice(trig);
        args.extend_from_slice(&base);
        let mut w = Watch::start(&args, &[]);
        w.expect("\"event\":\"watch\"");
        // Not yet: nothing may fire before the condition (a few polls go by).
        std::thread::sleep(Duration::from_millis(500));
        if let Some((c, reply)) = drive {
            assert!(
                cores_in(&dir).iter().all(|p| !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains(&format!("_{name}_"))),
                "{name} fired before its condition"
            );
            t.cmd(c, Some(reply));
        }
        let ev = w.expect("\"event\":\"dump\"");
        assert_eq!(field(&ev, "trigger"), *name);
        assert_eq!(w.wait(), 0);
        let path = PathBuf::from(field(&ev, "path"));
        assert_name(&path, "coreflect", name, t.pid);
        assert_opens(&path);
    }
    // Idle again: CPU below 150 % (one and a half cores) for the sustain time. (The target's
    // own busy-loop thread takes anywhere from a little to a whole core depending on the
    // machine's load, so a threshold under one core would depend on the load.)
    t.cmd("calm", Some("CALM"));
    let mut w = Watch::start(
        &[&pid, "--cpu-below", "150"]
            .iter()
            .chain(base.iter())
            .copied()
            .collect::<Vec<_>>(),
        &[],
    );
    let ev = w.expect("\"event\":\"dump\"");
    assert_eq!(field(&ev, "trigger"), "cpu-below");
    assert_eq!(w.wait(), 0);
    assert_eq!(cores_in(&dir).len(), cases.len() + 1);
    common::assert_free(t.pid);
}

#[test]
fn clones_limit_concurrency_and_skip_then_cancel_leaves_nothing() {
    let dir = tmpdir("watch-clones");
    let t = Driven::start(&exe(), &dir, 0);
    let pid = t.pid.to_string();
    // Every dump holds at its writing phase until cancelled: the third firing finds two
    // writing and must be skipped, not wait.
    let mut w = Watch::start(
        &[
            &pid,
            "--timer",
            "-n",
            "5",
            "-s",
            "0.2",
            "--poll",
            "100ms",
            "--clones",
            "2",
            "-o",
            dir.to_str().unwrap(),
        ],
        &[("COREFLECT_TEST_PAUSE_AT", "writing")],
    );
    let skip = w.expect("\"event\":\"skip\"");
    assert!(
        field(&skip, "reason").contains("2 dump(s) still writing (--clones 2)"),
        "{skip}"
    );
    // Two clones exist at once, both children of the target, no more.
    wait_until("two clones", || common::children(t.pid).len() == 2);
    w.expect("\"event\":\"skip\"");
    assert_eq!(common::children(t.pid).len(), 2);
    w.signal(libc::SIGTERM);
    let e = w.expect("\"event\":\"exit\"");
    assert_eq!(field(&e, "reason"), "cancelled");
    assert_eq!(field(&e, "dumps"), "0");
    assert_eq!(w.wait(), 130);
    // No partial file, no clone left, the target free.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
    wait_until("the clones to be reaped", || {
        common::children(t.pid).is_empty()
    });
    common::assert_free(t.pid);
}

#[test]
fn intercepted_sigterm_is_dumped_then_still_terminates() {
    let dir = tmpdir("watch-sigterm");
    let mut t = Driven::start(&exe(), &dir, 0);
    let pid = t.pid.to_string();
    let mut w = Watch::start(
        &[&pid, "--signal", "TERM", "-o", dir.to_str().unwrap()],
        &[],
    );
    w.expect("\"event\":\"watch\"");
    // Signals it does not watch pass through: the target handles its own SIGUSR1 storm.
    let storm = t.cmd("sigstorm 1", Some("SIGSTORM"));
    let n: u64 = storm
        .split_whitespace()
        .find_map(|f| f.strip_prefix("n="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(n > 0, "{storm}");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(t.pid, libc::SIGTERM) };
    let sig = w.expect("\"event\":\"signal\"");
    assert_eq!(field(&sig, "signal"), "SIGTERM");
    let d = w.expect("\"event\":\"dump\"");
    assert_eq!(field(&d, "trigger"), "signal");
    let st = t.wait();
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    assert_eq!(w.wait(), 0);
    let path = PathBuf::from(field(&d, "path"));
    assert_name(&path, "coreflect", "signal", t.pid);
    let out = assert_opens(&path);
    assert!(
        out.contains("Program terminated with signal SIGTERM"),
        "{out}"
    );
}

#[test]
fn cancel_detaches_every_thread() {
    let dir = tmpdir("watch-detach");
    let mut t = Driven::start(&exe(), &dir, 0);
    t.cmd("threads 8", Some("THREADS"));
    let pid = t.pid.to_string();
    let mut w = Watch::start(
        &[&pid, "--signal", "USR2", "-o", dir.to_str().unwrap()],
        &[],
    );
    w.expect("\"event\":\"watch\"");
    assert_ne!(common::status_field(t.pid, "TracerPid"), "0");
    // Threads started while traced are followed, and released too.
    t.cmd("threads 4", Some("THREADS"));
    let tracers: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", t.pid))
        .unwrap()
        .filter_map(|e| {
            let tid = e.unwrap().file_name().to_string_lossy().to_string();
            let s = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", t.pid)).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(|v| v.trim().to_string())
        })
        .collect();
    assert!(tracers.len() >= 20, "{tracers:?}");
    assert!(
        tracers.iter().all(|t| t != "0"),
        "every thread, new ones too, is followed: {tracers:?}"
    );
    w.signal(libc::SIGINT);
    assert_eq!(w.wait(), 130);
    wait_until("every thread untraced", || {
        std::fs::read_dir(format!("/proc/{}/task", t.pid))
            .unwrap()
            .all(|e| {
                let tid = e.unwrap().file_name().to_string_lossy().to_string();
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", t.pid))
                    .map(|s| s.contains("TracerPid:\t0\n"))
                    .unwrap_or(true)
            })
    });
    common::assert_free(t.pid);
    assert!(cores_in(&dir).is_empty());
    t.cmd("ping", Some("PONG"));
}

/// Crashes the target with `cmd` (without and with `watch`), with RLIMIT_CORE
/// `core_limit`: the watched run must end with the very same wait status, after a dump in
/// which gdb names the signal and the crashing thread.
fn crash_case(cmd: &str, sig: i32, name: &str, func: &str, core_limit: u64) {
    let dir = tmpdir(&format!("watch-crash-{cmd}-{core_limit}"));
    let base_dir = dir.join("baseline");
    std::fs::create_dir_all(&base_dir).unwrap();
    let mut b = Driven::start(&exe(), &base_dir, core_limit);
    b.cmd(cmd, None);
    let baseline = b.wait();
    assert_eq!(baseline.signal(), Some(sig), "{baseline:?}");
    assert_eq!(
        baseline.core_dumped(),
        core_limit > 0,
        "kernel core-dump bit"
    );

    let out_dir = dir.join("dumps");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut t = Driven::start(&exe(), &dir, core_limit);
    let pid = t.pid.to_string();
    let mut w = Watch::start(
        &[
            &pid,
            "--signal",
            "SEGV,ABRT,BUS,FPE,ILL",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    w.expect("\"event\":\"watch\"");
    t.cmd(cmd, None);
    let ev = w.expect("\"event\":\"signal\"");
    assert_eq!(field(&ev, "signal"), name);
    let tid: i32 = field(&ev, "tid").parse().unwrap();
    let d = w.expect("\"event\":\"dump\"");
    let st = t.wait();
    assert_eq!(
        st.into_raw(),
        baseline.into_raw(),
        "wait status with watch {st:?} vs without {baseline:?}"
    );
    assert_eq!(w.wait(), 0);
    let path = PathBuf::from(field(&d, "path"));
    assert_name(&path, "coreflect", "signal", t.pid);
    let out = gdb(&path, &["bt", "p $_siginfo.si_signo"]);
    assert!(
        out.contains(&format!("Program terminated with signal {name}")),
        "{out}"
    );
    assert!(
        out.contains("[Current thread is 1 (Thread ") && out.contains(&format!("(LWP {tid}))]")),
        "the crashing thread {tid} must be gdb's current thread:\n{out}"
    );
    assert!(
        out.contains(func),
        "{func} not in the crash backtrace:\n{out}"
    );
    assert!(out.contains(&format!("$1 = {sig}")), "NT_SIGINFO: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn segv_is_dumped_before_death_with_the_same_wait_status() {
    crash_case(
        "segv",
        libc::SIGSEGV,
        "SIGSEGV",
        "coreflect_target_crash_segv",
        0,
    );
}

#[test]
fn segv_keeps_the_kernel_core_dump_bit() {
    crash_case(
        "segv",
        libc::SIGSEGV,
        "SIGSEGV",
        "coreflect_target_crash_segv",
        u64::MAX,
    );
}

#[test]
fn abort_is_dumped_before_death_with_the_same_wait_status() {
    crash_case(
        "abort",
        libc::SIGABRT,
        "SIGABRT",
        "coreflect_target_crash_abort",
        0,
    );
}

#[test]
fn names_must_match_one_process_or_be_waited_for() {
    let dir = tmpdir("watch-names");
    let name = format!("cfw{}", std::process::id() % 100000);
    let prog = dir.join(&name);
    std::fs::copy(exe(), &prog).unwrap();
    // None yet.
    let o = Command::new(exe())
        .args(["watch", &name, "-o", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("no process named '{name}'")), "{err}");
    // --wait: the watcher waits, then dumps the process once it starts, and exits.
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut w = Watch::start(
        &[
            &name,
            "--wait",
            "--poll",
            "100ms",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    w.expect("\"event\":\"wait\"");
    let a = Driven::start(&prog, &dir, 0);
    let d = w.expect("\"event\":\"dump\"");
    assert_eq!(w.wait(), 0);
    assert_name(&PathBuf::from(field(&d, "path")), &name, "timer", a.pid);
    // Two of them: refused, both listed.
    let b = Driven::start(&prog, &dir, 0);
    let o = Command::new(exe())
        .args(["watch", &name, "-o", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("matches 2 processes")
            && err.contains(&a.pid.to_string())
            && err.contains(&b.pid.to_string()),
        "{err}"
    );
}

fn stamp(at: libc::time_t) -> String {
    // SAFETY: localtime_r into a zeroed local struct.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&at, &mut tm);
        tm
    };
    format!(
        "{:02}{:02}{:02}_{:02}{:02}{:02}",
        tm.tm_year % 100,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[test]
fn collisions_get_a_suffix_never_an_overwrite() {
    let dir = tmpdir("watch-collide");
    let t = Driven::start(&exe(), &dir, 0);
    let pid = t.pid.to_string();
    // Occupy the names of the next 60 seconds with symlinks to a file that must stay
    // untouched.
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    // SAFETY: time(NULL).
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    for i in 0..60 {
        let n = dir.join(format!("coreflect_timer_{}.{pid}.core", stamp(now + i)));
        std::os::unix::fs::symlink(&victim, n).unwrap();
    }
    let mut w = Watch::start(
        &[
            &pid,
            "-n",
            "2",
            "-s",
            "0",
            "--poll",
            "10ms",
            "-o",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    let mut paths = Vec::new();
    for _ in 0..2 {
        let d = w.expect("\"event\":\"dump\"");
        paths.push(PathBuf::from(field(&d, "path")));
    }
    assert_eq!(w.wait(), 0);
    for p in &paths {
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            n.ends_with(&format!(".{pid}-2.core")) || n.ends_with(&format!(".{pid}-3.core")),
            "{n}"
        );
        assert!(std::fs::symlink_metadata(p).unwrap().file_type().is_file());
        assert_name(p, "coreflect", "timer", t.pid);
    }
    assert_ne!(paths[0], paths[1]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
}

#[test]
fn pgid_watches_every_process_of_the_group() {
    let dir = tmpdir("watch-pgid");
    // Two targets in a process group of their own (the first leads it).
    let start = |pgid: i32| {
        let mut cmd = Command::new(exe());
        cmd.arg("__target")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(pgid);
        let mut child = cmd.spawn().unwrap();
        let out = lines_of(child.stdout.take().unwrap());
        assert!(out.recv_timeout(LONG).unwrap().starts_with("READY"));
        (child, out)
    };
    let (mut a, _ao) = start(0);
    let pgid = a.id() as i32;
    let (mut b, _bo) = start(pgid);
    let mut w = Watch::start(
        &[
            &pgid.to_string(),
            "--pgid",
            "--clones",
            "2",
            "-n",
            "2",
            "-s",
            "600",
            "--poll",
            "100ms",
            "-o",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    let mut pids = Vec::new();
    for _ in 0..2 {
        let d = w.expect("\"event\":\"dump\"");
        pids.push(field(&d, "pid").parse::<i32>().unwrap());
    }
    assert_eq!(w.wait(), 0);
    pids.sort();
    let mut want = vec![a.id() as i32, b.id() as i32];
    want.sort();
    assert_eq!(pids, want, "one timer dump per member");
    for c in cores_in(&dir) {
        assert_opens(&c);
    }
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
}

/// A cgroup of this test's own in hierarchy `ctrl` (v1) with `file` set to `value`,
/// holding `pid`; removed on drop.
struct Cg(PathBuf);
impl Cg {
    fn v1(ctrl: &str, name: &str, file: &str, value: &str, pid: i32) -> Option<Cg> {
        let root = Path::new("/sys/fs/cgroup").join(ctrl);
        if !root.join("cgroup.procs").exists() {
            return None;
        }
        let d = root.join(name);
        std::fs::create_dir_all(&d).ok()?;
        let cg = Cg(d.clone());
        std::fs::write(d.join(file), value).ok()?;
        std::fs::write(d.join("cgroup.procs"), pid.to_string()).ok()?;
        Some(cg)
    }
}
impl Drop for Cg {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            let parent = self.0.parent().unwrap().join("cgroup.procs");
            for pid in p.split_whitespace() {
                let _ = std::fs::write(&parent, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn cgroup_makes_cpu_and_memory_relative_to_the_limits() {
    if !common::is_root() || Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // (cgroup v2 hosts: the same code path reads cpu.max/memory.max; this test sets
        // up v1 limits.)
        eprintln!("skipped: needs root and a cgroup v1 cpu+memory hierarchy");
        return;
    }
    let dir = tmpdir("watch-cgroup");
    let mut t = Driven::start(&exe(), &dir, 0);
    let name = format!("coreflect-watch-test-{}", std::process::id());
    let Some(cpu) = Cg::v1("cpu", &name, "cpu.cfs_quota_us", "40000", t.pid) else {
        eprintln!("skipped: cannot make a cpu cgroup");
        return;
    };
    // A large share, so the group gets its 40 % even on a loaded machine.
    std::fs::write(cpu.0.join("cpu.shares"), "20480").unwrap();
    let Some(_mem) = Cg::v1(
        "memory",
        &name,
        "memory.limit_in_bytes",
        "1073741824",
        t.pid,
    ) else {
        eprintln!("skipped: cannot make a memory cgroup");
        return;
    };
    let pid = t.pid.to_string();
    let d = dir.to_str().unwrap();
    // Burning, the target gets at most 40 % of a core: above 80 % of its limit, never 80 %
    // of a core.
    t.cmd("burn", Some("BURN"));
    let mut w = Watch::start(
        &[
            &pid, "--cpu", "80", "--cgroup", "-s", "1", "--poll", "200ms", "-o", d,
        ],
        &[],
    );
    let ev = w.expect("\"event\":\"dump\"");
    assert_eq!(field(&ev, "trigger"), "cpu");
    assert_eq!(w.wait(), 0);
    let mut plain = Watch::start(
        &[
            &pid, "--cpu", "80", "-s", "1", "--poll", "200ms", "-o", d, "-n", "1",
        ],
        &[],
    );
    plain.expect("\"event\":\"watch\"");
    std::thread::sleep(Duration::from_secs(3));
    plain.signal(libc::SIGTERM);
    assert_eq!(plain.wait(), 130);
    assert!(
        !plain.seen.iter().any(|l| l.contains("\"event\":\"dump\"")),
        "40 % of a core is not 80 %: {:?}",
        plain.seen
    );
    t.cmd("calm", Some("CALM"));
    // 10 % of 1 GiB: reached after growing by 150 MiB.
    let mut w = Watch::start(
        &[
            &pid, "--mem", "10%", "--cgroup", "-s", "0", "--poll", "100ms", "-o", d,
        ],
        &[],
    );
    w.expect("\"event\":\"watch\"");
    t.cmd("grow 150", Some("GROW"));
    let ev = w.expect("\"event\":\"dump\"");
    assert_eq!(field(&ev, "trigger"), "mem");
    assert_eq!(w.wait(), 0);
}
