//! Dump levels, `-o -`, zstd compression and `coreflect info`, checked with gdb, lldb,
//! elfutils and the `zstd` command on real targets.

mod common;

use common::*;
use coreflect::elf::reader::CoreFile;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

/// The numbers after `key` in a JSON text (`"key":N`), in order.
fn json_nums(text: &str, key: &str) -> Vec<u64> {
    let pat = format!("\"{key}\":");
    text.match_indices(&pat)
        .filter_map(|(i, _)| {
            let rest = &text[i + pat.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

/// The strings after `key` in a JSON text (`"key":"v"`), in order.
fn json_strs(text: &str, key: &str) -> Vec<String> {
    let pat = format!("\"{key}\":\"");
    text.match_indices(&pat)
        .map(|(i, _)| {
            let rest = &text[i + pat.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

/// Asserts gdb shows every thread with a backtrace through the target's named functions,
/// and has loaded libc.
fn assert_debuggable(core: &Path, threads: usize, what: &str) {
    let out = gdb(
        core,
        &["info sharedlibrary", "info threads", "thread apply all bt"],
    );
    assert!(
        out.lines()
            .any(|l| l.contains("libc.so.6") && l.contains("Yes")),
        "{what}: gdb did not load libc:\n{out}"
    );
    let listed = out
        .lines()
        .filter(|l| l.starts_with("Thread ") && l.contains("(LWP "))
        .count();
    assert_eq!(listed, threads, "{what}: gdb backtraces:\n{out}");
    for w in WORKERS {
        assert!(
            out.contains(&format!("coreflect_target::{w}")),
            "{what}: no frame in {w}:\n{out}"
        );
    }
    // Every worker thread's stack is walked to its root (the main thread's to Rust's main,
    // where gdb stops).
    let roots = out.matches(" in clone3 ").count() + out.matches(" in clone ").count();
    assert_eq!(
        roots,
        threads - 1,
        "{what}: unwinding stopped early:\n{out}"
    );
    assert!(
        out.contains("in coreflect::main ()"),
        "{what}: main not reached:\n{out}"
    );
    assert!(
        !out.contains("Cannot access memory"),
        "{what}: gdb missed memory:\n{out}"
    );
}

#[test]
fn levels_debuggable_and_mini_small() {
    let t = Target::spawn(&["--heap-mib", "128"]);
    let dir = tmpdir("levels");
    let threads = t.threads();
    let mut written = BTreeMap::new();
    for level in ["mini", "default", "full"] {
        let core = dir.join(format!("{level}.core"));
        let j = dump(t.pid, &core, &["--level", level]);
        assert_eq!(j.get("level").as_deref(), Some(level));
        written.insert(level, j.num("bytes_written"));
        assert_debuggable(&core, threads, level);
        // coreflect's note is there, and elfutils still reads the notes.
        let (ok, notes) = run_tool("eu-readelf", &["-n", core.to_str().unwrap()]);
        assert!(ok && notes.contains("COREFLECT"), "{level}:\n{notes}");
        let (ok, st) = run_tool(
            "eu-stack",
            &[
                "--core",
                core.to_str().unwrap(),
                "-e",
                exe().to_str().unwrap(),
            ],
        );
        assert!(ok && st.contains("spin_worker"), "{level}: eu-stack:\n{st}");
        let c = CoreFile::open(&core).unwrap();
        let n = coreflect::elf::reader::parse_notes(&c.notes().unwrap()).unwrap();
        let m = n.metadata.expect("COREFLECT note");
        assert_eq!(m.get("level"), Some(level));
        assert_eq!(m.get("mode"), Some("reflect"));
    }
    // lldb on the smallest core: threads, frames, libc.
    let mini = dir.join("mini.core");
    let (_, out) = run_tool(
        "lldb",
        &[
            "--batch",
            "-o",
            "bt all",
            "-o",
            "image list",
            "-c",
            mini.to_str().unwrap(),
            exe().to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("libc.so.6") && out.contains("condvar_worker"),
        "lldb on the mini core:\n{out}"
    );
    let (mini, default, full) = (written["mini"], written["default"], written["full"]);
    assert!(
        mini * 20 < full,
        "mini {mini} is not under 5 % of full {full}"
    );
    assert!(default <= full, "default {default} larger than full {full}");
    // full holds file-backed text (libc's code), default only its ELF header.
    let text_of = |core: &str| {
        let c = CoreFile::open(&dir.join(core)).unwrap();
        let n = coreflect::elf::reader::parse_notes(&c.notes().unwrap()).unwrap();
        let libc = n
            .files
            .iter()
            .filter(|f| f.path.contains("libc.so"))
            .map(|f| f.start)
            .collect::<Vec<_>>();
        c.loads()
            .filter(|p| libc.contains(&p.vaddr) && p.flags & 1 != 0)
            .map(|p| p.filesz)
            .sum::<u64>()
    };
    assert!(text_of("full.core") > 0 && text_of("default.core") == 0);
    // --filter overrides --level.
    let f = dir.join("filter.core");
    let j = dump(t.pid, &f, &["--level", "mini", "--filter", "0x33"]);
    assert!(j.num("bytes_written") > 100 << 20, "--filter ignored");
    let stats = t.quit();
    assert_undisturbed(&stats);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pattern buffer and marker of the target, read from a core.
fn sample(core: &Path, t: &Target) -> (Vec<u8>, Vec<u8>) {
    let c = CoreFile::open(core).unwrap();
    assert_eq!(c.len, c.expected_len(), "{} is truncated", core.display());
    let pattern = c
        .read(t.get("pattern_addr"), t.get("pattern_len") as usize)
        .unwrap()
        .expect("pattern in the core");
    let marker = c.read(t.get("marker_addr"), 8).unwrap().expect("marker");
    (pattern, marker)
}

fn unzstd(src: &Path, dst: &Path) {
    let (ok, out) = run_tool(
        "zstd",
        &[
            "-d",
            "-q",
            "-f",
            src.to_str().unwrap(),
            "-o",
            dst.to_str().unwrap(),
        ],
    );
    assert!(ok, "zstd -d {}: {out}", src.display());
}

fn gdb_words(core: &Path, addrs: &[u64]) -> Vec<String> {
    let cmds: Vec<String> = addrs.iter().map(|a| format!("x/2gx {a:#x}")).collect();
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let out = gdb(core, &refs);
    let words: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("0x") && l.contains(':'))
        .map(|l| l.to_string())
        .collect();
    assert_eq!(
        words.len(),
        addrs.len(),
        "gdb on {}:\n{out}",
        core.display()
    );
    words
}

#[test]
fn stream_and_zstd_give_the_same_bytes() {
    let t = Target::spawn(&["--heap-mib", "32"]);
    let dir = tmpdir("stream");
    let file_core = dir.join("file.core");
    dump(t.pid, &file_core, &[]);

    // -o -: the core on stdout, the report on stderr.
    let stream_core = dir.join("stream.core");
    let o = Command::new(exe())
        .args(["dump", &t.pid.to_string(), "-o", "-", "--json"])
        .stdout(File::create(&stream_core).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "-o -: {err}");
    assert!(err.contains("\"path\":\"-\""), "report on stderr: {err}");

    // --compress zstd into a file, and into a pipe with the report in a file.
    let zfile = dir.join("c.core.zst");
    let j = dump(t.pid, &zfile, &["--compress", "zstd"]);
    assert!(j.num("compressed_size") > 0);
    assert_eq!(
        &std::fs::read(&zfile).unwrap()[..4],
        &[0x28, 0xb5, 0x2f, 0xfd]
    );
    let zpipe = dir.join("p.core.zst");
    let report = dir.join("p.json");
    let mut child = Command::new(exe())
        .args([
            "dump",
            &t.pid.to_string(),
            "-o",
            "-",
            "--compress",
            "zstd:1",
        ])
        .arg("--json-file")
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Through a real pipe (cat), as a user would.
    let cat = Command::new("cat")
        .stdin(child.stdout.take().unwrap())
        .stdout(File::create(&zpipe).unwrap())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success() && cat.success());
    assert!(std::fs::read_to_string(&report)
        .unwrap()
        .contains("\"compressed_size\":"));
    let (zc, zp) = (dir.join("c.core"), dir.join("p.core"));
    unzstd(&zfile, &zc);
    unzstd(&zpipe, &zp);

    let want = sample(&file_core, &t);
    assert_eq!(
        u64::from_le_bytes(want.1.clone().try_into().unwrap()),
        t.get("marker")
    );
    let pa = t.get("pattern_addr");
    let addrs = [
        t.get("marker_addr"),
        pa,
        pa + 4096 * 7 + 8,
        pa + t.get("pattern_len") / 2,
        pa + t.get("pattern_len") - 16,
    ];
    let want_gdb = gdb_words(&file_core, &addrs);
    for core in [&stream_core, &zc, &zp] {
        assert!(sample(core, &t) == want, "{} differs", core.display());
        assert_eq!(gdb_words(core, &addrs), want_gdb, "{}", core.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zstd_is_byte_identical_to_the_uncompressed_core() {
    // One snapshot, written three ways: a sparse file, a stream, a zstd frame.
    let t = Target::spawn(&["--heap-mib", "16"]);
    let dir = tmpdir("zstd-identity");
    let snap = coreflect::Snapshot::capture(t.pid, &coreflect::Options::default()).unwrap();
    let segs = coreflect::level::plan(&snap, coreflect::Level::Default, None);
    let notes = snap.notes();
    let (a, b, z) = (dir.join("a.core"), dir.join("b.core"), dir.join("c.zst"));
    let fa = File::create(&a).unwrap();
    snap.write_core_file_with(&fa, &notes, &segs, &mut |_, _| true)
        .unwrap();
    let mut sink = coreflect::elf::writer::StreamSink::new(File::create(&b).unwrap());
    snap.write_core_with(&mut sink, &notes, &segs, &mut |_, _| true)
        .unwrap();
    drop(sink);
    coreflect::dump::write_core_zstd(
        &snap,
        File::create(&z).unwrap(),
        3,
        &notes,
        &segs,
        &mut |_, _| true,
    )
    .unwrap();
    drop(snap);
    let zd = dir.join("c.core");
    unzstd(&z, &zd);
    let a = std::fs::read(&a).unwrap();
    let bb = std::fs::read(&b).unwrap();
    let first = (0..a.len().min(bb.len())).find(|&i| a[i] != bb[i]);
    assert!(
        a == bb,
        "stream differs from file: lengths {} and {}, first difference at {first:?}",
        a.len(),
        bb.len()
    );
    assert!(
        a == std::fs::read(&zd).unwrap(),
        "zstd -d differs from file"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stdout_terminal_is_refused() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` to make a terminal");
        return;
    }
    let t = Target::spawn(&[]);
    let cmd = format!("{} dump {} -o -", exe().display(), t.pid);
    let (ok, out) = run_tool("script", &["-qec", &cmd, "/dev/null"]);
    assert!(!ok, "a core was written to a terminal:\n{out}");
    assert!(
        out.contains("refusing to write a core to a terminal"),
        "{out}"
    );
    t.assert_free();
}

#[test]
fn info_agrees_with_gdb_and_elfutils() {
    let t = Target::spawn(&[]);
    let dir = tmpdir("info");
    let core = dir.join("t.core");
    dump(t.pid, &core, &[]);
    let o = coreflect(&["info", "--json", core.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = String::from_utf8(o.stdout).unwrap();
    assert!(info.contains("\"threads\":[{"), "{info}");

    // Threads: the same LWPs as gdb, the first one selected.
    let mut tids = json_nums(&info, "tid");
    let out = gdb(&core, &["info threads"]);
    let mut lwps: Vec<u64> = out
        .match_indices("(LWP ")
        .map(|(i, _)| {
            let r = &out[i + 5..];
            r[..r.find(')').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(tids.len(), t.threads());
    assert_eq!(tids[0], t.pid as u64);
    tids.sort();
    lwps.sort();
    lwps.dedup(); // "[New LWP n]" lines and the table both name them
    assert_eq!(tids, lwps, "gdb:\n{out}");

    // Notes: the same owners and sizes, in order, as eu-readelf.
    let (ok, en) = run_tool("eu-readelf", &["-n", core.to_str().unwrap()]);
    assert!(ok);
    let theirs: Vec<(String, u64)> = en
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let indented = l.starts_with("  ") && !l.starts_with("   ");
            (indented && w.len() >= 3 && w[0] != "Owner")
                .then(|| (w[0].to_string(), w[1].parse().ok()))
                .and_then(|(o, s)| Some((o, s?)))
        })
        .collect();
    // `size` appears in mappings too: take the notes' part of the JSON only.
    let notes_json = &info[info.find("\"notes\":[").unwrap()..];
    let ours: Vec<(String, u64)> = json_strs(notes_json, "owner")
        .into_iter()
        .zip(json_nums(notes_json, "size"))
        .collect();
    assert_eq!(ours, theirs, "eu-readelf -n:\n{en}");
    assert!(ours.iter().any(|(o, _)| o == "COREFLECT"));

    // Segments: the same LOADs (address, file size, memory size).
    let (ok, el) = run_tool("eu-readelf", &["-l", core.to_str().unwrap()]);
    assert!(ok);
    let theirs: Vec<(u64, u64, u64)> = el
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let h = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (h(w[2]), h(w[4]), h(w[5]))
        })
        .collect();
    let maps_json = &info[info.find("\"mappings\":[").unwrap()..info.find("\"notes\":[").unwrap()];
    let starts = json_nums(maps_json, "start");
    let sizes = json_nums(maps_json, "size");
    let dumped = json_nums(maps_json, "dumped");
    let ours: Vec<(u64, u64, u64)> = (0..starts.len())
        .map(|i| (starts[i], dumped[i], sizes[i]))
        .collect();
    assert_eq!(ours, theirs);
    assert!(info.contains("\"coreflect\":{\"version\":"), "{info}");
    // Threads' functions, resolved from libc on this machine (build-ids match).
    let syms = json_strs(&info, "symbol");
    assert!(
        syms.iter().any(|s| s.contains("pause")) && syms.iter().any(|s| s.contains("nanosleep")),
        "{syms:?}"
    );
    assert!(info.contains(&format!("\"pid\":{}", t.pid)));

    // The text form names the process and the threads.
    let o = coreflect(&["info", core.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("threads: ") && text.contains("written by coreflect")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn info_fails_cleanly_on_bad_files() {
    let t = Target::spawn(&[]);
    let dir = tmpdir("info-bad");
    let core = dir.join("t.core");
    dump(t.pid, &core, &["--level", "mini"]);
    let z = dir.join("t.core.zst");
    dump(t.pid, &z, &["--level", "mini", "--compress", "zstd"]);
    drop(t);
    let bytes = std::fs::read(&core).unwrap();
    let zbytes = std::fs::read(&z).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("text".into(), b"hello, not a core\n".to_vec()),
        ("elf header only".into(), bytes[..64].to_vec()),
    ];
    for n in [3, 100, 1000, bytes.len() / 2, bytes.len() - 1] {
        cases.push((format!("core cut at {n}"), bytes[..n].to_vec()));
    }
    for n in [10, zbytes.len() / 2, zbytes.len() - 1] {
        cases.push((format!("zst cut at {n}"), zbytes[..n].to_vec()));
    }
    let mut corrupt = bytes.clone();
    corrupt[56..58].copy_from_slice(&0xfffeu16.to_le_bytes()); // e_phnum
    cases.push(("phnum 65534".into(), corrupt));
    let mut args: Vec<(String, String)> = Vec::new();
    for (name, b) in &cases {
        let p = dir.join(name.replace(' ', "_"));
        std::fs::write(&p, b).unwrap();
        args.push((name.clone(), p.display().to_string()));
    }
    args.push(("an executable".into(), exe().display().to_string()));
    args.push(("a directory".into(), dir.display().to_string()));
    args.push((
        "a missing file".into(),
        dir.join("nope").display().to_string(),
    ));
    for (name, p) in args {
        let o = coreflect(&["info", &p]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with("coreflect: error:"), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(o.stdout.is_empty(), "{name}");
    }
    // A reader that stopped reading (`| head`) is no error and no panic: stdout is a pipe
    // whose read end is already closed.
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    let o = Command::new(exe())
        .args(["info", "--all", core.to_str().unwrap()])
        .stdout(w)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.is_empty(),
        "info into a closed pipe: {err}"
    );
    // And the intact ones are accepted.
    for p in [&core, &z] {
        assert!(coreflect(&["info", p.to_str().unwrap()]).status.success());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
