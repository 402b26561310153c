//! A small reader for ELF cores: program headers (with `PN_XNUM`), notes, and memory by
//! virtual address; typed views of the notes (threads and their registers, `NT_PRPSINFO`,
//! `NT_AUXV`, `NT_FILE`, coreflect's own note). Used by the tests to check what the writer
//! wrote, and by `coreflect info`.
//!
//! It reads untrusted files: every offset and size is checked against the file's length
//! (a corrupt core is an [`io::ErrorKind::InvalidData`] error, never a panic or a huge
//! allocation). A zstd-compressed core (one frame, as `coreflect dump --compress` writes)
//! is opened by decompressing its headers and notes into memory and streaming the rest
//! once to learn its length and zero pages; its memory cannot be read by address.

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
    data: Backing,
    /// `e_type`.
    pub e_type: u16,
    /// `e_machine`.
    pub machine: u16,
    /// Every program header.
    pub phdrs: Vec<Phdr>,
    /// The core's length (decompressed, for a compressed core).
    pub len: u64,
    /// The compressed file's length, for a zstd-compressed core.
    pub compressed_len: Option<u64>,
    /// For a compressed core: bytes of whole zero pages inside the segments' data (what a
    /// sparse decompression would leave as holes).
    zero_bytes: u64,
}

/// Where the bytes come from.
#[derive(Debug)]
enum Backing {
    File(File),
    /// The decompressed start of a compressed core (headers and notes).
    Prefix(Vec<u8>),
}

impl Backing {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.read_exact_at(buf, off),
            Backing::Prefix(v) => {
                let end = off
                    .checked_add(buf.len() as u64)
                    .filter(|&e| e <= v.len() as u64);
                match end {
                    Some(e) => {
                        buf.copy_from_slice(&v[off as usize..e as usize]);
                        Ok(())
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the memory of a compressed core cannot be read in place: decompress it first (zstd -d)",
                    )),
                }
            }
        }
    }
}

/// The zstd frame magic number.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The most note bytes accepted, all notes segments together (a kernel core of 10,000
/// threads has ~35 MiB): a crafted core's notes (overlapping segments, empty notes of 12
/// bytes each) must not make the reader's memory unbounded.
const MAX_NOTES: u64 = 256 << 20;

/// The most notes accepted (a real core has a handful per thread).
const MAX_NOTE_COUNT: usize = 1 << 20;

/// The most program headers accepted: ~4 times the largest `vm.max_map_count` seen in
/// practice. A crafted `PN_XNUM` count must not make the reader allocate gigabytes.
const MAX_PHNUM: u64 = 1 << 21;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// True if `size` bytes at `off` do not fit in `len` bytes.
fn past(off: u64, size: u64, len: u64) -> bool {
    off.checked_add(size).is_none_or(|e| e > len)
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
    /// Opens and parses the headers of a 64-bit little-endian ELF file (or of a zstd frame
    /// holding one).
    pub fn open(path: &Path) -> io::Result<CoreFile> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below);
        // reads of a regular file ignore the flag.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(bad("not a regular file"));
        }
        let mut magic = [0u8; 4];
        if file.read_exact_at(&mut magic, 0).is_ok() && magic == ZSTD_MAGIC {
            return Self::open_zstd(file);
        }
        let len = file.metadata()?.len();
        Self::parse(Backing::File(file), len)
    }

    fn parse(data: Backing, len: u64) -> io::Result<CoreFile> {
        let short = |what: &str| bad(&format!("truncated: the file ends before its {what}"));
        let mut eh = [0u8; EHDR_SIZE];
        if len < EHDR_SIZE as u64 {
            return Err(if len >= 4 {
                short("ELF header")
            } else {
                bad("not an ELF file")
            });
        }
        data.read_exact_at(&mut eh, 0)?;
        if &eh[..4] != b"\x7fELF" {
            return Err(bad("not an ELF file"));
        }
        if eh[4] != 2 || eh[5] != 1 {
            return Err(bad("not a 64-bit little-endian ELF file"));
        }
        let phoff = u64at(&eh, 32);
        let shoff = u64at(&eh, 40);
        let mut phnum = u16at(&eh, 56) as u64;
        if phnum == PN_XNUM as u64 {
            let mut sh = [0u8; SHDR_SIZE];
            if past(shoff, SHDR_SIZE as u64, len) {
                return Err(short("section header (PN_XNUM)"));
            }
            data.read_exact_at(&mut sh, shoff)?;
            phnum = u32at(&sh, 44) as u64;
        }
        if phnum > MAX_PHNUM {
            return Err(bad(&format!(
                "{phnum} program headers, more than the {MAX_PHNUM} a core can have"
            )));
        }
        let phsize = phnum * PHDR_SIZE as u64;
        if past(phoff, phsize, len) {
            return Err(short("program headers"));
        }
        let mut ph = vec![0u8; phsize as usize];
        data.read_exact_at(&mut ph, phoff)?;
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
            data,
            e_type: u16at(&eh, 16),
            machine: u16at(&eh, 18),
            phdrs,
            len,
            compressed_len: None,
            zero_bytes: 0,
        })
    }

    fn open_zstd(file: File) -> io::Result<CoreFile> {
        use std::io::Read;
        let compressed = file.metadata()?.len();
        let zerr = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad("truncated zstd frame")
            } else {
                bad(&format!("corrupt zstd data: {e}"))
            }
        };
        let mut dec = zstd::stream::read::Decoder::new(io::BufReader::new(file))?;
        let mut prefix = Vec::new();
        // Grows the prefix to `n` bytes; false at the end of the stream.
        let mut fill = |prefix: &mut Vec<u8>, n: u64| -> io::Result<bool> {
            let want = n.saturating_sub(prefix.len() as u64);
            let got = (&mut dec).take(want).read_to_end(prefix).map_err(zerr)? as u64;
            Ok(got == want)
        };
        fill(&mut prefix, EHDR_SIZE as u64)?;
        // The program headers, then the notes, follow the ELF header.
        let mut need = EHDR_SIZE as u64;
        for _ in 0..3 {
            if let Ok(c) = Self::parse(Backing::Prefix(prefix.clone()), prefix.len() as u64) {
                need = c
                    .phdrs
                    .iter()
                    .filter(|p| p.p_type == PT_NOTE)
                    .map(|p| p.offset.saturating_add(p.filesz.min(MAX_NOTES)))
                    .max()
                    .unwrap_or(need);
                break;
            }
            if prefix.len() < EHDR_SIZE {
                break;
            }
            let eh = &prefix[..EHDR_SIZE];
            let mut n = u64at(eh, 32).saturating_add(u16at(eh, 56) as u64 * PHDR_SIZE as u64);
            if u16at(eh, 56) == PN_XNUM {
                n = n.max(u64at(eh, 40).saturating_add(SHDR_SIZE as u64));
                if prefix.len() as u64 >= n {
                    let sh = u64at(eh, 40) as usize;
                    let count = u32at(&prefix, sh + 44) as u64;
                    n = n.max(u64at(eh, 32).saturating_add(count * PHDR_SIZE as u64));
                }
            }
            if !fill(&mut prefix, n.min(MAX_NOTES))? {
                break;
            }
        }
        fill(&mut prefix, need.min(MAX_NOTES))?;
        let head = Self::parse(Backing::Prefix(prefix.clone()), prefix.len() as u64)?;
        // Stream the rest: its length, and its zero pages inside segment data.
        let page = 4096usize;
        let mut ranges: Vec<(u64, u64)> = head
            .loads()
            .filter(|p| p.filesz > 0)
            .map(|p| (p.offset, p.offset.saturating_add(p.filesz)))
            .collect();
        ranges.sort_unstable();
        let mut pos = prefix.len() as u64;
        let mut zero = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut carry = 0usize; // bytes at the start of buf belonging to a partial page
        loop {
            let n = dec.read(&mut buf[carry..]).map_err(zerr)?;
            if n == 0 {
                break;
            }
            let avail = carry + n;
            let start = pos - carry as u64; // buffer's file offset (page aligned)
            let whole = avail / page * page;
            for (k, pg) in buf[..whole].chunks_exact(page).enumerate() {
                let off = start + (k * page) as u64;
                let inside = ranges
                    .iter()
                    .any(|&(a, b)| off >= a && off + page as u64 <= b);
                if inside && super::writer::is_zero(pg) {
                    zero += page as u64;
                }
            }
            buf.copy_within(whole..avail, 0);
            carry = avail - whole;
            pos += n as u64;
        }
        let len = pos;
        let mut c = Self::parse(Backing::Prefix(prefix), len)?;
        c.compressed_len = Some(compressed);
        c.zero_bytes = zero;
        Ok(c)
    }

    /// Bytes inside the segments' data that hold no data on disk: holes of a sparse core
    /// file (`SEEK_HOLE`), or zero pages of a compressed one.
    pub fn hole_bytes(&self) -> u64 {
        let Backing::File(f) = &self.data else {
            return self.zero_bytes;
        };
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let mut ranges: Vec<(u64, u64)> = self
            .loads()
            .filter(|p| p.filesz > 0)
            .map(|p| (p.offset, p.offset.saturating_add(p.filesz).min(self.len)))
            .collect();
        ranges.sort_unstable();
        let mut holes = 0u64;
        for (a, b) in ranges {
            let mut at = a;
            while at < b {
                // SAFETY: lseek on a descriptor we own; no memory is involved.
                let h = unsafe { libc::lseek(fd, at as i64, libc::SEEK_HOLE) };
                if h < 0 || h as u64 >= b {
                    break;
                }
                // SAFETY: as above.
                let d = unsafe { libc::lseek(fd, h, libc::SEEK_DATA) };
                let end = if d < 0 { b } else { (d as u64).min(b) };
                if end <= at {
                    break;
                }
                holes += end - h as u64;
                at = end;
            }
        }
        holes
    }

    /// The offset one past the last byte any segment needs (the core's expected length).
    pub fn expected_len(&self) -> u64 {
        self.phdrs
            .iter()
            .filter(|p| p.filesz > 0)
            .map(|p| p.offset.saturating_add(p.filesz))
            .max()
            .unwrap_or(0)
    }

    /// The `PT_LOAD` headers.
    pub fn loads(&self) -> impl Iterator<Item = &Phdr> {
        self.phdrs.iter().filter(|p| p.p_type == PT_LOAD)
    }

    /// Every note of every `PT_NOTE`, in order.
    pub fn notes(&self) -> io::Result<Vec<Note>> {
        let mut out = Vec::new();
        let mut total = 0u64;
        for p in self.phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
            total = total.saturating_add(p.filesz);
            if total > MAX_NOTES {
                return Err(bad(&format!(
                    "notes segments too large (over {} MiB in all)",
                    MAX_NOTES >> 20
                )));
            }
            if past(p.offset, p.filesz, self.len) {
                return Err(bad("truncated: the file ends inside the notes"));
            }
            let mut b = vec![0u8; p.filesz as usize];
            self.data.read_exact_at(&mut b, p.offset)?;
            let mut o = 0;
            while o + 12 <= b.len() {
                let namesz = u32at(&b, o) as usize;
                let descsz = u32at(&b, o + 4) as usize;
                let ntype = u32at(&b, o + 8);
                let name_at = o + 12;
                let desc_at = name_at.saturating_add(namesz.div_ceil(4) * 4);
                let next = desc_at.saturating_add(descsz.div_ceil(4) * 4);
                if desc_at.saturating_add(descsz) > b.len() {
                    return Err(bad("note runs past its segment"));
                }
                let name = String::from_utf8_lossy(&b[name_at..name_at + namesz])
                    .trim_end_matches('\0')
                    .to_string();
                if out.len() >= MAX_NOTE_COUNT {
                    return Err(bad(&format!(
                        "more than {MAX_NOTE_COUNT} notes: not a core this reader accepts"
                    )));
                }
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
        let Some(p) = self.loads().find(|p| {
            vaddr >= p.vaddr && vaddr.saturating_add(len as u64) <= p.vaddr.saturating_add(p.filesz)
        }) else {
            return Ok(None);
        };
        let at = p.offset.saturating_add(vaddr - p.vaddr);
        if at.saturating_add(len as u64) > self.len {
            return Ok(None);
        }
        let mut b = vec![0u8; len];
        self.data.read_exact_at(&mut b, at)?;
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

/// One thread of a core, from its `NT_PRSTATUS` note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Thread id (`pr_pid`).
    pub tid: i32,
    /// The signal it was stopped on (`pr_cursig`), 0 if none.
    pub signal: i32,
    /// Pending signals (`pr_sigpend`).
    pub pending: u64,
    /// Blocked signals (`pr_sighold`).
    pub blocked: u64,
    /// The general registers (`user_regs_struct`, 27 × u64).
    pub regs: [u64; 27],
}

impl ThreadInfo {
    /// The instruction pointer.
    pub fn rip(&self) -> u64 {
        self.regs[16]
    }
    /// The stack pointer.
    pub fn rsp(&self) -> u64 {
        self.regs[19]
    }
}

/// The process, from `NT_PRPSINFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsInfo {
    /// State letter (`R`, `S`, ...).
    pub state: char,
    /// Process id.
    pub pid: i32,
    /// Parent's pid.
    pub ppid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Command name (at most 15 bytes).
    pub fname: String,
    /// Start of the command line (at most 79 bytes).
    pub psargs: String,
}

/// One file mapping, from `NT_FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Offset in the file, in bytes.
    pub offset: u64,
    /// The path.
    pub path: String,
}

/// What the notes of a core say, typed.
#[derive(Debug, Clone, Default)]
pub struct CoreNotes {
    /// Every thread, in note order (the first is the one the debugger selects).
    pub threads: Vec<ThreadInfo>,
    /// The process.
    pub psinfo: Option<PsInfo>,
    /// The signal number of `NT_SIGINFO`, if present and non-zero.
    pub siginfo_signo: Option<i32>,
    /// The auxiliary vector's (type, value) pairs, up to `AT_NULL`.
    pub auxv: Vec<(u64, u64)>,
    /// The mapped files.
    pub files: Vec<FileMapping>,
    /// coreflect's own note.
    pub metadata: Option<super::meta::Metadata>,
}

fn cstr_field(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The conventional name of a note type (as elfutils prints it), or `None` if unknown.
pub fn note_type_name(owner: &str, ntype: u32) -> Option<&'static str> {
    Some(match (owner, ntype) {
        ("CORE", NT_PRSTATUS) => "PRSTATUS",
        ("CORE", NT_PRFPREG) => "FPREGSET",
        ("CORE", NT_PRPSINFO) => "PRPSINFO",
        ("CORE", NT_AUXV) => "AUXV",
        ("CORE", NT_SIGINFO) => "SIGINFO",
        ("CORE", NT_FILE) => "FILE",
        ("LINUX", NT_X86_XSTATE) => "X86_XSTATE",
        ("LINUX", NT_X86_XSAVE_LAYOUT) => "X86_XSAVE_LAYOUT",
        (super::meta::NOTE_NAME, super::meta::NT_COREFLECT) => "COREFLECT",
        _ => return None,
    })
}

/// Parses the notes of a core into typed values. A known note with a malformed descriptor
/// is an [`io::ErrorKind::InvalidData`] error naming it.
pub fn parse_notes(notes: &[Note]) -> io::Result<CoreNotes> {
    let mut out = CoreNotes::default();
    for n in notes {
        let d = &n.desc;
        match (n.name.as_str(), n.ntype) {
            ("CORE", NT_PRSTATUS) => {
                if d.len() < 112 + 27 * 8 {
                    return Err(bad(&format!(
                        "corrupt NT_PRSTATUS note ({} bytes, expected 336)",
                        d.len()
                    )));
                }
                let mut regs = [0u64; 27];
                for (i, r) in regs.iter_mut().enumerate() {
                    *r = u64at(d, 112 + i * 8);
                }
                out.threads.push(ThreadInfo {
                    tid: u32at(d, 32) as i32,
                    signal: u16at(d, 12) as i16 as i32,
                    pending: u64at(d, 16),
                    blocked: u64at(d, 24),
                    regs,
                });
            }
            ("CORE", NT_PRPSINFO) => {
                if d.len() < 136 {
                    return Err(bad(&format!(
                        "corrupt NT_PRPSINFO note ({} bytes, expected 136)",
                        d.len()
                    )));
                }
                out.psinfo = Some(PsInfo {
                    state: d[1] as char,
                    uid: u32at(d, 16),
                    gid: u32at(d, 20),
                    pid: u32at(d, 24) as i32,
                    ppid: u32at(d, 28) as i32,
                    fname: cstr_field(&d[40..56]),
                    psargs: cstr_field(&d[56..136]),
                });
            }
            ("CORE", NT_SIGINFO) if d.len() >= 4 => {
                let s = u32at(d, 0) as i32;
                out.siginfo_signo = (s != 0).then_some(s);
            }
            ("CORE", NT_AUXV) => {
                out.auxv = d
                    .chunks_exact(16)
                    .map(|c| (u64at(c, 0), u64at(c, 8)))
                    .take_while(|e| e.0 != 0)
                    .collect();
            }
            ("CORE", NT_FILE) => out.files = parse_file_note(d)?,
            (super::meta::NOTE_NAME, super::meta::NT_COREFLECT) => {
                out.metadata = Some(super::meta::Metadata::parse(d));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn parse_file_note(d: &[u8]) -> io::Result<Vec<FileMapping>> {
    let corrupt = || bad("corrupt NT_FILE note");
    if d.len() < 16 {
        return Err(corrupt());
    }
    let count = u64at(d, 0);
    let page = u64at(d, 8);
    let table = count
        .checked_mul(24)
        .and_then(|t| t.checked_add(16))
        .filter(|&t| t <= d.len() as u64)
        .ok_or_else(corrupt)? as usize;
    let mut names = d[table..].split(|&c| c == 0);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let e = 16 + i * 24;
        let path = names.next().ok_or_else(corrupt)?;
        out.push(FileMapping {
            start: u64at(d, e),
            end: u64at(d, e + 8),
            offset: u64at(d, e + 16).saturating_mul(page),
            path: String::from_utf8_lossy(path).into_owned(),
        });
    }
    Ok(out)
}
