//! Hostile conditions found by an adversarial review, each a regression test with real
//! processes: the CLI must neither be steered by its target nor leave a wrong file.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Puts core_pattern back as it was, even when the test fails.
struct PatternGuard(Vec<u8>);

impl Drop for PatternGuard {
    fn drop(&mut self) {
        if std::fs::read(CORE_PATTERN).ok().as_deref() != Some(&self.0[..]) {
            std::fs::write(CORE_PATTERN, &self.0).expect("restore core_pattern");
        }
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".core"))
        .collect();
    v.sort();
    v
}

/// Runs the handler with the kernel's argument list `args` and `core` on stdin.
fn run_handler(args: &[&str], core: &[u8]) -> (bool, String, String) {
    let mut c = Command::new(exe())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let _ = std::io::Write::write_all(&mut stdin, core);
    drop(stdin);
    let o = c.wait_with_output().unwrap();
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}

/// The crashing process names itself (%e is its comm, which any process sets): a name
/// like `--state-dir=/x` used to be parsed as the handler's own option, so root's handler
/// read its configuration — and the dump directory — from a place the crashing process
/// chose; `--help` made it print the help and save nothing.
#[test]
fn crash_handler_takes_a_hostile_command_name_as_a_name() {
    let state = tmpdir("hostile-state");
    let dir = tmpdir("hostile-dumps");
    let evil_state = tmpdir("hostile-evil-state");
    let evil_dir = tmpdir("hostile-evil-dumps");
    for (s, d) in [(&state, &dir), (&evil_state, &evil_dir)] {
        std::fs::write(
            s.join("crash-handler.conf"),
            format!(
                "dir={}\nmax_files=10\nmax_size=1073741824\nmin_free=0\nmax_time=60\n",
                d.display()
            ),
        )
        .unwrap();
    }
    let mut core = vec![0u8; 64 << 10];
    core[..4].copy_from_slice(b"\x7fELF");
    let steer = format!("--state-dir={}", evil_state.display());
    // The pattern as installed before `--` was added: the kernel's arguments follow the
    // handler's options directly.
    for (pid, comm) in [("4101", steer.as_str()), ("4102", "--help"), ("4103", "-V")] {
        let (ok, out, err) = run_handler(
            &[
                "crash-handler",
                "handle",
                "-c",
                state.to_str().unwrap(),
                pid,
                "11",
                "1764000000",
                comm,
            ],
            &core,
        );
        assert!(ok, "comm {comm:?}: handler failed: {err}{out}");
        assert!(
            out.is_empty(),
            "comm {comm:?}: the handler printed on stdout: {out}"
        );
        assert!(
            err.contains(&format!(
                "pid {pid} ({comm}) killed by signal 11: core saved to"
            )),
            "comm {comm:?}: {err}"
        );
        let saved = files(&dir);
        assert!(
            saved.iter().any(|n| n.ends_with(&format!(".{pid}.core"))),
            "comm {comm:?}: no core for {pid} in {}: {saved:?}",
            dir.display()
        );
    }
    assert!(
        files(&evil_dir).is_empty(),
        "the crashing process chose the dump directory: {:?}",
        files(&evil_dir)
    );

    // End to end with the kernel: a process named `--help` crashes.
    if !require_root(
        "crash_handler_takes_a_hostile_command_name_as_a_name",
        "installing the crash handler writes core_pattern",
    ) {
        return;
    }
    let _guard = PatternGuard(std::fs::read(CORE_PATTERN).unwrap());
    let o = coreflect(&[
        "crash-handler",
        "install",
        "--dir",
        dir.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "install: {}", text(&o.stderr));
    let pattern = text(&std::fs::read(CORE_PATTERN).unwrap());
    assert!(pattern.contains(" -- %P %s %t %e"), "{pattern}");
    let child = Command::new("sh")
        .arg("-c")
        .arg("printf %s --help > /proc/self/comm && kill -SEGV $$")
        .spawn()
        .unwrap();
    let pid = child.id();
    let st = child.wait_with_output().unwrap().status;
    assert_eq!(st.signal(), Some(libc::SIGSEGV), "{st:?}");
    let suffix = format!(".{pid}.core");
    let end = Instant::now() + Duration::from_secs(60);
    let found = loop {
        if let Some(n) = files(&dir).into_iter().find(|n| n.ends_with(&suffix)) {
            break n;
        }
        assert!(
            Instant::now() < end,
            "no core of the process named --help (pid {pid}) in {}: {:?}",
            dir.display(),
            files(&dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(found.starts_with("_-help_"), "{found}");
    let o = coreflect(&[
        "crash-handler",
        "uninstall",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "uninstall: {}", text(&o.stderr));
    for d in [&state, &dir, &evil_state, &evil_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}
