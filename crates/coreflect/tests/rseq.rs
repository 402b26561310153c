//! The clone's rseq area in every write path.
//!
//! Each syscall injected into the clone takes it through the kernel's return-to-user path,
//! which rewrites its rseq area (`cpu_id`…) with the CPU the clone runs on. With the
//! target on one CPU and coreflect (and so the clone) on another, those bytes differ from
//! the target's at the pause unless each path puts the snapshot's copy back: the core
//! written by the clone's `pwrite`s and by the zero-copy path must be the read path's,
//! byte for byte.

mod common;

use common::*;
use coreflect::elf::writer::{write_core, StreamSink};
use coreflect::select::KernelPolicy;
use coreflect::write_path::WritePath;

target_entry!();

/// Pins thread `tid` (0: the calling thread) to CPU `cpu`.
fn pin(tid: i32, cpu: usize) -> bool {
    // SAFETY: `cpu_set_t` is an array of integers: all-zero bytes are a valid value;
    // CPU_SET writes inside it (cpu < CPU_SETSIZE); sched_setaffinity reads it, a live local
    // of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[test]
fn every_write_path_puts_the_clones_rseq_area_back() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let d = tmpdir("rseq");
    let t = Target::spawn(&["--heap-mib", "4"]);
    assert!(pin(0, 0), "pinning the test thread");
    // Every thread of the target on CPU 1; coreflect's tracer thread (created by the
    // snapshot from this thread) and so the clone on CPU 0.
    for e in std::fs::read_dir(format!("/proc/{}/task", t.pid)).unwrap() {
        let tid: i32 = e.unwrap().file_name().to_string_lossy().parse().unwrap();
        assert!(pin(tid, 1), "pinning thread {tid}");
    }
    // Let the running threads go through user mode on CPU 1.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for path in [WritePath::Pwrite, WritePath::Auto] {
        let opts = coreflect::Options {
            mode: coreflect::Mode::Reflect,
            write_path: path,
            ..Default::default()
        };
        let snap = coreflect::Snapshot::capture(t.pid, &opts).unwrap();
        let policy = KernelPolicy::default();
        let segs = snap.plan(&policy);
        let notes = snap.notes();
        let mut a = StreamSink::new(Vec::new());
        write_core(&mut a, &notes, &segs, &snap, &mut |_, _| true).unwrap();
        let out = d.join(format!("{}.core", path.as_str()));
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
        let used = st.path.used.clone();
        match path {
            WritePath::Pwrite => assert_eq!(used, "pwrite", "{st:?}"),
            _ => assert!(used.starts_with("splice"), "{st:?}"),
        }
        let (a, b) = (a.into_inner(), std::fs::read(&out).unwrap());
        assert_eq!(a.len(), b.len(), "{used}");
        let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).take(16).collect();
        assert!(
            diff.is_empty(),
            "the {used} path differs from the read path at {diff:?}"
        );
    }
    assert_undisturbed(&t.quit());
    let _ = std::fs::remove_dir_all(&d);
}
