//! The core writer: ELF header, program headers, notes, then every segment's bytes, streamed
//! over any [`Sink`] — a file (holes become sparse regions) or a pipe (holes become zeros).
//!
//! Memory is read in large `pread`s. In private anonymous mappings, pages the kernel never
//! populated (neither present nor swapped in `/proc/PID/pagemap`) are not read at all; pages
//! that read back as zeros are not written either. Unreadable ranges become holes and are
//! reported, never an abort.

use super::types::{Elf64Ehdr, Elf64Phdr, Elf64Shdr, Pod};
use super::*;
use crate::error::{Error, Result};
use crate::proc::mem::{PM_PRESENT, PM_SWAPPED};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// Where a segment's bytes are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The frozen image (the clone, or the stopped target in suspend mode).
    Image,
    /// The live target (for memory a clone cannot hold: `MADV_DONTFORK`, `MADV_WIPEONFORK`).
    Live,
    /// Nothing: memory the kernel dumps but no one can read (`[vvar]`, `[vsyscall]`),
    /// written as zeros (a hole) without being read.
    Hole,
}

/// One `PT_LOAD` to write.
#[derive(Debug, Clone)]
pub struct SegmentPlan {
    /// Start address.
    pub vaddr: u64,
    /// Size in memory (the whole mapping).
    pub memsz: u64,
    /// Bytes dumped from `vaddr` (0, one page, or `memsz`).
    pub filesz: u64,
    /// `p_flags`.
    pub flags: u32,
    /// Where to read it.
    pub source: Source,
    /// True if never-populated pages may be skipped (private anonymous memory).
    pub sparse: bool,
    /// The mapping's name, for warnings.
    pub name: String,
}

/// Reads the dumped process's memory.
pub trait MemoryReader: Sync {
    /// Reads at `addr`; returns bytes read (short at the first unreadable byte).
    fn read_at(&self, source: Source, addr: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Fills pagemap entries for the pages from `addr`; `false` if unavailable.
    fn pagemap(&self, source: Source, addr: u64, out: &mut [u64]) -> bool;
}

/// An output for the core.
pub trait Sink {
    /// Writes bytes at the current position.
    fn write_all(&mut self, b: &[u8]) -> io::Result<()>;
    /// Advances over `n` bytes of zeros (a hole where possible).
    fn skip(&mut self, n: u64) -> io::Result<()>;
    /// Ends the output at `len` bytes.
    fn finish(&mut self, len: u64) -> io::Result<()>;
    /// True if skipped bytes take no disk space.
    fn sparse(&self) -> bool;
}

/// A seekable file: holes are left unwritten, and the length is set at the end.
#[derive(Debug)]
pub struct FileSink<'a> {
    file: &'a File,
    pos: u64,
}

impl<'a> FileSink<'a> {
    /// Writes into `file` from offset 0 (the file must be new or empty).
    pub fn new(file: &'a File) -> Self {
        FileSink { file, pos: 0 }
    }
}

impl Sink for FileSink<'_> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.file.write_all_at(b, self.pos)?;
        self.pos += b.len() as u64;
        Ok(())
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        self.pos += n;
        Ok(())
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sparse(&self) -> bool {
        true
    }
}

/// Any `Write` (a pipe, a compressor): holes are written as zeros.
#[derive(Debug)]
pub struct StreamSink<W: Write> {
    w: W,
    pos: u64,
}

impl<W: Write> StreamSink<W> {
    /// Wraps a writer.
    pub fn new(w: W) -> Self {
        StreamSink { w, pos: 0 }
    }
    /// Returns the writer.
    pub fn into_inner(self) -> W {
        self.w
    }
}

impl<W: Write> Sink for StreamSink<W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        static ZEROS: [u8; 65536] = [0; 65536];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        if self.pos < len {
            self.skip(len - self.pos)?;
        }
        self.w.flush()
    }
    fn sparse(&self) -> bool {
        false
    }
}

/// A range that could not be read.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// The mapping's name.
    pub name: String,
    /// The error.
    pub error: String,
}

/// What the writer did.
#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    /// Bytes of data written (holes excluded), headers and notes included.
    pub bytes_written: u64,
    /// The file's length.
    pub file_size: u64,
    /// Bytes skipped as never-populated pages.
    pub unpopulated_bytes: u64,
    /// Bytes skipped as all-zero pages.
    pub zero_bytes: u64,
    /// Ranges that could not be read (left as holes).
    pub unreadable: Vec<Unreadable>,
    /// Bytes the clone wrote itself (direct writing).
    pub written_by_clone: u64,
    /// How the memory reached the file (see [`crate::write_path`]).
    pub path: crate::write_path::WritePathStats,
}

/// The size of one read.
pub const CHUNK: usize = 8 << 20;

/// The layout of a core: headers, and where each segment's data goes.
#[derive(Debug)]
pub struct Layout {
    /// ELF header, program headers (and the PN_XNUM section header).
    pub headers: Vec<u8>,
    /// Offset of the notes.
    pub notes_offset: u64,
    /// File offset of each segment's data.
    pub data_offsets: Vec<u64>,
    /// Total length of the file.
    pub total_len: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Computes the layout for `notes_len` bytes of notes and `segs`.
pub fn layout(notes_len: u64, segs: &[SegmentPlan], page: u64) -> Layout {
    let nphdr = segs.len() + 1;
    let xnum = nphdr >= PN_XNUM as usize;
    let phoff = EHDR_SIZE as u64;
    let shoff = phoff + (nphdr * PHDR_SIZE) as u64;
    let notes_offset = shoff + if xnum { SHDR_SIZE as u64 } else { 0 };
    let mut off = align_up(notes_offset + notes_len, page);
    let mut data_offsets = Vec::with_capacity(segs.len());
    for s in segs {
        data_offsets.push(off);
        off += s.filesz;
    }
    let total_len = off;

    let ehdr = Elf64Ehdr {
        e_ident: [0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        e_type: ET_CORE,
        e_machine: EM_X86_64,
        e_version: 1,
        e_entry: 0,
        e_phoff: phoff,
        e_shoff: if xnum { shoff } else { 0 },
        e_flags: 0,
        e_ehsize: EHDR_SIZE as u16,
        e_phentsize: PHDR_SIZE as u16,
        e_phnum: if xnum { PN_XNUM } else { nphdr as u16 },
        e_shentsize: if xnum { SHDR_SIZE as u16 } else { 0 },
        e_shnum: xnum as u16,
        e_shstrndx: 0,
    };
    let mut h = Vec::with_capacity(notes_offset as usize);
    h.extend_from_slice(ehdr.as_bytes());
    let notes = Elf64Phdr {
        p_type: PT_NOTE,
        p_offset: notes_offset,
        p_filesz: notes_len,
        ..Default::default()
    };
    h.extend_from_slice(notes.as_bytes());
    for (s, &o) in segs.iter().zip(&data_offsets) {
        let load = Elf64Phdr {
            p_type: PT_LOAD,
            p_flags: s.flags,
            p_offset: o,
            p_vaddr: s.vaddr,
            p_paddr: 0,
            p_filesz: s.filesz,
            p_memsz: s.memsz,
            p_align: page,
        };
        h.extend_from_slice(load.as_bytes());
    }
    if xnum {
        // sh_type SHT_NULL; sh_size = e_shnum (1), sh_link = e_shstrndx (0), sh_info = the
        // real program header count.
        let sh = Elf64Shdr {
            sh_size: 1,
            sh_info: nphdr as u32,
            ..Default::default()
        };
        h.extend_from_slice(sh.as_bytes());
    }
    debug_assert_eq!(h.len() as u64, notes_offset);
    Layout {
        headers: h,
        notes_offset,
        data_offsets,
        total_len,
    }
}

/// Progress of a write, for a progress display.
pub trait Progress {
    /// `done` of `total` segment bytes are processed. Return `false` to cancel.
    fn update(&mut self, done: u64, total: u64) -> bool;
}

impl<F: FnMut(u64, u64) -> bool> Progress for F {
    fn update(&mut self, done: u64, total: u64) -> bool {
        self(done, total)
    }
}

/// A [`CHUNK`]-sized buffer mapped straight from the kernel and unmapped when dropped, so
/// the writer's memory comes and goes with each core (the allocator would keep 8 MiB
/// blocks once it has raised its mmap threshold).
pub struct ChunkBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for ChunkBuf {}

impl ChunkBuf {
    /// A zeroed buffer of [`CHUNK`] bytes.
    pub fn new() -> ChunkBuf {
        // SAFETY: an anonymous private mapping at an address the kernel picks: no existing memory
        // is touched; the result is checked against MAP_FAILED below before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "cannot map an {CHUNK}-byte write buffer"
        );
        ChunkBuf {
            ptr: p as *mut u8,
            len: CHUNK,
        }
    }
}

impl Default for ChunkBuf {
    fn default() -> Self {
        ChunkBuf::new()
    }
}

impl std::fmt::Debug for ChunkBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkBuf({} bytes)", self.len)
    }
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live mapping of len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping `new` made, owned by this value alone (no
        // slice borrowed from it can outlive `self`); unmapped once, here.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// One chunk of a segment, read and classified, ready to be written.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) buf: ChunkBuf,
    /// File offset of the chunk's first byte.
    pub(crate) offset: u64,
    len: usize,
    /// Per page: true if it holds data to write (false: hole).
    pub(crate) data: Vec<bool>,
    pub(crate) unpopulated: u64,
    pub(crate) zero: u64,
    pub(crate) unreadable: Vec<Unreadable>,
}

/// The chunks of all segments, in file order: (segment index, address, length, file offset).
fn chunk_list(segs: &[SegmentPlan], lay: &Layout) -> Vec<(usize, u64, usize, u64)> {
    let mut v = Vec::new();
    for (i, (s, &off)) in segs.iter().zip(&lay.data_offsets).enumerate() {
        let mut a = 0;
        while a < s.filesz {
            let n = (s.filesz - a).min(CHUNK as u64);
            v.push((i, s.vaddr + a, n as usize, off + a));
            a += n;
        }
    }
    v
}

/// Reads one chunk into `buf` and classifies its pages.
pub(crate) fn fill_chunk(
    mem: &dyn MemoryReader,
    s: &SegmentPlan,
    addr: u64,
    len: usize,
    offset: u64,
    mut buf: ChunkBuf,
    pm: &mut Vec<u64>,
) -> Chunk {
    let page = crate::page_size() as usize;
    let pages = len / page;
    pm.resize(pages.max(pm.len()), 0);
    let present = &mut pm[..pages];
    if s.source == Source::Hole {
        present.fill(0);
    } else if !(s.sparse && mem.pagemap(s.source, addr, present)) {
        present.fill(PM_PRESENT);
    }
    let mut st = WriteStats::default();
    let chunk = &mut buf[..len];
    let mut i = 0;
    while i < pages {
        if present[i] & (PM_PRESENT | PM_SWAPPED) == 0 {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < pages && present[j] & (PM_PRESENT | PM_SWAPPED) != 0 {
            j += 1;
        }
        read_run(mem, s, addr, chunk, page, i, j, present, &mut st);
        i = j;
    }
    let mut data = Vec::with_capacity(pages);
    let (mut unpopulated, mut zero) = (0, 0);
    for (k, e) in present.iter().enumerate() {
        if e & (PM_PRESENT | PM_SWAPPED) == 0 {
            unpopulated += page as u64;
            data.push(false);
        } else if is_zero(&chunk[k * page..(k + 1) * page]) {
            zero += page as u64;
            data.push(false);
        } else {
            data.push(true);
        }
    }
    Chunk {
        buf,
        offset,
        len,
        data,
        unpopulated,
        zero,
        unreadable: st.unreadable,
    }
}

/// Writes one chunk at its offset (the sink is at `*pos`): data runs, holes for the rest.
fn emit_chunk(
    sink: &mut dyn Sink,
    c: &Chunk,
    pos: &mut u64,
    st: &mut WriteStats,
) -> io::Result<()> {
    let page = crate::page_size() as usize;
    sink.skip(c.offset - *pos)?;
    *pos = c.offset;
    let mut i = 0;
    let pages = c.data.len();
    while i < pages {
        let d = c.data[i];
        let mut j = i + 1;
        while j < pages && c.data[j] == d {
            j += 1;
        }
        let (a, b) = (i * page, j * page);
        if d {
            sink.write_all(&c.buf[a..b])?;
            st.bytes_written += (b - a) as u64;
        } else {
            sink.skip((b - a) as u64)?;
        }
        i = j;
    }
    *pos += c.len as u64;
    st.unpopulated_bytes += c.unpopulated;
    st.zero_bytes += c.zero;
    for u in &c.unreadable {
        match st.unreadable.last_mut() {
            Some(l) if l.end == u.start && l.name == u.name => l.end = u.end,
            _ => st.unreadable.push(u.clone()),
        }
    }
    Ok(())
}

fn write_head(
    sink: &mut dyn Sink,
    lay: &Layout,
    notes: &[u8],
    st: &mut WriteStats,
) -> io::Result<u64> {
    sink.write_all(&lay.headers)?;
    sink.write_all(notes)?;
    let pos = lay.notes_offset + notes.len() as u64;
    st.bytes_written = pos;
    st.file_size = lay.total_len;
    Ok(pos)
}

fn out_err(e: io::Error) -> Error {
    Error::io("writing the core", e)
}

/// How many threads read memory in [`write_core`]: reading through `/proc/PID/mem` costs
/// more CPU than writing (the kernel bounces every page through a buffer of its own), so
/// two readers keep one writer busy.
pub const READERS: usize = 2;

/// Writes a whole core: headers, `notes`, then the segments' bytes read from `mem`.
///
/// Reading and writing overlap: [`READERS`] threads fill buffers from a small ring of their
/// own (reading, pagemap and zero-page checks), taking chunks in turn, while this thread
/// writes them out in file order. The output is byte for byte the same as
/// [`write_core_serial`]'s.
pub fn write_core(
    sink: &mut dyn Sink,
    notes: &[u8],
    segs: &[SegmentPlan],
    mem: &dyn MemoryReader,
    progress: &mut dyn Progress,
) -> Result<WriteStats> {
    use std::sync::mpsc::{channel, sync_channel, Sender};
    const PER_READER: usize = 2;
    let lay = layout(notes.len() as u64, segs, crate::page_size());
    let mut st = WriteStats::default();
    let mut pos = write_head(sink, &lay, notes, &mut st).map_err(out_err)?;
    let chunks = chunk_list(segs, &lay);
    let total: u64 = segs.iter().map(|s| s.filesz).sum();
    let mut done = 0u64;
    let result = std::thread::scope(|scope| -> Result<()> {
        let (full_tx, full_rx) = sync_channel::<(usize, usize, Chunk)>(READERS * PER_READER);
        // Each reader has its own buffers, so the reader holding the next chunk in file
        // order can always go on (no deadlock on a shared pool).
        let mut free: Vec<Sender<ChunkBuf>> = Vec::new();
        for r in 0..READERS {
            let (free_tx, free_rx) = channel::<ChunkBuf>();
            for _ in 0..PER_READER {
                let _ = free_tx.send(ChunkBuf::new());
            }
            free.push(free_tx);
            let full_tx = full_tx.clone();
            let list = &chunks;
            scope.spawn(move || {
                let mut pm = Vec::new();
                for (k, &(i, addr, len, off)) in list.iter().enumerate().skip(r).step_by(READERS) {
                    let Ok(buf) = free_rx.recv() else { return };
                    let c = fill_chunk(mem, &segs[i], addr, len, off, buf, &mut pm);
                    if full_tx.send((k, r, c)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(full_tx);
        let mut waiting = std::collections::BTreeMap::new();
        let mut next = 0;
        for (k, r, c) in full_rx.iter() {
            waiting.insert(k, (r, c));
            while let Some((r, c)) = waiting.remove(&next) {
                emit_chunk(sink, &c, &mut pos, &mut st).map_err(out_err)?;
                done += c.len as u64;
                next += 1;
                let _ = free[r].send(c.buf);
                if !progress.update(done, total) {
                    return Err(Error::Cancelled);
                }
            }
        }
        // Dropping the channels on return stops the readers.
        Ok(())
    });
    result?;
    sink.skip(lay.total_len - pos).map_err(out_err)?;
    sink.finish(lay.total_len).map_err(out_err)?;
    Ok(st)
}

/// The same as [`write_core`], on one thread: read a chunk, write it, repeat.
pub fn write_core_serial(
    sink: &mut dyn Sink,
    notes: &[u8],
    segs: &[SegmentPlan],
    mem: &dyn MemoryReader,
    progress: &mut dyn Progress,
) -> Result<WriteStats> {
    let lay = layout(notes.len() as u64, segs, crate::page_size());
    let mut st = WriteStats::default();
    let mut pos = write_head(sink, &lay, notes, &mut st).map_err(out_err)?;
    let total: u64 = segs.iter().map(|s| s.filesz).sum();
    let mut done = 0u64;
    let mut buf = ChunkBuf::new();
    let mut pm = Vec::new();
    for (i, addr, len, off) in chunk_list(segs, &lay) {
        let c = fill_chunk(mem, &segs[i], addr, len, off, buf, &mut pm);
        emit_chunk(sink, &c, &mut pos, &mut st).map_err(out_err)?;
        buf = c.buf;
        done += len as u64;
        if !progress.update(done, total) {
            return Err(Error::Cancelled);
        }
    }
    sink.skip(lay.total_len - pos).map_err(out_err)?;
    sink.finish(lay.total_len).map_err(out_err)?;
    Ok(st)
}

/// Reads pages `i..j` of the chunk at `addr`; pages that fail are zeroed, marked as holes
/// (pagemap entry cleared) and reported.
#[allow(clippy::too_many_arguments)]
fn read_run(
    mem: &dyn MemoryReader,
    s: &SegmentPlan,
    addr: u64,
    chunk: &mut [u8],
    page: usize,
    i: usize,
    j: usize,
    present: &mut [u64],
    st: &mut WriteStats,
) {
    let mut k = i;
    while k < j {
        let (a, b) = (k * page, j * page);
        let (got, err) = match mem.read_at(s.source, addr + a as u64, &mut chunk[a..b]) {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        };
        k += got / page;
        if k < j {
            // Page k failed: zero it, make it a hole, and go on after it.
            let e = err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO));
            note_unreadable(st, s, addr + (k * page) as u64, page as u64, &e);
            chunk[k * page..(k + 1) * page].fill(0);
            present[k] = 0;
            k += 1;
        }
    }
}

pub(crate) fn note_unreadable(
    st: &mut WriteStats,
    s: &SegmentPlan,
    at: u64,
    len: u64,
    e: &dyn std::fmt::Display,
) {
    if let Some(u) = st.unreadable.last_mut() {
        if u.end == at {
            u.end += len;
            return;
        }
    }
    st.unreadable.push(Unreadable {
        start: at,
        end: at + len,
        name: s.name.clone(),
        error: e.to_string(),
    });
}

/// True if the page is all zeros.
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to splits off unaligned ends.
    let (pre, mid, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Writes a whole core into `file`, the clone writing its own memory (see
/// the crate-internal `direct` module): one copy per page instead of three. Ranges the clone cannot write —
/// memory read from the live target, pages it cannot read — go the usual way through `mem`.
/// The file's bytes are the same as [`write_core`]'s (zero pages are written rather than
/// left as holes).
pub(crate) fn write_core_direct(
    file: &File,
    notes: &[u8],
    segs: &[SegmentPlan],
    mem: &dyn MemoryReader,
    direct: &crate::direct::DirectWriter,
    progress: &mut dyn Progress,
) -> Result<WriteStats> {
    let page = crate::page_size();
    let lay = layout(notes.len() as u64, segs, page);
    let mut sink = FileSink::new(file);
    let mut st = WriteStats::default();
    let mut pos = write_head(&mut sink, &lay, notes, &mut st).map_err(out_err)?;
    let total: u64 = segs.iter().map(|s| s.filesz).sum();
    let mut done = 0u64;
    let mut pm = vec![0u64; CHUNK / page as usize];
    let mut buf = ChunkBuf::new();
    let mut pbuf = vec![0u8; page as usize];
    for (s, &off) in segs.iter().zip(&lay.data_offsets) {
        if s.filesz == 0 {
            continue;
        }
        if s.source != Source::Image {
            let mut a = 0;
            while a < s.filesz {
                let n = (s.filesz - a).min(CHUNK as u64) as usize;
                let c = fill_chunk(mem, s, s.vaddr + a, n, off + a, buf, &mut pm);
                emit_chunk(&mut sink, &c, &mut pos, &mut st).map_err(out_err)?;
                buf = c.buf;
                a += n as u64;
                done += n as u64;
                if !progress.update(done, total) {
                    return Err(Error::Cancelled);
                }
            }
            continue;
        }
        // Runs of populated pages, written by the clone; holes elsewhere.
        let mut flush = |from: u64, to: u64, st: &mut WriteStats| -> Result<()> {
            let mut at = from;
            while at < to {
                let len = (to - at).min(64 << 20); // progress and cancel stay responsive
                let r = direct.pwrite(at, len, off + (at - s.vaddr));
                let efault = |e: &Error| e.raw_os_error() == Some(libc::EFAULT);
                match r {
                    Ok(w) if w > 0 => {
                        st.bytes_written += w;
                        st.written_by_clone += w;
                        at += w;
                    }
                    // Anything but a page the clone cannot read: stop writing this way.
                    Err(e) if !efault(&e) => return Err(e),
                    _ => {
                        // The clone cannot read this page: read it the usual way.
                        let pa = at & !(page - 1);
                        let skip = (at - pa) as usize;
                        let got = mem.read_at(s.source, pa, &mut pbuf).unwrap_or(0);
                        if got == pbuf.len() {
                            file.write_all_at(&pbuf[skip..], off + (at - s.vaddr))
                                .map_err(out_err)?;
                            st.bytes_written += (pbuf.len() - skip) as u64;
                        } else {
                            let e = io::Error::from_raw_os_error(libc::EIO);
                            note_unreadable(st, s, pa, page, &e);
                        }
                        at = pa + page;
                    }
                }
            }
            Ok(())
        };
        let mut run: Option<u64> = None;
        let mut a = 0;
        while a < s.filesz {
            let n = (s.filesz - a).min(CHUNK as u64);
            let pages = (n / page) as usize;
            let present = &mut pm[..pages];
            if !(s.sparse && mem.pagemap(s.source, s.vaddr + a, present)) {
                present.fill(PM_PRESENT);
            }
            for (k, e) in present.iter().enumerate() {
                let addr = s.vaddr + a + k as u64 * page;
                if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                    run.get_or_insert(addr);
                } else {
                    st.unpopulated_bytes += page;
                    if let Some(r) = run.take() {
                        flush(r, addr, &mut st)?;
                    }
                }
            }
            a += n;
            done += n;
            if !progress.update(done, total) {
                return Err(Error::Cancelled);
            }
        }
        if let Some(r) = run.take() {
            flush(r, s.vaddr + s.filesz, &mut st)?;
        }
    }
    // The kernel refreshed the clone's rseq area on each injected syscall: put back the
    // bytes the snapshot holds (see the crate-internal `direct::RseqArea`).
    if let Some(rseq) = direct.rseq() {
        for (s, &off) in segs.iter().zip(&lay.data_offsets) {
            if s.source != Source::Image {
                continue;
            }
            if let Some(rel) = rseq.offset_in(s.vaddr, s.filesz) {
                file.write_all_at(rseq.bytes(), off + rel)
                    .map_err(out_err)?;
            }
        }
    }
    file.set_len(lay.total_len).map_err(out_err)?;
    st.file_size = lay.total_len;
    Ok(st)
}
