//! The library as its users see it: real targets (this test binary re-run as the
//! multi-threaded test target), real ptrace, checked against /proc and `eu-readelf`.
//!
//! A test binary of its own (`harness = false`): the same executable is the target when
//! `COREFLECT_LIB_TARGET` is set. Run one test with `cargo test -p coreflect --test library
//! -- NAME` (substring match).

use coreflect::{Error, Freshness, LiveReason, Options, Snapshot};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TARGET_ENV: &str = "COREFLECT_LIB_TARGET";

struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pid: i32,
    ready: HashMap<String, u64>,
}

fn fields(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| {
            let n = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok()?,
                None => v.parse().ok()?,
            };
            Some((k.to_string(), n))
        })
        .collect()
}

impl Target {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Target {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(TARGET_ENV, args.join(" "))
            .args(["target-arg-1", "two words"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the target");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("READY");
        assert!(line.starts_with("READY"), "{line}");
        Target {
            pid: child.id() as i32,
            stdin: child.stdin.take().unwrap(),
            child,
            lines,
            ready: fields(&line),
        }
    }

    fn get(&self, k: &str) -> u64 {
        self.ready[k]
    }

    fn command(&mut self, cmd: &str, answer: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("target answer");
            if l.starts_with(answer) {
                return l;
            }
        }
    }

    fn quit(mut self) -> HashMap<String, u64> {
        let l = self.command("quit", "STATS");
        let st = self.child.wait().unwrap();
        assert!(st.success(), "target exited with {st}");
        l.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    if v == "true" {
                        1
                    } else {
                        v.parse().unwrap_or(0)
                    },
                )
            })
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_of(pid: i32, tid: i32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

fn tids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

/// Every thread of `pid` untraced and running.
fn assert_free(pid: i32) {
    for tid in tids(pid) {
        let (Some(tracer), Some(state)) = (
            status_of(pid, tid, "TracerPid:"),
            status_of(pid, tid, "State:"),
        ) else {
            continue;
        };
        assert_eq!(tracer, "0", "thread {tid} of {pid} is still traced");
        assert!(
            !state.starts_with('t') && !state.starts_with('T'),
            "thread {tid} of {pid} is stopped: {state}"
        );
    }
}

fn assert_undisturbed(stats: &HashMap<String, u64>) {
    for (k, v) in [
        ("sigchld", 0),
        ("read_eintr", 0),
        ("read_bad", 0),
        ("short_sleep", 0),
        ("sleep_err", 0),
        ("pause_returns", 0),
        ("waitpid_children", 0),
        ("waitpid_errors", 0),
        ("accept_err", 0),
    ] {
        assert_eq!(stats.get(k), Some(&v), "target counter {k} in {stats:?}");
    }
}

fn split_nul(b: &[u8]) -> Vec<Vec<u8>> {
    let b = b.strip_suffix(b"\0").unwrap_or(b);
    b.split(|&c| c == 0).map(|s| s.to_vec()).collect()
}

/// Options with a generous stop timeout: the machine may be loaded.
fn opts() -> Options {
    Options {
        stop_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

// ---- the tests ----

fn snapshot_moves_to_another_thread_and_reads_there() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Snapshot>();
    let mut t = Target::spawn(&["--heap-mib", "2", "--seq-pages", "8"], &[]);
    let snap = Snapshot::capture(t.pid, &opts()).unwrap();
    assert_eq!(snap.mode(), coreflect::Mode::Reflect);
    let clone = snap.clone_pid().unwrap();
    let (marker_addr, marker, seq) = (t.get("marker_addr"), t.get("marker"), t.get("seq_addr"));
    let pattern = t.get("pattern_addr");
    // Read, write a core, and end it on another thread than the one that captured it.
    let h = std::thread::spawn(move || {
        assert_eq!(snap.read_u64(marker_addr).unwrap(), marker);
        let first = snap.read_u64(seq).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(snap.read_u64(seq).unwrap(), first, "the image changed");
        let mut b = [0u8; 32];
        snap.read_exact(pattern + 100, &mut b).unwrap();
        let want: Vec<u8> = (100..132).map(coreflect_target::pattern_byte).collect();
        assert_eq!(&b[..], &want[..]);
        let dir = std::env::temp_dir().join(format!("coreflect-lib-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("moved.core");
        let _ = std::fs::remove_file(&path);
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut calls = 0;
        let st = snap
            .write_core_file(&f, &snap.default_policy(), &mut |_, _| {
                calls += 1;
                true
            })
            .unwrap();
        assert!(calls > 0, "progress was never reported");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), st.file_size);
        let core = coreflect::elf::reader::CoreFile::open(&path).unwrap();
        let got = core
            .read(marker_addr, 8)
            .unwrap()
            .expect("marker in the core");
        assert_eq!(u64::from_le_bytes(got.try_into().unwrap()), marker);
        std::fs::remove_dir_all(&dir).unwrap();
        snap.finish()
    });
    assert_eq!(h.join().unwrap(), None);
    assert!(
        !std::path::Path::new(&format!("/proc/{clone}")).exists(),
        "the clone is still there"
    );
    assert_free(t.pid);
    assert!(t.command("ping", "PONG").starts_with("PONG"));
    assert_undisturbed(&t.quit());
}

fn suspended_snapshot_ended_on_another_thread_releases_the_target() {
    let mut t = Target::spawn(&["--heap-mib", "1"], &[]);
    let o = Options {
        mode: coreflect::Mode::Suspend,
        ..opts()
    };
    let snap = Snapshot::capture(t.pid, &o).unwrap();
    assert_eq!(snap.mode(), coreflect::Mode::Suspend);
    assert_eq!(snap.clone_pid(), None);
    let main = status_of(t.pid, t.pid, "State:").unwrap();
    assert!(main.starts_with('t'), "the target is not stopped: {main}");
    let (addr, marker) = (t.get("marker_addr"), t.get("marker"));
    let h = std::thread::spawn(move || {
        assert_eq!(snap.read_u64(addr).unwrap(), marker);
        assert!(snap.is_frozen(addr..addr + 8));
        drop(snap);
    });
    h.join().unwrap();
    assert_free(t.pid);
    assert!(t.command("ping", "PONG").starts_with("PONG"));
    assert_undisturbed(&t.quit());
}

fn no_leftover_warning_for_a_target_that_died() {
    let mut t = Target::spawn(&["--heap-mib", "1"], &[]);
    let snap = Snapshot::capture(t.pid, &opts()).unwrap();
    let clone = snap.clone_pid().unwrap();
    t.child.kill().unwrap();
    // Not reaped yet: the target is a zombie (our child), its memory map empty.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status_of(t.pid, t.pid, "State:").is_some_and(|s| s.starts_with('Z')) {
        assert!(Instant::now() < deadline, "the target did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        snap.finish(),
        None,
        "a warning about a process that is gone"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{clone}/stat")).exists()
            || std::fs::read_to_string(format!("/proc/{clone}/stat")).is_ok_and(|s| s
                .rsplit(')')
                .next()
                .unwrap()
                .trim()
                .starts_with('Z')),
        "the clone still runs"
    );
}

fn vfork_thread_past_the_timeout_is_released_and_the_next_capture_succeeds() {
    let mut t = Target::spawn(&["--heap-mib", "1"], &[]);
    let vt = fields(&t.command("vfork 4000", "VFORK"))["tid"] as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !status_of(t.pid, vt, "State:").is_some_and(|s| s.starts_with('D')) {
        assert!(Instant::now() < deadline, "the vfork thread never waited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let short = Options {
        stop_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let started = Instant::now();
    match Snapshot::capture(t.pid, &short) {
        Err(Error::StopTimeout { tid, .. }) => assert_eq!(tid, vt),
        Err(e) => panic!("expected a stop timeout, got: {e}"),
        Ok(_) => panic!("the thread in vfork was stopped: the test did not test anything"),
    }
    assert!(
        status_of(t.pid, vt, "State:").is_some_and(|s| s.starts_with('D')),
        "the vfork ended before the capture gave up: no late thread was tested"
    );
    // Released already, although it has not stopped: nothing of the target is ours.
    assert_free(t.pid);
    // Once the vfork ends the thread runs on (and ends); the next capture succeeds.
    while tids(t.pid).contains(&vt) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the vfork thread never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let snap = Snapshot::capture(t.pid, &opts()).expect("the next capture");
    assert_eq!(snap.mode(), coreflect::Mode::Reflect);
    assert_eq!(snap.finish(), None);
    assert_free(t.pid);
    assert!(t.command("ping", "PONG").starts_with("PONG"));
    assert_undisturbed(&t.quit());
}

fn argv_environment_auxv_and_threads_equal_proc() {
    let t = Target::spawn(
        &["--heap-mib", "1"],
        &[("COREFLECT_LIB_TEST", "value with = and spaces")],
    );
    let snap = Snapshot::capture(t.pid, &opts()).unwrap();
    let proc_bytes = |what: &str| std::fs::read(format!("/proc/{}/{what}", t.pid)).unwrap();
    let argv: Vec<Vec<u8>> = snap.argv().iter().map(|a| a.as_bytes().to_vec()).collect();
    assert_eq!(argv, split_nul(&proc_bytes("cmdline")));
    assert_eq!(
        &argv[1..],
        &[b"target-arg-1".to_vec(), b"two words".to_vec()]
    );
    let env: Vec<Vec<u8>> = snap
        .environ()
        .iter()
        .map(|a| a.as_bytes().to_vec())
        .collect();
    assert_eq!(env, split_nul(&proc_bytes("environ")));
    assert_eq!(
        snap.env_var("COREFLECT_LIB_TEST").map(|v| v.as_bytes()),
        Some(&b"value with = and spaces"[..])
    );
    let raw = proc_bytes("auxv");
    let want: Vec<(u64, u64)> = raw
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_ne_bytes(c[..8].try_into().unwrap()),
                u64::from_ne_bytes(c[8..].try_into().unwrap()),
            )
        })
        .take_while(|e| e.0 != 0)
        .collect();
    let got: Vec<(u64, u64)> = snap.auxv().iter().map(|e| (e.key, e.value)).collect();
    assert_eq!(got, want);
    assert!(snap
        .auxv()
        .iter()
        .any(|e| e.name() == Some("AT_PAGESZ") && e.value == 4096));
    // Threads: names as /proc shows them, registers by name.
    assert_eq!(snap.threads().len(), tids(t.pid).len());
    assert_eq!(snap.threads()[0].tid(), t.pid);
    for th in snap.threads() {
        let comm =
            std::fs::read_to_string(format!("/proc/{}/task/{}/comm", t.pid, th.tid())).unwrap();
        assert_eq!(th.name(), comm.trim_end());
        assert_eq!(th.pc(), th.registers().rip);
        assert_eq!(th.registers().get("sp"), Some(th.sp()));
        assert!(
            snap.mappings()
                .iter()
                .any(|m| m.exec && th.pc() >= m.start && th.pc() < m.end),
            "thread {} pc {:#x} is not in executable memory",
            th.tid(),
            th.pc()
        );
    }
    let names: Vec<&str> = snap.threads().iter().map(|t| t.name()).collect();
    for n in ["spin", "read", "sleep", "condvar", "accept", "seq", "pause"] {
        assert!(names.contains(&n), "no thread {n} in {names:?}");
    }
    drop(snap);
    assert_free(t.pid);
}

fn eu_readelf_build_id(path: &str) -> Option<String> {
    let o = Command::new("eu-readelf")
        .args(["-n", path])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let i = text.find("Build ID:")?;
    Some(
        text[i + 9..]
            .split_whitespace()
            .next()?
            .to_ascii_lowercase(),
    )
}

fn build_ids_and_load_bias_match_eu_readelf_and_auxv() {
    let t = Target::spawn(&["--heap-mib", "1"], &[]);
    let snap = Snapshot::capture(t.pid, &opts()).unwrap();
    let mods = snap.modules();
    let mut compared = Vec::new();
    for m in mods.iter().filter(|m| m.path.starts_with('/')) {
        let want = eu_readelf_build_id(&m.path);
        assert_eq!(m.build_id_hex(), want, "build-id of {}", m.path);
        if want.is_some() {
            compared.push(m.path.clone());
        }
    }
    assert!(
        compared.iter().any(|p| p.contains("libc.so")),
        "libc's build-id was not compared: {compared:?} of {mods:?}"
    );
    assert!(compared.len() >= 2, "{compared:?}");
    assert!(
        mods.iter()
            .any(|m| m.path == "[vdso]" && m.build_id.is_some()),
        "no vDSO module with a build-id in {mods:?}"
    );
    // Load bias: the dynamic loader's is AT_BASE; the executable's is AT_ENTRY minus its
    // e_entry.
    let aux = |k: u64| snap.auxv().iter().find(|e| e.key == k).unwrap().value;
    let (at_base, at_entry) = (aux(7), aux(9));
    let ld = mods
        .iter()
        .find(|m| m.start == at_base)
        .expect("ld.so module");
    assert_eq!(ld.load_bias, at_base);
    let exe = std::fs::read_link(format!("/proc/{}/exe", t.pid)).unwrap();
    let exe_mod = mods
        .iter()
        .find(|m| std::path::Path::new(&m.path) == exe)
        .expect("executable module");
    let hdr = std::fs::read(&exe).unwrap();
    let e_entry = u64::from_le_bytes(hdr[24..32].try_into().unwrap());
    assert_eq!(exe_mod.load_bias, at_entry - e_entry);
    assert_eq!(
        snap.module_at(at_entry).map(|m| &m.path),
        Some(&exe_mod.path)
    );
    // The core's own view agrees with the module's header: the ELF magic is at start.
    assert_eq!(snap.read_vec(exe_mod.start, 4).unwrap(), b"\x7fELF");
}

fn frozen_and_live_ranges_are_reported() {
    let t = Target::spawn(
        &[
            "--heap-mib",
            "1",
            "--wipeonfork-kib",
            "64",
            "--dontfork-kib",
            "64",
        ],
        &[],
    );
    let snap = Snapshot::capture(t.pid, &opts()).unwrap();
    let (wof, dof) = (t.get("wof_addr"), t.get("dof_addr"));
    let (marker, pattern) = (t.get("marker_addr"), t.get("pattern_addr"));
    assert_eq!(snap.freshness(marker), Some(Freshness::Frozen));
    assert_eq!(snap.freshness(pattern), Some(Freshness::Frozen));
    assert_eq!(
        snap.freshness(wof),
        Some(Freshness::Live(LiveReason::WipeOnFork))
    );
    assert_eq!(
        snap.freshness(dof),
        Some(Freshness::Live(LiveReason::DontFork))
    );
    assert!(snap.is_frozen(marker..marker + 8));
    assert!(!snap.is_frozen(wof..wof + 16));
    assert!(!snap.is_frozen(0..8), "unmapped memory is not frozen");
    let parts = snap.freshness_of(wof..wof + 64 * 1024);
    assert_eq!(
        parts,
        vec![(
            wof..wof + 64 * 1024,
            Freshness::Live(LiveReason::WipeOnFork)
        )]
    );
    // Live memory holds the target's bytes (the clone's copy would be zeros / missing).
    assert_eq!(snap.read_u8(wof).unwrap(), 0xAB);
    assert_eq!(snap.read_u8(dof).unwrap(), 0xCD);
    for m in snap.mappings().iter().filter(|m| m.shared) {
        assert_eq!(
            snap.freshness(m.start),
            Some(Freshness::Live(LiveReason::Shared)),
            "{m:?}"
        );
    }
    assert_eq!(snap.freshness(0), None);
}

fn reads_are_typed_and_errors_name_the_address() {
    let t = Target::spawn(&["--heap-mib", "1"], &[]);
    let snap = Snapshot::capture(t.pid, &opts()).unwrap();
    let pattern = t.get("pattern_addr");
    // Unmapped: the error is ours and names the address.
    let e = snap.read_u64(0x10).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Memory {
                addr: 0x10,
                len: 8,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("0x10"), "{e}");
    // Across the end of a mapping into unmapped memory: short, then an error for exact.
    let m = snap
        .mappings()
        .iter()
        .zip(snap.mappings().iter().skip(1))
        .find(|(a, b)| a.end < b.start && a.read && !a.shared)
        .map(|(a, _)| a.clone())
        .expect("a mapping followed by a gap");
    let mut b = [0u8; 16];
    assert_eq!(snap.read_memory(m.end - 8, &mut b).unwrap(), 8);
    let e = snap.read_exact(m.end - 8, &mut b).unwrap_err();
    assert!(e.to_string().contains(&format!("{:#x}", m.end - 8)), "{e}");
    assert!(e.to_string().contains("only 8 bytes"), "{e}");
    // Typed reads and a Read + Seek view agree with the pattern.
    let p = |i: usize| coreflect_target::pattern_byte(i);
    assert_eq!(snap.read_u8(pattern + 7).unwrap(), p(7));
    assert_eq!(
        snap.read_u32(pattern + 8).unwrap(),
        u32::from_le_bytes([p(8), p(9), p(10), p(11)])
    );
    let mut v = snap.view(pattern..pattern + 4096);
    v.seek(SeekFrom::Start(1000)).unwrap();
    let mut buf = [0u8; 24];
    v.read_exact(&mut buf).unwrap();
    assert_eq!(buf.to_vec(), (1000..1024).map(p).collect::<Vec<u8>>());
    assert_eq!(v.seek(SeekFrom::End(-4)).unwrap(), 4092);
    let mut rest = Vec::new();
    v.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, (4092..4096).map(p).collect::<Vec<u8>>());
    // A compact Debug.
    let d = format!("{snap:?}");
    assert!(d.len() < 300 && d.contains(&t.pid.to_string()), "{d}");
}

fn library_messages_name_no_command_line_flags() {
    let errs = [
        Error::StopTimeout {
            pid: 1,
            tid: 2,
            millis: 3,
            state: "D".into(),
        },
        Error::ReflectUnavailable {
            pid: 1,
            reason: "x".into(),
        },
        Error::PauseTooLong {
            pid: 1,
            estimate_ms: 2.0,
            limit_ms: 1.0,
        },
        Error::Cancelled,
    ];
    for e in errs {
        let s = e.to_string();
        assert!(!s.contains("--") && !s.contains("no file"), "{s}");
    }
    // The output's own advice, which reads after the cause.
    let d = std::env::temp_dir().join(format!("coreflect-lib-msgs-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let paths = [std::path::PathBuf::new(), fifo, d.join("a\0b")];
    for p in &paths {
        let e = coreflect::output::OutputFile::create(p, true).unwrap_err();
        let s = e.with_causes();
        assert!(matches!(e, Error::Output { .. }), "{s}");
        assert!(!s.contains("--") && !s.contains("-o"), "{s}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

// ---- the runner ----

fn main() {
    if let Ok(args) = std::env::var(TARGET_ENV) {
        let args: Vec<String> = args.split_whitespace().map(String::from).collect();
        let o = coreflect_target::TargetOptions::parse(&args).expect("target options");
        coreflect_target::run(o);
    }
    let tests: &[(&str, fn())] = &[
        (
            "snapshot_moves_to_another_thread_and_reads_there",
            snapshot_moves_to_another_thread_and_reads_there,
        ),
        (
            "suspended_snapshot_ended_on_another_thread_releases_the_target",
            suspended_snapshot_ended_on_another_thread_releases_the_target,
        ),
        (
            "no_leftover_warning_for_a_target_that_died",
            no_leftover_warning_for_a_target_that_died,
        ),
        (
            "vfork_thread_past_the_timeout_is_released_and_the_next_capture_succeeds",
            vfork_thread_past_the_timeout_is_released_and_the_next_capture_succeeds,
        ),
        (
            "argv_environment_auxv_and_threads_equal_proc",
            argv_environment_auxv_and_threads_equal_proc,
        ),
        (
            "build_ids_and_load_bias_match_eu_readelf_and_auxv",
            build_ids_and_load_bias_match_eu_readelf_and_auxv,
        ),
        (
            "frozen_and_live_ranges_are_reported",
            frozen_and_live_ranges_are_reported,
        ),
        (
            "reads_are_typed_and_errors_name_the_address",
            reads_are_typed_and_errors_name_the_address,
        ),
        (
            "library_messages_name_no_command_line_flags",
            library_messages_name_no_command_line_flags,
        ),
    ];
    // libtest's arguments: NAME filters (substrings), `--exact`, `--skip NAME`, `--list`;
    // other flags (and the values of those that take one) are accepted and ignored.
    let (mut filters, mut skips, mut exact, mut list) = (Vec::new(), Vec::new(), false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => list = true,
            "--exact" => exact = true,
            "--skip" => skips.extend(args.next()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" | "--shuffle-seed" => {
                args.next();
            }
            _ if a.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    let matches = |name: &str, f: &String| {
        if exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, f) in tests {
        if (!filters.is_empty() && !filters.iter().any(|f| matches(name, f)))
            || skips.iter().any(|f| matches(name, f))
        {
            continue;
        }
        if list {
            println!("{name}: test");
            continue;
        }
        ran += 1;
        print!("test {name} ... ");
        std::io::stdout().flush().ok();
        match std::panic::catch_unwind(f) {
            Ok(()) => println!("ok"),
            Err(_) => {
                println!("FAILED");
                failed.push(*name);
            }
        }
    }
    if list {
        return;
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        std::process::exit(101);
    }
}
