//! Rendering reports, errors and progress.

use coreflect::DumpReport;
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Quotes a string for JSON.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    let f = n as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// The report of a successful dump as one JSON object.
pub fn report_json(r: &DumpReport) -> String {
    let p = &r.pause;
    let warnings: Vec<String> = r.warnings.iter().map(|w| json_str(w)).collect();
    format!(
        "{{\"pid\":{},\"path\":{},\"mode\":{},\"threads\":{},\"segments\":{},\"pause_us\":{},\"pause\":{{\"stop_us\":{},\"capture_us\":{},\"clone_us\":{},\"release_us\":{},\"estimate_us\":{},\"started_ns\":{}}},\"bytes_written\":{},\"file_size\":{},\"unpopulated_bytes\":{},\"zero_bytes\":{},\"written_by_clone\":{},\"write_path\":{},\"clone_cpu_ms\":{:.1},\"cow_bytes\":{},\"duration_ms\":{},\"warnings\":[{}]}}",
        r.pid,
        json_str(&r.path.display().to_string()),
        json_str(r.mode.as_str()),
        r.threads,
        r.segments,
        p.total_us,
        p.stop_us,
        p.capture_us,
        p.clone_us,
        p.release_us,
        p.estimate_us,
        p.started_ns,
        r.bytes_written,
        r.file_size,
        r.unpopulated_bytes,
        r.zero_bytes,
        r.written_by_clone,
        write_path_json(&r.write_path),
        r.write_path.clone_cpu_ms,
        r.write_path.cow_bytes,
        r.duration_ms,
        warnings.join(",")
    )
}

fn write_path_json(w: &coreflect::write_path::WritePathStats) -> String {
    format!(
        "{{\"used\":{},\"fallback\":{},\"spliced_bytes\":{},\"read_bytes\":{},\"read_runs\":{},\"released_bytes\":{},\"injections\":{}}}",
        json_str(&w.used),
        json_str(&w.fallback),
        w.spliced_bytes,
        w.read_bytes,
        w.read_runs,
        w.released_bytes,
        w.injections
    )
}

/// Prints the report of a successful dump.
pub fn success(json: bool, r: &DumpReport) {
    if json {
        println!("{}", report_json(r));
        return;
    }
    let p = &r.pause;
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "coreflect: dumped pid {} to {}", r.pid, r.path.display());
    let _ = writeln!(
        e,
        "  mode {}, {} threads, {} mappings",
        r.mode.as_str(),
        r.threads,
        r.segments
    );
    if r.mode == coreflect::Mode::Reflect {
        let _ = writeln!(
            e,
            "  target paused {} (stop {}, clone {}, release {}; registers read during the clone in {}; estimated {})",
            ms(p.total_us),
            ms(p.stop_us),
            ms(p.clone_us),
            ms(p.release_us),
            ms(p.capture_us),
            ms(p.estimate_us)
        );
    } else {
        let _ = writeln!(
            e,
            "  target paused {} (stopped for the whole write)",
            ms(p.total_us)
        );
    }
    let _ = writeln!(
        e,
        "  wrote {} of data into a {} file in {:.2} s{}",
        bytes(r.bytes_written),
        bytes(r.file_size),
        r.duration_ms as f64 / 1000.0,
        if r.written_by_clone > 0 {
            format!(
                " ({} of it written by the clone itself)",
                bytes(r.written_by_clone)
            )
        } else {
            String::new()
        }
    );
    let w = &r.write_path;
    let _ = writeln!(
        e,
        "  write path {}{}; clone CPU {:.1} ms; target copied {} while the clone lived{}",
        w.used,
        if w.read_runs > 0 {
            format!(
                " ({} runs, {} read instead)",
                w.read_runs,
                bytes(w.read_bytes)
            )
        } else {
            String::new()
        },
        w.clone_cpu_ms,
        bytes(w.cow_bytes),
        if w.fallback.is_empty() {
            String::new()
        } else {
            format!(" ({})", w.fallback)
        }
    );
    for w in &r.warnings {
        let _ = writeln!(e, "  warning: {w}");
    }
}

/// Prints an error: one line on stderr (and a JSON object on stdout with `--json`).
pub fn error(json: bool, err: &coreflect::Error) {
    eprintln!("coreflect: error: {err}");
    if json {
        println!("{{\"error\":{}}}", json_str(&err.to_string()));
    }
}

/// A one-line progress display on a terminal.
pub struct ProgressLine {
    on: bool,
    start: Instant,
    last: Option<Instant>,
}

impl ProgressLine {
    /// A display that shows only if `want` and stderr is a terminal.
    pub fn new(want: bool) -> Self {
        ProgressLine {
            on: want && std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
        }
    }

    /// Shows `done` of `total`; always returns `true` (it never cancels).
    pub fn update(&mut self, done: u64, total: u64) -> bool {
        if !self.on {
            return true;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l).as_millis() < 100)
            && done < total
        {
            return true;
        }
        self.last = Some(now);
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-3);
        eprint!(
            "\r  writing {:>5.1}%  {} / {}  {}/s   ",
            100.0 * done as f64 / total.max(1) as f64,
            bytes(done),
            bytes(total),
            bytes((done as f64 / secs) as u64)
        );
        true
    }

    /// Removes the line.
    pub fn clear(&mut self) {
        if self.on && self.last.is_some() {
            eprint!("\r{:60}\r", "");
        }
    }
}
