//! The C structures of an x86_64 Linux core, as `#[repr(C)]` types with every byte named:
//! the ELF header and program headers, and the `NT_PRSTATUS`, `NT_PRPSINFO` notes
//! (`struct elf_prstatus` and `struct elf_prpsinfo` of `include/linux/elfcore.h`).
//!
//! Each type is checked at compile time against the kernel's size, and against implicit
//! padding (the sum of its fields' sizes must be its size), so that a field cannot be left
//! out silently and its bytes can be viewed as a slice soundly.

use std::mem::size_of;

/// Plain old data: a `#[repr(C)]` type without padding whose every bit pattern is valid.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, hold only integers (or arrays / structs of them),
/// and have no padding bytes. The `pod!` macro checks the last two at compile time.
pub unsafe trait Pod: Copy + 'static {
    /// The all-zero value.
    fn zeroed() -> Self {
        // SAFETY: every bit pattern, the all-zero one included, is a valid `Self` (trait
        // contract).
        unsafe { std::mem::zeroed() }
    }

    /// The value's bytes, in memory order (little-endian on x86_64).
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self` has no padding (trait contract), so all `size_of::<Self>()` bytes
        // behind the reference are initialized, and they live as long as `self`.
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u8, size_of::<Self>()) }
    }

    /// Reads a value from the first `size_of::<Self>()` bytes of `b`; `None` if `b` is
    /// shorter.
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: `b` holds at least `size_of::<Self>()` bytes (checked), any bit pattern is
        // a valid `Self` (trait contract), and the read is unaligned.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const Self) })
    }
}

/// Declares a `#[repr(C)]` [`Pod`] struct and checks its size and that it has no padding.
macro_rules! pod {
    (
        $(#[$m:meta])*
        pub struct $name:ident { $( $(#[$fm:meta])* pub $f:ident : $t:ty ),* $(,)? }
        size = $size:expr;
    ) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name { $( $(#[$fm])* pub $f: $t ),* }

        const _: () = assert!(size_of::<$name>() == $size, "size differs from the kernel's");
        const _: () = assert!(0 $( + size_of::<$t>() )* == $size, "implicit padding");

        // SAFETY: `#[repr(C)]`, integer fields only, and no padding (both checked above).
        unsafe impl Pod for $name {}

        impl Default for $name {
            fn default() -> Self {
                <$name as Pod>::zeroed()
            }
        }
    };
}

pod! {
    /// `Elf64_Ehdr`.
    pub struct Elf64Ehdr {
        /// `e_ident`: magic, class, data, version, OS ABI, padding.
        pub e_ident: [u8; 16],
        /// `e_type`.
        pub e_type: u16,
        /// `e_machine`.
        pub e_machine: u16,
        /// `e_version`.
        pub e_version: u32,
        /// `e_entry`.
        pub e_entry: u64,
        /// `e_phoff`.
        pub e_phoff: u64,
        /// `e_shoff`.
        pub e_shoff: u64,
        /// `e_flags`.
        pub e_flags: u32,
        /// `e_ehsize`.
        pub e_ehsize: u16,
        /// `e_phentsize`.
        pub e_phentsize: u16,
        /// `e_phnum`.
        pub e_phnum: u16,
        /// `e_shentsize`.
        pub e_shentsize: u16,
        /// `e_shnum`.
        pub e_shnum: u16,
        /// `e_shstrndx`.
        pub e_shstrndx: u16,
    }
    size = 64;
}

pod! {
    /// `Elf64_Phdr`.
    pub struct Elf64Phdr {
        /// `p_type`.
        pub p_type: u32,
        /// `p_flags`.
        pub p_flags: u32,
        /// `p_offset`.
        pub p_offset: u64,
        /// `p_vaddr`.
        pub p_vaddr: u64,
        /// `p_paddr`.
        pub p_paddr: u64,
        /// `p_filesz`.
        pub p_filesz: u64,
        /// `p_memsz`.
        pub p_memsz: u64,
        /// `p_align`.
        pub p_align: u64,
    }
    size = 56;
}

pod! {
    /// `Elf64_Shdr`.
    pub struct Elf64Shdr {
        /// `sh_name`.
        pub sh_name: u32,
        /// `sh_type`.
        pub sh_type: u32,
        /// `sh_flags`.
        pub sh_flags: u64,
        /// `sh_addr`.
        pub sh_addr: u64,
        /// `sh_offset`.
        pub sh_offset: u64,
        /// `sh_size`.
        pub sh_size: u64,
        /// `sh_link`.
        pub sh_link: u32,
        /// `sh_info`.
        pub sh_info: u32,
        /// `sh_addralign`.
        pub sh_addralign: u64,
        /// `sh_entsize`.
        pub sh_entsize: u64,
    }
    size = 64;
}

pod! {
    /// `struct __kernel_old_timeval`.
    pub struct Timeval {
        /// Seconds.
        pub tv_sec: i64,
        /// Microseconds.
        pub tv_usec: i64,
    }
    size = 16;
}

pod! {
    /// `struct elf_siginfo` (the short siginfo at the start of `elf_prstatus`).
    pub struct ElfSiginfo {
        /// `si_signo`.
        pub si_signo: i32,
        /// `si_code`.
        pub si_code: i32,
        /// `si_errno`.
        pub si_errno: i32,
    }
    size = 12;
}

pod! {
    /// `struct elf_prstatus` on x86_64: one thread's status and general registers
    /// (`NT_PRSTATUS`).
    pub struct ElfPrstatus {
        /// `pr_info`: the kernel fills only `si_signo`, with the signal that caused the dump.
        pub pr_info: ElfSiginfo,
        /// `pr_cursig`: that signal again.
        pub pr_cursig: i16,
        /// Padding before `pr_sigpend`.
        pub _pad0: [u8; 2],
        /// `pr_sigpend`: the thread's own pending signals (`task->pending`, not the shared
        /// ones), first word.
        pub pr_sigpend: u64,
        /// `pr_sighold`: the thread's blocked signals (`task->blocked`), first word.
        pub pr_sighold: u64,
        /// `pr_pid`: the thread id.
        pub pr_pid: i32,
        /// `pr_ppid`: the process's parent.
        pub pr_ppid: i32,
        /// `pr_pgrp`: process group.
        pub pr_pgrp: i32,
        /// `pr_sid`: session.
        pub pr_sid: i32,
        /// `pr_utime`: user time (the whole process's for the main thread).
        pub pr_utime: Timeval,
        /// `pr_stime`: system time (the whole process's for the main thread).
        pub pr_stime: Timeval,
        /// `pr_cutime`: reaped children's user time.
        pub pr_cutime: Timeval,
        /// `pr_cstime`: reaped children's system time.
        pub pr_cstime: Timeval,
        /// `pr_reg`: `elf_gregset_t`, the 27 words of `struct user_regs_struct`.
        pub pr_reg: [u64; 27],
        /// `pr_fpvalid`: 1 when `NT_PRFPREG` follows.
        pub pr_fpvalid: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad1: [u8; 4],
    }
    size = 336;
}

pod! {
    /// `struct elf_prpsinfo` on x86_64: the process (`NT_PRPSINFO`).
    pub struct ElfPrpsinfo {
        /// `pr_state`: numeric state (0 running, 1 sleeping, 2 disk sleep, ...).
        pub pr_state: u8,
        /// `pr_sname`: state letter, one of `RSDTZW`.
        pub pr_sname: u8,
        /// `pr_zomb`: 1 if a zombie.
        pub pr_zomb: u8,
        /// `pr_nice`: nice value.
        pub pr_nice: i8,
        /// Padding before `pr_flag`.
        pub _pad0: [u8; 4],
        /// `pr_flag`: the task's `PF_*` flags.
        pub pr_flag: u64,
        /// `pr_uid`: real uid.
        pub pr_uid: u32,
        /// `pr_gid`: real gid.
        pub pr_gid: u32,
        /// `pr_pid`.
        pub pr_pid: i32,
        /// `pr_ppid`.
        pub pr_ppid: i32,
        /// `pr_pgrp`.
        pub pr_pgrp: i32,
        /// `pr_sid`.
        pub pr_sid: i32,
        /// `pr_fname`: `comm`, NUL-terminated.
        pub pr_fname: [u8; 16],
        /// `pr_psargs`: the argument area (at most 79 bytes, NULs turned to spaces),
        /// NUL-terminated.
        pub pr_psargs: [u8; 80],
    }
    size = 136;
}

pod! {
    /// `siginfo_t` as the kernel copies it to user space (`NT_SIGINFO`, 128 bytes).
    pub struct Siginfo {
        /// `si_signo`.
        pub si_signo: i32,
        /// `si_errno`.
        pub si_errno: i32,
        /// `si_code`.
        pub si_code: i32,
        /// Padding before the union.
        pub _pad0: [u8; 4],
        /// The union (`_sifields`): sender pid/uid, fault address, ... by `si_code`.
        pub fields: [u8; 112],
    }
    size = 128;
}

/// One `NT_FILE` entry: a file-backed mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Offset in the file, in pages.
    pub page_offset: u64,
    /// The file's path.
    pub name: Vec<u8>,
}

/// Parses an `NT_FILE` descriptor: (page size, entries); `None` if it is malformed.
pub fn parse_file_note(b: &[u8]) -> Option<(u64, Vec<FileEntry>)> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let count = word(0)? as usize;
    let page = word(1)?;
    let mut names = b.get((2 + 3 * count) * 8..)?.split(|&c| c == 0);
    let mut v = Vec::with_capacity(count);
    for i in 0..count {
        let at = 2 + 3 * i;
        v.push(FileEntry {
            start: word(at)?,
            end: word(at + 1)?,
            page_offset: word(at + 2)?,
            name: names.next()?.to_vec(),
        });
    }
    Some((page, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn offsets_match_the_kernel() {
        assert_eq!(offset_of!(ElfPrstatus, pr_cursig), 12);
        assert_eq!(offset_of!(ElfPrstatus, pr_sigpend), 16);
        assert_eq!(offset_of!(ElfPrstatus, pr_sighold), 24);
        assert_eq!(offset_of!(ElfPrstatus, pr_pid), 32);
        assert_eq!(offset_of!(ElfPrstatus, pr_utime), 48);
        assert_eq!(offset_of!(ElfPrstatus, pr_reg), 112);
        assert_eq!(offset_of!(ElfPrstatus, pr_fpvalid), 328);
        assert_eq!(offset_of!(ElfPrpsinfo, pr_flag), 8);
        assert_eq!(offset_of!(ElfPrpsinfo, pr_uid), 16);
        assert_eq!(offset_of!(ElfPrpsinfo, pr_pid), 24);
        assert_eq!(offset_of!(ElfPrpsinfo, pr_fname), 40);
        assert_eq!(offset_of!(ElfPrpsinfo, pr_psargs), 56);
        assert_eq!(offset_of!(Siginfo, si_code), 8);
        assert_eq!(offset_of!(Siginfo, fields), 16);
        assert_eq!(size_of::<libc::siginfo_t>(), size_of::<Siginfo>());
        assert_eq!(offset_of!(Elf64Ehdr, e_phoff), 32);
        assert_eq!(offset_of!(Elf64Ehdr, e_phnum), 56);
        assert_eq!(offset_of!(Elf64Shdr, sh_size), 32);
        assert_eq!(offset_of!(Elf64Shdr, sh_info), 44);
        assert_eq!(size_of::<libc::user_regs_struct>(), 27 * 8);
    }

    #[test]
    fn bytes_round_trip() {
        let p = ElfPrstatus {
            pr_sighold: 0x1234,
            pr_pid: 77,
            ..Default::default()
        };
        let b = p.as_bytes().to_vec();
        assert_eq!(b.len(), 336);
        assert_eq!(&b[24..32], &0x1234u64.to_le_bytes());
        assert_eq!(ElfPrstatus::from_bytes(&b), Some(p));
        assert_eq!(ElfPrstatus::from_bytes(&b[..335]), None);
    }

    #[test]
    fn file_note_parses() {
        let mut b = Vec::new();
        for w in [1u64, 4096, 0x1000, 0x3000, 2] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(b"/bin/x\0");
        let (page, v) = parse_file_note(&b).unwrap();
        assert_eq!(page, 4096);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, b"/bin/x");
        assert_eq!(v[0].page_offset, 2);
    }
}
