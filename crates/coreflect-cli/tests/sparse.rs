//! Cost in proportion to resident memory: never-populated pages become holes of a sparse
//! file, yet every byte reads back right; and the pipelined writer writes exactly what the
//! simple one does.

mod common;

use common::*;
use coreflect::elf::reader::CoreFile;
use coreflect::elf::writer::{write_core, write_core_serial, StreamSink};
use coreflect::select::KernelPolicy;
use std::os::unix::fs::MetadataExt;

#[test]
fn sparse_target_dumps_small_and_reads_back() {
    let d = tmpdir("sparse");
    // 512 MiB reserved, one page in 32 touched (16 MiB).
    let t = Target::spawn(&[
        "--heap-mib",
        "1",
        "--sparse-reserve-mib",
        "512",
        "--sparse-touch-every",
        "32",
    ]);
    let core = d.join("s.core");
    let json = dump(t.pid, &core, &[]);
    let meta = std::fs::metadata(&core).unwrap();
    let base = t.get("sparse_addr");
    let len = t.get("sparse_len");
    assert!(meta.len() > len, "the file must span the reservation");
    let disk = meta.blocks() * 512;
    assert!(disk < 96 << 20, "{disk} bytes on disk for 16 MiB touched");
    assert!(json.num("unpopulated_bytes") > 400 << 20, "{}", json.0);
    let cf = CoreFile::open(&core).unwrap();
    let page = 4096;
    for k in [0u64, 1, 7, 100, 511] {
        let off = k * 32 * page;
        let v = cf.read(base + off, 8).unwrap().unwrap();
        assert_eq!(
            u64::from_le_bytes(v.try_into().unwrap()),
            off | 1,
            "touched page {k}"
        );
        let z = cf.read(base + off + page, 8).unwrap().unwrap();
        assert_eq!(z, [0u8; 8], "untouched page after {k}");
    }
    let out = gdb(
        &core,
        &[
            &format!("x/1xg {:#x}", base + 3 * 32 * page),
            &format!("x/1xg {:#x}", base + 5 * page),
        ],
    );
    assert!(
        out.contains(&format!("{:#018x}", (3 * 32 * page) | 1)),
        "{out}"
    );
    assert!(out.contains("0x0000000000000000"), "{out}");
    assert!(!out.contains("Cannot access memory"), "{out}");
    assert_undisturbed(&t.quit());
}

#[test]
fn file_backed_headers_and_data_are_kept() {
    let d = tmpdir("file-backed");
    let t = Target::spawn(&["--heap-mib", "1"]);
    let core = d.join("f.core");
    dump(t.pid, &core, &[]);
    let cf = CoreFile::open(&core).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let mut checked = 0;
    for l in maps
        .lines()
        .filter(|l| l.contains("libc.so") && l.split_whitespace().nth(2) == Some("00000000"))
    {
        let start = u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap();
        let h = cf
            .read(start, 4)
            .unwrap()
            .expect("libc's ELF header page in the core");
        assert_eq!(&h, b"\x7fELF");
        checked += 1;
    }
    assert!(checked > 0, "libc not found in {maps}");
    // The executable's .data (file-backed, private, written): the marker lives there.
    let m = cf.read(t.get("marker_addr"), 8).unwrap().unwrap();
    assert_eq!(u64::from_le_bytes(m.try_into().unwrap()), t.get("marker"));
    assert_undisturbed(&t.quit());
}

/// The three ways to write a core — serial reads, pipelined reads, the clone writing its
/// own memory — give the same bytes.
#[test]
fn the_three_writers_give_the_same_bytes() {
    let d = tmpdir("writers");
    let t = Target::spawn(&[
        "--heap-mib",
        "24",
        "--sparse-reserve-mib",
        "64",
        "--sparse-touch-every",
        "3",
        "--wipeonfork-kib",
        "64",
    ]);
    let opts = coreflect::Options {
        write_path: coreflect::write_path::WritePath::Pwrite,
        ..Default::default()
    };
    let snap = coreflect::Snapshot::capture(t.pid, &opts).unwrap();
    let policy = KernelPolicy::default();
    let segs = snap.plan(&policy);
    let notes = snap.notes();
    // Reading first (it leaves the clone untouched), the clone writing itself last.
    let mut a = StreamSink::new(Vec::new());
    let sa = write_core(&mut a, &notes, &segs, &snap, &mut |_, _| true).unwrap();
    let mut b = StreamSink::new(Vec::new());
    let sb = write_core_serial(&mut b, &notes, &segs, &snap, &mut |_, _| true).unwrap();
    let path = d.join("direct.core");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let sd = snap
        .write_core_file(&file, &policy, &mut |_, _| true)
        .unwrap();
    let (a, b, c) = (
        a.into_inner(),
        b.into_inner(),
        std::fs::read(&path).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    assert!(a == b, "the pipelined core differs from the serial one");
    assert_eq!(c.len(), b.len());
    let diff: Vec<usize> = (0..c.len()).filter(|&i| c[i] != b[i]).take(16).collect();
    assert!(
        diff.is_empty(),
        "the clone's own writes differ from reading it at {diff:?}"
    );
    assert_eq!(sa.bytes_written, sb.bytes_written);
    assert_eq!(sa.unpopulated_bytes, sb.unpopulated_bytes);
    assert_eq!(sd.unpopulated_bytes, sb.unpopulated_bytes);
    assert!(
        sa.unpopulated_bytes > 0,
        "the sparse region was not skipped"
    );
    assert!(
        sd.written_by_clone > 24 << 20,
        "the clone wrote nothing: {sd:?}"
    );
    drop(snap);
    assert!(children(t.pid).is_empty());
    assert_undisturbed(&t.quit());
}

/// The memory cgroup directory of a process (cgroup v1 `memory` or v2), if mounted here.
fn memcg_dir(pid: &str) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in text.lines() {
        let mut it = l.splitn(3, ':');
        let (_, ctrl, path) = (it.next()?, it.next()?, it.next()?);
        if ctrl.split(',').any(|c| c == "memory") {
            return Some(format!("/sys/fs/cgroup/memory{path}").into());
        }
    }
    None
}

#[test]
fn the_clone_leaves_the_targets_cgroup_before_writing() {
    if !is_root() {
        eprintln!("skipped: needs root to make a cgroup");
        return;
    }
    let Some(ours) = memcg_dir("self") else {
        eprintln!("skipped: no cgroup v1 memory hierarchy here");
        return;
    };
    let theirs = ours.join(format!("coreflect-test-{}", std::process::id()));
    if std::fs::create_dir(&theirs).is_err() {
        eprintln!("skipped: cannot create {}", theirs.display());
        return;
    }
    let d = tmpdir("cgroup");
    let t = Target::spawn(&["--heap-mib", "8"]);
    std::fs::write(theirs.join("cgroup.procs"), t.pid.to_string()).unwrap();
    let json = dump(t.pid, &d.join("c.core"), &["--write-path", "splice"]);
    // The clone spliced its memory: it could be moved out of the target's cgroup.
    assert!(json.num("spliced_bytes") > 8 << 20, "{}", json.0);
    assert_eq!(
        memcg_dir(&t.pid.to_string()).as_deref(),
        Some(theirs.as_path())
    );
    assert!(children(t.pid).is_empty());
    assert_undisturbed(&t.quit());
    let _ = std::fs::remove_dir(&theirs);
}
