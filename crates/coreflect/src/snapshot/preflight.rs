//! Before anything is stopped: can this process be dumped at all, can it be reflected (and
//! how must the injections treat seccomp), and what will the pause cost.

use super::Mode;
use crate::error::{Error, Pid, Result};
use crate::inject;
use crate::proc::{self, Mapping, ProcessInfo};
use crate::ptrace;
use std::time::Duration;

/// Checks that `pid` can be dumped at all and reads its process information.
pub fn preflight(pid: Pid) -> Result<ProcessInfo> {
    if pid <= 0 {
        return Err(Error::InvalidPid { pid: pid as i64 });
    }
    if pid as u32 == std::process::id() {
        return Err(Error::SelfDump { pid });
    }
    let stat = proc::Stat::read(pid)?;
    if stat.is_kernel_thread() {
        return Err(Error::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    // A zombie main thread with live threads (it called pthread_exit) is a live process:
    // the kernel dumps it too. Its memory is read through a live thread.
    let Some(mm) = proc::live_thread(pid) else {
        return Err(Error::Zombie {
            pid,
            comm: stat.comm,
        });
    };
    let status = proc::Status::read(mm)?;
    if status.tgid != pid {
        return Err(Error::NotAProcess {
            tid: pid,
            tgid: status.tgid,
        });
    }
    if status.no_mm {
        return Err(Error::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    if status.tracer_pid != 0 {
        let tracer_comm = proc::Stat::read(status.tracer_pid)
            .map(|s| s.comm)
            .unwrap_or_default();
        // Another coreflect in its pause: the target lock serializes us behind it.
        if tracer_comm != "coreflect" {
            return Err(Error::AlreadyTraced {
                pid,
                tracer: status.tracer_pid,
                tracer_comm,
            });
        }
    }
    check_dumpable(mm, &status)?;
    let info = ProcessInfo::read(pid)?;
    // A 32-bit program (its executable's ELF class is 1) cannot be described by this writer.
    let class = info
        .exe
        .as_ref()
        .and_then(|e| std::fs::File::open(e).ok())
        .and_then(|f| {
            let mut b = [0u8; 5];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).ok()?;
            (&b[..4] == b"\x7fELF").then_some(b[4])
        });
    if class == Some(1) {
        return Err(Error::Not64Bit { pid });
    }
    Ok(info)
}

/// Refuses a non-dumpable target (set-uid, or `PR_SET_DUMPABLE` 0) when we lack
/// CAP_SYS_PTRACE: the kernel then hands its /proc files to root, whatever its user.
fn check_dumpable(pid: Pid, status: &proc::Status) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    let me = proc::Status::read(std::process::id() as Pid).unwrap_or_default();
    if me.cap_eff & CAP_SYS_PTRACE != 0 {
        return Ok(());
    }
    if status.uid == 0 || status.uid != me.uid {
        return Ok(()); // another user's process: ptrace itself says no, with its own hint
    }
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .unwrap_or(status.uid);
    // Our own user's process whose private /proc files we may not open: not dumpable.
    let refused = std::fs::File::open(format!("/proc/{pid}/auxv"))
        .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)));
    if owner == 0 || refused {
        return Err(Error::NotDumpable { pid });
    }
    Ok(())
}

/// How the injections must treat seccomp filters.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Injectable {
    /// Extra ptrace options for the injections (`PTRACE_O_SUSPEND_SECCOMP`).
    pub(super) options: u32,
    /// Some thread runs under a seccomp filter: inject only into threads without one
    /// (unless the filter is suspended), checked again on each candidate while it is
    /// stopped.
    pub(super) filtered: bool,
}

/// Why reflection cannot be used for this target, if it cannot; else how to inject.
pub(super) fn reflect_blocker(
    p: &ProcessInfo,
    maps: &[Mapping],
) -> std::result::Result<Injectable, String> {
    if let Some(m) = maps
        .iter()
        .find(|m| m.has_flag("um") || m.has_flag("uw") || m.has_flag("ui"))
    {
        return Err(format!(
            "memory at {:#x}-{:#x} is registered with userfaultfd (the clone syscall would wait for the target's own, stopped, fault handler)",
            m.start, m.end
        ));
    }
    if let Some(m) = maps.iter().find(|m| m.has_flag("ht") && !m.shared) {
        return Err(format!(
            "memory at {:#x}-{:#x} ({} KiB) is private hugetlb memory (MAP_HUGETLB): a clone would share its huge pages, so the target's next write to one needs a free huge page for its copy-on-write (SIGBUS when the pool is exhausted), and the kernel unmaps them from the clone",
            m.start,
            m.end,
            m.len() / 1024
        ));
    }
    // Seccomp is per thread: look at every thread, not only the main one.
    let tids = proc::threads(p.pid).unwrap_or_default();
    let modes: Vec<u32> = tids
        .iter()
        .map(|&t| inject::thread_seccomp(p.pid, t))
        .collect();
    let filtered = modes.iter().filter(|&&m| m != 0).count();
    if filtered == 0 {
        return Ok(Injectable::default());
    }
    let me = proc::Status::read(std::process::id() as Pid).unwrap_or_default();
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    if me.cap_eff & CAP_SYS_ADMIN != 0 && me.seccomp == 0 {
        return Ok(Injectable {
            options: ptrace::O_SUSPEND_SECCOMP,
            filtered: true,
        });
    }
    if filtered < modes.len() {
        // Threads without a filter can run the injections.
        return Ok(Injectable {
            options: 0,
            filtered: true,
        });
    }
    Err(format!(
        "every thread of the target runs under a seccomp filter (Seccomp: {}) that may kill it on the injected clone, and coreflect lacks CAP_SYS_ADMIN to suspend seccomp (PTRACE_O_SUSPEND_SECCOMP)",
        modes.first().copied().unwrap_or(2)
    ))
}

/// What a pause costs besides the clone and the per-thread work: seizing, the injection's
/// round trips and the tracer's wake-ups, the release (coreflect-bench, 1 GiB THP target:
/// pause minus a helper-measured fork ≈ 1 ms on a busy 2-vCPU guest).
const PTRACE_FIXED_US: f64 = 1000.0;

/// A target's 4 KiB pages cost more to copy than the calibration helper's freshly touched
/// ones (coreflect-bench, 1 GiB 4K target on a 2-vCPU EPYC guest: clone 13.9 ms where the
/// helpers' fastest forks gave 7.2 ms per GiB; the huge-page and many-thread scenarios
/// matched without a factor).
const TARGET_VS_HELPER_4K: f64 = 2.0;

/// The pause a snapshot of this process is expected to cost. The clone costs what a fork
/// of the target costs — a fixed part, a part per mapping, plus copying the page tables of
/// its anonymous memory, per GiB in 4 KiB pages and per GiB of transparent huge pages — as
/// calibrated on this machine (helper processes time their own forks; the result is cached
/// for an hour under `$XDG_CACHE_HOME/coreflect/`); stopping, capturing and
/// releasing cost ~1 ms plus ~12 µs per thread. In suspend mode the target is stopped for
/// the whole write (~1.5 GB/s).
pub fn estimate_pause(status: &proc::Status, maps: &[Mapping], mode: Mode) -> Duration {
    let anon: u64 = maps.iter().map(|m| m.anonymous_kb).sum();
    let huge: u64 = maps.iter().map(|m| m.anon_huge_kb).sum::<u64>().min(anon);
    let us = match mode {
        Mode::Suspend => 1000 + status.vm_rss_kb * 2 / 3, // 1 KiB at 1.5 GB/s is ~0.68 µs
        _ => {
            let c = crate::calibrate::fork_cost();
            let gib = |kb: u64| kb as f64 / (1u64 << 20) as f64;
            let fork = c.fixed_us
                + c.per_map_us * maps.len() as f64
                + gib(anon - huge) * c.per_gib_4k_us * TARGET_VS_HELPER_4K
                + gib(huge) * c.per_gib_thp_us;
            (fork + PTRACE_FIXED_US + 12.0 * status.threads as f64) as u64
        }
    };
    Duration::from_micros(us)
}
