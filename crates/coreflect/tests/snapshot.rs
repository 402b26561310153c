//! The library's own API on real processes: `Snapshot`, the core writers, the selection
//! policy and the core reader.

mod common;

use common::*;
use coreflect::elf::reader::{thread_ids, CoreFile};
use coreflect::elf::types::{ElfPrpsinfo, ElfPrstatus, Pod};
use coreflect::elf::writer::{write_core, write_core_serial, StreamSink};
use coreflect::elf::{NT_PRPSINFO, NT_PRSTATUS};
use coreflect::select::KernelPolicy;
use std::path::Path;
use std::time::Duration;

target_entry!();

#[test]
fn snapshot_api_reads_the_frozen_image_while_the_target_runs() {
    let mut t = Target::spawn(&["--heap-mib", "2", "--seq-pages", "64"]);
    let snap = coreflect::Snapshot::capture(t.pid, &coreflect::Options::default()).unwrap();
    assert_eq!(snap.mode(), coreflect::Mode::Reflect);
    assert_eq!(snap.threads().len(), t.threads());
    let clone = snap.clone_pid().unwrap();
    let st = std::fs::read_to_string(format!("/proc/{clone}/stat")).unwrap();
    assert!(
        st.rsplit(')').next().unwrap().trim().starts_with('t'),
        "clone not stopped: {st}"
    );
    // The target runs while the snapshot stays frozen.
    assert!(t.ping());
    let mut b = [0u8; 8];
    assert_eq!(snap.read_memory(t.get("marker_addr"), &mut b).unwrap(), 8);
    assert_eq!(u64::from_le_bytes(b), t.get("marker"));
    let seq = t.get("seq_addr");
    let mut first = [0u8; 8];
    snap.read_memory(seq, &mut first).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut again = [0u8; 8];
    snap.read_memory(seq, &mut again).unwrap();
    assert_eq!(first, again, "the snapshot changed while the target ran");
    // A core into any writer.
    let mut sink = StreamSink::new(Vec::new());
    let stats = snap
        .write_core(&mut sink, &KernelPolicy::default(), &mut |_, _| true)
        .unwrap();
    let bytes = sink.into_inner();
    assert_eq!(bytes.len() as u64, stats.file_size);
    assert_eq!(&bytes[..4], b"\x7fELF");
    drop(snap);
    assert!(
        !Path::new(&format!("/proc/{clone}")).exists(),
        "clone still exists"
    );
    assert!(t.children().is_empty());
    t.assert_free();
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
    assert!(t.children().is_empty());
    assert_undisturbed(&t.quit());
    let _ = std::fs::remove_dir_all(&d);
}

/// `SigBlk:` of one thread, from /proc.
fn blocked(pid: i32, tid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let v = s
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .expect("SigBlk in status");
    u64::from_str_radix(v.trim(), 16).unwrap()
}

/// What the reader finds in a written core is what the snapshot holds: one `NT_PRSTATUS`
/// per thread with its own blocked mask, the process in `NT_PRPSINFO`, one `PT_LOAD` per
/// mapping of the plan.
#[test]
fn the_reader_finds_what_the_writer_wrote() {
    let d = tmpdir("reader");
    let t = Target::spawn(&["--heap-mib", "2", "--signal-masks"]);
    let snap = coreflect::Snapshot::capture(t.pid, &coreflect::Options::default()).unwrap();
    let path = d.join("c.core");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let policy = KernelPolicy::default();
    snap.write_core_file(&file, &policy, &mut |_, _| true)
        .unwrap();
    let plan = snap.plan(&policy);
    let tids: Vec<i32> = snap.threads().iter().map(|t| t.tid()).collect();
    drop(snap);

    let core = CoreFile::open(&path).unwrap();
    let notes = core.notes().unwrap();
    assert_eq!(thread_ids(&notes), tids);
    let loads: Vec<(u64, u64, u64)> = core.loads().map(|p| (p.vaddr, p.memsz, p.filesz)).collect();
    let planned: Vec<(u64, u64, u64)> = plan.iter().map(|s| (s.vaddr, s.memsz, s.filesz)).collect();
    assert_eq!(loads, planned);
    let mut masks = std::collections::BTreeSet::new();
    for n in notes.iter().filter(|n| n.ntype == NT_PRSTATUS) {
        let p = ElfPrstatus::from_bytes(&n.desc).unwrap();
        // The masks do not change while the target runs: /proc shows the same now.
        assert_eq!(
            p.pr_sighold,
            blocked(t.pid, p.pr_pid),
            "thread {}",
            p.pr_pid
        );
        masks.insert(p.pr_sighold);
    }
    assert!(masks.len() > 8, "distinct masks expected: {masks:x?}");
    let ps = notes.iter().find(|n| n.ntype == NT_PRPSINFO).unwrap();
    let ps = ElfPrpsinfo::from_bytes(&ps.desc).unwrap();
    assert_eq!(ps.pr_pid, t.pid);
    // The marker reads back from the core.
    let m = core.read(t.get("marker_addr"), 8).unwrap().unwrap();
    assert_eq!(u64::from_le_bytes(m.try_into().unwrap()), t.get("marker"));
    t.assert_free();
    assert_undisturbed(&t.quit());
    let _ = std::fs::remove_dir_all(&d);
}

/// The library's example (`cargo test -p coreflect` builds it next to this test).
#[test]
fn example_snapshot_prints_threads_and_value() {
    let deps = std::env::current_exe().unwrap();
    let ex = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/snapshot");
    assert!(
        ex.exists(),
        "{} missing: `cargo test -p coreflect` builds it",
        ex.display()
    );
    let t = Target::spawn(&["--heap-mib", "1"]);
    let o = std::process::Command::new(&ex)
        .args([t.pid.to_string(), format!("{:x}", t.get("marker_addr"))])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains(&format!("threads={}", t.threads())), "{out}");
    assert!(
        out.contains(&format!("u64={:#x}", t.get("marker"))),
        "{out}"
    );
    assert!(t.children().is_empty());
    assert_undisturbed(&t.quit());
}
