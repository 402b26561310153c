//! The notes of a Linux x86_64 core, in the kernel's order:
//! first thread `NT_PRSTATUS`, then `NT_PRPSINFO`, `NT_SIGINFO`, `NT_AUXV`, `NT_FILE`, that
//! thread's `NT_PRFPREG` and `NT_X86_XSTATE`; then every other thread's `NT_PRSTATUS`,
//! `NT_PRFPREG`, `NT_X86_XSTATE`; last `NT_X86_XSAVE_LAYOUT`.

use super::types::{ElfPrpsinfo, ElfPrstatus, ElfSiginfo, Pod, Siginfo, Timeval};
use super::*;
use crate::arch::x86_64 as arch;
use crate::proc::{Mapping, MappingKind, ProcessInfo, ThreadTimes};
use crate::stop::{StopKind, ThreadState};

/// Appends one note (4-byte aligned name and descriptor) to `out`.
pub fn push_note(out: &mut Vec<u8>, name: &str, ntype: u32, desc: &[u8]) {
    let namesz = name.len() + 1;
    out.extend_from_slice(&(namesz as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&ntype.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(desc);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn ticks_to_timeval(ticks: u64) -> Timeval {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Timeval {
        tv_sec: (ticks / hz) as i64,
        tv_usec: ((ticks % hz) * 1_000_000 / hz) as i64,
    }
}

/// The signal a thread was stopped on (0 if it was stopped by us).
pub(crate) fn cursig(t: &ThreadState) -> i32 {
    match t.kind {
        StopKind::Signal(s) => s,
        _ => 0,
    }
}

/// `struct elf_prstatus` for one thread, filled as the kernel's `fill_prstatus` does.
pub(crate) fn prstatus_struct(
    p: &ProcessInfo,
    t: &ThreadState,
    times: &ThreadTimes,
) -> ElfPrstatus {
    let sig = cursig(t);
    ElfPrstatus {
        pr_info: ElfSiginfo {
            si_signo: sig,
            ..Default::default()
        },
        pr_cursig: sig as i16,
        pr_sigpend: times.sig_pending,
        pr_sighold: t.sigmask,
        pr_pid: t.tid,
        pr_ppid: p.parent_tid,
        pr_pgrp: p.stat.pgrp,
        pr_sid: p.stat.session,
        pr_utime: ticks_to_timeval(times.utime),
        pr_stime: ticks_to_timeval(times.stime),
        pr_cutime: ticks_to_timeval(p.stat.cutime),
        pr_cstime: ticks_to_timeval(p.stat.cstime),
        pr_reg: t.regs.words(),
        pr_fpvalid: 1,
        ..Default::default()
    }
}

/// `struct elf_prstatus` (336 bytes) for one thread.
pub(crate) fn prstatus(p: &ProcessInfo, t: &ThreadState, times: &ThreadTimes) -> Vec<u8> {
    prstatus_struct(p, t, times).as_bytes().to_vec()
}

/// `struct elf_prpsinfo`, filled as the kernel's `fill_psinfo` does.
pub fn prpsinfo_struct(p: &ProcessInfo) -> ElfPrpsinfo {
    let sname = p.stat.state;
    let state = "RSDTZW".find(sname);
    let mut fname = [0u8; 16];
    let comm = p.stat.comm.as_bytes();
    let n = comm.len().min(15);
    fname[..n].copy_from_slice(&comm[..n]);
    // The kernel copies the argument area (at most 79 bytes) and turns every NUL into a
    // space, the terminating one included.
    let mut psargs = [0u8; 80];
    let args = p.args.iter().map(|&c| if c == 0 { b' ' } else { c });
    for (d, c) in psargs[..79].iter_mut().zip(args) {
        *d = c;
    }
    ElfPrpsinfo {
        pr_state: state.unwrap_or(0) as u8,
        pr_sname: if state.is_some() { sname as u8 } else { b'.' },
        pr_zomb: (sname == 'Z') as u8,
        pr_nice: p.stat.nice as i8,
        pr_flag: p.stat.flags,
        pr_uid: p.status.uid,
        pr_gid: p.status.gid,
        pr_pid: p.pid,
        pr_ppid: p.parent_tid,
        pr_pgrp: p.stat.pgrp,
        pr_sid: p.stat.session,
        pr_fname: fname,
        pr_psargs: psargs,
        ..Default::default()
    }
}

/// `struct elf_prpsinfo` (136 bytes).
pub fn prpsinfo(p: &ProcessInfo) -> Vec<u8> {
    prpsinfo_struct(p).as_bytes().to_vec()
}

/// The 128-byte `siginfo_t` of the first thread: the real one if it was stopped on a signal,
/// else zeros.
pub(crate) fn siginfo(t: &ThreadState) -> Vec<u8> {
    let si = match &t.siginfo {
        Some(si) if cursig(t) != 0 => Siginfo::from_bytes(si).unwrap_or_default(),
        _ => Siginfo::default(),
    };
    si.as_bytes().to_vec()
}

/// `NT_FILE` in the kernel's convention (page size in bytes, offsets in pages).
pub fn file_note(mappings: &[Mapping], page_size: u64) -> Vec<u8> {
    let files: Vec<&Mapping> = mappings
        .iter()
        .filter(|m| m.kind() == MappingKind::File)
        .collect();
    let mut b = Vec::new();
    b.extend_from_slice(&(files.len() as u64).to_le_bytes());
    b.extend_from_slice(&page_size.to_le_bytes());
    for m in &files {
        b.extend_from_slice(&m.start.to_le_bytes());
        b.extend_from_slice(&m.end.to_le_bytes());
        b.extend_from_slice(&(m.offset / page_size).to_le_bytes());
    }
    for m in &files {
        b.extend_from_slice(m.name.as_bytes());
        b.push(0);
    }
    b
}

/// `NT_X86_XSAVE_LAYOUT`: {type, size, offset, flags} per enabled extended feature.
pub(crate) fn xsave_layout(layout: &[arch::XfeatComponent]) -> Vec<u8> {
    let mut b = Vec::new();
    for c in layout {
        for v in [c.kind, c.size, c.offset, c.flags] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Everything the notes segment is made from.
#[derive(Debug)]
pub(crate) struct NoteInput<'a> {
    /// The process.
    pub process: &'a ProcessInfo,
    /// Its threads, the one gdb should select first.
    pub threads: &'a [ThreadState],
    /// Times and pending signals, parallel to `threads`.
    pub times: &'a [ThreadTimes],
    /// The memory map the core describes (for `NT_FILE`).
    pub mappings: &'a [Mapping],
}

/// Builds the whole content of the `PT_NOTE` segment.
pub(crate) fn build(input: &NoteInput) -> Vec<u8> {
    let page = crate::page_size();
    let mut out = Vec::with_capacity(input.threads.len() * 3500 + 4096);
    let zero = ThreadTimes::default();
    // XSTATE notes use Intel's standard layout (see arch::to_standard_layout), described by
    // the NT_X86_XSAVE_LAYOUT note at the end.
    let mut layout = Vec::new();
    for (i, t) in input.threads.iter().enumerate() {
        let times = input.times.get(i).unwrap_or(&zero);
        push_note(
            &mut out,
            "CORE",
            NT_PRSTATUS,
            &prstatus(input.process, t, times),
        );
        if i == 0 {
            push_note(&mut out, "CORE", NT_PRPSINFO, &prpsinfo(input.process));
            push_note(&mut out, "CORE", NT_SIGINFO, &siginfo(t));
            push_note(&mut out, "CORE", NT_AUXV, &input.process.auxv);
            push_note(&mut out, "CORE", NT_FILE, &file_note(input.mappings, page));
        }
        push_note(&mut out, "CORE", NT_PRFPREG, &t.fpregs);
        if !t.xstate.is_empty() {
            let cpu_layout = arch::xsave_layout(arch::xcr0_of(&t.xstate));
            let (x, l) = arch::to_standard_layout(&t.xstate, &cpu_layout);
            push_note(&mut out, "LINUX", NT_X86_XSTATE, &x);
            layout = l;
        }
    }
    if !layout.is_empty() {
        push_note(
            &mut out,
            "LINUX",
            NT_X86_XSAVE_LAYOUT,
            &xsave_layout(&layout),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_padding() {
        let mut v = Vec::new();
        push_note(&mut v, "LINUX", 0x202, &[1, 2, 3]);
        // 12 header + "LINUX\0" padded to 8 + 3 padded to 4
        assert_eq!(v.len(), 12 + 8 + 4);
        assert_eq!(&v[0..4], &6u32.to_le_bytes());
        assert_eq!(&v[4..8], &3u32.to_le_bytes());
    }

    #[test]
    fn file_note_layout() {
        let m = Mapping::parse_line("1000-3000 r--p 00002000 fe:01 7 /bin/x").unwrap();
        let a = Mapping::parse_line("4000-5000 rw-p 00000000 00:00 0").unwrap();
        let b = file_note(&[m, a], 4096);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 4096);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 2);
        assert_eq!(&b[40..], b"/bin/x\0");
    }
}
