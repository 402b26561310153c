//! The core file: real targets dumped in each mode, read back with gdb, elfutils and our own
//! reader, and compared with gcore's and the kernel's cores.

mod common;

use common::*;
use coreflect::elf::reader::{thread_ids, CoreFile};
use coreflect::elf::*;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Everything a core of the test target must show, whatever the mode.
fn check_core(t: &Target, core: &Path, json: &Json) {
    // The report.
    assert_eq!(json.num("pid"), t.pid as u64);
    assert_eq!(json.num("threads") as usize, t.threads());
    assert!(json.num("bytes_written") > t.get("pattern_len"));
    assert!(json.num("file_size") >= json.num("bytes_written"));
    assert_eq!(
        std::fs::metadata(core).unwrap().len(),
        json.num("file_size"),
        "file length"
    );
    assert_eq!(
        std::fs::metadata(core).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Our reader: notes and thread ids.
    let cf = CoreFile::open(core).unwrap();
    assert_eq!(cf.e_type, ET_CORE);
    let notes = cf.notes().unwrap();
    let tids = thread_ids(&notes);
    assert_eq!(tids[0], t.pid, "main thread first");
    let mut live: Vec<i32> = std::fs::read_dir(format!("/proc/{}/task", t.pid))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    live.sort();
    let mut got = tids.clone();
    got.sort();
    assert_eq!(got, live, "one NT_PRSTATUS per thread");
    for ty in [
        NT_PRPSINFO,
        NT_SIGINFO,
        NT_AUXV,
        NT_FILE,
        NT_X86_XSAVE_LAYOUT,
    ] {
        assert_eq!(
            notes.iter().filter(|n| n.ntype == ty).count(),
            1,
            "note {ty:#x}"
        );
    }
    for ty in [NT_PRFPREG, NT_X86_XSTATE] {
        assert_eq!(
            notes.iter().filter(|n| n.ntype == ty).count(),
            tids.len(),
            "note {ty:#x}"
        );
    }
    // Per-thread notes follow their own PRSTATUS.
    let order: Vec<u32> = notes.iter().map(|n| n.ntype).collect();
    for (i, ty) in order.iter().enumerate() {
        if *ty == NT_PRSTATUS && i > 0 {
            assert!(order[i + 1] == NT_PRFPREG && order[i + 2] == NT_X86_XSTATE || i == 0);
        }
    }
    let marker = cf
        .read(t.get("marker_addr"), 8)
        .unwrap()
        .expect("marker in core");
    assert_eq!(
        u64::from_le_bytes(marker.try_into().unwrap()),
        t.get("marker")
    );
    let pat = cf
        .read(t.get("pattern_addr") + 12345, 64)
        .unwrap()
        .expect("pattern in core");
    for (i, b) in pat.iter().enumerate() {
        assert_eq!(
            *b,
            coreflect_target::pattern_byte(12345 + i),
            "pattern byte {i}"
        );
    }

    // gdb.
    let out = gdb(
        core,
        &[
            "info threads",
            "thread apply all bt",
            "info sharedlibrary",
            &format!("x/2xg {:#x}", t.get("marker_addr")),
            &format!("x/4xb {:#x}", t.get("pattern_addr") + 1000),
            "p $ymm0.v4_int64",
        ],
    );
    assert!(!out.contains("is not a core dump"), "{out}");
    assert!(!out.contains("too small"), "gdb rejected a note:\n{out}");
    let threads_listed = out
        .lines()
        .filter(|l| l.contains("(LWP "))
        .filter(|l| {
            l.trim_start()
                .starts_with(|c: char| c == '*' || c.is_ascii_digit())
        })
        .count();
    assert_eq!(threads_listed, live.len(), "gdb lists every thread:\n{out}");
    for w in WORKERS {
        assert!(out.contains(w), "{w} missing from gdb's backtraces:\n{out}");
    }
    assert!(
        out.contains("libc.so"),
        "libc missing from info sharedlibrary:\n{out}"
    );
    let marker_hex = format!("{:#018x}", t.get("marker"));
    assert!(
        out.contains(&marker_hex),
        "marker {marker_hex} not read by gdb:\n{out}"
    );
    let b: Vec<String> = (1000..1004)
        .map(|i| format!("{:#04x}", coreflect_target::pattern_byte(i)))
        .collect();
    assert!(
        out.contains(&b.join("\t")),
        "pattern bytes {b:?} not read by gdb:\n{out}"
    );
    assert!(
        !out.contains("<unavailable>"),
        "registers unavailable:\n{out}"
    );

    // elfutils.
    let (ok, notes_txt) = run_tool("eu-readelf", &["-n", core.to_str().unwrap()]);
    assert!(ok, "{notes_txt}");
    for n in [
        "PRSTATUS",
        "PRPSINFO",
        "AUXV",
        "FILE",
        "FPREGSET",
        "X86_XSTATE",
        "SIGINFO",
    ] {
        assert!(notes_txt.contains(n), "eu-readelf -n lacks {n}");
    }
    let (_, stack) = run_tool(
        "eu-stack",
        &[
            "--core",
            core.to_str().unwrap(),
            "-e",
            exe().to_str().unwrap(),
        ],
    );
    for w in ["spin_worker", "read_worker", "sleep_worker"] {
        assert!(
            stack.contains(w),
            "eu-stack does not unwind to {w}:\n{stack}"
        );
    }
}

#[test]
fn suspend_mode_core_reads_in_gdb_and_elfutils() {
    let d = tmpdir("suspend");
    let t = Target::spawn(&["--heap-mib", "8"]);
    let core = d.join("t.core");
    let json = dump(t.pid, &core, &["--mode", "suspend"]);
    assert_eq!(json.get("mode").as_deref(), Some("suspend"));
    t.assert_free();
    check_core(&t, &core, &json);
    let stats = t.quit();
    assert_undisturbed(&stats);
}

#[test]
fn reflect_mode_core_reads_in_gdb_and_elfutils() {
    let d = tmpdir("reflect");
    let t = Target::spawn(&["--heap-mib", "8"]);
    let core = d.join("t.core");
    let json = dump(t.pid, &core, &[]);
    assert_eq!(json.get("mode").as_deref(), Some("reflect"), "{}", json.0);
    t.assert_free();
    assert!(
        children(t.pid).is_empty(),
        "the target has a child after the dump"
    );
    check_core(&t, &core, &json);
    let stats = t.quit();
    assert_undisturbed(&stats);
}

#[test]
fn default_name_and_human_summary() {
    let d = tmpdir("default-name");
    let t = Target::spawn(&["--heap-mib", "1"]);
    let o = std::process::Command::new(exe())
        .args(["dump", &t.pid.to_string()])
        .current_dir(&d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let files: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = &files[0];
    // <comm>_<yymmdd_HHMMSS>.<pid>.core
    let suffix = format!(".{}.core", t.pid);
    assert!(
        name.starts_with("coreflect_") && name.ends_with(&suffix),
        "{name}"
    );
    let stamp = &name["coreflect_".len()..name.len() - suffix.len()];
    assert_eq!(stamp.len(), 13, "{name}");
    assert!(
        err.contains("dumped pid") && err.contains("paused") && err.contains(name),
        "{err}"
    );
}

fn note_types(core: &Path) -> BTreeSet<u32> {
    CoreFile::open(core)
        .unwrap()
        .notes()
        .unwrap()
        .iter()
        .map(|n| n.ntype)
        .collect()
}

fn load_ranges(core: &Path) -> BTreeSet<(u64, u64)> {
    CoreFile::open(core)
        .unwrap()
        .loads()
        .map(|p| (p.vaddr, p.vaddr + p.memsz))
        .collect()
}

#[test]
fn same_notes_and_segments_as_gcore_and_the_kernel() {
    let d = tmpdir("compare");
    let t = Target::spawn(&["--heap-mib", "4"]);
    let ours = d.join("ours.core");
    dump(t.pid, &ours, &["--mode", "suspend"]);
    let maps: BTreeSet<(u64, u64)> = std::fs::read_to_string(format!("/proc/{}/maps", t.pid))
        .unwrap()
        .lines()
        .map(|l| {
            let r = l.split(' ').next().unwrap();
            let (a, b) = r.split_once('-').unwrap();
            (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            )
        })
        .collect();
    let ours_loads = load_ranges(&ours);
    // One PT_LOAD per mapping, [vsyscall] included, as the kernel writes (empty ones too).
    assert_eq!(ours_loads, maps, "PT_LOADs are not the memory map");

    // gcore's core of the same process.
    let prefix = d.join("gcore");
    let (ok, out) = run_tool(
        "gcore",
        &["-o", prefix.to_str().unwrap(), &t.pid.to_string()],
    );
    assert!(ok, "gcore failed: {out}");
    let g = d.join(format!("gcore.{}", t.pid));
    let gnotes = note_types(&g);
    let mut onotes = note_types(&ours);
    // coreflect's own note is the one addition to the kernel's set.
    assert!(onotes.remove(&coreflect::elf::meta::NT_COREFLECT));
    // NT_GDB_TDESC (0xff000000) is gdb's own target description; the kernel does not
    // write it either.
    for ty in gnotes.iter().filter(|t| **t != 0xff00_0000) {
        assert!(onotes.contains(ty), "gcore writes note {ty:#x}, we do not");
    }
    // gcore skips some mappings ([vvar], unreadable ones); every range it dumps is ours.
    for r in load_ranges(&g) {
        assert!(ours_loads.contains(&r), "gcore dumps {r:x?}, we do not");
    }
    t.assert_free();
    // The kernel's own core is compared field by field in kernel_fidelity.rs.
}

#[test]
fn more_than_65534_segments_use_pn_xnum() {
    if !require_root(
        "more_than_65534_segments_use_pn_xnum",
        "to raise vm.max_map_count",
    ) {
        return;
    }
    const MAPS: usize = 70_000;
    let knob = "/proc/sys/vm/max_map_count";
    let old = std::fs::read_to_string(knob).unwrap();
    if old.trim().parse::<usize>().unwrap() < 2 * MAPS {
        std::fs::write(knob, (2 * MAPS + 65536).to_string()).unwrap();
    }
    let d = tmpdir("xnum");
    let t = Target::spawn(&["--heap-mib", "1", "--many-maps", &MAPS.to_string()]);
    let core = d.join("x.core");
    let json = dump(t.pid, &core, &[]);
    let cf = CoreFile::open(&core).unwrap();
    let mut eh = [0u8; 64];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&core).unwrap(), &mut eh, 0)
        .unwrap();
    assert_eq!(u16::from_le_bytes([eh[56], eh[57]]), PN_XNUM, "e_phnum");
    let loads = cf.loads().count();
    assert!(loads > MAPS, "{loads} PT_LOADs");
    assert_eq!(json.num("segments") as usize, loads);
    let base = t.get("maps_addr");
    assert!(cf
        .loads()
        .any(|p| p.vaddr == base + 4096 && p.memsz == 4096));
    let (ok, out) = run_tool("eu-readelf", &["-l", core.to_str().unwrap()]);
    assert!(ok, "{out}");
    let out = gdb(
        &core,
        &[
            "info threads",
            &format!("x/1xg {:#x}", t.get("marker_addr")),
        ],
    );
    assert!(out.contains(&format!("{:#018x}", t.get("marker"))), "{out}");
    drop(t);
    std::fs::write(knob, old.trim()).unwrap();
}

#[test]
fn lldb_reads_threads_libraries_and_backtraces() {
    let d = tmpdir("lldb");
    let t = Target::spawn(&["--heap-mib", "2"]);
    let core = d.join("l.core");
    dump(t.pid, &core, &[]);
    let (_, out) = run_tool(
        "lldb",
        &[
            "--batch",
            "-o",
            &format!(
                "target create {} --core {}",
                exe().display(),
                core.display()
            ),
            "-o",
            "image list",
            "-o",
            "bt all",
        ],
    );
    assert!(
        out.contains("was loaded"),
        "lldb did not load the core:\n{out}"
    );
    assert!(out.contains("libc.so.6"), "lldb found no libc:\n{out}");
    let threads = out
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("* thread #") || l.trim_start().starts_with("thread #")
        })
        .count();
    assert_eq!(threads, t.threads(), "lldb's threads:\n{out}");
    for w in [
        "spin_worker",
        "read_worker",
        "sleep_worker",
        "condvar_worker",
        "accept_worker",
    ] {
        assert!(
            out.contains(w),
            "{w} missing from lldb's backtraces:\n{out}"
        );
    }
    assert_undisturbed(&t.quit());
}
