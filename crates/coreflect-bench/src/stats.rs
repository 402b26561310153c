//! Samples of one measurement, their medians and ranges, and number formatting.

/// What one run of one method measured; `None` where the method has no such number.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Longest stop the target's heartbeat thread saw (µs).
    pub seen_us: Option<f64>,
    /// The pause the tool itself reported (µs): coreflect's `pause_us`, or fork()'s time.
    pub tool_us: Option<f64>,
    /// Wall time of the tool (s).
    pub wall_s: Option<f64>,
    /// Bytes written (coreflect's `bytes_written`; gcore's file size; dd's total).
    pub written: Option<f64>,
    /// Apparent size of the output file (bytes).
    pub file_size: Option<f64>,
    /// Disk space of the output file (`st_blocks` × 512, bytes).
    pub blocks: Option<f64>,
    /// Peak RSS of the tool (KiB).
    pub rss_kib: Option<f64>,
    /// CPU time (user + system) of the tool (s).
    pub cpu_s: Option<f64>,
    /// coreflect's pause breakdown (µs): stop, capture, clone, release, estimate.
    pub breakdown: Option<[f64; 5]>,
    /// Warnings the tool reported.
    pub warnings: Option<String>,
}

impl Sample {
    /// Write bandwidth in GB/s (bytes written ÷ wall time).
    pub fn gbps(&self) -> Option<f64> {
        match (self.written, self.wall_s) {
            (Some(w), Some(t)) if t > 0.0 => Some(w / t / 1e9),
            _ => None,
        }
    }
}

/// Median, minimum and maximum of a set of values.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// The spread of `vals`, or `None` if there are none.
    pub fn of(vals: &[f64]) -> Option<Spread> {
        if vals.is_empty() {
            return None;
        }
        let mut v = vals.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// The median formatted by `f`, followed by ` [min–max]` when there were several
    /// distinct values.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        let (lo, hi) = (f(self.min), f(self.max));
        if self.n > 1 && lo != hi {
            format!("{} [{lo}–{hi}]", f(self.median))
        } else {
            f(self.median)
        }
    }
}

/// A number with precision fitted to its size: 2 decimals below 10, 1 below 1000, else 0.
fn fitted(m: f64) -> String {
    if m < 10.0 {
        format!("{m:.2}")
    } else if m < 1000.0 {
        format!("{m:.1}")
    } else {
        format!("{m:.0}")
    }
}

/// Microseconds as milliseconds, with precision fitted to the size.
pub fn ms(us: f64) -> String {
    fitted(us / 1000.0)
}

/// Bytes as MiB, with precision fitted to the size.
pub fn mib(bytes: f64) -> String {
    fitted(bytes / (1u64 << 20) as f64)
}

/// Seconds with 2 or 3 decimals.
pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.3}")
    } else {
        format!("{s:.2}")
    }
}

/// A ratio, e.g. `1.23×`.
pub fn ratio(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_median() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert_eq!(s.show(|v| format!("{v:.0}")), "2 [1–3]");
        assert_eq!(Spread::of(&[5.0]).unwrap().show(|v| format!("{v}")), "5");
    }

    #[test]
    fn formats() {
        assert_eq!(ms(12_345.0), "12.3");
        assert_eq!(ms(1_234.0), "1.23");
        assert_eq!(mib(1024.0 * 1024.0 * 1024.0), "1024");
        assert_eq!(ratio(1.234), "1.23×");
    }
}
