//! The clone: what is done to it at its first stop ([`setup_clone`]), the image's memory
//! map read from it ([`image_mappings`]), its guard that kills it and reaps its zombie
//! inside the target ([`CloneGuard`]), the zombies an interrupted dump left
//! ([`leftover_clones`]). (The clone's rseq area, which the kernel rewrites whenever the
//! clone passes through its return-to-user path, is `crate::direct::RseqArea`.)

use super::{Phase, PhaseHook, Range};
use crate::arch::x86_64::{self as arch};
use crate::error::{Error, Pid, Result};
use crate::inspect::LiveReason;
use crate::proc::{self, Mapping};
use crate::ptrace::{self, WaitStatus};
use crate::warning::Warning;
use std::time::{Duration, Instant};

/// `CLONE_FILES`: share the fd table, so the clone holds no extra file references.
pub(super) const CLONE_FILES: u64 = 0x400;

/// The clone: stopped, traced by us, set to `exit_group(0)` if it ever runs. Killed and
/// reaped when dropped.
#[derive(Debug)]
pub(super) struct CloneGuard {
    pub(super) target: Pid,
    pub(super) target_start: u64,
    pub(super) clone: Pid,
    /// The clone's pid in the target's pid namespace (what `wait4` there needs).
    pub(super) clone_ns: Pid,
    /// The `syscall` instruction the clone's registers point at.
    pub(super) insn: u64,
    pub(super) options: u32,
    pub(super) stop_timeout: Duration,
    pub(super) hook: Option<PhaseHookDebug>,
}

#[derive(Clone)]
pub(super) struct PhaseHookDebug(pub(super) PhaseHook);
impl std::fmt::Debug for PhaseHookDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hook")
    }
}

impl CloneGuard {
    /// Kills the clone and reaps its zombie inside the target, unseen by the target's
    /// `wait`s (see [`crate::reap`]). Returns a warning if the zombie was left for the next
    /// dump, and the length of the reap's stop.
    pub(super) fn finish(&mut self) -> crate::reap::Reaped {
        if self.clone == 0 {
            return Default::default();
        }
        let clone = std::mem::take(&mut self.clone);
        let hook = || {
            if let Some(h) = &self.hook {
                (h.0)(Phase::Reaping)
            }
        };
        crate::reap::kill_and_reap(
            self.target,
            self.target_start,
            clone,
            self.clone_ns,
            self.insn,
            self.options,
            self.stop_timeout,
            &hook,
        )
    }
}

impl Drop for CloneGuard {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Children of `pid` that look like clones left by an interrupted coreflect: zombies created
/// with exit signal 0 (`PTRACE_EVENT_CLONE`), invisible to the target's own `wait`.
/// Returns their pids in the target's pid namespace. A coreflect clone exits with status
/// [`CLONE_EXIT_CODE`] (or is killed by SIGKILL when its tracer died).
///
/// A zombie still traced belongs to a snapshot that is alive (another coreflect, or another
/// snapshot in this process, between killing its clone and reaping it): it is not a
/// leftover — that snapshot reaps it, and nobody else can before its tracer lets go.
pub fn leftover_clones(pid: Pid) -> Vec<Pid> {
    proc::children(pid)
        .into_iter()
        .filter(|&c| {
            proc::Stat::read(c).is_ok_and(|s| {
                s.state == 'Z'
                    && s.exit_signal == 0
                    && (s.exit_code == CLONE_EXIT_CODE << 8 || s.exit_code == libc::SIGKILL)
            })
        })
        .filter_map(|c| match proc::Status::read(c) {
            Ok(st) if st.ns_pid > 0 && st.tracer_pid == 0 => Some(st.ns_pid),
            _ => None,
        })
        .collect()
}

/// The exit code coreflect's clones exit with: it marks their zombies as ours.
pub const CLONE_EXIT_CODE: i32 = 0xCF;

/// At the clone's first stop: point it at `exit_group(CLONE_EXIT_CODE)` so it can never run the target's
/// code, kill it if we die, and make it the OOM killer's first choice (a warning if it
/// could not be).
pub(super) fn setup_clone(
    pid: Pid,
    clone: Pid,
    insn: u64,
    warnings: &mut Vec<Warning>,
) -> Result<Pid> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = match ptrace::wait_until(clone, deadline)? {
        Some(WaitStatus::Stopped { .. }) => None,
        Some(WaitStatus::Exited(code)) => Some(format!("it exited with status {code}")),
        Some(WaitStatus::Signaled(sig)) => Some(format!("it was killed by signal {sig}")),
        Some(other) => Some(format!("it reported {other:?} instead of a stop")),
        None => Some("it did not stop within 10 s".to_string()),
    };
    if let Some(status) = status {
        return Err(Error::CloneNotStopped { pid, clone, status });
    }
    let r = ptrace::get_regs(clone)?.at_syscall(
        insn,
        arch::SYS_EXIT_GROUP,
        [CLONE_EXIT_CODE as u64, 0, 0, 0, 0, 0],
    );
    ptrace::set_regs(clone, &r)?;
    ptrace::set_options(clone, ptrace::O_EXITKILL)?;
    if let Err(e) = std::fs::write(format!("/proc/{clone}/oom_score_adj"), "1000") {
        warnings.push(Warning::CloneOomScoreNotSet {
            clone,
            error: e.to_string(),
        });
    }
    // In a container the target knows the clone by another pid.
    Ok(proc::Status::read(clone)
        .ok()
        .map(|s| s.ns_pid)
        .filter(|&p| p > 0)
        .unwrap_or(clone))
}

/// The clone's memory map, plus what only the live target holds (MADV_DONTFORK ranges are
/// absent from the clone, MADV_WIPEONFORK ranges are zero there): those are read live. The
/// target's map is the one read just before the pause.
pub(super) fn image_mappings(
    clone: Pid,
    target_maps: &[Mapping],
    warnings: &mut Vec<Warning>,
) -> Result<(Vec<Mapping>, Vec<Range>)> {
    let mut maps = proc::maps::read_smaps(clone)?;
    let mut live = Vec::new();
    for m in target_maps
        .iter()
        .filter(|m| m.has_flag("dc") || m.has_flag("wf"))
    {
        let overlaps = maps.iter().any(|c| c.start < m.end && m.start < c.end);
        if m.has_flag("dc") && overlaps {
            continue;
        }
        if m.has_flag("dc") {
            maps.push(m.clone());
        } else if let Some(c) = maps
            .iter_mut()
            .find(|c| c.start == m.start && c.end == m.end)
        {
            // Wiped in the clone: describe it by the target's contents.
            c.anonymous_kb = m.anonymous_kb;
            c.swap_kb = m.swap_kb;
            c.rss_kb = m.rss_kb;
        }
        live.push((m.start, m.end));
        warnings.push(Warning::ReadLive {
            start: m.start,
            end: m.end,
            name: m.name.clone(),
            reason: if m.has_flag("dc") {
                LiveReason::DontFork
            } else {
                LiveReason::WipeOnFork
            },
        });
    }
    maps.sort_by_key(|m| m.start);
    Ok((maps, live))
}
