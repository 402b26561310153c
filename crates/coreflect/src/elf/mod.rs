//! The ELF core format: notes, the streaming writer, and a reader for checking cores.

pub mod meta;
pub mod notes;
pub mod reader;
pub mod symbols;
pub mod types;
pub mod writer;

/// `ET_CORE`.
pub const ET_CORE: u16 = 4;
/// `EM_X86_64`.
pub const EM_X86_64: u16 = 62;
/// `PT_LOAD`.
pub const PT_LOAD: u32 = 1;
/// `PT_NOTE`.
pub const PT_NOTE: u32 = 4;
/// `PN_XNUM`: the real program header count is in section header 0's `sh_info`.
pub const PN_XNUM: u16 = 0xffff;
/// Size of `Elf64_Ehdr`.
pub const EHDR_SIZE: usize = 64;
/// Size of `Elf64_Phdr`.
pub const PHDR_SIZE: usize = 56;
/// Size of `Elf64_Shdr`.
pub const SHDR_SIZE: usize = 64;

/// `NT_PRSTATUS`.
pub const NT_PRSTATUS: u32 = 1;
/// `NT_PRFPREG`.
pub const NT_PRFPREG: u32 = 2;
/// `NT_PRPSINFO`.
pub const NT_PRPSINFO: u32 = 3;
/// `NT_AUXV`.
pub const NT_AUXV: u32 = 6;
/// `NT_SIGINFO`.
pub const NT_SIGINFO: u32 = 0x5349_4749;
/// `NT_FILE`.
pub const NT_FILE: u32 = 0x4649_4c45;
/// `NT_X86_XSTATE`.
pub const NT_X86_XSTATE: u32 = 0x202;
/// `NT_X86_XSAVE_LAYOUT`.
pub const NT_X86_XSAVE_LAYOUT: u32 = 0x205;
