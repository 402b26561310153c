//! Problems that do not stop a snapshot or a dump.
//!
//! They are collected as they happen (as `minidump-writer` collects its soft errors) and
//! returned with the result: [`crate::Snapshot::warnings`], [`crate::DumpReport::warnings`],
//! [`crate::Snapshot::finish`]. Each one is a [`Warning`] whose `Display` says what
//! happened and what it means for the core; [`Warning::kind`] names its kind for a machine.
//! Like errors, warnings name no command-line option.

use crate::error::Pid;
use crate::inspect::LiveReason;
use crate::write_path::WritePath;
use std::fmt;

/// One problem that did not stop the snapshot or the dump.
///
/// ```no_run
/// # fn main() -> coreflect::Result<()> {
/// let snap = coreflect::Snapshot::capture(1234, &Default::default())?;
/// for w in snap.warnings() {
///     match w {
///         coreflect::Warning::ReadLive { start, end, .. } => {
///             eprintln!("{start:#x}-{end:#x} is not frozen")
///         }
///         w => eprintln!("warning ({}): {w}", w.kind()),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// The per-target lock's name was taken by a socket that cannot belong to a coreflect
    /// allowed to dump the target: the lock was ignored and the dump went on without it.
    LockIgnored {
        /// The lock's abstract socket name (without the leading `@`).
        name: String,
        /// What holds the name.
        holder: String,
    },
    /// Reflection was not possible: the snapshot was taken in suspend mode instead (the
    /// target stopped for the whole write).
    SuspendedInstead {
        /// Why reflection was not possible.
        reason: String,
    },
    /// Zombies of the clones of an earlier, interrupted dump were found in the target and
    /// reaped.
    LeftoverClonesReaped {
        /// How many.
        count: usize,
    },
    /// Zombies of the clones of an earlier, interrupted dump are in the target and could
    /// not be reaped.
    LeftoverClonesNotReaped {
        /// Why (the error with its causes).
        error: String,
    },
    /// The clone could not be made the out-of-memory killer's first choice: under memory
    /// pressure while the core is written, the kernel may pick the target instead.
    CloneOomScoreNotSet {
        /// The clone.
        clone: Pid,
        /// The error writing its `oom_score_adj`.
        error: String,
    },
    /// A range the clone cannot hold was read from the live target, not the frozen image.
    ReadLive {
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
        /// The mapping's name (empty for anonymous memory).
        name: String,
        /// Why it is live.
        reason: LiveReason,
    },
    /// The chosen write path does not apply to this output (a stream or a compressed core):
    /// the memory was read from the clone.
    WritePathNotApplicable {
        /// The write path asked for.
        path: WritePath,
    },
    /// A range could not be read; it is a hole in the core.
    Unreadable {
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
        /// The mapping's name (empty for anonymous memory).
        name: String,
        /// The error reading it.
        error: String,
    },
    /// The clone did not exit after SIGKILL in time; its zombie may stay in the target
    /// until the next dump reaps it.
    CloneDidNotExit {
        /// The clone.
        clone: Pid,
        /// The target.
        pid: Pid,
    },
    /// The clone's zombie was left in the target (the target may see it in a `wait`);
    /// the next dump reaps it.
    CloneZombieLeft {
        /// The clone.
        clone: Pid,
        /// The target.
        pid: Pid,
        /// Why it could not be reaped unseen.
        why: String,
    },
}

impl Warning {
    /// The warning's kind, a stable `snake_case` name for a machine (e.g. in a JSON report).
    pub fn kind(&self) -> &'static str {
        match self {
            Warning::LockIgnored { .. } => "lock_ignored",
            Warning::SuspendedInstead { .. } => "suspended_instead",
            Warning::LeftoverClonesReaped { .. } => "leftover_clones_reaped",
            Warning::LeftoverClonesNotReaped { .. } => "leftover_clones_not_reaped",
            Warning::CloneOomScoreNotSet { .. } => "clone_oom_score_not_set",
            Warning::ReadLive { .. } => "read_live",
            Warning::WritePathNotApplicable { .. } => "write_path_not_applicable",
            Warning::Unreadable { .. } => "unreadable",
            Warning::CloneDidNotExit { .. } => "clone_did_not_exit",
            Warning::CloneZombieLeft { .. } => "clone_zombie_left",
        }
    }
}

fn or_anonymous(name: &str) -> &str {
    if name.is_empty() {
        "anonymous"
    } else {
        name
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::LockIgnored { name, holder } => write!(
                f,
                "the per-target lock (abstract socket @{name}) is {holder}: ignored it and dumped without the lock (a second coreflect on this target at the same time would not be kept out)"
            ),
            Warning::SuspendedInstead { reason } => write!(
                f,
                "reflection unavailable: {reason}; dumped in suspend mode (target stopped for the whole write)"
            ),
            Warning::LeftoverClonesReaped { count } => write!(
                f,
                "reaped {count} leftover clone zombie(s) of an earlier interrupted dump"
            ),
            Warning::LeftoverClonesNotReaped { error } => {
                write!(f, "could not reap leftover clone zombies: {error}")
            }
            Warning::CloneOomScoreNotSet { clone, error } => write!(
                f,
                "could not make the clone {clone} the out-of-memory killer's first choice ({error}): if memory runs out while the core is written, the kernel may kill the target instead"
            ),
            Warning::ReadLive {
                start,
                end,
                name,
                reason,
            } => write!(
                f,
                "{start:#x}-{end:#x} ({} KiB, {}) is {} and was read from the live target, not the frozen image",
                end.saturating_sub(*start) / 1024,
                or_anonymous(name),
                match reason {
                    LiveReason::DontFork => "MADV_DONTFORK",
                    LiveReason::WipeOnFork => "MADV_WIPEONFORK",
                    LiveReason::Shared => "shared memory",
                }
            ),
            Warning::WritePathNotApplicable { path } => write!(
                f,
                "the {} write path applies to uncompressed core files only: the memory was read from the clone",
                path.as_str()
            ),
            Warning::Unreadable {
                start,
                end,
                name,
                error,
            } => write!(
                f,
                "{start:#x}-{end:#x} ({}) could not be read ({error}); left as a hole",
                or_anonymous(name)
            ),
            Warning::CloneDidNotExit { clone, pid } => write!(
                f,
                "the clone {clone} did not exit within 30 s of SIGKILL; if its zombie stays in pid {pid}, the next dump reaps it"
            ),
            Warning::CloneZombieLeft { clone, pid, why } => write!(
                f,
                "the clone {clone}'s zombie was left in pid {pid} ({why}); the next dump reaps it"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_keeps_the_messages_and_kinds_are_distinct() {
        let all = [
            Warning::LockIgnored {
                name: "coreflect/target/1/2".into(),
                holder: "bound by a socket of another type".into(),
            },
            Warning::SuspendedInstead {
                reason: "seccomp".into(),
            },
            Warning::LeftoverClonesReaped { count: 2 },
            Warning::LeftoverClonesNotReaped { error: "x".into() },
            Warning::CloneOomScoreNotSet {
                clone: 5,
                error: "Permission denied (os error 13)".into(),
            },
            Warning::ReadLive {
                start: 0x1000,
                end: 0x3000,
                name: String::new(),
                reason: LiveReason::WipeOnFork,
            },
            Warning::WritePathNotApplicable {
                path: WritePath::Splice,
            },
            Warning::Unreadable {
                start: 0x1000,
                end: 0x2000,
                name: "/dev/x".into(),
                error: "Input/output error (os error 5)".into(),
            },
            Warning::CloneDidNotExit { clone: 5, pid: 4 },
            Warning::CloneZombieLeft {
                clone: 5,
                pid: 4,
                why: "no thread could run wait4".into(),
            },
        ];
        let text: Vec<String> = all.iter().map(|w| w.to_string()).collect();
        let t = |kind: &str| all.iter().find(|w| w.kind() == kind).unwrap().to_string();
        assert!(t("lock_ignored")
            .contains("@coreflect/target/1/2) is bound by a socket of another type"));
        let s = t("suspended_instead");
        assert!(s.contains("seccomp") && s.contains("suspend mode"), "{s}");
        assert!(t("leftover_clones_reaped").starts_with("reaped 2 leftover clone zombie(s)"));
        assert!(t("clone_oom_score_not_set").contains(
            "the clone 5 the out-of-memory killer's first choice (Permission denied (os error 13))"
        ));
        assert_eq!(
            t("read_live"),
            "0x1000-0x3000 (8 KiB, anonymous) is MADV_WIPEONFORK and was read from the live target, not the frozen image"
        );
        assert!(t("write_path_not_applicable").starts_with("the splice write path"));
        assert_eq!(
            t("unreadable"),
            "0x1000-0x2000 (/dev/x) could not be read (Input/output error (os error 5)); left as a hole"
        );
        assert!(
            t("clone_zombie_left").contains("zombie was left in pid 4 (no thread could run wait4)")
        );
        for t in &text {
            assert!(
                !t.contains("--"),
                "a warning names a command-line option: {t}"
            );
        }
        let mut kinds: Vec<&str> = all.iter().map(Warning::kind).collect();
        kinds.sort();
        kinds.dedup();
        assert_eq!(kinds.len(), all.len());
    }
}
