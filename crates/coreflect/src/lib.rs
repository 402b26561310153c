//! # coreflect
//!
//! Full ELF core dumps of *live* Linux processes with a pause of milliseconds.
//!
//! [`Snapshot::capture`] stops every thread of the target with `PTRACE_SEIZE` +
//! `PTRACE_INTERRUPT`, captures their registers, makes one thread run an injected
//! `clone()` so that a copy-on-write image of the address space exists, and lets the target
//! go. The core is then written from that frozen clone while the target runs — the Linux
//! analogue of Windows' `PssCaptureSnapshot` / `procdump -r`. [`dump::dump`] does the whole
//! job (snapshot, core file, report) and is what the `coreflect` command runs.
//!
//! Layout:
//! - [`proc`]: reading `/proc/PID/*` (maps, status, memory, pagemap);
//! - [`ptrace`], [`stop`], [`inject`]: stopping threads and injecting syscalls;
//! - [`snapshot`]: reflection, and the snapshot API;
//! - [`select`]: which memory goes into a core (a policy apart from the writer);
//! - [`elf`]: the notes, the streaming core writer and a core reader;
//! - [`output`]: creating the core file safely;
//! - [`arch::x86_64`]: registers and syscall conventions.
//!
//! The library never prints: problems that do not stop a dump are returned as warnings.
#![warn(missing_docs)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("coreflect supports Linux on x86_64 only");

pub mod arch;
pub mod direct;
pub mod dump;
pub mod elf;
pub mod error;
pub mod inject;
pub mod lock;
pub mod output;
pub mod proc;
pub mod ptrace;
pub mod select;
pub mod snapshot;
pub mod stop;
pub mod write_path;

pub use dump::{dump, DumpOptions, DumpReport};
pub use error::{Error, Pid, Result};
pub use snapshot::{Mode, Options, Phase, Snapshot};

/// The system's page size in bytes.
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64)
}
