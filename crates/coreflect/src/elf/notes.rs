//! The notes of a Linux x86_64 core, in the kernel's order:
//! first thread `NT_PRSTATUS`, then `NT_PRPSINFO`, `NT_SIGINFO`, `NT_AUXV`, `NT_FILE`, that
//! thread's `NT_PRFPREG` and `NT_X86_XSTATE`; then every other thread's `NT_PRSTATUS`,
//! `NT_PRFPREG`, `NT_X86_XSTATE`; last `NT_X86_XSAVE_LAYOUT`.

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
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn put<const N: usize>(buf: &mut [u8], at: usize, v: [u8; N]) {
    buf[at..at + N].copy_from_slice(&v);
}

fn ticks_to_timeval(ticks: u64) -> [u8; 16] {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(ticks / hz).to_le_bytes());
    b[8..].copy_from_slice(&((ticks % hz) * 1_000_000 / hz).to_le_bytes());
    b
}

/// The signal a thread was stopped on (0 if it was stopped by us).
pub fn cursig(t: &ThreadState) -> i32 {
    match t.kind {
        StopKind::Signal(s) => s,
        _ => 0,
    }
}

/// `struct elf_prstatus` (336 bytes) for one thread.
pub fn prstatus(p: &ProcessInfo, t: &ThreadState, times: &ThreadTimes) -> Vec<u8> {
    let mut b = vec![0u8; 336];
    let sig = cursig(t);
    put(&mut b, 0, sig.to_le_bytes()); // si_signo
    put(&mut b, 12, (sig as i16).to_le_bytes()); // pr_cursig
    put(&mut b, 16, times.sig_pending.to_le_bytes());
    put(&mut b, 24, t.sigmask.to_le_bytes());
    put(&mut b, 32, t.tid.to_le_bytes());
    put(&mut b, 36, p.stat.ppid.to_le_bytes());
    put(&mut b, 40, p.stat.pgrp.to_le_bytes());
    put(&mut b, 44, p.stat.session.to_le_bytes());
    put(&mut b, 48, ticks_to_timeval(times.utime));
    put(&mut b, 64, ticks_to_timeval(times.stime));
    put(&mut b, 80, ticks_to_timeval(p.stat.cutime));
    put(&mut b, 96, ticks_to_timeval(p.stat.cstime));
    put(&mut b, 112, t.regs.to_bytes());
    put(&mut b, 328, 1i32.to_le_bytes()); // pr_fpvalid
    b
}

/// `struct elf_prpsinfo` (136 bytes).
pub fn prpsinfo(p: &ProcessInfo) -> Vec<u8> {
    let mut b = vec![0u8; 136];
    let sname = p.stat.state;
    let state = "RSDTZW".find(sname).unwrap_or(0) as u8;
    b[0] = state;
    b[1] = sname as u8;
    b[2] = (sname == 'Z') as u8;
    b[3] = p.stat.nice as i8 as u8;
    put(&mut b, 8, p.stat.flags.to_le_bytes());
    put(&mut b, 16, p.status.uid.to_le_bytes());
    put(&mut b, 20, p.status.gid.to_le_bytes());
    put(&mut b, 24, p.pid.to_le_bytes());
    put(&mut b, 28, p.stat.ppid.to_le_bytes());
    put(&mut b, 32, p.stat.pgrp.to_le_bytes());
    put(&mut b, 36, p.stat.session.to_le_bytes());
    let comm = p.stat.comm.as_bytes();
    let n = comm.len().min(15);
    b[40..40 + n].copy_from_slice(&comm[..n]);
    let args = p.cmdline.as_bytes();
    let n = args.len().min(79);
    b[56..56 + n].copy_from_slice(&args[..n]);
    b
}

/// The 128-byte `siginfo_t` of the first thread: the real one if it was stopped on a signal,
/// else zeros.
pub fn siginfo(t: &ThreadState) -> Vec<u8> {
    match t.siginfo {
        Some(si) if cursig(t) != 0 => si.to_vec(),
        _ => vec![0u8; 128],
    }
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
pub fn xsave_layout(layout: &[arch::XfeatComponent]) -> Vec<u8> {
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
pub struct NoteInput<'a> {
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
pub fn build(input: &NoteInput) -> Vec<u8> {
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
