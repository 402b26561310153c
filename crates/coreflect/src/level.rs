//! Dump levels (procdump's `-mm` / default / `-ma`): which memory goes into a core.
//!
//! - [`Level::Default`]: the kernel's rules with the target's `coredump_filter`
//!   ([`KernelPolicy`]).
//! - [`Level::Full`]: every readable mapping, file-backed ones included, like `gcore -a`
//!   ([`FullPolicy`]); never-populated anonymous pages are still holes.
//! - [`Level::Mini`]: enough for a debugger to show every thread's backtrace and load every
//!   shared library with its build-id (`mini_plan`): each thread's stack from its stack
//!   pointer (minus the red zone) to the end of its stack mapping, the ELF header page of
//!   every mapped object, the executable's and the dynamic loader's writable mappings, the
//!   pages holding `r_debug` and every `link_map` entry and name, and the vDSO.
//!
//! A PT_LOAD can only hold the start of its mapping, so the mini plan splits a mapping into
//! several consecutive segments when it keeps pages from its middle (a stack's used part).

use crate::elf::writer::SegmentPlan;
use crate::proc::{Mapping, MappingKind};
use crate::select::{Extent, KernelPolicy, RegionPolicy};
use crate::snapshot::Snapshot;

/// How much memory a core holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Level {
    /// Stacks, ELF headers, the loader's data and the vDSO: backtraces and libraries only.
    Mini,
    /// What the kernel would dump (the target's `coredump_filter`, `MADV_DONTDUMP`).
    #[default]
    Default,
    /// Every readable mapping, file-backed ones included (like `gcore -a`).
    Full,
}

impl Level {
    /// The level's name (`mini`, `default`, `full`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Level::Mini => "mini",
            Level::Default => "default",
            Level::Full => "full",
        }
    }
}

/// Every readable mapping, whole: anonymous and file-backed, private and shared, including
/// `MADV_DONTDUMP` ranges (as `gcore -a`). Never device (`VM_IO`) mappings, `[vvar]` or
/// `[vsyscall]`, nor inaccessible ones (guard pages).
#[derive(Debug, Clone, Copy, Default)]
pub struct FullPolicy;

impl RegionPolicy for FullPolicy {
    fn extent(&self, m: &Mapping, _is_elf: &mut dyn FnMut() -> bool) -> Extent {
        match m.kind() {
            MappingKind::Vdso => Extent::Whole,
            MappingKind::Special => Extent::None,
            _ if m.has_flag("io") || !m.read => Extent::None,
            _ => Extent::Whole,
        }
    }
}

/// What the mini level keeps of a mapping before stacks and loader data are added: ELF
/// header pages and the vDSO.
#[derive(Debug, Clone, Copy, Default)]
struct MiniBase;

impl RegionPolicy for MiniBase {
    fn extent(&self, m: &Mapping, is_elf: &mut dyn FnMut() -> bool) -> Extent {
        match m.kind() {
            MappingKind::Vdso => Extent::Whole,
            MappingKind::File if m.offset == 0 && m.read && !m.has_flag("io") && is_elf() => {
                Extent::FirstPage
            }
            _ => Extent::None,
        }
    }
}

/// The x86-64 SysV red zone below the stack pointer, which a leaf function may use.
pub const RED_ZONE: u64 = 128;

/// The most `link_map` entries followed (a corrupt list must not loop forever).
const MAX_LINK_MAPS: usize = 4096;

/// The segments of a core of `snap` at `level`; `filter` overrides the target's
/// `coredump_filter` (and the level) when given.
pub fn plan(snap: &crate::Snapshot, level: Level, filter: Option<u32>) -> Vec<SegmentPlan> {
    plan_for(snap.bound(), level, filter)
}

pub(crate) fn plan_for(snap: &Snapshot, level: Level, filter: Option<u32>) -> Vec<SegmentPlan> {
    match (filter, level) {
        (Some(f), _) => snap.plan(&KernelPolicy { filter: f }),
        (None, Level::Default) => snap.plan(&KernelPolicy {
            filter: snap.process().coredump_filter,
        }),
        (None, Level::Full) => snap.plan(&FullPolicy),
        (None, Level::Mini) => mini_plan(snap),
    }
}

/// The mini level's segments (see the module documentation).
pub(crate) fn mini_plan(snap: &Snapshot) -> Vec<SegmentPlan> {
    let page = crate::page_size();
    let maps = snap.mappings();
    let base = snap.plan(&MiniBase);
    // Page ranges to keep, per mapping index.
    let mut keep: Vec<Vec<(u64, u64)>> = vec![Vec::new(); maps.len()];
    let find = |addr: u64| maps.iter().position(|m| addr >= m.start && addr < m.end);
    let add = |keep: &mut Vec<Vec<(u64, u64)>>, start: u64, end: u64| {
        let mut a = start & !(page - 1);
        while a < end {
            let Some(i) = find(a) else { break };
            let m = &maps[i];
            if m.kind() == MappingKind::Special || m.has_flag("io") || !m.read {
                break;
            }
            let e = end.div_ceil(page).saturating_mul(page).min(m.end);
            keep[i].push((a, e));
            a = e;
        }
    };
    for (i, s) in base.iter().enumerate() {
        if s.filesz > 0 {
            keep[i].push((s.vaddr, s.vaddr + s.filesz));
        }
    }
    // Stacks: from SP minus the red zone to the end of the mapping holding SP.
    for t in snap.threads() {
        let sp = t.regs.0.rsp;
        if let Some(i) = find(sp) {
            add(
                &mut keep,
                sp.saturating_sub(RED_ZONE).max(maps[i].start),
                maps[i].end,
            );
        }
    }
    // The executable's and the loader's writable mappings (their .data, .bss, GOT and
    // .dynamic, which holds DT_DEBUG), found through the auxiliary vector.
    let aux = auxv(&snap.process().auxv);
    let get = |k: u64| aux.iter().find(|e| e.0 == k).map(|e| e.1);
    for at in [get(AT_PHDR), get(AT_BASE), get(AT_ENTRY)]
        .into_iter()
        .flatten()
    {
        let Some(i) = find(at) else { continue };
        let (dev, inode) = (&maps[i].dev, maps[i].inode);
        if inode == 0 {
            continue;
        }
        for (j, m) in maps.iter().enumerate() {
            if m.inode == inode && &m.dev == dev && m.write && m.read {
                keep[j].push((m.start, m.end));
                // The anonymous part of .bss right after the file-backed data.
                if let Some(n) = maps.get(j + 1) {
                    if n.start == m.end && n.inode == 0 && n.kind() == MappingKind::Anonymous {
                        keep[j + 1].push((n.start, n.end));
                    }
                }
            }
        }
    }
    // r_debug and the link_map list, wherever the loader allocated them.
    let read = |addr: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        (snap.read_memory(addr, &mut b).ok()? == len).then_some(b)
    };
    for (a, l) in link_map_ranges(get(AT_PHDR), get(AT_PHNUM), &read) {
        add(&mut keep, a, a + l);
    }
    let mut out = Vec::with_capacity(base.len() + snap.threads().len());
    for (s, mut ranges) in base.into_iter().zip(keep) {
        out.extend(split(s, &mut ranges));
    }
    out
}

/// Splits the segment `s` into consecutive segments, dumping exactly the (page-aligned,
/// possibly overlapping) `ranges` inside it.
fn split(s: SegmentPlan, ranges: &mut [(u64, u64)]) -> Vec<SegmentPlan> {
    let end = s.vaddr + s.memsz;
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in ranges.iter() {
        let (a, b) = (a.max(s.vaddr), b.min(end));
        if a >= b {
            continue;
        }
        match merged.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    if merged.is_empty() {
        return vec![SegmentPlan { filesz: 0, ..s }];
    }
    if merged.len() == 1 && merged[0].0 == s.vaddr {
        // A prefix: one segment.
        return vec![SegmentPlan {
            filesz: merged[0].1 - s.vaddr,
            ..s
        }];
    }
    let mut out = Vec::new();
    let mut at = s.vaddr;
    let piece = |from: u64, to: u64, dumped: bool| SegmentPlan {
        vaddr: from,
        memsz: to - from,
        filesz: if dumped { to - from } else { 0 },
        ..s.clone()
    };
    for (a, b) in merged {
        if a > at {
            out.push(piece(at, a, false));
        }
        out.push(piece(a, b, true));
        at = b;
    }
    if at < end {
        out.push(piece(at, end, false));
    }
    out
}

const AT_PHDR: u64 = 3;
const AT_PHNUM: u64 = 5;
const AT_BASE: u64 = 7;
const AT_ENTRY: u64 = 9;

fn auxv(raw: &[u8]) -> Vec<(u64, u64)> {
    raw.chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().unwrap()),
                u64::from_le_bytes(c[8..].try_into().unwrap()),
            )
        })
        .take_while(|e| e.0 != 0)
        .collect()
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The memory a debugger reads to list the shared libraries: the executable's dynamic
/// section (for `DT_DEBUG`), `r_debug`, each `link_map` entry's public fields and its name.
/// `read` reads the snapshot. Returns (address, length) pairs.
pub fn link_map_ranges(
    phdr: Option<u64>,
    phnum: Option<u64>,
    read: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
) -> Vec<(u64, u64)> {
    const PT_DYNAMIC: u32 = 2;
    const PT_PHDR: u32 = 6;
    const DT_DEBUG: u64 = 21;
    let mut out = Vec::new();
    let (Some(phdr), Some(phnum)) = (phdr, phnum) else {
        return out;
    };
    let Some(ph) = read(phdr, (phnum.min(256) * 56) as usize) else {
        return out;
    };
    let mut bias = None;
    let mut dynamic = None;
    for p in ph.chunks_exact(56) {
        let ty = u32::from_le_bytes(p[..4].try_into().unwrap());
        if ty == PT_PHDR {
            bias = Some(phdr.wrapping_sub(u64_at(p, 16)));
        } else if ty == PT_DYNAMIC {
            dynamic = Some((u64_at(p, 16), u64_at(p, 40)));
        }
    }
    let Some((dyn_vaddr, dyn_size)) = dynamic else {
        return out;
    };
    let dyn_addr = bias.unwrap_or(0).wrapping_add(dyn_vaddr);
    let dyn_size = dyn_size.min(64 << 10);
    out.push((dyn_addr, dyn_size));
    let Some(d) = read(dyn_addr, dyn_size as usize) else {
        return out;
    };
    let Some(r_debug) = d
        .chunks_exact(16)
        .find(|e| u64_at(e, 0) == DT_DEBUG)
        .map(|e| u64_at(e, 8))
        .filter(|&a| a != 0)
    else {
        return out;
    };
    // struct r_debug (r_debug_extended since glibc 2.35: r_next at 40).
    out.push((r_debug, 48));
    let Some(r) = read(r_debug, 48) else {
        return out;
    };
    let mut heads = vec![u64_at(&r, 8)];
    if u32::from_le_bytes(r[..4].try_into().unwrap()) >= 2 {
        // Other namespaces' r_debug structures.
        let mut next = u64_at(&r, 40);
        while next != 0 && heads.len() < 64 {
            out.push((next, 48));
            match read(next, 48) {
                Some(r) => {
                    heads.push(u64_at(&r, 8));
                    next = u64_at(&r, 40);
                }
                None => break,
            }
        }
    }
    let mut seen = 0;
    for mut lm in heads {
        while lm != 0 && seen < MAX_LINK_MAPS {
            seen += 1;
            // l_addr, l_name, l_ld, l_next, l_prev.
            out.push((lm, 40));
            let Some(e) = read(lm, 40) else { break };
            let name = u64_at(&e, 8);
            if name != 0 {
                out.push((name, name_len(name, read)));
            }
            lm = u64_at(&e, 24);
        }
    }
    out
}

fn name_len(addr: u64, read: &dyn Fn(u64, usize) -> Option<Vec<u8>>) -> u64 {
    // Up to PATH_MAX, a piece at a time (a name may end just before an unreadable page).
    let mut len = 0u64;
    while len < 4096 {
        let Some(b) = read(addr + len, 64) else {
            return len + 1;
        };
        if let Some(z) = b.iter().position(|&c| c == 0) {
            return len + z as u64 + 1;
        }
        len += 64;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::writer::Source;

    fn seg(vaddr: u64, memsz: u64) -> SegmentPlan {
        SegmentPlan {
            vaddr,
            memsz,
            filesz: 0,
            flags: 6,
            source: Source::Image,
            sparse: true,
            name: "[stack]".into(),
        }
    }

    #[test]
    fn split_ranges() {
        let s = seg(0x10000, 0x10000);
        let v = split(s.clone(), &mut []);
        assert_eq!((v.len(), v[0].filesz), (1, 0));
        let v = split(s.clone(), &mut [(0x10000, 0x11000)]);
        assert_eq!((v.len(), v[0].filesz, v[0].memsz), (1, 0x1000, 0x10000));
        let v = split(s.clone(), &mut [(0x18000, 0x20000), (0x10000, 0x11000)]);
        let got: Vec<_> = v.iter().map(|p| (p.vaddr, p.memsz, p.filesz)).collect();
        assert_eq!(
            got,
            vec![
                (0x10000, 0x1000, 0x1000),
                (0x11000, 0x7000, 0),
                (0x18000, 0x8000, 0x8000)
            ]
        );
        let v = split(s, &mut [(0x14000, 0x15000), (0x14800, 0x16000)]);
        let got: Vec<_> = v.iter().map(|p| (p.vaddr, p.memsz, p.filesz)).collect();
        assert_eq!(
            got,
            vec![
                (0x10000, 0x4000, 0),
                (0x14000, 0x2000, 0x2000),
                (0x16000, 0xa000, 0)
            ]
        );
    }

    #[test]
    fn full_policy() {
        let m = |l: &str| Mapping::parse_line(l).unwrap();
        let mut y = || true;
        let p = FullPolicy;
        assert_eq!(
            p.extent(&m("1000-3000 r-xp 00000000 fe:01 7 /lib/x.so"), &mut y),
            Extent::Whole
        );
        assert_eq!(
            p.extent(&m("1000-3000 ---p 00000000 00:00 0"), &mut y),
            Extent::None
        );
        assert_eq!(
            p.extent(&m("1000-3000 r--p 00000000 00:00 0 [vvar]"), &mut y),
            Extent::None
        );
    }
}
