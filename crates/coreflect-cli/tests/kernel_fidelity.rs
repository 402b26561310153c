//! coreflect's notes, field by field, against the kernel's own core of the same process
//! taken right after: the kernel is the reference for every field of a Linux core.
//!
//! The target runs with a signal mask of its own per thread and a blocked signal pending
//! on its main thread; coreflect dumps it, then `kill -ABRT` makes the kernel dump it into
//! a directory of ours (`core_pattern` is set for the moment of the kill and always put
//! back). Only fields that legitimately differ between two instants are left out, each
//! with the reason.

mod common;

use common::*;
use coreflect::elf::reader::{CoreFile, Note};
use coreflect::elf::types::{parse_file_note, ElfPrpsinfo, ElfPrstatus, Pod};
use coreflect::elf::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";

/// `core_pattern` is global: one kernel dump at a time in this binary.
static KERNEL_DUMP: Mutex<()> = Mutex::new(());

/// Sets `core_pattern` and puts the saved one back when dropped, on panic too.
struct CorePattern {
    saved: String,
}

impl CorePattern {
    fn set(pattern: &str) -> CorePattern {
        let saved = std::fs::read_to_string(CORE_PATTERN).expect("read core_pattern");
        let guard = CorePattern { saved };
        std::fs::write(CORE_PATTERN, pattern).expect("write core_pattern (needs root)");
        guard
    }
}

impl Drop for CorePattern {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(CORE_PATTERN, self.saved.trim_end()) {
            eprintln!(
                "could not restore {CORE_PATTERN} to {:?}: {e}",
                self.saved.trim_end()
            );
        }
    }
}

/// Makes the kernel dump `t` (SIGABRT, which the target does not handle) into `dir`;
/// returns the core's path.
fn kernel_core(t: Target, dir: &Path) -> PathBuf {
    let pid = t.pid;
    let _one = KERNEL_DUMP.lock().unwrap_or_else(|e| e.into_inner());
    let pattern = format!("{}/kernel.%p", dir.display());
    let status = {
        let _pattern = CorePattern::set(&pattern);
        t.kill_and_wait(libc::SIGABRT)
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "target ended with {status}"
    );
    assert!(
        status.core_dumped(),
        "the kernel did not dump the target ({status})"
    );
    let core = dir.join(format!("kernel.{pid}"));
    // The dump is complete before the parent can reap; allow for a slow file system anyway.
    let end = Instant::now() + Duration::from_secs(30);
    while !core.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(core.exists(), "no kernel core at {}", core.display());
    core
}

/// The notes of a core, split per thread (by `NT_PRSTATUS`), plus the process-wide ones.
struct Notes {
    all: Vec<Note>,
    /// tid -> (prstatus, that thread's other notes)
    threads: BTreeMap<i32, (ElfPrstatus, Vec<Note>)>,
    first_tid: i32,
}

fn notes(core: &Path) -> Notes {
    let all = CoreFile::open(core).unwrap().notes().unwrap();
    let mut threads = BTreeMap::new();
    let mut cur: Option<i32> = None;
    let mut first_tid = 0;
    for n in &all {
        if n.ntype == NT_PRSTATUS {
            let p = ElfPrstatus::from_bytes(&n.desc).expect("NT_PRSTATUS of 336 bytes");
            assert_eq!(n.desc.len(), 336, "NT_PRSTATUS size");
            if cur.is_none() {
                first_tid = p.pr_pid;
            }
            cur = Some(p.pr_pid);
            threads.insert(p.pr_pid, (p, Vec::new()));
        } else if matches!(n.ntype, NT_PRFPREG | NT_X86_XSTATE) {
            let tid = cur.expect("a thread's note before any NT_PRSTATUS");
            threads.get_mut(&tid).unwrap().1.push(n.clone());
        }
    }
    Notes {
        all,
        threads,
        first_tid,
    }
}

fn note(n: &Notes, ty: u32) -> &Note {
    n.all
        .iter()
        .find(|x| x.ntype == ty)
        .unwrap_or_else(|| panic!("no note {ty:#x}"))
}

fn thread_note(n: &[Note], ty: u32) -> Option<&Note> {
    n.iter().find(|x| x.ntype == ty)
}

fn u64at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Collects mismatches, so one run shows all of them.
#[derive(Default)]
struct Diffs(Vec<String>);

impl Diffs {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, ours: T, kernel: T) {
        if ours != kernel {
            self.0
                .push(format!("{what}: coreflect {ours:?}, kernel {kernel:?}"));
        }
    }
}

// user_regs_struct word indices.
const FS_BASE: usize = 21;
const GS_BASE: usize = 22;
const CS: usize = 17;
const SS: usize = 20;
const DS: usize = 23;
const ES: usize = 24;
const FS: usize = 25;
const GS: usize = 26;

// PF_* flags the kernel sets on the dumping process because it is dying of a signal.
const PF_EXITING: u64 = 0x4;
const PF_POSTCOREDUMP: u64 = 0x8;
const PF_DUMPCORE: u64 = 0x200;
const PF_SIGNALED: u64 = 0x400;

fn compare(mode: &str) {
    let test = format!("notes_match_the_kernels_core_{mode}");
    if !require_root(&test, "to set kernel.core_pattern") {
        return;
    }
    let d = tmpdir(&format!("fidelity-{mode}"));
    let t = Target::spawn_with(&["--heap-mib", "4", "--signal-masks"], |c| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; it only changes the child's own limit.
        unsafe {
            c.pre_exec(|| {
                let r = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let ours = d.join("ours.core");
    dump(t.pid, &ours, &["--mode", mode]);
    t.assert_free();
    let kcore = kernel_core(t, &d);

    let o = notes(&ours);
    let k = notes(&kcore);
    let mut x = Diffs::default();

    // ---- ELF header and program headers ----
    let (oc, kc) = (
        CoreFile::open(&ours).unwrap(),
        CoreFile::open(&kcore).unwrap(),
    );
    x.eq("e_type", oc.e_type, kc.e_type);
    x.eq("e_machine", oc.machine, kc.machine);
    let head = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        coreflect::elf::types::Elf64Ehdr::from_bytes(&b).unwrap()
    };
    let (oh, kh) = (head(&ours), head(&kcore));
    x.eq("e_ident", oh.e_ident, kh.e_ident);
    x.eq("e_version", oh.e_version, kh.e_version);
    x.eq("e_flags", oh.e_flags, kh.e_flags);
    x.eq("e_ehsize", oh.e_ehsize, kh.e_ehsize);
    x.eq("e_phentsize", oh.e_phentsize, kh.e_phentsize);
    x.eq("e_phnum", oh.e_phnum, kh.e_phnum);
    let loads = |c: &CoreFile| -> Vec<(u64, u64, u32, u64, u64)> {
        c.loads()
            .map(|p| (p.vaddr, p.memsz, p.flags, p.filesz, p.align))
            .collect()
    };
    let (ol, kl) = (loads(&oc), loads(&kc));
    let (om, km): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        ol.iter().map(|l| (l.0, *l)).collect(),
        kl.iter().map(|l| (l.0, *l)).collect(),
    );
    for (a, l) in &km {
        match om.get(a) {
            None => x.0.push(format!("kernel PT_LOAD {l:x?} missing from ours")),
            Some(m) => x.eq(
                &format!("PT_LOAD at {a:#x} (vaddr, memsz, flags, filesz, align)"),
                m,
                l,
            ),
        }
    }
    for (a, l) in &om {
        if !km.contains_key(a) {
            x.0.push(format!("our PT_LOAD {l:x?} is not in the kernel's core"));
        }
    }
    x.eq(
        "PT_LOAD order",
        ol.iter().map(|l| l.0).collect::<Vec<_>>(),
        kl.iter().map(|l| l.0).collect(),
    );

    // ---- note sequence: same types, same owners, same sizes, same order ----
    let seq = |n: &Notes| -> Vec<(String, u32, usize)> {
        n.all
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    n.ntype,
                    if n.ntype == NT_FILE { 0 } else { n.desc.len() },
                )
            })
            .collect()
    };
    // The threads come in a different order (the kernel starts with the thread that took
    // the signal, then the others newest first); the sequence is compared per kind.
    // coreflect's own COREFLECT note (its metadata: version, mode, level, pause) has no
    // kernel counterpart; debuggers skip unknown owners.
    let kinds = |n: &Notes| {
        let mut v = seq(n);
        v.retain(|(owner, _, _)| owner != "COREFLECT");
        v.sort();
        v
    };
    x.eq("notes (owner, type, size)", kinds(&o), kinds(&k));
    // The kernel's first note block: the dumping thread's NT_PRSTATUS, then the process's
    // notes, then that thread's registers.
    let order = |n: &Notes| -> Vec<u32> { n.all.iter().take(7).map(|n| n.ntype).collect() };
    x.eq("first notes' order", order(&o), order(&k));

    // ---- per thread ----
    x.eq(
        "thread ids",
        o.threads.keys().collect::<Vec<_>>(),
        k.threads.keys().collect(),
    );
    let mut distinct_masks = std::collections::BTreeSet::new();
    for (tid, (op, onotes)) in &o.threads {
        let Some((kp, knotes)) = k.threads.get(tid) else {
            continue;
        };
        let w = |f: &str| format!("thread {tid} {f}");
        x.eq(&w("pr_sighold"), op.pr_sighold, kp.pr_sighold);
        distinct_masks.insert(op.pr_sighold);
        // Pending signals: the main thread's blocked SIGUSR2 is stable. A non-dumping
        // thread of the kernel's core may also show SIGKILL, which the kernel queued to
        // stop it for the dump (zap_threads): that bit is not the process's.
        x.eq(
            &w("pr_sigpend"),
            op.pr_sigpend,
            kp.pr_sigpend & !(1 << (libc::SIGKILL - 1)),
        );
        x.eq(&w("pr_pid"), op.pr_pid, kp.pr_pid);
        x.eq(&w("pr_ppid"), op.pr_ppid, kp.pr_ppid);
        x.eq(&w("pr_pgrp"), op.pr_pgrp, kp.pr_pgrp);
        x.eq(&w("pr_sid"), op.pr_sid, kp.pr_sid);
        x.eq(&w("pr_fpvalid"), op.pr_fpvalid, kp.pr_fpvalid);
        x.eq(
            &w("pr_info.si_code"),
            op.pr_info.si_code,
            kp.pr_info.si_code,
        );
        x.eq(
            &w("pr_info.si_errno"),
            op.pr_info.si_errno,
            kp.pr_info.si_errno,
        );
        // pr_info.si_signo and pr_cursig: the kernel writes the signal it dumps on (SIGABRT)
        // for every thread; coreflect's threads were not stopped by a signal (0).
        x.eq(&w("pr_cursig (kernel: the ABRT)"), op.pr_cursig, 0);
        x.eq(&w("kernel pr_cursig"), kp.pr_cursig, libc::SIGABRT as i16);
        // Times (pr_utime, pr_stime, pr_cutime, pr_cstime) grow between the two instants.
        // Registers: threads running or in a system call at either instant differ (the
        // kernel's threads were interrupted to die); the segment registers and the TLS
        // bases do not change.
        for (name, i) in [
            ("fs_base", FS_BASE),
            ("gs_base", GS_BASE),
            ("cs", CS),
            ("ss", SS),
            ("ds", DS),
            ("es", ES),
            ("fs", FS),
            ("gs", GS),
        ] {
            x.eq(&w(name), op.pr_reg[i], kp.pr_reg[i]);
        }
        // FP control: fcw (bytes 0-1), mxcsr (24-27) and mxcsr_mask (28-31) are set once.
        match (
            thread_note(onotes, NT_PRFPREG),
            thread_note(knotes, NT_PRFPREG),
        ) {
            (Some(a), Some(b)) => {
                x.eq(&w("NT_PRFPREG size"), a.desc.len(), b.desc.len());
                x.eq(&w("fcw"), &a.desc[0..2], &b.desc[0..2]);
                x.eq(&w("mxcsr, mxcsr_mask"), &a.desc[24..32], &b.desc[24..32]);
            }
            (a, b) => x.eq(&w("NT_PRFPREG present"), a.is_some(), b.is_some()),
        }
        match (
            thread_note(onotes, NT_X86_XSTATE),
            thread_note(knotes, NT_X86_XSTATE),
        ) {
            (Some(a), Some(b)) => {
                x.eq(&w("NT_X86_XSTATE size"), a.desc.len(), b.desc.len());
                // The software-reserved bytes: magic, sizes, and XCR0 (the enabled
                // components).
                x.eq(
                    &w("xstate sw_reserved"),
                    &a.desc[464..512],
                    &b.desc[464..512],
                );
                // XSTATE_BV: the components in use. A component leaves its init state
                // when the thread uses it, and the vector ones (x87, SSE, AVX: bits 0-2;
                // AVX-512: bits 5-7) come and go with any string function of libc between
                // the two instants; the others (MPX, PKRU, AMX, ...) must agree.
                let mask = !0b1110_0111u64;
                x.eq(
                    &w("XSTATE_BV beyond the vector registers"),
                    u64at(&a.desc, 512) & mask,
                    u64at(&b.desc, 512) & mask,
                );
                x.eq(&w("XCOMP_BV"), u64at(&a.desc, 520), u64at(&b.desc, 520));
            }
            (a, b) => x.eq(&w("NT_X86_XSTATE present"), a.is_some(), b.is_some()),
        }
    }
    // ---- the process ----
    let op = ElfPrpsinfo::from_bytes(&note(&o, NT_PRPSINFO).desc).unwrap();
    let kp = ElfPrpsinfo::from_bytes(&note(&k, NT_PRPSINFO).desc).unwrap();
    x.eq("NT_PRPSINFO size", note(&o, NT_PRPSINFO).desc.len(), 136);
    x.eq("pr_uid", op.pr_uid, kp.pr_uid);
    x.eq("pr_gid", op.pr_gid, kp.pr_gid);
    x.eq("pr_pid", op.pr_pid, kp.pr_pid);
    x.eq("pr_ppid", op.pr_ppid, kp.pr_ppid);
    x.eq("pr_pgrp", op.pr_pgrp, kp.pr_pgrp);
    x.eq("pr_sid", op.pr_sid, kp.pr_sid);
    x.eq("pr_nice", op.pr_nice, kp.pr_nice);
    x.eq("pr_fname", op.pr_fname, kp.pr_fname);
    x.eq(
        "pr_psargs",
        String::from_utf8_lossy(&op.pr_psargs),
        String::from_utf8_lossy(&kp.pr_psargs),
    );
    // pr_state/pr_sname/pr_zomb: the kernel's main thread is running (it is the one
    // dumping); coreflect's was parked (sleeping). Both are the state of their instant.
    x.eq("pr_zomb", op.pr_zomb, kp.pr_zomb);
    // pr_flag: the kernel's process is dying of a signal (PF_SIGNALED, PF_DUMPCORE,
    // PF_EXITING, PF_POSTCOREDUMP); every other flag must be the same.
    let dying = PF_EXITING | PF_POSTCOREDUMP | PF_DUMPCORE | PF_SIGNALED;
    x.eq("pr_flag", op.pr_flag & !dying, kp.pr_flag & !dying);

    // ---- NT_AUXV, NT_FILE, NT_SIGINFO, NT_X86_XSAVE_LAYOUT ----
    x.eq("NT_AUXV", &note(&o, NT_AUXV).desc, &note(&k, NT_AUXV).desc);
    let (opage, ofiles) = parse_file_note(&note(&o, NT_FILE).desc).expect("our NT_FILE");
    let (kpage, kfiles) = parse_file_note(&note(&k, NT_FILE).desc).expect("kernel NT_FILE");
    x.eq("NT_FILE page size", opage, kpage);
    x.eq("NT_FILE count", ofiles.len(), kfiles.len());
    for (a, b) in ofiles.iter().zip(&kfiles) {
        x.eq(
            "NT_FILE entry",
            (
                a.start,
                a.end,
                a.page_offset,
                String::from_utf8_lossy(&a.name),
            ),
            (
                b.start,
                b.end,
                b.page_offset,
                String::from_utf8_lossy(&b.name),
            ),
        );
    }
    // NT_SIGINFO: the kernel's is the SIGABRT it dies of; coreflect's thread was not
    // stopped by a signal, so its siginfo is all zeros.
    x.eq("NT_SIGINFO size", note(&o, NT_SIGINFO).desc.len(), 128);
    x.eq(
        "NT_SIGINFO (no signal)",
        note(&o, NT_SIGINFO).desc.iter().all(|&b| b == 0),
        true,
    );
    if let Some(kl) = k.all.iter().find(|n| n.ntype == NT_X86_XSAVE_LAYOUT) {
        x.eq(
            "NT_X86_XSAVE_LAYOUT",
            &note(&o, NT_X86_XSAVE_LAYOUT).desc,
            &kl.desc,
        );
    }

    if !x.0.is_empty() {
        panic!(
            "{mode} mode: {} field(s) differ from the kernel's core ({}):\n  {}",
            x.0.len(),
            kcore.display(),
            x.0.join("\n  ")
        );
    }
    // The target is what the comparison needs: distinct masks, a pending signal.
    assert!(
        distinct_masks.len() >= 8,
        "the target's threads should have distinct masks: {distinct_masks:x?}"
    );
    let main = o.threads.get(&o.first_tid).map(|t| t.0.pr_sigpend);
    assert_eq!(
        o.threads
            .values()
            .find(|t| t.0.pr_pid == oc_pid(&o))
            .map(|t| t.0.pr_sigpend),
        Some(1 << (libc::SIGUSR2 - 1)),
        "the main thread's pending SIGUSR2 (first thread's: {main:x?})"
    );

    let _ = std::fs::remove_dir_all(&d);
}

/// The process id, from NT_PRPSINFO.
fn oc_pid(n: &Notes) -> i32 {
    ElfPrpsinfo::from_bytes(&note(n, NT_PRPSINFO).desc)
        .unwrap()
        .pr_pid
}

#[test]
fn notes_match_the_kernels_core_reflect() {
    compare("reflect");
}

#[test]
fn notes_match_the_kernels_core_suspend() {
    compare("suspend");
}
