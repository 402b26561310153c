//! Rendering reports, errors and progress.

use coreflect::DumpReport;
use serde::Serialize;
use std::io::Write;

/// A string made safe for one line of text on a terminal: control characters (newlines,
/// escape sequences, C1 controls) are shown escaped, as `\n`, `\t`, `\r`, `\e`,
/// `\x7f`, `\u{9b}`, so a path or a mapping's name can neither split a message in two
/// nor drive the terminal.
pub fn text(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            '\x1b' => o.push_str("\\e"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                o.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => o.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => o.push(c),
        }
    }
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

/// `--json`'s report of a successful dump (the field names are the interface).
#[derive(Serialize)]
struct JsonReport<'a> {
    pid: i32,
    path: String,
    mode: &'a str,
    threads: usize,
    segments: usize,
    pause_us: u64,
    pause: JsonPause,
    bytes_written: u64,
    file_size: u64,
    unpopulated_bytes: u64,
    zero_bytes: u64,
    written_by_clone: u64,
    live_bytes: u64,
    write_path: JsonWritePath<'a>,
    clone_cpu_ms: f64,
    cow_bytes: u64,
    duration_ms: u64,
    level: &'a str,
    compressed_size: Option<u64>,
    /// Each warning's message, in order.
    warnings: Vec<String>,
    /// Each warning's kind ([`coreflect::Warning::kind`]), in the same order.
    warning_kinds: Vec<&'static str>,
}

/// The pause by phase, in µs (`started_ns`: CLOCK_MONOTONIC when it began).
#[derive(Serialize)]
struct JsonPause {
    stop_us: u64,
    capture_us: u64,
    clone_us: u64,
    release_us: u64,
    estimate_us: u64,
    started_ns: u64,
    reap_us: u64,
}

/// The report of a successful dump as one JSON object.
pub fn report_json(r: &DumpReport) -> String {
    let p = &r.pause;
    let report = JsonReport {
        pid: r.pid,
        path: r.path.display().to_string(),
        mode: r.mode.as_str(),
        threads: r.threads,
        segments: r.segments,
        pause_us: p.total_us,
        pause: JsonPause {
            stop_us: p.stop_us,
            capture_us: p.capture_us,
            clone_us: p.clone_us,
            release_us: p.release_us,
            estimate_us: p.estimate_us,
            started_ns: p.started_ns,
            reap_us: p.reap_us,
        },
        bytes_written: r.bytes_written,
        file_size: r.file_size,
        unpopulated_bytes: r.unpopulated_bytes,
        zero_bytes: r.zero_bytes,
        written_by_clone: r.written_by_clone,
        live_bytes: r.live_bytes,
        write_path: JsonWritePath::from(&r.write_path),
        clone_cpu_ms: (r.write_path.clone_cpu_ms * 10.0).round() / 10.0,
        cow_bytes: r.write_path.cow_bytes,
        duration_ms: r.duration_ms,
        level: r.level.as_str(),
        compressed_size: r.compressed_size,
        warnings: r.warnings.iter().map(ToString::to_string).collect(),
        warning_kinds: r.warnings.iter().map(coreflect::Warning::kind).collect(),
    };
    serde_json::to_string(&report).expect("a report serializes")
}

/// How memory reached the file, as JSON.
#[derive(Serialize)]
struct JsonWritePath<'a> {
    used: &'a str,
    fallback: &'a str,
    spliced_bytes: u64,
    read_bytes: u64,
    read_runs: u64,
    released_bytes: u64,
    injections: u64,
}

impl<'a> From<&'a coreflect::write_path::WritePathStats> for JsonWritePath<'a> {
    fn from(w: &'a coreflect::write_path::WritePathStats) -> Self {
        JsonWritePath {
            used: &w.used,
            fallback: &w.fallback,
            spliced_bytes: w.spliced_bytes,
            read_bytes: w.read_bytes,
            read_runs: w.read_runs,
            released_bytes: w.released_bytes,
            injections: w.injections,
        }
    }
}

/// Prints the report of a successful dump.
pub fn success(json: bool, r: &DumpReport) {
    if json {
        println!("{}", report_json(r));
        return;
    }
    let p = &r.pause;
    let mut e = std::io::stderr().lock();
    let _ = writeln!(
        e,
        "coreflect: dumped pid {} to {}",
        r.pid,
        text(&r.path.display().to_string())
    );
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
        if p.reap_us > 0 {
            let _ = writeln!(
                e,
                "  and paused {} at the end, while the clone's zombie was reaped unseen",
                ms(p.reap_us)
            );
        }
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
    if let Some(c) = r.compressed_size {
        let _ = writeln!(
            e,
            "  compressed (zstd) to {} ({:.1}% of the core)",
            bytes(c),
            100.0 * c as f64 / r.file_size.max(1) as f64
        );
    }
    if r.live_bytes > 0 {
        let _ = writeln!(
            e,
            "  {} read live, not frozen (shared memory the target kept using)",
            bytes(r.live_bytes)
        );
    }
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
        let _ = writeln!(e, "  warning: {}", text(&w.to_string()));
    }
}

/// What to do about `err` with this command's options (the library names none).
pub fn hint(err: &coreflect::Error) -> Option<&'static str> {
    use coreflect::Error as E;
    Some(match err {
        E::StopTimeout { .. } => "raise --stop-timeout",
        E::ReflectUnavailable { .. } => {
            "use --mode suspend (or auto) to dump with the target stopped"
        }
        E::PauseTooLong { .. } => "raise --max-pause",
        E::WritePathUnavailable { .. } => "use --write-path auto or read",
        E::SpliceBroken { .. } => "--write-path read does that",
        E::CloneKilled { .. } => "--mode suspend takes one",
        E::Cancelled => "no file was left",
        E::Output { source, what, .. } => match source.raw_os_error() {
            // (Not a FIFO or a device: only regular files are ever replaced.)
            Some(libc::EEXIST) if *what != "refusing to replace" => {
                "--overwrite replaces it, -o chooses another path"
            }
            _ => "-o chooses another path",
        },
        _ => return None,
    })
}

/// The whole message of `err`: what failed, each cause, and this command's hint.
pub fn error_text(err: &coreflect::Error) -> String {
    match hint(err) {
        Some(h) => format!("{}; {h}", err.with_causes()),
        None => err.with_causes(),
    }
}

/// Prints an error: one line on stderr (and a JSON object on stdout with `--json`).
pub fn error(json: bool, err: &coreflect::Error) {
    let msg = error_text(err);
    eprintln!("coreflect: error: {}", text(&msg));
    if json {
        println!("{}", serde_json::json!({ "error": msg }));
    }
}

/// `s` with every control character (newline, escape, DEL, C1…) written as `\xNN` or
/// `\u{N}`: text a target or a core controls (process names, command lines, file names)
/// stays on its line and cannot drive the terminal.
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x100 && c.is_control() => {
                o.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => o.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => o.push(c),
        }
    }
    std::borrow::Cow::Owned(o)
}

/// A JSON string literal for `s` (quoted and escaped).
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use coreflect::Error as E;

    #[test]
    fn the_cli_adds_its_options_after_the_librarys_advice() {
        let wp = error_text(&E::WritePathUnavailable {
            clone: 6,
            reason: "the clone could not be set up for splicing".into(),
        });
        assert!(
            wp.starts_with("the zero-copy write path cannot be used"),
            "{wp}"
        );
        assert!(wp.ends_with("; use --write-path auto or read"), "{wp}");
        let k = error_text(&E::CloneKilled { pid: 5, clone: 6 });
        assert!(
            k.ends_with("take a suspended snapshot; --mode suspend takes one"),
            "{k}"
        );
        // A FIFO is never replaced: no --overwrite advice for it.
        let out = |what: &'static str| E::Output {
            what,
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EEXIST),
            hint: String::new(),
        };
        let fifo = error_text(&out("refusing to replace"));
        assert!(
            !fifo.contains("--overwrite") && fifo.contains("-o chooses"),
            "{fifo}"
        );
        let exists = error_text(&out("output file already exists"));
        assert!(exists.contains("--overwrite replaces it"), "{exists}");
        // Each cause once.
        let m = error_text(&E::Memory {
            pid: 1,
            addr: 0x10,
            len: 8,
            live: false,
            readable: 0,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        });
        assert_eq!(m.matches("Input/output error").count(), 1, "{m}");
    }

    #[test]
    fn json_warnings_are_messages_with_their_kinds_alongside() {
        let r = DumpReport {
            pid: 1,
            path: "/x.core".into(),
            mode: coreflect::Mode::Reflect,
            threads: 1,
            segments: 1,
            pause: Default::default(),
            bytes_written: 0,
            file_size: 0,
            unpopulated_bytes: 0,
            zero_bytes: 0,
            written_by_clone: 0,
            live_bytes: 0,
            write_path: Default::default(),
            duration_ms: 0,
            warnings: vec![
                coreflect::Warning::LeftoverClonesReaped { count: 1 },
                coreflect::Warning::SuspendedInstead {
                    reason: "a \"quoted\" reason".into(),
                },
            ],
            level: coreflect::Level::Default,
            compressed_size: None,
        };
        let v: serde_json::Value = serde_json::from_str(&report_json(&r)).unwrap();
        assert_eq!(
            v["warnings"][0],
            "reaped 1 leftover clone zombie(s) of an earlier interrupted dump"
        );
        assert!(v["warnings"][1]
            .as_str()
            .unwrap()
            .contains("a \"quoted\" reason"));
        assert_eq!(
            v["warning_kinds"],
            serde_json::json!(["leftover_clones_reaped", "suspended_instead"])
        );
    }
}
