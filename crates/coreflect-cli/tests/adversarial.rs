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

/// An ELF header of a core with `phnum` program headers right after it (`shoff`/`shnum`
/// for PN_XNUM).
fn ehdr(phnum: u16, shoff: u64, shnum: u16) -> Vec<u8> {
    let mut e = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    e.extend_from_slice(&4u16.to_le_bytes()); // ET_CORE
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&shoff.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, phnum, if shnum > 0 { 64 } else { 0 }, shnum, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e
}

fn pt_note(offset: u64, filesz: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    p.extend_from_slice(&4u32.to_le_bytes());
    for v in [offset, 0, 0, filesz, 0, 4] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// `coreflect info` on crafted sparse cores whose headers claim huge tables: 50 million
/// program headers (PN_XNUM) made it allocate and read ~5 GiB; one zero-filled 1 GiB notes
/// segment (89 million empty notes), or many notes segments over the same bytes, made it
/// die of a failed allocation (SIGABRT). Each must be a one-line error, within a memory
/// limit far below those sizes.
#[test]
fn info_memory_stays_bounded_on_crafted_cores() {
    use std::os::unix::process::CommandExt;
    let dir = tmpdir("crafted");
    // 50M program headers announced through the section header (PN_XNUM).
    let xnum = dir.join("xnum.core");
    let mut b = ehdr(0xffff, 4096, 1);
    b.resize(4096, 0);
    let mut sh = vec![0u8; 64];
    sh[44..48].copy_from_slice(&50_000_000u32.to_le_bytes()); // sh_info
    b.extend_from_slice(&sh);
    std::fs::write(&xnum, &b).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&xnum)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    // One 1 GiB notes segment of zeros.
    let zeros = dir.join("zero-notes.core");
    let mut b = ehdr(1, 0, 0);
    b.extend(pt_note(4096, (1 << 30) - 4096));
    std::fs::write(&zeros, &b).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&zeros)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    // 40 notes segments of 200 MiB each, all over the same bytes.
    let overlap = dir.join("overlapping-notes.core");
    let mut b = ehdr(40, 0, 0);
    for _ in 0..40 {
        b.extend(pt_note(4096, 200 << 20));
    }
    std::fs::write(&overlap, &b).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&overlap)
        .unwrap()
        .set_len((200 << 20) + 4096)
        .unwrap();
    for f in [&xnum, &zeros, &overlap] {
        let mut c = Command::new(exe());
        c.args(["info", f.to_str().unwrap()]);
        // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let o = c.output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: {:?}\n{err}",
            f.display(),
            o.status
        );
        assert!(
            err.starts_with("coreflect: error: ") && err.trim_end().lines().count() == 1,
            "{}: {err}",
            f.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `coreflect info` on a FIFO waited forever in open() for a writer that never comes.
#[test]
fn info_refuses_a_fifo_without_waiting() {
    let dir = tmpdir("fifo");
    let fifo = dir.join("core.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut child = Command::new(exe())
        .args(["info", fifo.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coreflect info still waits on a FIFO after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let o = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    let err = text(&o.stderr);
    assert!(err.contains("not a regular file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// True if `s` holds a control character other than the line ends.
fn has_controls(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\n')
}

/// A process names itself and its arguments with terminal escape sequences and newlines
/// (any user can, and root runs `info` on its crash cores): `watch` printed its name raw
/// and `info` the name and command line, so a core or a target could drive the terminal
/// (set its title, fake output lines). They are shown escaped now.
#[test]
fn names_and_command_lines_with_control_characters_are_printed_escaped() {
    let dir = tmpdir("controls");
    let mut child = Command::new("sh")
        .arg("-c")
        // Short: the core's command line (pr_psargs) holds 80 bytes.
        .arg("printf 'x\\033[31mred'>/proc/$$/comm;echo ok;read l")
        .arg("\x1b]0;P\x07\nfake line")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ok = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ok,
    )
    .unwrap();
    assert_eq!(ok.trim(), "ok");
    let pid = child.id().to_string();
    let o = coreflect(&[
        "watch",
        &pid,
        "--timer",
        "-n",
        "1",
        "-o",
        dir.to_str().unwrap(),
    ]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        !has_controls(&err),
        "watch printed control characters: {err:?}"
    );
    assert!(err.contains("(x\\x1b[31mred)"), "{err}");
    let core = files(&dir).pop().expect("a core from watch");
    let o = coreflect(&["info", dir.join(core).to_str().unwrap()]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !has_controls(&out),
        "info printed control characters: {out:?}"
    );
    let cmdline: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("command line:"))
        .collect();
    assert_eq!(cmdline.len(), 1, "{out}");
    assert!(cmdline[0].contains("\\x1b]0;P\\x07\\x0afake line"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("fake line")), "{out}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
