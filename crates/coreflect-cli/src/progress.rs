//! What `coreflect dump` shows while it works: a progress bar on a terminal (once the write
//! has taken more than a moment), nothing elsewhere; and the `-v` log (`tracing` to stderr).

use crate::report::bytes;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How long a write runs before the bar appears: short dumps print only their summary.
const DELAY: Duration = Duration::from_millis(400);
/// The fastest the bar is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

/// A progress bar on stderr: `[#####-----]  42%  1.20 GiB / 2.90 GiB  850.0 MiB/s  ETA 2s`.
pub struct Bar {
    on: bool,
    start: Option<Instant>,
    last: Option<Instant>,
    width: usize,
}

/// [`DELAY`], or `COREFLECT_PROGRESS_DELAY_MS` (for tests: 0 shows the bar at once).
fn delay() -> Duration {
    std::env::var("COREFLECT_PROGRESS_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DELAY, Duration::from_millis)
}

/// The terminal's width in columns (80 if unknown).
fn columns() -> usize {
    // SAFETY: winsize is four integers: all zeros is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `ws`.
    let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col >= 20 {
        ws.ws_col as usize
    } else {
        80
    }
}

/// `12s`, `3m05s`, `1h02m`.
pub fn eta(secs: f64) -> String {
    let s = secs.round().max(0.0) as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// One line of the bar for `done` of `total` bytes after `secs` seconds, fitted to `cols`.
pub fn render(done: u64, total: u64, secs: f64, cols: usize) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let rate = done as f64 / secs.max(1e-3);
    let left = if rate > 0.0 && done < total {
        format!("ETA {}", eta((total - done) as f64 / rate))
    } else {
        String::new()
    };
    let tail = format!(
        " {:>3.0}%  {} / {}  {}/s  {left}",
        100.0 * frac,
        bytes(done),
        bytes(total),
        bytes(rate as u64)
    );
    // The bar takes what the numbers leave, 10 to 40 cells.
    let cells = cols.saturating_sub(tail.len() + 5).clamp(10, 40);
    let full = (frac * cells as f64).round() as usize;
    format!("  [{}{}]{tail}", "#".repeat(full), "-".repeat(cells - full))
}

impl Bar {
    /// A bar that shows only if `want`, stderr is a terminal, and no `-v` log shares it
    /// (its lines would land in the middle of the bar).
    pub fn new(want: bool) -> Bar {
        let on =
            want && std::io::stderr().is_terminal() && !tracing::enabled!(tracing::Level::DEBUG);
        Bar {
            on,
            start: None,
            last: None,
            width: if on { columns() } else { 80 },
        }
    }

    /// Shows `done` of `total`; always returns `true` (it never cancels).
    pub fn update(&mut self, done: u64, total: u64) -> bool {
        if !self.on {
            return true;
        }
        let now = Instant::now();
        let start = *self.start.get_or_insert(now);
        // Redraws are throttled, except the last one (a fast write still ends on a full bar).
        let throttled = self.last.is_some_and(|l| now - l < REDRAW) && done < total;
        if now - start < delay() || throttled {
            return true;
        }
        self.last = Some(now);
        let line = render(done, total, (now - start).as_secs_f64(), self.width);
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r{line:<w$}", w = self.width.saturating_sub(1));
        let _ = e.flush();
        true
    }

    /// Removes the bar, if it was shown.
    pub fn clear(&mut self) {
        if self.on && self.last.is_some() {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r{:w$}\r", "", w = self.width.saturating_sub(1));
            let _ = e.flush();
        }
    }
}

/// Sets up the `-v` log: `tracing` events from the library and the CLI, to stderr.
/// `verbose` 0: off; 1: phases and per-mapping decisions (debug); 2+: everything (trace).
pub fn init_log(verbose: u8) {
    if verbose == 0 {
        return;
    }
    let level = if verbose == 1 {
        tracing::Level::DEBUG
    } else {
        tracing::Level::TRACE
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_line() {
        let l = render(1 << 30, 4 << 30, 2.0, 100);
        assert!(l.contains(" 25%"), "{l}");
        assert!(l.contains("1.00 GiB / 4.00 GiB"), "{l}");
        assert!(l.contains("512.0 MiB/s"), "{l}");
        assert!(l.contains("ETA 6s"), "{l}");
        assert!(l.len() <= 100, "{l}");
        let done = render(10, 10, 1.0, 80);
        assert!(done.contains("100%") && !done.contains("ETA"), "{done}");
        assert!(done.contains("[##########"), "{done}");
    }

    #[test]
    fn eta_units() {
        assert_eq!(eta(4.4), "4s");
        assert_eq!(eta(185.0), "3m05s");
        assert_eq!(eta(3720.0), "1h02m");
    }
}
