//! Reading another process's memory through `/proc/PID/mem` and `/proc/PID/pagemap`.

use super::path;
use crate::error::{Error, Pid, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// An open `/proc/PID/mem`, read with `pread` (no copy-on-write copies are made, unlike
/// `process_vm_readv` on a clone).
#[derive(Debug)]
pub struct ProcMem {
    pid: Pid,
    file: File,
}

impl ProcMem {
    /// Opens `/proc/<pid>/mem` for reading.
    pub fn open(pid: Pid) -> Result<ProcMem> {
        let p = path(pid, "mem");
        let file = File::open(&p).map_err(|e| super::proc_error(pid, p, e))?;
        Ok(ProcMem { pid, file })
    }

    /// The pid whose memory this reads.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Reads as many bytes as possible at `addr` into `buf`; returns how many were read.
    /// A short count means the next byte is unreadable (EIO) or unmapped.
    pub fn read_at(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], addr + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if done > 0 => {
                    let _ = e;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// Bit 63 of a pagemap entry: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62 of a pagemap entry: the page is swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/<pid>/pagemap`.
    pub fn open(pid: Pid) -> Result<Pagemap> {
        let p = path(pid, "pagemap");
        let file = File::open(&p).map_err(|e| Error::Proc { path: p, source: e })?;
        Ok(Pagemap { file })
    }

    /// Fills `out` with one entry per page starting at page-aligned `addr`.
    pub fn entries(&self, addr: u64, out: &mut [u64]) -> io::Result<()> {
        let page = crate::page_size();
        // SAFETY: `out` is a live, mutably borrowed `[u64]`: its memory is `size_of_val(out)`
        // initialized bytes, u8 needs no alignment, and any bytes written form valid u64s; `bytes`
        // is the only access to `out` while it lives.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, std::mem::size_of_val(out))
        };
        let mut done = 0;
        while done < bytes.len() {
            let n = self
                .file
                .read_at(&mut bytes[done..], (addr / page) * 8 + done as u64)?;
            if n == 0 {
                bytes[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}
