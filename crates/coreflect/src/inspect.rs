//! What a [`crate::Snapshot`] tells about the process: threads with named registers, the
//! auxiliary vector, the mapped ELF modules with their build-ids, and whether a range of
//! memory is frozen or read live.
//!
//! These types are plain data: they hold no file or tracer and can be cloned, sent and kept
//! after the snapshot is gone.

use crate::arch::x86_64::Regs;
use crate::error::Pid;
use crate::proc::{Mapping, MappingKind};
use crate::stop::ThreadState;

/// The general registers of an x86_64 thread, by name.
///
/// ```
/// let mut r = coreflect::Registers::default();
/// r.rip = 0x401000;
/// assert_eq!(r.get("rip"), Some(0x401000));
/// assert_eq!(r.iter().count(), 27);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the register names are their documentation
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// The syscall number the thread was in (`-1` as u64 when in user mode).
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

impl Registers {
    /// The registers' names, in `NT_PRSTATUS` order.
    pub const NAMES: [&'static str; 27] = [
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
        "es", "fs", "gs",
    ];

    fn values(&self) -> [u64; 27] {
        [
            self.r15,
            self.r14,
            self.r13,
            self.r12,
            self.rbp,
            self.rbx,
            self.r11,
            self.r10,
            self.r9,
            self.r8,
            self.rax,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.orig_rax,
            self.rip,
            self.cs,
            self.eflags,
            self.rsp,
            self.ss,
            self.fs_base,
            self.gs_base,
            self.ds,
            self.es,
            self.fs,
            self.gs,
        ]
    }

    /// The register called `name` (as in [`Registers::NAMES`]; `pc`/`sp`/`fp` are accepted
    /// for `rip`/`rsp`/`rbp`).
    pub fn get(&self, name: &str) -> Option<u64> {
        let name = match name {
            "pc" => "rip",
            "sp" => "rsp",
            "fp" => "rbp",
            n => n,
        };
        let i = Self::NAMES.iter().position(|n| *n == name)?;
        Some(self.values()[i])
    }

    /// Every register as `(name, value)`, in `NT_PRSTATUS` order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        Self::NAMES.into_iter().zip(self.values())
    }
}

impl Registers {
    /// The registers of a captured `user_regs_struct`.
    pub(crate) fn from_regs(r: &Regs) -> Registers {
        let r = &r.0;
        Registers {
            r15: r.r15,
            r14: r.r14,
            r13: r.r13,
            r12: r.r12,
            rbp: r.rbp,
            rbx: r.rbx,
            r11: r.r11,
            r10: r.r10,
            r9: r.r9,
            r8: r.r8,
            rax: r.rax,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            orig_rax: r.orig_rax,
            rip: r.rip,
            cs: r.cs,
            eflags: r.eflags,
            rsp: r.rsp,
            ss: r.ss,
            fs_base: r.fs_base,
            gs_base: r.gs_base,
            ds: r.ds,
            es: r.es,
            fs: r.fs,
            gs: r.gs,
        }
    }
}

/// One thread of the snapshot: its name and the state captured while it was stopped.
///
/// ```no_run
/// # fn main() -> coreflect::Result<()> {
/// let snap = coreflect::Snapshot::capture(1234, &coreflect::Options::default())?;
/// for t in snap.threads() {
///     println!("{} {:?} pc={:#x} sp={:#x} rax={:#x}", t.tid(), t.name(), t.pc(), t.sp(),
///              t.registers().rax);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Thread {
    name: String,
    regs: Registers,
    state: ThreadState,
    sig_blocked: u64,
    sig_pending: u64,
}

impl std::fmt::Debug for Thread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Thread")
            .field("tid", &self.tid())
            .field("name", &self.name)
            .field("pc", &format_args!("{:#x}", self.pc()))
            .field("sp", &format_args!("{:#x}", self.sp()))
            .finish()
    }
}

impl Thread {
    pub(crate) fn new(state: ThreadState, name: String, times: &crate::proc::ThreadTimes) -> Self {
        Thread {
            regs: Registers::from_regs(&state.regs),
            name,
            sig_blocked: state.sigmask,
            state,
            sig_pending: times.sig_pending,
        }
    }

    /// The thread id.
    pub fn tid(&self) -> Pid {
        self.state.tid
    }

    /// The thread's name (`/proc/PID/task/TID/comm`, read right after the pause; empty if
    /// the thread had exited by then).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The program counter (`rip`).
    pub fn pc(&self) -> u64 {
        self.regs.rip
    }

    /// The stack pointer (`rsp`).
    pub fn sp(&self) -> u64 {
        self.regs.rsp
    }

    /// The frame pointer (`rbp`; meaningful only in code built with frame pointers).
    pub fn fp(&self) -> u64 {
        self.regs.rbp
    }

    /// The general registers.
    pub fn registers(&self) -> &Registers {
        &self.regs
    }

    /// The system call the thread was in when it was stopped, if any.
    pub fn syscall(&self) -> Option<u64> {
        self.state.regs.syscall_nr()
    }

    /// The FPU/SSE state in `fxsave` format (512 bytes, as `NT_PRFPREG`).
    pub fn fpregs(&self) -> &[u8] {
        &self.state.fpregs
    }

    /// The full XSAVE area (AVX, AVX-512…), as `NT_X86_XSTATE` (empty if unavailable).
    pub fn xstate(&self) -> &[u8] {
        &self.state.xstate
    }

    /// The blocked signals (bit `n-1` for signal `n`).
    pub fn blocked_signals(&self) -> u64 {
        self.sig_blocked
    }

    /// The pending signals (thread and process-wide; bit `n-1` for signal `n`).
    pub fn pending_signals(&self) -> u64 {
        self.sig_pending
    }
}

/// One entry of the auxiliary vector (`/proc/PID/auxv`).
///
/// ```
/// let e = coreflect::AuxvEntry { key: 6, value: 4096 };
/// assert_eq!(e.name(), Some("AT_PAGESZ"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuxvEntry {
    /// The `AT_*` type.
    pub key: u64,
    /// Its value.
    pub value: u64,
}

impl AuxvEntry {
    /// The `AT_*` name of the key, if it is a known one.
    pub fn name(&self) -> Option<&'static str> {
        Some(match self.key {
            2 => "AT_EXECFD",
            3 => "AT_PHDR",
            4 => "AT_PHENT",
            5 => "AT_PHNUM",
            6 => "AT_PAGESZ",
            7 => "AT_BASE",
            8 => "AT_FLAGS",
            9 => "AT_ENTRY",
            11 => "AT_UID",
            12 => "AT_EUID",
            13 => "AT_GID",
            14 => "AT_EGID",
            15 => "AT_PLATFORM",
            16 => "AT_HWCAP",
            17 => "AT_CLKTCK",
            23 => "AT_SECURE",
            24 => "AT_BASE_PLATFORM",
            25 => "AT_RANDOM",
            26 => "AT_HWCAP2",
            27 => "AT_RSEQ_FEATURE_SIZE",
            28 => "AT_RSEQ_ALIGN",
            29 => "AT_HWCAP3",
            30 => "AT_HWCAP4",
            31 => "AT_EXECFN",
            32 => "AT_SYSINFO",
            33 => "AT_SYSINFO_EHDR",
            51 => "AT_MINSIGSTKSZ",
            _ => return None,
        })
    }
}

/// Parses a raw auxiliary vector (pairs of native u64) up to, not including, `AT_NULL`.
pub fn parse_auxv(raw: &[u8]) -> Vec<AuxvEntry> {
    raw.chunks_exact(16)
        .map(|c| AuxvEntry {
            key: u64::from_ne_bytes(c[..8].try_into().unwrap()),
            value: u64::from_ne_bytes(c[8..].try_into().unwrap()),
        })
        .take_while(|e| e.key != 0)
        .collect()
}

/// Where the bytes of a range of a snapshot come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Freshness {
    /// From the frozen image: as the process held it during the pause.
    Frozen,
    /// Read from memory that keeps changing: what it holds when read, not at the pause.
    Live(LiveReason),
}

/// Why a range is read live rather than from the frozen image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LiveReason {
    /// `MADV_DONTFORK`: absent from the clone, read from the running target.
    DontFork,
    /// `MADV_WIPEONFORK`: zero in the clone, read from the running target.
    WipeOnFork,
    /// Shared memory (`MAP_SHARED`, shmem, shared files): the clone sees every later write
    /// of the target and of any other process sharing it.
    Shared,
}

/// A mapped ELF object (the executable, a shared library, the vDSO).
///
/// ```no_run
/// # fn main() -> coreflect::Result<()> {
/// let snap = coreflect::Snapshot::capture(1234, &coreflect::Options::default())?;
/// for m in snap.modules() {
///     println!("{:#x} {} {}", m.load_bias, m.path, m.build_id_hex().unwrap_or_default());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The mapped file's path as the memory map shows it (`[vdso]` for the vDSO; a path
    /// ending in ` (deleted)` if the file was removed).
    pub path: String,
    /// The address of its ELF header (its lowest mapping).
    pub start: u64,
    /// One past the end of its last segment.
    pub end: u64,
    /// What was added to the object's virtual addresses: 0 for a non-PIE executable, the
    /// load address for a PIE or shared library (`dlpi_addr`, `l_addr`).
    pub load_bias: u64,
    /// The `NT_GNU_BUILD_ID` bytes, if it has one.
    pub build_id: Option<Vec<u8>>,
}

impl Module {
    /// The build-id in lowercase hex, as `eu-readelf -n` and debuginfod use it.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id
            .as_ref()
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
    }
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_GNU_BUILD_ID: u32 = 3;

struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Reads an ELF64 little-endian object's program headers through `read(offset, buf) ->
/// bytes read`, where offsets are file offsets (or, for an image in memory, offsets from
/// its header).
fn phdrs(read: &mut dyn FnMut(u64, &mut [u8]) -> usize) -> Option<Vec<Phdr>> {
    let mut eh = [0u8; 64];
    if read(0, &mut eh) != 64 || &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56));
    if phentsize != 56 || phnum == 0 || phnum > 512 {
        return None;
    }
    let mut b = vec![0u8; 56 * phnum as usize];
    if read(phoff, &mut b) != b.len() {
        return None;
    }
    Some(
        b.chunks_exact(56)
            .map(|p| Phdr {
                p_type: u32_at(p, 0),
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                filesz: u64_at(p, 32),
                memsz: u64_at(p, 40),
                align: u64_at(p, 48),
            })
            .collect(),
    )
}

/// Finds `NT_GNU_BUILD_ID` in the bytes of one note segment aligned to `align`.
pub(crate) fn build_id_in_notes(b: &[u8], align: u64) -> Option<Vec<u8>> {
    let a = if align == 8 { 8 } else { 4 };
    let up = |x: usize| (x + a - 1) & !(a - 1);
    let mut o = 0;
    while o + 12 <= b.len() {
        let (namesz, descsz, ty) = (
            u32_at(b, o) as usize,
            u32_at(b, o + 4) as usize,
            u32_at(b, o + 8),
        );
        let name = o + 12;
        let desc = name + up(namesz);
        let next = desc + up(descsz);
        if desc + descsz > b.len() || next <= o {
            return None;
        }
        if ty == NT_GNU_BUILD_ID && &b[name..name + namesz] == b"GNU\0" {
            return Some(b[desc..desc + descsz].to_vec());
        }
        o = next;
    }
    None
}

fn build_id_from(
    read: &mut dyn FnMut(u64, &mut [u8]) -> usize,
    ph: &[Phdr],
    file: bool,
) -> Option<Vec<u8>> {
    ph.iter()
        .filter(|p| p.p_type == PT_NOTE && p.filesz > 0 && p.filesz <= 1 << 20)
        .find_map(|p| {
            let mut b = vec![0u8; p.filesz as usize];
            let at = if file { p.offset } else { p.vaddr };
            (read(at, &mut b) == b.len()).then_some(())?;
            build_id_in_notes(&b, p.align)
        })
}

/// Finds the ELF objects mapped in `maps`, reading their headers and notes through
/// `read_mem(addr, buf)` (the snapshot's memory), and from the file behind the mapping
/// (`/proc/<pid>/map_files/…`) when the notes are not in memory.
pub(crate) fn find_modules(
    pid: Pid,
    maps: &[Mapping],
    read_mem: &dyn Fn(u64, &mut [u8]) -> usize,
) -> Vec<Module> {
    let page = crate::page_size();
    let mut out: Vec<Module> = Vec::new();
    for m in maps {
        let candidate = match m.kind() {
            MappingKind::Vdso => true,
            MappingKind::File => m.offset == 0 && m.read,
            _ => false,
        };
        if !candidate || out.iter().any(|x| m.start >= x.start && m.start < x.end) {
            continue;
        }
        let mut from_mem = |off: u64, b: &mut [u8]| read_mem(m.start + off, b);
        let Some(ph) = phdrs(&mut from_mem) else {
            continue;
        };
        let loads: Vec<&Phdr> = ph.iter().filter(|p| p.p_type == PT_LOAD).collect();
        let Some(first) = loads.iter().min_by_key(|p| p.vaddr) else {
            continue;
        };
        // The mapping at file offset 0 holds the first PT_LOAD's page.
        let bias = m
            .start
            .wrapping_sub(first.vaddr.wrapping_sub(first.offset) & !(page - 1));
        let end = loads
            .iter()
            .map(|p| bias.wrapping_add(p.vaddr + p.memsz))
            .max()
            .unwrap_or(m.end)
            .div_ceil(page)
            * page;
        let mut from_image = |va: u64, b: &mut [u8]| read_mem(bias.wrapping_add(va), b);
        let mut build_id = build_id_from(&mut from_image, &ph, false);
        if build_id.is_none() && m.kind() == MappingKind::File {
            let f = std::fs::File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
                .or_else(|_| std::fs::File::open(&m.name));
            if let Ok(f) = f {
                use std::os::unix::fs::FileExt;
                let mut from_file = |off: u64, b: &mut [u8]| f.read_at(b, off).unwrap_or(0);
                if let Some(fph) = phdrs(&mut from_file) {
                    build_id = build_id_from(&mut from_file, &fph, true);
                }
            }
        }
        out.push(Module {
            path: m.name.clone(),
            start: m.start,
            end: end.max(m.end),
            load_bias: bias,
            build_id,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_parsed_with_both_alignments() {
        let mut n = Vec::new();
        // A note before the build-id, with a name that needs padding.
        n.extend_from_slice(&5u32.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&1u32.to_le_bytes());
        n.extend_from_slice(b"Linux\0\0\0");
        n.extend_from_slice(&[1, 2, 3, 4]);
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(&NT_GNU_BUILD_ID.to_le_bytes());
        n.extend_from_slice(b"GNU\0");
        n.extend_from_slice(&[0xab, 0xcd, 0xef, 0]);
        assert_eq!(build_id_in_notes(&n, 4), Some(vec![0xab, 0xcd, 0xef]));
        assert_eq!(build_id_in_notes(&n[..n.len() - 2], 4), None);
    }

    #[test]
    fn auxv_stops_at_null() {
        let mut raw = Vec::new();
        for (k, v) in [(6u64, 4096u64), (0, 0), (9, 1)] {
            raw.extend_from_slice(&k.to_ne_bytes());
            raw.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(
            parse_auxv(&raw),
            vec![AuxvEntry {
                key: 6,
                value: 4096
            }]
        );
    }
}
