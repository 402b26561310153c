//! # coreflect
//!
//! Snapshots of *live* Linux processes with a pause of milliseconds, and full ELF core
//! dumps from them — the Linux counterpart of ClrMD's `DataTarget.CreateSnapshotAndAttach`
//! and Windows' `PssCaptureSnapshot` / `procdump -r`.
//!
//! ## Where to start: [`Snapshot`]
//!
//! [`Snapshot::capture`] stops every thread of the target (`PTRACE_SEIZE` +
//! `PTRACE_INTERRUPT`), captures their registers, makes one thread run an injected `clone()`
//! so that a copy-on-write image of the address space exists, and lets the target go. The
//! snapshot is then inspected at leisure while the process runs on:
//!
//! ```no_run
//! use coreflect::{Freshness, Options, Snapshot};
//!
//! # fn main() -> coreflect::Result<()> {
//! let snap = Snapshot::capture(1234, &Options::default())?;
//! println!("paused {:.2} ms", snap.pause().total_us as f64 / 1e3);
//! for t in snap.threads() {
//!     println!("{} {:>16} pc={:#x} sp={:#x}", t.tid(), t.name(), t.pc(), t.sp());
//! }
//! println!("argv {:?}", snap.argv());
//! for m in snap.modules() {
//!     println!("{:#014x} {} {}", m.load_bias, m.build_id_hex().unwrap_or_default(), m.path);
//! }
//! let sp = snap.threads()[0].sp();
//! let top_of_stack = snap.read_u64(sp)?;                  // typed, exact reads
//! assert_eq!(snap.freshness(sp), Some(Freshness::Frozen)); // frozen, or read live?
//! // A core gdb, lldb and elfutils open, with what the kernel would put in it:
//! let file = std::fs::File::create("/tmp/app.core").map_err(|e| coreflect::Error::io("create", e))?;
//! snap.write_core_file(&file, &snap.default_policy(), &mut |_, _| true)?;
//! // Send + Sync: move it to another thread or task; dropping it ends it there.
//! std::thread::spawn(move || drop(snap)).join().unwrap();
//! # let _ = top_of_stack;
//! # Ok(()) }
//! ```
//!
//! [`dump()`] does the whole job of the `coreflect` command (snapshot, core file created
//! safely, report). Every error is a [`Error`]; the library never prints: problems that do
//! not stop a snapshot come back as [`Snapshot::warnings`].
//!
//! ## Modules
//!
//! - [`inspect`]: what a snapshot tells — [`Thread`], [`Registers`], [`AuxvEntry`],
//!   [`Module`], [`Freshness`];
//! - [`snapshot`]: [`Options`], [`Mode`], [`Phase`], [`snapshot::preflight`],
//!   [`snapshot::estimate_pause`] and how reflection works (its source is cut by stage:
//!   options, preflight, pause, clone);
//! - [`dump`](mod@dump): the whole dump into a file;
//! - [`select`]: which memory goes into a core (`coredump_filter` rules, or your own policy);
//! - [`trace`]: staying a process's tracer to intercept its signals and dump the process
//!   while the signalled thread is held (`coreflect watch --signal`): [`trace::Tracer`],
//!   [`trace::Event`], [`trace::Held`], [`trace::dump_held`];
//! - low-level building blocks, stable only as far as the items above need them:
//!   [`elf`] (notes, the streaming core writer over any [`elf::writer::Sink`], a core
//!   reader), [`proc`] (reading `/proc/PID/*`), [`output`] (creating the core file safely).
//!   Everything else (ptrace requests, stopping threads, injection, locking, direct
//!   writing, reaping, the register layout, pause calibration, the plan's explanations)
//!   is private to the crate: no public item exposes its types.
//!
//! Linux on x86_64 only; tracing needs root, `CAP_SYS_PTRACE`, or the target's user with
//! `kernel.yama.ptrace_scope` = 0.
#![warn(missing_docs)]
// A public item must not expose a type of a private module (a type nobody can name).
#![warn(unnameable_types)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("coreflect supports Linux on x86_64 only");

pub mod access;
pub(crate) mod arch;
pub(crate) mod calibrate;
pub(crate) mod direct;
pub mod dump;
pub mod elf;
pub mod error;
pub(crate) mod explain;
pub(crate) mod inject;
pub mod inspect;
pub mod level;
pub(crate) mod lock;
pub mod output;
pub mod proc;
pub(crate) mod ptrace;
mod reap;
pub mod select;
pub mod snapshot;
pub(crate) mod stop;
pub mod trace;
pub mod warning;
pub mod write_path;

pub use dump::{dump, DumpOptions, DumpReport};
pub use error::{Error, Pid, Result};
pub use inspect::{AuxvEntry, Freshness, LiveReason, Module, Registers, Thread};
pub use level::Level;
pub use proc::Mapping;
pub use snapshot::handle::{MemoryView, Snapshot};
pub use snapshot::{Mode, Options, PauseBreakdown, Phase};
pub use warning::Warning;

/// The system's page size in bytes.
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf takes no pointers and has no preconditions.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64)
}
