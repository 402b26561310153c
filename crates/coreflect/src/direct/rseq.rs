//! The clone's rseq area, and how every way of reading the clone's memory puts it back.
//!
//! A thread that registered a restartable-sequences area (`rseq(2)`; glibc registers one for
//! every thread) has the kernel write into that area of its memory on its way back to user
//! mode whenever it was scheduled, migrated or interrupted: `cpu_id_start`, `cpu_id`,
//! `node_id`, `mm_cid`, and `rseq_cs` cleared when a critical section is aborted. The clone
//! inherits the borrowed thread's registration, and each syscall injected into it (set-up,
//! `pwrite64`, `vmsplice`, `madvise`) takes it through that return path: the kernel then
//! rewrites the clone's copy of the area (a copy-on-write fault, so the page becomes the
//! clone's own), and the clone's memory no longer holds what the target held at the pause.
//!
//! [`RseqArea::capture`] reads the area right after the clone's first stop, before anything
//! is injected into it; that copy is what the snapshot holds. Each path fixes the area up:
//! - the read path (`/proc/CLONE/mem`, the snapshot's reads): [`RseqArea::restore_into`]
//!   puts the captured bytes back into every read that overlaps the area;
//! - the zero-copy path (`vmsplice`): the pages holding the area ([`RseqArea::overlaps`])
//!   are not spliced (the pipe would hold the clone's live page, rewritten at the next
//!   injection) but go through the read path;
//! - the clone's own `pwrite64`s: once they are done, the captured bytes are written over
//!   the area's place in the file ([`RseqArea::offset_in`]).

use crate::error::Pid;

/// The clone's registered rseq area: its address and its bytes as the snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RseqArea {
    addr: u64,
    bytes: Vec<u8>,
}

impl RseqArea {
    /// Reads the rseq area `clone` (stopped, traced by this thread) registered, before any
    /// injection into it. `None` if it has none or it cannot be read.
    pub(crate) fn capture(clone: Pid) -> Option<RseqArea> {
        #[repr(C)]
        #[derive(Default)]
        struct Config {
            ptr: u64,
            size: u32,
            sig: u32,
            flags: u32,
            pad: u32,
        }
        let mut cfg = Config::default();
        // SAFETY: GET_RSEQ_CONFIGURATION writes at most `addr` = size_of::<Config>() bytes to
        // `data`, which points to `cfg`, a live local `#[repr(C)]` Config of exactly that size.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GET_RSEQ_CONFIGURATION,
                clone,
                std::mem::size_of::<Config>(),
                &mut cfg as *mut Config,
            )
        };
        if r <= 0 || cfg.ptr == 0 {
            return None;
        }
        let mem = crate::proc::ProcMem::open(clone).ok()?;
        let mut b = vec![0u8; (cfg.size as usize).clamp(32, 256)];
        (mem.read_at(cfg.ptr, &mut b).ok()? == b.len()).then_some(RseqArea {
            addr: cfg.ptr,
            bytes: b,
        })
    }

    /// Its bytes as the snapshot holds them.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn end(&self) -> u64 {
        self.addr + self.bytes.len() as u64
    }

    /// True if `[start, end)` holds part of the area.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end() && self.addr < end
    }

    /// The area's offset from `start` if it lies wholly inside `[start, start + len)`.
    pub(crate) fn offset_in(&self, start: u64, len: u64) -> Option<u64> {
        (self.addr >= start && self.end() <= start + len).then(|| self.addr - start)
    }

    /// Puts the snapshot's bytes back where they overlap `buf`, read from the clone at
    /// `addr`.
    pub(crate) fn restore_into(&self, addr: u64, buf: &mut [u8]) {
        let (s, e) = (
            addr.max(self.addr),
            (addr + buf.len() as u64).min(self.end()),
        );
        if s < e {
            buf[(s - addr) as usize..(e - addr) as usize]
                .copy_from_slice(&self.bytes[(s - self.addr) as usize..(e - self.addr) as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area() -> RseqArea {
        RseqArea {
            addr: 0x1010,
            bytes: (1..=32).collect(),
        }
    }

    #[test]
    fn restore_puts_back_only_the_overlap() {
        let a = area();
        // A read straddling the start of the area.
        let mut buf = vec![0xAAu8; 0x20];
        a.restore_into(0x1000, &mut buf);
        assert_eq!(&buf[..0x10], &[0xAA; 0x10]);
        assert_eq!(&buf[0x10..], &a.bytes()[..0x10]);
        // A read inside it, and one past it.
        let mut mid = [0u8; 4];
        a.restore_into(0x1014, &mut mid);
        assert_eq!(mid, [5, 6, 7, 8]);
        let mut after = [0xAAu8; 8];
        a.restore_into(0x1030, &mut after);
        assert_eq!(after, [0xAA; 8]);
        // A read that ends where the area starts.
        let mut before = [0xAAu8; 0x10];
        a.restore_into(0x1000, &mut before);
        assert_eq!(before, [0xAA; 0x10]);
    }

    #[test]
    fn overlap_and_offset() {
        let a = area();
        assert!(a.overlaps(0x1000, 0x2000));
        assert!(a.overlaps(0x102f, 0x1030));
        assert!(!a.overlaps(0x1030, 0x2000));
        assert!(!a.overlaps(0x0, 0x1010));
        assert_eq!(a.offset_in(0x1000, 0x1000), Some(0x10));
        assert_eq!(a.offset_in(0x1000, 0x2f), None); // ends one byte short
        assert_eq!(a.offset_in(0x1020, 0x1000), None);
    }
}
