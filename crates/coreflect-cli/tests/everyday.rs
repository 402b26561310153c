//! Everyday use (issue 13): output modes, the manual page and completions, permissions as
//! a normal user, the post-mortem crash handler, and the Debian package.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Threads gdb lists in a core.
fn gdb_threads(core: &Path) -> usize {
    let out = gdb(core, &["info threads"]);
    out.lines()
        .filter(|l| {
            l.trim_start()
                .trim_start_matches('*')
                .trim_start()
                .starts_with(char::is_numeric)
                && l.contains("LWP")
        })
        .count()
}

#[test]
fn quiet_plain_and_verbose_output() {
    let t = Target::spawn(&[]);
    let d = tmpdir("output");
    // Off a terminal, the default: the summary only, no progress bar.
    let plain = d.join("plain.core");
    let o = coreflect(&["dump", &t.pid.to_string(), "-o", plain.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(e.starts_with("coreflect: dumped pid"), "{e}");
    assert!(
        !e.contains('\r') && !e.contains("ETA"),
        "a bar off a terminal: {e:?}"
    );
    assert!(o.stdout.is_empty());
    // -q: nothing at all on success.
    let quiet = d.join("quiet.core");
    let o = coreflect(&[
        "dump",
        &t.pid.to_string(),
        "-q",
        "-o",
        quiet.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(o.stderr.is_empty(), "-q printed {:?}", text(&o.stderr));
    assert!(o.stdout.is_empty());
    assert!(quiet.exists());
    // -q still prints errors.
    let o = coreflect(&[
        "dump",
        &t.pid.to_string(),
        "-q",
        "-o",
        "/nonexistent/dir/x.core",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.contains("error:") && e.contains("/nonexistent/dir"),
        "{e}"
    );
    // -v: phase timings and one decision per mapping, with the reason.
    let verbose = d.join("verbose.core");
    let o = coreflect(&[
        "-v",
        "dump",
        &t.pid.to_string(),
        "-o",
        verbose.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    for want in [
        "output file prepared in",
        "snapshot (reflect",
        "target paused",
        "core written in",
        "named ",
        "coreflect: dumped pid",
    ] {
        assert!(e.contains(want), "-v lacks {want:?}:\n{e}");
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let logged = e.lines().filter(|l| l.contains(" mapping 0x")).count();
    assert!(
        logged + 5 >= maps.lines().count() && logged > 10,
        "{logged} mapping lines for {} mappings",
        maps.lines().count()
    );
    assert!(
        e.contains("[heap]: whole") && e.contains("anonymous pages"),
        "{e}"
    );
    assert!(e.contains("ELF header only (build-id)"), "{e}");
    t.assert_free();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn progress_bar_on_a_terminal() {
    if !have("script") {
        eprintln!("skipped: script(1) is not installed to give coreflect a terminal");
        return;
    }
    let t = Target::spawn(&["--heap-mib", "64"]);
    let d = tmpdir("tty");
    let core = d.join("tty.core");
    // script(1) runs coreflect on a pseudo-terminal; the bar's delay is set to 0 so that the
    // test does not depend on how long the write takes.
    let o = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "{} dump {} -o {}",
            exe().display(),
            t.pid,
            core.display()
        ))
        .arg("/dev/null")
        .env("COREFLECT_PROGRESS_DELAY_MS", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("\r  [#") && out.contains("MiB/s"),
        "no bar: {out:?}"
    );
    assert!(out.contains(" / ") && out.contains('%'), "{out:?}");
    // The bar is erased before the summary.
    let summary = out.find("coreflect: dumped pid").expect("a summary");
    let last_cr = out[..summary].rfind('\r').unwrap();
    assert!(out[last_cr + 1..summary].trim().is_empty(), "{out:?}");
    assert!(core.exists());
    t.assert_free();
    let _ = std::fs::remove_dir_all(&d);
}

/// The visible subcommands, read from `--help`.
fn subcommands(args: &[&str]) -> Vec<String> {
    let mut a = args.to_vec();
    a.push("--help");
    let o = coreflect(&a);
    let h = text(&o.stdout);
    let start = h.find("Commands:").expect("--help lists commands");
    h[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "help")
        .map(String::from)
        .collect()
}

#[test]
fn man_page_documents_every_subcommand() {
    let o = coreflect(&["man"]);
    assert!(o.status.success());
    let page = text(&o.stdout);
    for s in [
        ".TH coreflect 1",
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH DESCRIPTION",
        ".SH \"EXIT STATUS\"",
        ".SH EXAMPLES",
    ] {
        assert!(page.contains(s), "the man page lacks {s}");
    }
    let top = subcommands(&[]);
    assert!(top.len() >= 5, "{top:?}");
    for s in &top {
        let esc = s.replace('-', "\\-");
        assert!(
            page.contains(&format!(".SS \"coreflect {esc}\"")),
            "no section for {s}"
        );
    }
    for s in subcommands(&["crash-handler"]) {
        assert!(
            page.contains(&format!(".SS \"coreflect crash\\-handler {s}\"")),
            "no section for crash-handler {s}"
        );
    }
    // Every option of dump is documented.
    for opt in [
        "\\-\\-output",
        "\\-\\-mode",
        "\\-\\-json",
        "\\-\\-quiet",
        "\\-\\-max\\-pause",
        "\\-\\-direct\\-write",
    ] {
        assert!(page.contains(opt), "dump option {opt} missing");
    }
    if have("groff") {
        let mut g = Command::new("groff")
            .args(["-man", "-ww", "-z"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(g.stdin.as_mut().unwrap(), page.as_bytes()).unwrap();
        let r = g.wait_with_output().unwrap();
        assert!(
            r.status.success() && r.stderr.is_empty(),
            "groff warns: {}",
            text(&r.stderr)
        );
    }
    if have("man") {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{} man | MANWIDTH=100 man -l - | col -b",
                exe().display()
            ))
            .output()
            .unwrap();
        let shown = text(&out.stdout);
        assert!(
            shown.contains("SYNOPSIS") && shown.contains("coreflect crash-handler install"),
            "{shown}"
        );
    }
}

#[test]
fn completions_parse_in_each_shell() {
    let d = tmpdir("completions");
    for (shell, check) in [
        ("bash", vec!["-n"]),
        ("zsh", vec!["-n"]),
        ("fish", vec!["--no-execute"]),
    ] {
        let o = coreflect(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", text(&o.stderr));
        let script = text(&o.stdout);
        assert!(
            script.contains("crash-handler") && script.contains("direct-write"),
            "{shell}"
        );
        if !have(shell) {
            assert_ne!(shell, "bash", "bash must be installed");
            eprintln!("skipped the {shell} syntax check: {shell} is not installed");
            continue;
        }
        let f = d.join(format!("coreflect.{shell}"));
        std::fs::write(&f, &script).unwrap();
        let (ok, out) = run_tool(shell, &[check.as_slice(), &[f.to_str().unwrap()]].concat());
        assert!(ok, "{shell} rejects its completions: {out}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Runs `args` as nobody (uid/gid 65534, no groups).
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args);
    c
}

fn nobody_can_run(exe: &Path) -> bool {
    as_nobody(&[exe.to_str().unwrap(), "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn normal_user_dumps_its_own_process_and_gets_a_clear_error_for_root() {
    if !is_root() || !have("setpriv") {
        eprintln!("skipped: needs root and setpriv to switch to nobody");
        return;
    }
    if !nobody_can_run(&exe()) {
        eprintln!("skipped: nobody cannot execute {}", exe().display());
        return;
    }
    let d = tmpdir("nobody");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    // A target of nobody's, dumped by nobody.
    let (mut child, line) =
        spawn_first_line(&mut as_nobody(&[exe().to_str().unwrap(), "__target"]));
    assert!(line.starts_with("READY"), "{line}");
    let pid = child.id() as i32;
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("65534")
    );
    let core = d.join("own.core");
    let o = as_nobody(&[
        exe().to_str().unwrap(),
        "dump",
        &pid.to_string(),
        "-o",
        core.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(
        o.status.success(),
        "nobody could not dump its own process: {}",
        text(&o.stderr)
    );
    let m = std::fs::metadata(&core).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (65534, 0o600));
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert_eq!(gdb_threads(&core), threads);
    let _ = child.kill();
    let _ = child.wait();

    // A root process: refused, and the error says why and what to do.
    let t = Target::spawn(&[]);
    let o = as_nobody(&[
        exe().to_str().unwrap(),
        "dump",
        &t.pid.to_string(),
        "-o",
        d.join("root.core").to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    for want in [
        "permission denied",
        "runs as root (uid 0)",
        "uid 65534",
        "CAP_SYS_PTRACE",
        "sudo",
        "setcap cap_sys_ptrace,cap_dac_read_search,cap_kill+ep",
    ] {
        assert!(e.contains(want), "the error lacks {want:?}: {e}");
    }
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(!d.join("root.core").exists());

    // The remedy it names works: the binary with those capabilities, run by nobody.
    if have("setcap") {
        let bin_dir = d.join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin_dir.join("coreflect");
        std::fs::copy(exe(), &bin).unwrap();
        let (ok, out) = run_tool(
            "setcap",
            &[
                "cap_sys_ptrace,cap_dac_read_search,cap_kill+ep",
                bin.to_str().unwrap(),
            ],
        );
        if ok {
            let core = d.join("capable.core");
            let o = as_nobody(&[
                bin.to_str().unwrap(),
                "dump",
                &t.pid.to_string(),
                "-o",
                core.to_str().unwrap(),
            ])
            .output()
            .unwrap();
            assert!(
                o.status.success(),
                "with the capabilities: {}",
                text(&o.stderr)
            );
            assert_eq!(gdb_threads(&core), t.threads());
        } else {
            eprintln!("skipped the setcap part: {out}");
        }
    }
    t.assert_free();
    let _ = std::fs::remove_dir_all(&d);
}

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";

/// Puts core_pattern back as it was when created, whatever happens to the test.
struct PatternGuard(Vec<u8>);

impl Drop for PatternGuard {
    fn drop(&mut self) {
        if std::fs::read(CORE_PATTERN).ok().as_deref() != Some(&self.0[..]) {
            std::fs::write(CORE_PATTERN, &self.0).expect("restore core_pattern");
        }
    }
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn crash_handler_keeps_a_core_of_a_crash_and_uninstall_restores_the_pattern() {
    if !is_root() {
        eprintln!("skipped: installing a core_pattern handler needs root");
        return;
    }
    let original = std::fs::read(CORE_PATTERN).unwrap();
    let _guard = PatternGuard(original.clone());
    // Short paths: core_pattern holds at most 127 bytes.
    let state = PathBuf::from(format!("/tmp/cfh-{}", std::process::id()));
    let dir = tmpdir("crashes");
    let _ = std::fs::remove_dir_all(&state);
    let o = coreflect(&[
        "crash-handler",
        "install",
        "--dir",
        dir.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--max-files",
        "3",
    ]);
    assert!(o.status.success(), "install: {}", text(&o.stderr));
    let pattern = text(&std::fs::read(CORE_PATTERN).unwrap());
    assert!(
        pattern.starts_with(&format!("|{} crash-handler handle", exe().display())),
        "{pattern}"
    );
    let st = text(
        &coreflect(&[
            "crash-handler",
            "status",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .stdout,
    );
    assert!(st.contains("coreflect crash handler: installed"), "{st}");
    assert!(
        st.contains(&format!(
            "saved previous pattern: {:?}",
            text(&original).trim_end_matches('\n')
        )),
        "{st}"
    );

    // A multi-threaded process killed by SIGSEGV, with the usual RLIMIT_CORE of 0: the
    // kernel ignores it for a pipe handler.
    let (mut child, line) = spawn_first_line(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -c 0 && exec {} __target", exe().display())),
    );
    assert!(line.starts_with("READY"), "{line}");
    let pid = child.id() as i32;
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    // A real fault (a signal sent with kill() would be taken by Rust's stack-overflow
    // handler, which then lets the process run on).
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"segv-here\n").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSEGV));
    assert!(status.core_dumped(), "the kernel reports no core dumped");
    let suffix = format!(".{pid}.core");
    let mut found = None;
    assert!(
        wait_for(Duration::from_secs(120), || {
            found = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(&suffix));
            found.is_some()
        }),
        "no core for pid {pid} in {} (handler log: dmesg)",
        dir.display()
    );
    let core = found.unwrap();
    let name = core.file_name().unwrap().to_string_lossy().into_owned();
    // coreflect_<yymmdd_HHMMSS>.<pid>.core
    let stamp = name
        .strip_prefix("coreflect_")
        .and_then(|r| r.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("{name}"));
    assert!(
        stamp.len() == 13
            && stamp.as_bytes()[6] == b'_'
            && stamp.replace('_', "").bytes().all(|b| b.is_ascii_digit()),
        "{name}"
    );
    let m = std::fs::metadata(&core).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600);
    assert!(
        m.blocks() * 512 < m.len(),
        "not sparse: {} blocks for {} bytes",
        m.blocks(),
        m.len()
    );
    let out = gdb(&core, &["info threads"]);
    assert!(out.contains("terminated with signal SIGSEGV"), "{out}");
    assert_eq!(gdb_threads(&core), threads, "{out}");
    let (ok, log) = run_tool("dmesg", &[]);
    if ok {
        assert!(
            log.contains(&format!(
                "coreflect: pid {pid} (coreflect) killed by signal 11: core saved to {}",
                core.display()
            )),
            "no log line in dmesg"
        );
    }

    let o = coreflect(&[
        "crash-handler",
        "uninstall",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "uninstall: {}", text(&o.stderr));
    assert_eq!(
        std::fs::read(CORE_PATTERN).unwrap(),
        original,
        "the original pattern is not back"
    );
    assert!(!state.join("core_pattern.saved").exists());
    assert!(core.exists(), "uninstall keeps the dumps");
    let o = coreflect(&[
        "crash-handler",
        "uninstall",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a second uninstall has nothing to restore"
    );
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the handler as the kernel would, with `input` as the core on stdin.
fn handle(state: &Path, pid: u32, input: &[u8]) -> (bool, String) {
    let mut c = Command::new(exe())
        .args([
            "crash-handler",
            "handle",
            "-c",
            state.to_str().unwrap(),
            &pid.to_string(),
            "11",
            "1764000000",
            "fake",
            "prog",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    // The handler may stop reading early (a refused core): a broken pipe is fine.
    let _ = std::io::Write::write_all(&mut stdin, input);
    drop(stdin);
    let o = c.wait_with_output().unwrap();
    (o.status.success(), text(&o.stderr))
}

fn dumps(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".core"))
        .collect();
    v.sort();
    v
}

#[test]
fn crash_handler_rotates_and_respects_size_and_free_space() {
    let state = tmpdir("handler-state");
    let dir = tmpdir("handler-dumps");
    let conf = |extra: &str| {
        std::fs::write(
            state.join("crash-handler.conf"),
            format!("dir={}\nmax_files=2\nmax_time=60\n{extra}", dir.display()),
        )
        .unwrap()
    };
    conf("max_size=1073741824\nmin_free=0\n");
    // 8 MiB, mostly zeros: a sparse copy with the same bytes.
    let mut core = vec![0u8; 8 << 20];
    core[..64].copy_from_slice(&[0x7f; 64]);
    core[5 << 20..(5 << 20) + 10000].fill(3);
    let (ok, log) = handle(&state, 101, &core);
    assert!(ok, "{log}");
    assert!(
        log.contains("pid 101 (fake prog) killed by signal 11: core saved to"),
        "{log}"
    );
    let first = dir.join(&dumps(&dir)[0]);
    assert!(
        first.to_string_lossy().ends_with(".101.core")
            && first.to_string_lossy().contains("/fake_prog_")
    );
    assert_eq!(std::fs::read(&first).unwrap(), core);
    let m = std::fs::metadata(&first).unwrap();
    assert!(m.blocks() * 512 <= 64 << 10, "{} blocks", m.blocks());
    assert_eq!(m.mode() & 0o777, 0o600);
    // Two more: only the newest two stay.
    std::thread::sleep(Duration::from_millis(20));
    assert!(handle(&state, 102, &core).0);
    std::thread::sleep(Duration::from_millis(20));
    let (ok, log) = handle(&state, 103, &core);
    assert!(ok, "{log}");
    let names = dumps(&dir);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| !n.contains(".101.")),
        "the oldest should be gone: {names:?}"
    );
    // A core larger than the size budget: refused, nothing left.
    conf("max_size=1048576\nmin_free=0\n");
    let dense = vec![0x55u8; 4 << 20];
    let (ok, log) = handle(&state, 104, &dense);
    assert!(
        !ok && log.contains("core not saved") && log.contains("--max-size"),
        "{log}"
    );
    // Nothing was deleted for it, and nothing of it is left.
    assert_eq!(dumps(&dir), names);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains("tmp")),
        "{leftovers:?}"
    );
    // The free-space floor: 99 % of the filesystem can never be free here.
    conf("max_size=1073741824\nmin_free=99%\n");
    let (ok, log) = handle(&state, 105, &core);
    assert!(
        !ok && log.contains("core not saved") && log.contains("floor"),
        "{log}"
    );
    assert!(dumps(&dir).iter().all(|n| !n.contains(".105.")));
    // zstd: `<name>.core.zst`, the same bytes once decompressed, counted in the rotation.
    conf("max_size=1073741824\nmin_free=0\ncompress=zstd\n");
    let (ok, log) = handle(&state, 106, &core);
    assert!(ok, "{log}");
    let zst: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".106.core.zst"))
        .collect();
    assert_eq!(zst.len(), 1, "{log}");
    let packed = std::fs::read(&zst[0]).unwrap();
    assert!(packed.len() < 64 << 10, "{} bytes", packed.len());
    assert_eq!(zstd::decode_all(&packed[..]).unwrap(), core);
    assert_eq!(std::fs::metadata(&zst[0]).unwrap().mode() & 0o777, 0o600);
    let all: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".core"))
        .collect();
    assert_eq!(all.len(), 2, "rotation counts .core.zst too: {all:?}");
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debian_package_holds_binary_man_page_and_completions() {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is not installed");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new("bash")
        .arg(root.join("packaging/deb"))
        .env("COREFLECT_BIN", exe())
        .env("COREFLECT_DEB_Z", "gzip")
        .output()
        .unwrap();
    assert!(o.status.success(), "packaging/deb: {}", text(&o.stderr));
    let version = env!("CARGO_PKG_VERSION");
    let deb = root.join(text(&o.stdout).trim());
    assert!(
        deb.ends_with(format!("target/debian/coreflect_{version}_amd64.deb")),
        "{}",
        deb.display()
    );
    let (ok, list) = run_tool("dpkg-deb", &["-c", deb.to_str().unwrap()]);
    assert!(ok, "{list}");
    for f in [
        "./usr/bin/coreflect",
        "./usr/share/man/man1/coreflect.1.gz",
        "./usr/share/bash-completion/completions/coreflect",
        "./usr/share/zsh/vendor-completions/_coreflect",
        "./usr/share/fish/vendor_completions.d/coreflect.fish",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(f)),
            "{f} is not in the package:\n{list}"
        );
    }
    assert!(
        list.lines()
            .any(|l| l.starts_with("-rwxr-xr-x root/root") && l.ends_with("./usr/bin/coreflect")),
        "{list}"
    );
    let (_, fields) = run_tool(
        "dpkg-deb",
        &[
            "-f",
            deb.to_str().unwrap(),
            "Package",
            "Version",
            "Architecture",
        ],
    );
    assert!(
        fields.contains("Package: coreflect") && fields.contains(&format!("Version: {version}")),
        "{fields}"
    );
    // The packaged binary runs and its man page is the generated one.
    let x = tmpdir("deb-extract");
    let (ok, out) = run_tool(
        "dpkg-deb",
        &["-x", deb.to_str().unwrap(), x.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    let v = Command::new(x.join("usr/bin/coreflect"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(text(&v.stdout).trim(), format!("coreflect {version}"));
    let (ok, man) = run_tool(
        "zcat",
        &[x.join("usr/share/man/man1/coreflect.1.gz")
            .to_str()
            .unwrap()],
    );
    assert!(
        ok && man.contains(".SH NAME") && man.contains("crash\\-handler"),
        "{man}"
    );
    let _ = std::fs::remove_dir_all(&x);
}
