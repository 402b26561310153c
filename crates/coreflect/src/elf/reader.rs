//! A small reader for ELF cores: program headers (with `PN_XNUM`), notes, and memory by
//! virtual address. Used by the tests to check what the writer wrote, and by tools that
//! inspect cores.

use super::types::{ElfPrstatus, Pod};
use super::*;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phdr {
    /// `p_type`.
    pub p_type: u32,
    /// `p_flags`.
    pub flags: u32,
    /// `p_offset`.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_align`.
    pub align: u64,
}

/// One note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Owner name ("CORE", "LINUX").
    pub name: String,
    /// `n_type`.
    pub ntype: u32,
    /// Descriptor bytes.
    pub desc: Vec<u8>,
}

/// An open core file.
#[derive(Debug)]
pub struct CoreFile {
    file: File,
    /// `e_type`.
    pub e_type: u16,
    /// `e_machine`.
    pub machine: u16,
    /// Every program header.
    pub phdrs: Vec<Phdr>,
    /// The file's length.
    pub len: u64,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn u16at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

impl CoreFile {
    /// Opens and parses the headers of a 64-bit little-endian ELF file.
    pub fn open(path: &Path) -> io::Result<CoreFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut eh = [0u8; EHDR_SIZE];
        file.read_exact_at(&mut eh, 0)?;
        if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
            return Err(bad("not a 64-bit little-endian ELF file"));
        }
        let phoff = u64at(&eh, 32);
        let shoff = u64at(&eh, 40);
        let mut phnum = u16at(&eh, 56) as u64;
        if phnum == PN_XNUM as u64 {
            let mut sh = [0u8; SHDR_SIZE];
            file.read_exact_at(&mut sh, shoff)?;
            phnum = u32at(&sh, 44) as u64;
        }
        let mut ph = vec![0u8; phnum as usize * PHDR_SIZE];
        file.read_exact_at(&mut ph, phoff)?;
        let phdrs = ph
            .chunks_exact(PHDR_SIZE)
            .map(|p| Phdr {
                p_type: u32at(p, 0),
                flags: u32at(p, 4),
                offset: u64at(p, 8),
                vaddr: u64at(p, 16),
                filesz: u64at(p, 32),
                memsz: u64at(p, 40),
                align: u64at(p, 48),
            })
            .collect();
        Ok(CoreFile {
            file,
            e_type: u16at(&eh, 16),
            machine: u16at(&eh, 18),
            phdrs,
            len,
        })
    }

    /// The `PT_LOAD` headers.
    pub fn loads(&self) -> impl Iterator<Item = &Phdr> {
        self.phdrs.iter().filter(|p| p.p_type == PT_LOAD)
    }

    /// Every note of every `PT_NOTE`, in order.
    pub fn notes(&self) -> io::Result<Vec<Note>> {
        let mut out = Vec::new();
        for p in self.phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
            let mut b = vec![0u8; p.filesz as usize];
            self.file.read_exact_at(&mut b, p.offset)?;
            let mut o = 0;
            while o + 12 <= b.len() {
                let namesz = u32at(&b, o) as usize;
                let descsz = u32at(&b, o + 4) as usize;
                let ntype = u32at(&b, o + 8);
                let name_at = o + 12;
                let desc_at = name_at + namesz.div_ceil(4) * 4;
                let next = desc_at + descsz.div_ceil(4) * 4;
                if desc_at + descsz > b.len() {
                    return Err(bad("note runs past its segment"));
                }
                let name = String::from_utf8_lossy(&b[name_at..name_at + namesz])
                    .trim_end_matches('\0')
                    .to_string();
                out.push(Note {
                    name,
                    ntype,
                    desc: b[desc_at..desc_at + descsz].to_vec(),
                });
                o = next;
            }
        }
        Ok(out)
    }

    /// Reads `len` bytes of the dumped memory at `vaddr`; `None` if any byte is not in the
    /// file (outside every segment, or past a segment's `p_filesz`).
    pub fn read(&self, vaddr: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        let Some(p) = self
            .loads()
            .find(|p| vaddr >= p.vaddr && vaddr + len as u64 <= p.vaddr + p.filesz)
        else {
            return Ok(None);
        };
        let mut b = vec![0u8; len];
        self.file
            .read_exact_at(&mut b, p.offset + (vaddr - p.vaddr))?;
        Ok(Some(b))
    }
}

/// The thread ids (`pr_pid`) of the `NT_PRSTATUS` notes, in order.
pub fn thread_ids(notes: &[Note]) -> Vec<i32> {
    notes
        .iter()
        .filter(|n| n.ntype == NT_PRSTATUS)
        .filter_map(|n| ElfPrstatus::from_bytes(&n.desc))
        .map(|p| p.pr_pid)
        .collect()
}
