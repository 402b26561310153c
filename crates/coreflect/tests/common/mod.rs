//! Shared helpers of the library's integration tests: real target processes.
//!
//! The target is this test binary itself, re-run on its ignored `__target` test with the
//! target's options in `COREFLECT_TEST_TARGET` (each test file declares it with
//! [`target_entry!`]), so the library's tests need no other binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The environment variable holding the target's options.
pub const TARGET_ENV: &str = "COREFLECT_TEST_TARGET";

/// Declares the `__target` test a test binary re-runs itself as.
#[macro_export]
macro_rules! target_entry {
    () => {
        #[test]
        #[ignore = "the test target's entry point: the tests run it in a process of its own"]
        fn __target() {
            let args = std::env::var(common::TARGET_ENV)
                .expect("run by the tests only, with COREFLECT_TEST_TARGET set");
            let args: Vec<String> = args.split_whitespace().map(String::from).collect();
            let o = coreflect_target::TargetOptions::parse(&args).expect("target options");
            coreflect_target::run(o)
        }
    };
}

/// A running test target.
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

impl Target {
    /// Starts a target with these options and waits for READY.
    pub fn spawn(args: &[&str]) -> Target {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["__target", "--exact", "--ignored", "--nocapture"])
            .env(TARGET_ENV, args.join(" "))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the test target");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // The test harness prints its own lines first.
        let ready = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the test target did not print READY");
            if line.starts_with("READY") {
                break parse_fields(&line);
            }
        };
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

    /// Checks it still answers (its stdin-reading thread runs).
    pub fn ping(&mut self) -> bool {
        let Some(i) = self.stdin.as_mut() else {
            return false;
        };
        if writeln!(i, "ping").is_err() {
            return false;
        }
        matches!(self.lines.recv_timeout(Duration::from_secs(10)), Ok(l) if l.starts_with("PONG"))
    }

    /// Sends one command line without waiting for its answer (see [`Target::try_line`]).
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin.as_mut().expect("stdin"), "{cmd}").expect("write a command");
    }

    /// The next line the target printed, if one is there.
    pub fn try_line(&mut self) -> Option<String> {
        self.lines.try_recv().ok()
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

    /// The threads of the target now.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .unwrap()
            .count()
    }

    /// Asserts every thread of the target is untraced and not stopped.
    pub fn assert_free(&self) {
        for t in std::fs::read_dir(format!("/proc/{}/task", self.pid)).unwrap() {
            let tid = t.unwrap().file_name().to_string_lossy().to_string();
            let Ok(s) = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", self.pid))
            else {
                continue; // the thread has just exited
            };
            let get = |k: &str| {
                s.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            assert_eq!(get("TracerPid:"), "0", "thread {tid} is still traced");
            let state = get("State:");
            assert!(
                !state.starts_with('t') && !state.starts_with('T'),
                "thread {tid} is stopped: {state}"
            );
        }
    }

    /// The target's children (all threads).
    pub fn children(&self) -> Vec<i32> {
        let mut v = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{}/task", self.pid)).unwrap() {
            let tid = t.unwrap().file_name().to_string_lossy().to_string();
            let s = std::fs::read_to_string(format!("/proc/{}/task/{tid}/children", self.pid))
                .unwrap_or_default();
            v.extend(s.split_whitespace().map(|w| w.parse::<i32>().unwrap()));
        }
        v
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// A fresh, empty directory for one test.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coreflect-libtest-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
