//! Which mappings go into the core, and how much of each: the kernel's `vma_dump_size`
//! rules, as a policy separate from the writer (so dump levels can replace it).

use crate::proc::{Mapping, MappingKind};

/// `coredump_filter` bit 0: anonymous private memory.
pub const FILTER_ANON_PRIVATE: u32 = 1 << 0;
/// Bit 1: anonymous shared memory.
pub const FILTER_ANON_SHARED: u32 = 1 << 1;
/// Bit 2: file-backed private memory.
pub const FILTER_MAPPED_PRIVATE: u32 = 1 << 2;
/// Bit 3: file-backed shared memory.
pub const FILTER_MAPPED_SHARED: u32 = 1 << 3;
/// Bit 4: ELF headers (the first page of mapped ELF files, which holds the build-id).
pub const FILTER_ELF_HEADERS: u32 = 1 << 4;
/// Bit 5: private hugetlb memory.
pub const FILTER_HUGETLB_PRIVATE: u32 = 1 << 5;
/// Bit 6: shared hugetlb memory.
pub const FILTER_HUGETLB_SHARED: u32 = 1 << 6;
/// The kernel's default filter.
pub const DEFAULT_FILTER: u32 = 0x33;

/// How much of a mapping to dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Extent {
    /// Nothing: a PT_LOAD with `p_filesz = 0`.
    None,
    /// The whole mapping.
    Whole,
    /// Only the first page (an ELF header).
    FirstPage,
}

/// A policy choosing how much of each mapping goes into the core.
pub trait RegionPolicy {
    /// The extent of `m`. `is_elf` tells whether the mapping starts with an ELF header
    /// (it reads memory, so call it only when needed).
    fn extent(&self, m: &Mapping, is_elf: &mut dyn FnMut() -> bool) -> Extent;
}

/// The kernel's rules (`fs/coredump.c: vma_dump_size`), driven by `coredump_filter`.
#[derive(Debug, Clone, Copy)]
pub struct KernelPolicy {
    /// The `coredump_filter` bits.
    pub filter: u32,
}

impl Default for KernelPolicy {
    fn default() -> Self {
        KernelPolicy {
            filter: DEFAULT_FILTER,
        }
    }
}

impl RegionPolicy for KernelPolicy {
    fn extent(&self, m: &Mapping, is_elf: &mut dyn FnMut() -> bool) -> Extent {
        let f = |bit: u32| self.filter & bit != 0;
        let whole_if = |c: bool| if c { Extent::Whole } else { Extent::None };
        match m.kind() {
            // The kernel always dumps the vDSO, [vvar] and [vsyscall] (always_dump_vma),
            // even with VM_DONTDUMP; the pages it cannot read become zeros.
            MappingKind::Vdso | MappingKind::Special => return Extent::Whole,
            _ => {}
        }
        if m.has_flag("dd") {
            return Extent::None;
        }
        if m.has_flag("ht") {
            return whole_if(if m.shared {
                f(FILTER_HUGETLB_SHARED)
            } else {
                f(FILTER_HUGETLB_PRIVATE)
            });
        }
        if m.has_flag("io") {
            return Extent::None;
        }
        if m.shared {
            // An unlinked inode (anonymous shared memory, shmem, deleted files) counts as
            // anonymous shared; a linked file as file-backed shared.
            let anon = m.inode == 0 || m.name.ends_with(" (deleted)");
            return whole_if(f(if anon {
                FILTER_ANON_SHARED
            } else {
                FILTER_MAPPED_SHARED
            }));
        }
        // Private: has it anonymous (copy-on-write or zero-fill) pages?
        let has_anon = m.anonymous_kb > 0 || m.swap_kb > 0;
        if has_anon && f(FILTER_ANON_PRIVATE) {
            return Extent::Whole;
        }
        if m.kind() != MappingKind::File {
            return Extent::None;
        }
        if f(FILTER_MAPPED_PRIVATE) {
            return Extent::Whole;
        }
        if f(FILTER_ELF_HEADERS) && m.offset == 0 && m.read && is_elf() {
            return Extent::FirstPage;
        }
        Extent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(line: &str, flags: &str, anon_kb: u64) -> Mapping {
        let mut m = Mapping::parse_line(line).unwrap();
        m.vmflags = flags
            .split_whitespace()
            .map(|w| [w.as_bytes()[0], w.as_bytes()[1]])
            .collect();
        m.anonymous_kb = anon_kb;
        m
    }

    #[test]
    fn kernel_rules() {
        let p = KernelPolicy::default();
        let mut yes = || true;
        let anon = map("1000-3000 rw-p 00000000 00:00 0", "rd wr", 4);
        assert_eq!(p.extent(&anon, &mut yes), Extent::Whole);
        let untouched = map("1000-3000 rw-p 00000000 00:00 0", "rd wr", 0);
        assert_eq!(p.extent(&untouched, &mut yes), Extent::None);
        let dd = map("1000-3000 rw-p 00000000 00:00 0", "rd wr dd", 4);
        assert_eq!(p.extent(&dd, &mut yes), Extent::None);
        let lib = map(
            "1000-3000 r-xp 00000000 fe:01 77 /lib/libc.so.6",
            "rd ex",
            0,
        );
        assert_eq!(p.extent(&lib, &mut yes), Extent::FirstPage);
        assert_eq!(p.extent(&lib, &mut || false), Extent::None);
        let data = map(
            "1000-3000 rw-p 00002000 fe:01 77 /lib/libc.so.6",
            "rd wr",
            8,
        );
        assert_eq!(p.extent(&data, &mut yes), Extent::Whole);
        let shm = map(
            "1000-3000 rw-s 00000000 00:01 9 /dev/zero (deleted)",
            "rd wr sh",
            0,
        );
        assert_eq!(p.extent(&shm, &mut yes), Extent::Whole);
        let fshared = map("1000-3000 rw-s 00000000 fe:01 9 /data/file", "rd wr sh", 0);
        assert_eq!(p.extent(&fshared, &mut yes), Extent::None);
        let vdso = map("1000-3000 r-xp 00000000 00:00 0 [vdso]", "rd ex", 0);
        assert_eq!(p.extent(&vdso, &mut yes), Extent::Whole);
        // Dumped whole even with VM_DONTDUMP, as the kernel does (written as zeros).
        let vvar = map("1000-3000 r--p 00000000 00:00 0 [vvar]", "rd io dd", 0);
        assert_eq!(p.extent(&vvar, &mut yes), Extent::Whole);
        let io = map("1000-3000 rw-p 00000000 00:00 0", "rd wr io", 4);
        assert_eq!(p.extent(&io, &mut yes), Extent::None);
        let all = KernelPolicy { filter: 0x7f };
        assert_eq!(all.extent(&fshared, &mut yes), Extent::Whole);
        assert_eq!(all.extent(&lib, &mut yes), Extent::Whole);
    }
}
