//! What a snapshot is asked for ([`Options`], [`Mode`]) and what it reports back about its
//! pause ([`PauseBreakdown`], [`Phase`] callbacks).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How to take the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Reflect if possible, else suspend (with a warning saying why).
    #[default]
    Auto,
    /// Reflect, or fail with the reason.
    Reflect,
    /// Keep the target stopped for the snapshot's whole life.
    Suspend,
}

impl Mode {
    /// The name used on the command line and in reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Reflect => "reflect",
            Mode::Suspend => "suspend",
        }
    }
}

/// Named points of a dump, for progress displays and fault-injection tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Every thread is stopped and captured; nothing injected yet (inside the pause).
    Stopped,
    /// The target is released and the clone exists (reflect mode).
    Released,
    /// The core's data is being written.
    Writing,
    /// The clone was killed; its zombie is about to be reaped in the target.
    Reaping,
}

impl Phase {
    /// The phase's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Released => "released",
            Phase::Writing => "writing",
            Phase::Reaping => "reaping",
        }
    }
}

/// A callback at each [`Phase`].
pub type PhaseHook = Arc<dyn Fn(Phase) + Send + Sync>;

/// Options of [`crate::Snapshot::capture`].
///
/// ```
/// use std::time::Duration;
/// let opts = coreflect::Options {
///     mode: coreflect::Mode::Reflect,            // fail rather than keep the target stopped
///     max_pause: Some(Duration::from_millis(50)), // refuse, before stopping, if longer
///     ..Default::default()
/// };
/// assert_eq!(opts.stop_timeout, Duration::from_secs(2));
/// ```
#[derive(Clone)]
pub struct Options {
    /// Reflect, suspend, or choose.
    pub mode: Mode,
    /// How long stopping all threads may take before giving up.
    pub stop_timeout: Duration,
    /// Refuse (before stopping anything) if the estimated pause is longer.
    pub max_pause: Option<Duration>,
    /// Checked before stopping the target and while writing: set it to cancel.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Called at each phase.
    pub hook: Option<PhaseHook>,
    /// How the image's memory reaches a core file (see [`crate::write_path`]); streams
    /// always take the read path.
    pub write_path: crate::write_path::WritePath,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Auto,
            stop_timeout: Duration::from_secs(2),
            max_pause: None,
            cancel: None,
            hook: None,
            write_path: Default::default(),
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("mode", &self.mode)
            .field("stop_timeout", &self.stop_timeout)
            .field("max_pause", &self.max_pause)
            .finish()
    }
}

impl Options {
    pub(super) fn phase(&self, p: Phase) {
        if let Some(h) = &self.hook {
            h(p)
        }
    }
    pub(super) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }
}

/// Where the pause went, in microseconds from the first `PTRACE_SEIZE`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseBreakdown {
    /// Seizing and stopping every thread.
    pub stop_us: u64,
    /// Reading registers and XSTATE. In reflect mode this overlaps the clone syscall and
    /// is not part of the total.
    pub capture_us: u64,
    /// From the last stop to the clone's `PTRACE_EVENT_CLONE` (choosing the thread, the
    /// injected syscall).
    pub clone_us: u64,
    /// Restoring and releasing the injection thread, then every other thread.
    pub release_us: u64,
    /// The whole pause: first stop to last release (in suspend mode: until the snapshot
    /// is dropped).
    pub total_us: u64,
    /// The estimate made before stopping.
    pub estimate_us: u64,
    /// When the pause began, in CLOCK_MONOTONIC nanoseconds (to match it with what the
    /// target observed).
    pub started_ns: u64,
    /// The second, short stop at the end (reflect mode): every thread is stopped while the
    /// clone's zombie is collected and reaped inside the target, so that no `wait` of the
    /// target can see it. 0 until the snapshot is finished, or if no reap was needed.
    pub reap_us: u64,
}
