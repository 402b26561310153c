//! The torture suite: coreflect must never harm a target, under random kills, a target that
//! changes under the dump, concurrency, soak, and hostile input.
//!
//! CI runs the short mode (part of `cargo test --workspace`). The long mode, for manual runs:
//!
//! ```sh
//! COREFLECT_TORTURE=long cargo test --release -p coreflect-cli --test torture -- --nocapture --test-threads 1
//! ```
//!
//! `COREFLECT_TORTURE_SEED=<n>` replays a run's random delays; every run prints its seed.

mod common;

use common::*;
use coreflect::elf::reader::{thread_ids, CoreFile};
use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The torture tests run one at a time: the soak measures this process's own fds and
/// memory, and the others would disturb each other's timing.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn long() -> bool {
    std::env::var("COREFLECT_TORTURE").is_ok_and(|v| v == "long")
}

/// A small seeded generator (xorshift64*), so runs can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("COREFLECT_TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{test}: seed {seed} (replay with COREFLECT_TORTURE_SEED={seed})");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn live_children(pid: i32) -> Vec<(i32, char)> {
    children(pid)
        .into_iter()
        .filter_map(|c| {
            let s = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            Some((c, s.rsplit(')').next()?.trim().chars().next()?))
        })
        .filter(|(_, st)| *st != 'Z')
        .collect()
}

/// A file at the output path must be a complete core.
fn assert_complete_or_absent(path: &Path, threads: usize) {
    if !path.exists() {
        return;
    }
    let cf = CoreFile::open(path).expect("a file was left that is not an ELF core");
    let notes = cf.notes().expect("its notes do not parse");
    assert_eq!(
        thread_ids(&notes).len(),
        threads,
        "a core with missing threads was left"
    );
    let end = cf.loads().map(|p| p.offset + p.filesz).max().unwrap_or(0);
    assert!(
        end <= cf.len,
        "a truncated core was left ({end} > {})",
        cf.len
    );
}

#[test]
fn random_kills_never_harm_the_target() {
    let _serial = serial();
    let trials = if long() { 200 } else { 20 };
    let heap = if long() { "1024" } else { "512" };
    let mut rng = Rng::from_env("random_kills");
    let d = tmpdir("torture-kills");
    let mut t = Target::spawn(&["--heap-mib", heap, "--seq-pages", "64"]);
    let threads = t.threads();
    // How long a whole dump takes here (the shortest of three): the kills are spread over
    // it, so most land while the dump is still running.
    let out = d.join("probe.core");
    let mut span = u64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        dump(t.pid, &out, &[]);
        span = span.min(t0.elapsed().as_micros() as u64);
        std::fs::remove_file(&out).unwrap();
    }
    eprintln!("random_kills: a whole dump takes {span} µs; kills fall uniformly in it");
    let mut completed = 0;
    for trial in 0..trials {
        let delay = rng.below(span);
        let out = d.join("trial.core");
        let mut c = Command::new(exe())
            .args([
                "dump",
                &t.pid.to_string(),
                "-o",
                out.to_str().unwrap(),
                "-q",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(delay));
        let _ = c.kill();
        let _ = c.wait();
        assert!(
            wait_no_dumper(t.pid, Duration::from_secs(20)),
            "trial {trial} (kill after {delay} µs): the dump process did not finish"
        );
        assert!(
            t.ping(),
            "trial {trial} (kill after {delay} µs): the target stopped answering"
        );
        assert_free(t.pid);
        assert_eq!(t.threads(), threads, "trial {trial}: thread count changed");
        assert!(
            live_children(t.pid).is_empty(),
            "trial {trial}: a clone is running"
        );
        assert_complete_or_absent(&out, threads);
        if out.exists() {
            completed += 1;
            std::fs::remove_file(&out).unwrap();
        }
        let leftovers: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "trial {trial}: files left: {leftovers:?}"
        );
    }
    eprintln!("random_kills: {trials} kills, {completed} dumps had completed before the kill");
    let out = d.join("final.core");
    let json = dump(t.pid, &out, &[]);
    assert_eq!(json.get("mode").as_deref(), Some("reflect"));
    assert!(
        children(t.pid).is_empty(),
        "children left after the final dump"
    );
    assert_undisturbed(&t.quit());
}

/// Runs a dump with a time bound; returns (exit ok, stderr).
fn bounded_dump(pid: i32, out: &Path, mode: &str, limit: Duration) -> (bool, String) {
    let mut c = Command::new(exe())
        .args([
            "dump",
            &pid.to_string(),
            "-o",
            out.to_str().unwrap(),
            "--overwrite",
            "-q",
            "--mode",
            mode,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (st.success(), err);
        }
        assert!(
            Instant::now() < end,
            "coreflect dump of {pid} hung for {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn target_changing_under_the_dump() {
    let _serial = serial();
    let rounds = if long() { 20 } else { 3 };
    let d = tmpdir("torture-changes");
    for mode_args in [
        &["--churn-threads"][..],
        &["--churn-maps"],
        &["--fork-loop"],
    ] {
        let mut args = vec!["--heap-mib", "16"];
        args.extend_from_slice(mode_args);
        let mut t = Target::spawn(&args);
        for r in 0..rounds {
            for mode in ["auto", "suspend"] {
                let out = d.join("c.core");
                let (ok, err) = bounded_dump(t.pid, &out, mode, Duration::from_secs(60));
                assert!(ok, "{mode_args:?} round {r} {mode}: {err}");
                let cf = CoreFile::open(&out).unwrap();
                assert!(!thread_ids(&cf.notes().unwrap()).is_empty());
                let (readelf_ok, txt) = run_tool("eu-readelf", &["-n", out.to_str().unwrap()]);
                assert!(readelf_ok && txt.contains("PRSTATUS"), "{txt}");
                t.assert_free();
            }
        }
        let gdb_out = gdb(&d.join("c.core"), &["info threads", "bt"]);
        assert!(gdb_out.contains("LWP"), "{gdb_out}");
        assert!(t.ping());
        let stats = t.quit();
        assert_eq!(stats["read_eintr"], 0);
        assert_eq!(stats["short_sleep"], 0);
        if mode_args != ["--fork-loop"] {
            // (the fork loop's own children send it SIGCHLD)
            assert_eq!(stats["sigchld"], 0, "{mode_args:?}: {stats:?}");
        }
    }
    // A target that exits, and one that execs, in the middle of repeated dumps.
    for how in ["--exit-after-ms", "--exec-after-ms"] {
        let t = Target::spawn(&["--heap-mib", "64", how, "700"]);
        let pid = t.pid;
        let start = Instant::now();
        let mut outcomes = HashMap::new();
        while start.elapsed() < Duration::from_secs(2) {
            let out = d.join("x.core");
            let (ok, err) = bounded_dump(pid, &out, "auto", Duration::from_secs(60));
            if ok {
                CoreFile::open(&out).expect("a successful dump must leave a core");
                *outcomes.entry("ok".to_string()).or_insert(0) += 1;
            } else {
                assert_eq!(err.lines().count(), 1, "one clear error line: {err}");
                assert!(err.starts_with("coreflect: error: "), "{err}");
                *outcomes.entry(err.trim().to_string()).or_insert(0) += 1;
            }
            if alive(pid) {
                assert_free(pid);
            }
        }
        eprintln!("{how}: {outcomes:?}");
        assert!(
            outcomes.get("ok").copied().unwrap_or(0) > 0,
            "{how}: no dump succeeded"
        );
        if how == "--exec-after-ms" {
            assert!(alive(pid), "the exec'd target died");
            assert_free(pid);
            assert!(live_children(pid).is_empty());
        }
        drop(t);
    }
}

fn fd_count(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn soak_many_snapshots_leak_nothing() {
    let _serial = serial();
    let n = if long() { 1000 } else { 100 };
    let mut t = Target::spawn(&["--heap-mib", "4"]);
    let tp = t.pid.to_string();
    let policy = coreflect::select::KernelPolicy::default();
    let one = |i: usize| {
        let snap = coreflect::Snapshot::capture(t.pid, &coreflect::Options::default())
            .unwrap_or_else(|e| panic!("snapshot {i}: {e}"));
        assert_eq!(snap.mode(), coreflect::Mode::Reflect);
        let mut sink = coreflect::elf::writer::StreamSink::new(std::io::sink());
        snap.write_core(&mut sink, &policy, &mut |_, _| true)
            .unwrap();
        assert_eq!(snap.finish(), None);
    };
    for i in 0..10 {
        one(i);
    }
    let (t_fds, t_threads, t_rss) = (fd_count(&tp), t.threads(), rss_kb(&tp));
    let (my_fds, my_rss) = (fd_count("self"), rss_kb("self"));
    for i in 10..n / 2 {
        one(i);
    }
    // The allocator may keep the writer's buffers (2 readers × 2 × 8 MiB) once they are
    // in use: bounded, not a leak. A leak shows as growth over the second half.
    let half_rss = rss_kb("self");
    for i in n / 2..n {
        one(i);
    }
    assert_eq!(fd_count(&tp), t_fds, "the target's fd count changed");
    assert_eq!(t.threads(), t_threads, "the target's thread count changed");
    assert!(
        rss_kb(&tp) < t_rss + 4096,
        "the target's RSS grew: {t_rss} -> {} KiB",
        rss_kb(&tp)
    );
    assert!(children(t.pid).is_empty(), "children left");
    assert_eq!(fd_count("self"), my_fds, "the dumper leaks fds");
    let end_rss = rss_kb("self");
    assert!(
        end_rss < my_rss + 40 * 1024,
        "the dumper's RSS is not bounded: {my_rss} -> {end_rss} KiB"
    );
    assert!(
        end_rss < half_rss + 4096,
        "the dumper's RSS grew over the second half: {half_rss} -> {end_rss} KiB"
    );
    eprintln!(
        "soak: {n} snapshots; target rss {t_rss}->{} KiB, dumper rss {my_rss}->{half_rss}->{end_rss} KiB",
        rss_kb(&tp)
    );
    assert!(t.ping());
    assert_undisturbed(&t.quit());
}

#[test]
fn two_dumpers_at_once() {
    let _serial = serial();
    let rounds = if long() { 20 } else { 4 };
    let d = tmpdir("torture-concurrent");
    let t = Target::spawn(&["--heap-mib", "64"]);
    for r in 0..rounds {
        let modes = if r % 2 == 0 {
            ["auto", "auto"]
        } else {
            ["suspend", "auto"]
        };
        let spawn = |i: usize, mode: &str| {
            Command::new(exe())
                .args([
                    "dump",
                    &t.pid.to_string(),
                    "-o",
                    d.join(format!("{i}.core")).to_str().unwrap(),
                    "-q",
                    "--overwrite",
                    "--mode",
                    mode,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let a = spawn(0, modes[0]);
        let b = spawn(1, modes[1]);
        let oa = a.wait_with_output().unwrap();
        let ob = b.wait_with_output().unwrap();
        for (o, i) in [(&oa, 0), (&ob, 1)] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() || err.contains("already being dumped"),
                "round {r} dumper {i} ({}): {err}",
                modes[i]
            );
        }
        assert!(
            oa.status.success() || ob.status.success(),
            "round {r}: both failed"
        );
        t.assert_free();
        assert!(children(t.pid).is_empty(), "round {r}: children left");
    }
    assert_undisturbed(&t.quit());
}

#[test]
fn security_files_are_private_and_non_dumpable_targets_refused() {
    let _serial = serial();
    if !require_root(
        "security_files_are_private_and_non_dumpable_targets_refused",
        "to switch users",
    ) {
        return;
    }
    let d = tmpdir("torture-security");
    std::fs::set_permissions(&d, PermissionsExt::from_mode(0o777)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(exe())
            .args(args);
        c
    };
    // A target of another user, dumped by that user: 0600 and owned by them.
    let (mut child, _) = spawn_first_line(&mut as_nobody(&["__target", "--heap-mib", "1"]));
    let pid = child.id().to_string();
    let out = d.join("mine.core");
    let o = as_nobody(&["dump", &pid, "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("permission denied") {
        eprintln!("skipped the same-user part: ptrace between same-user processes is not allowed here: {err}");
    } else {
        assert!(o.status.success(), "{err}");
        let m = std::fs::metadata(&out).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(m.uid(), 65534, "the core must belong to the invoking user");
    }
    let _ = child.kill();
    let _ = child.wait();

    // A non-dumpable target of the same user is refused, with the reason.
    let (mut child, _) = spawn_first_line(&mut as_nobody(&[
        "__target",
        "--heap-mib",
        "1",
        "--non-dumpable",
    ]));
    let pid = child.id().to_string();
    let out = d.join("nd.core");
    let o = as_nobody(&["dump", &pid, "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("not dumpable") && err.contains("CAP_SYS_PTRACE"),
        "{err}"
    );
    assert!(!out.exists());
    // Root may, and the file is still private.
    let o = coreflect(&["dump", &pid, "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn traced_by_gdb_is_refused_cleanly() {
    let _serial = serial();
    let d = tmpdir("torture-gdb");
    let mut t = Target::spawn(&["--heap-mib", "1"]);
    let mut g = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-p",
            &t.pid.to_string(),
            "-ex",
            "shell sleep 3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gdb");
    // Wait until gdb has attached.
    let end = Instant::now() + Duration::from_secs(20);
    while status_field(t.pid, "TracerPid") == "0" {
        assert!(Instant::now() < end, "gdb did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d.join("x.core");
    let o = coreflect(&["dump", &t.pid.to_string(), "-o", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("already traced by pid") && err.contains("gdb"),
        "{err}"
    );
    assert!(!out.exists());
    let _ = g.wait();
    assert!(t.ping());
    t.assert_free();
}
