//! Cost in proportion to resident memory: never-populated pages become holes of a sparse
//! file, yet every byte reads back right; the library's tests
//! (crates/coreflect/tests) check that the writers agree byte for byte.

mod common;

use common::*;
use coreflect::elf::reader::CoreFile;
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

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid system), from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(Into::into))?
    })
}

/// The cgroup directory of a process in one hierarchy: `"memory"` (cgroup v1's memory
/// controller) or `""` (cgroup v2), if that hierarchy is mounted here.
fn cgroup_dir(pid: &str, hierarchy: &str) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in text.lines() {
        let mut it = l.splitn(3, ':');
        let (id, ctrl, path) = (it.next()?, it.next()?, it.next()?);
        let path = path.trim_start_matches('/');
        if hierarchy.is_empty() && id == "0" && ctrl.is_empty() {
            return Some(cgroup2_mount()?.join(path));
        }
        if !hierarchy.is_empty() && ctrl.split(',').any(|c| c == hierarchy) {
            let d = std::path::Path::new("/sys/fs/cgroup").join(hierarchy);
            return d.join("cgroup.procs").exists().then(|| d.join(path));
        }
    }
    None
}

#[test]
fn the_clone_leaves_the_targets_cgroup_before_writing() {
    let test = "the_clone_leaves_the_targets_cgroup_before_writing";
    if !require_root(test, "to make a cgroup") {
        return;
    }
    let mut tried = Vec::new();
    for (label, hierarchy) in [("cgroup v2", ""), ("cgroup v1 memory", "memory")] {
        let Some(ours) = cgroup_dir("self", hierarchy) else {
            continue;
        };
        let theirs = ours.join(format!("coreflect-test-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&theirs) {
            panic!("{label}: cannot create {}: {e}", theirs.display());
        }
        tried.push(label);
        let d = tmpdir("cgroup");
        let t = Target::spawn(&["--heap-mib", "8"]);
        std::fs::write(theirs.join("cgroup.procs"), t.pid.to_string()).unwrap();
        assert_eq!(
            cgroup_dir(&t.pid.to_string(), hierarchy).as_deref(),
            Some(theirs.as_path()),
            "{label}: the target was not moved"
        );
        let json = dump(t.pid, &d.join("c.core"), &["--write-path", "splice"]);
        // The clone spliced its memory: it could be moved out of the target's cgroup.
        assert!(json.num("spliced_bytes") > 8 << 20, "{label}: {}", json.0);
        assert_eq!(
            cgroup_dir(&t.pid.to_string(), hierarchy).as_deref(),
            Some(theirs.as_path()),
            "{label}: the target left its cgroup"
        );
        assert!(children(t.pid).is_empty());
        assert_undisturbed(&t.quit());
        std::fs::remove_dir(&theirs)
            .unwrap_or_else(|e| panic!("{label}: remove {}: {e}", theirs.display()));
    }
    if tried.is_empty() {
        skip(
            test,
            "neither cgroup v2 nor the cgroup v1 memory controller is mounted",
        );
    }
    eprintln!("{test}: ran with {}", tried.join(", "));
}
