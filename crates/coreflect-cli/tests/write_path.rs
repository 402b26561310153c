//! The zero-copy write path (the clone vmsplices, coreflect splices into the core opened
//! O_DIRECT, the clone releases what it handed over) and its fallbacks: every path gives
//! the bytes the read path gives, on every kind of output.

mod common;

use common::*;
use coreflect::elf::reader::CoreFile;
use coreflect::elf::writer::{write_core, StreamSink, WriteStats};
use coreflect::select::KernelPolicy;
use coreflect::write_path::WritePath;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tests here run one at a time: one of them counts the test process's files.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fds(pid: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

/// One snapshot of `t`: the read path into memory first (it leaves the clone untouched),
/// then `path` into a new file in `dir`; the two must be byte for byte the same.
fn same_bytes(t: &Target, path: WritePath, dir: &Path) -> (WriteStats, PathBuf) {
    let opts = coreflect::Options {
        write_path: path,
        ..Default::default()
    };
    let snap = coreflect::Snapshot::capture(t.pid, &opts).unwrap();
    let policy = KernelPolicy::default();
    let segs = snap.plan(&policy);
    let notes = snap.notes();
    let mut a = StreamSink::new(Vec::new());
    let sa = write_core(&mut a, &notes, &segs, &snap, &mut |_, _| true).unwrap();
    let out = dir.join(format!("{}.core", path.as_str()));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&out)
        .unwrap();
    let st = snap
        .write_core_file(&file, &policy, &mut |_, _| true)
        .unwrap();
    drop(file);
    assert!(snap.finish().is_none());
    let (a, b) = (a.into_inner(), std::fs::read(&out).unwrap());
    assert_eq!(a.len(), b.len(), "{st:?}");
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).take(16).collect();
    assert!(
        diff.is_empty(),
        "{} path ({}) differs from the read path at {diff:?}",
        path.as_str(),
        st.path.used
    );
    assert_eq!(st.unpopulated_bytes, sa.unpopulated_bytes, "{st:?}");
    (st, out)
}

fn target() -> Target {
    Target::spawn(&[
        "--heap-mib",
        "24",
        "--sparse-reserve-mib",
        "64",
        "--sparse-touch-every",
        "3",
        "--wipeonfork-kib",
        "64",
        "--protnone-kib",
        "256",
    ])
}

/// The PROT_NONE region's bytes are in the core (read with FOLL_FORCE by the read path).
fn check_protnone(t: &Target, core: &Path) {
    let cf = CoreFile::open(core).unwrap();
    let at = t.get("protnone_addr");
    let len = t.get("protnone_len");
    for off in [0, len / 2, len - 8] {
        let v = cf.read(at + off, 8).unwrap().expect("PROT_NONE bytes");
        assert_eq!(v, [0xEF; 8], "PROT_NONE region at +{off}");
    }
}

#[test]
fn splice_into_odirect_gives_the_read_paths_bytes_and_leaves_no_fd() {
    let _serial = serial();
    let d = tmpdir("wp-direct");
    let t = target();
    let ours = fds("self");
    let theirs = fds(&t.pid.to_string());
    let (st, core) = same_bytes(&t, WritePath::Splice, &d);
    assert_eq!(st.path.used, "splice+direct", "{st:?}");
    assert!(st.path.spliced_bytes > 24 << 20, "{st:?}");
    // The PROT_NONE run went through the read path, run by run.
    assert!(
        st.path.read_runs >= 1 && st.path.read_bytes >= 256 << 10,
        "{st:?}"
    );
    // A library write leaves the snapshot readable: nothing is released (the CLI's
    // final write releases: release_behind_frees_the_clones_memory_as_the_dump_advances).
    assert_eq!(st.path.released_bytes, 0, "{st:?}");
    check_protnone(&t, &core);
    assert_eq!(fds("self"), ours, "coreflect kept a file open");
    assert_eq!(
        fds(&t.pid.to_string()),
        theirs,
        "the target's files changed"
    );
    assert!(children(t.pid).is_empty());
    assert_undisturbed(&t.quit());
}

#[test]
fn read_and_pwrite_paths_give_the_same_bytes() {
    let _serial = serial();
    let d = tmpdir("wp-read");
    let t = target();
    let (st, core) = same_bytes(&t, WritePath::Read, &d);
    assert_eq!(st.path.used, "read");
    check_protnone(&t, &core);
    let (st, _) = same_bytes(&t, WritePath::Pwrite, &d);
    assert_eq!(st.path.used, "pwrite");
    assert_undisturbed(&t.quit());
}

#[test]
fn splice_on_tmpfs_gives_the_same_bytes() {
    let _serial = serial();
    let d = PathBuf::from(format!("/dev/shm/coreflect-test-{}", std::process::id()));
    if std::fs::create_dir_all(&d).is_err() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let t = target();
    let (st, _) = same_bytes(&t, WritePath::Auto, &d);
    assert!(st.path.used.starts_with("splice"), "{st:?}");
    assert_undisturbed(&t.quit());
    let _ = std::fs::remove_dir_all(&d);
}

/// A ramfs mount, removed when dropped.
struct Ramfs(PathBuf);

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn odirect_refused_falls_back_to_buffered_splice() {
    let _serial = serial();
    if !is_root() {
        eprintln!("skipped: mounting ramfs needs root");
        return;
    }
    let dir = tmpdir("wp-ramfs").join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount ramfs here");
        return;
    }
    let m = Ramfs(dir.clone());
    // ramfs has no direct I/O: opening O_DIRECT is refused.
    let t = target();
    let (st, core) = same_bytes(&t, WritePath::Auto, &m.0);
    assert_eq!(st.path.used, "splice+buffered", "{st:?}");
    assert!(st.path.fallback.contains("O_DIRECT"), "{st:?}");
    assert!(st.path.spliced_bytes > 24 << 20, "{st:?}");
    check_protnone(&t, &core);
    // And through the CLI: the report says so.
    let json = dump(t.pid, &m.0.join("cli.core"), &[]);
    assert_eq!(
        json.get("used").as_deref(),
        Some("splice+buffered"),
        "{}",
        json.0
    );
    assert_undisturbed(&t.quit());
}

fn kib(pid: i32, key: &str) -> u64 {
    status_field(pid, key)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

/// Starts `coreflect dump` set to stall at `pct` % of the memory; returns it, once stalled,
/// with the clone and a thread collecting the rest of its stderr.
fn dump_stalled(
    t: &Target,
    out: &Path,
    resume: &Path,
    pct: u32,
) -> (std::process::Child, i32, std::thread::JoinHandle<String>) {
    let mut child = Command::new(exe())
        .args(["dump", &t.pid.to_string(), "-o"])
        .arg(out)
        .args(["--json", "--write-path", "splice"])
        .env("COREFLECT_TEST_STALL_AT", pct.to_string())
        .env("COREFLECT_TEST_RESUME", resume)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains(&format!("test stall at {pct}%")), "{line}");
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let kids = children(t.pid);
    assert_eq!(kids.len(), 1, "one clone expected: {kids:?}");
    (child, kids[0], rest)
}

#[test]
fn release_behind_frees_the_clones_memory_as_the_dump_advances() {
    let _serial = serial();
    let d = tmpdir("wp-release");
    let t = Target::spawn(&["--heap-mib", "96", "--seq-pages", "1"]);
    let resume = d.join("resume");
    let out = d.join("r.core");
    let target_anon = kib(t.pid, "RssAnon");
    let (child, clone, _err) = dump_stalled(&t, &out, &resume, 50);
    let clone_anon = kib(clone, "RssAnon");
    // Half of the memory is on disk and dropped by the clone.
    assert!(
        clone_anon * 10 < target_anon * 7,
        "clone RssAnon {clone_anon} KiB, target {target_anon} KiB"
    );
    // The clone holds our pipes and nothing else (none of the target's files).
    let cfds = fds(&clone.to_string());
    assert!(
        !cfds.is_empty() && cfds.iter().all(|f| f.starts_with("pipe:")),
        "{cfds:?}"
    );
    std::fs::write(&resume, "").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let json = Json(String::from_utf8(o.stdout).unwrap());
    assert_eq!(
        json.get("used").as_deref(),
        Some("splice+direct"),
        "{}",
        json.0
    );
    assert!(json.num("released_bytes") > 90 << 20, "{}", json.0);
    let cf = CoreFile::open(&out).unwrap();
    let (p, len) = (t.get("pattern_addr"), t.get("pattern_len"));
    let bytes = cf.read(p, len as usize).unwrap().unwrap();
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == coreflect_target::pattern_byte(i)),
        "the heap pattern is not intact in the core"
    );
    assert!(children(t.pid).is_empty());
    assert_undisturbed(&t.quit());
}

#[test]
fn a_clone_killed_mid_splice_fails_the_dump_and_keeps_nothing() {
    let _serial = serial();
    let d = tmpdir("wp-kill");
    let t = Target::spawn(&["--heap-mib", "64"]);
    let resume = d.join("resume");
    let out = d.join("k.core");
    let (child, clone, err) = dump_stalled(&t, &out, &resume, 50);
    // SAFETY: kill has no memory effects; `clone` is the target's only child, the clone.
    unsafe { libc::kill(clone, libc::SIGKILL) };
    std::fs::write(&resume, "").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = err.join().unwrap();
    assert!(err.contains("clone"), "{err}");
    assert!(!out.exists(), "a partial core was left");
    assert!(std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .all(|e| e.file_name() == "resume"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !children(t.pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(children(t.pid).is_empty(), "the clone was not reaped");
    let mut t = t;
    assert!(t.ping());
    assert_undisturbed(&t.quit());
}
