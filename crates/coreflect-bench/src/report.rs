//! The Markdown report: machine facts, the table, the ratios and the notes.

use crate::stats::{mib, ms, ratio, secs, Sample};
use crate::{Kind, Method, Outcome, Row};
use std::fmt::Write;

/// Makes `s` safe in a Markdown table cell, on one line and not too long.
fn cell(s: &str) -> String {
    let one: String = s
        .replace('|', "\\|")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one.chars().count() > 160 {
        one.chars().take(157).collect::<String>() + "..."
    } else {
        one
    }
}

/// A cell for the field `f` of a row, formatted by `show`, with the range if `range`.
fn col(
    row: &Row,
    f: impl Fn(&Sample) -> Option<f64>,
    show: fn(f64) -> String,
    range: bool,
) -> String {
    match row.spread(f) {
        Some(s) if range => s.show(show),
        Some(s) => show(s.median),
        None => "—".into(),
    }
}

/// The table row of one method in one scenario.
fn table_row(scenario: &str, row: &Row) -> String {
    let fails = row.failures();
    let ok = row.runs.len() - fails.len();
    if ok == 0 {
        let why = fails.first().copied().unwrap_or("no runs");
        return format!(
            "| {} | {} | failed: {} | — | — | — | — | — | — |",
            cell(scenario),
            row.method.label(),
            cell(why)
        );
    }
    let method = if fails.is_empty() {
        row.method.label().to_string()
    } else {
        format!(
            "{} ({} of {} runs failed)",
            row.method.label(),
            fails.len(),
            row.runs.len()
        )
    };
    let rss = |v: f64| format!("{:.1}", v / 1024.0);
    let gbps = |v: f64| format!("{v:.2}");
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        cell(scenario),
        method,
        col(row, |s| s.seen_us, ms, true),
        col(row, |s| s.tool_us, ms, true),
        col(row, |s| s.wall_s, secs, true),
        col(row, |s| s.written, mib, false),
        col(row, |s| s.blocks, mib, false),
        col(row, |s| s.rss_kib, rss, false),
        col(row, Sample::gbps, gbps, false),
    )
}

/// The median of field `f` of method `m` in outcome `o`.
fn med(o: &Outcome, m: Method, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    o.row(m)?.median(f)
}

/// `a ÷ b = r`, for two values with the same formatter.
fn quotient(a: f64, b: f64, show: fn(f64) -> String, unit: &str) -> String {
    if b > 0.0 {
        format!("{}{unit} ÷ {}{unit} = {}", show(a), show(b), ratio(a / b))
    } else {
        format!("{}{unit} ÷ {}{unit} = n/a", show(a), show(b))
    }
}

/// The goal for the reflect pause given the fork time: 1.2 × fork + 1 ms (µs).
fn goal_us(fork_us: f64) -> f64 {
    1.2 * fork_us + 1000.0
}

/// `met`/`not met` for a pause against the goal.
fn verdict(pause_us: f64, fork_us: f64) -> String {
    let g = goal_us(fork_us);
    format!(
        "goal ≤ 1.2 × fork + 1 ms = {} ms: {}",
        ms(g),
        if pause_us <= g { "met" } else { "not met" }
    )
}

/// The many-thread goal: stop + capture + clone + release ≤ 30 ms + the fork time.
fn verdict_threads(pause_us: f64, fork_us: f64) -> String {
    let g = 30_000.0 + fork_us;
    format!(
        "goal ≤ 30 ms + fork = {} ms: {}",
        ms(g),
        if pause_us <= g { "met" } else { "not met" }
    )
}

/// The ratio lines of one outcome.
fn ratios(o: &Outcome, out: &mut Vec<String>) {
    let l = &o.scenario.label;
    let na = |what: &str| format!("{l}: {what}: n/a (a measurement is missing)");
    let fork = med(o, Method::Fork, |s| s.tool_us);
    let r_tool = med(o, Method::Reflect, |s| s.tool_us);
    let r_seen = med(o, Method::Reflect, |s| s.seen_us);
    match o.scenario.kind {
        Kind::Size { .. } | Kind::Threads(_) => {
            let what = "reflect pause ÷ bare fork() time";
            let judge = match o.scenario.kind {
                Kind::Threads(_) => verdict_threads,
                _ => verdict,
            };
            match (r_tool, r_seen, fork) {
                (Some(rt), Some(rs), Some(f)) => out.push(format!(
                    "{l}: {what}: reported {} ({}); as seen by the target {} ({})",
                    quotient(rt, f, ms, " ms"),
                    judge(rt, f),
                    quotient(rs, f, ms, " ms"),
                    judge(rs, f)
                )),
                _ => out.push(na(what)),
            }
        }
        Kind::SparseDense | Kind::SparseSparse => {}
    }
    if let Kind::Threads(_) = o.scenario.kind {
        if let Some(b) = o.row(Method::Reflect).and_then(breakdown) {
            out.push(format!("{l}: reflect pause breakdown (medians): {b}"));
        }
    }
    if let Kind::Size { .. } = o.scenario.kind {
        for (m, name) in [(Method::Gcore, "gcore"), (Method::Suspend, "suspend")] {
            if o.row(m).is_none() {
                continue;
            }
            let what = format!("{name} pause ÷ reflect pause (both as seen by the target)");
            match (med(o, m, |s| s.seen_us), r_seen) {
                (Some(a), Some(b)) => {
                    out.push(format!("{l}: {what}: {}", quotient(a, b, ms, " ms")))
                }
                _ => out.push(na(&what)),
            }
        }
        let dd = med(o, Method::Dd, Sample::gbps);
        for (m, name) in [(Method::Reflect, "reflect"), (Method::Suspend, "suspend")] {
            let what = format!("{name} write bandwidth ÷ dd bandwidth");
            match (med(o, m, Sample::gbps), dd) {
                (Some(a), Some(b)) => out.push(format!(
                    "{l}: {what}: {}",
                    quotient(a, b, |v| format!("{v:.2}"), " GB/s")
                )),
                _ => out.push(na(&what)),
            }
        }
    }
}

/// A field of a sample.
type Field = fn(&Sample) -> Option<f64>;

/// A number formatter.
type Format = fn(f64) -> String;

/// The sparse B/A ratio lines.
fn sparse_ratios(outcomes: &[Outcome], out: &mut Vec<String>) {
    let find = |k: Kind| outcomes.iter().find(|o| o.scenario.kind == k);
    let (Some(a), Some(b)) = (find(Kind::SparseDense), find(Kind::SparseSparse)) else {
        return;
    };
    let get = |o: &Outcome, f: Field| med(o, Method::Reflect, f);
    let fields: [(&str, Field, Format, &str); 4] = [
        ("wall time", |s| s.wall_s, secs, " s"),
        ("disk blocks", |s| s.blocks, mib, " MiB"),
        ("bytes written", |s| s.written, mib, " MiB"),
        ("file size", |s| s.file_size, mib, " MiB"),
    ];
    for (name, f, show, unit) in fields {
        match (get(b, f), get(a, f)) {
            (Some(vb), Some(va)) => out.push(format!(
                "sparse B/A (reflect): {name}: {}",
                quotient(vb, va, show, unit)
            )),
            _ => out.push(format!("sparse B/A (reflect): {name}: n/a (a dump failed)")),
        }
    }
}

/// The median pause breakdown of a reflect row.
fn breakdown(row: &Row) -> Option<String> {
    let part = |i: usize| row.median(|s| s.breakdown.map(|b| b[i]));
    Some(format!(
        "stop {} ms, capture {} ms, clone {} ms, release {} ms (coreflect's estimate beforehand {} ms)",
        ms(part(0)?),
        ms(part(1)?),
        ms(part(2)?),
        ms(part(3)?),
        ms(part(4)?)
    ))
}

/// Renders the whole report.
pub fn render(facts: &str, outcomes: &[Outcome], runs: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{facts}");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{} run(s) per measurement; times are medians{}.",
        runs,
        if runs > 1 { " [min–max]" } else { "" }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| scenario | method | pause seen by target (ms) | tool-reported pause (ms) | wall (s) | written (MiB) | disk blocks (MiB) | peak RSS (MiB) | write GB/s |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        for r in &o.rows {
            let _ = writeln!(s, "{}", table_row(&o.scenario.label, r));
        }
    }

    let mut lines = Vec::new();
    for o in outcomes {
        ratios(o, &mut lines);
    }
    sparse_ratios(outcomes, &mut lines);
    if !lines.is_empty() {
        let _ = writeln!(s, "\n### Ratios\n");
        for l in lines {
            let _ = writeln!(s, "- {l}");
        }
    }

    let mut notes = vec![
        "pause seen by target: the longest gap between two clock reads of the target's \
         heartbeat thread (50 µs sleeps), i.e. how long its threads could not run; it includes \
         scheduling delays, whose size the idle row shows. For coreflect it is the longest gap \
         that overlaps the pause coreflect reports (matched by CLOCK_MONOTONIC, +1 ms), so \
         scheduling noise later in the write is not counted; for gcore and the idle and dd \
         rows it is the longest gap of the whole run."
            .to_string(),
        "tool-reported pause: coreflect's `pause_us`; for bare fork() the duration of a \
         fork() call inside the target. gcore and dd report none."
            .to_string(),
        "write GB/s: bytes written ÷ wall time of the tool (including its start-up); gcore's \
         bytes written are its file size; dd writes the bytes reflect wrote, rounded up to \
         16 MiB, to the same directory. Nothing is fsynced."
            .to_string(),
        "peak RSS: ru_maxrss of the tool from wait4 (for gcore, including gdb).".to_string(),
        "each scenario begins with an uncounted dd of the dump's size: on a VM, page-cache \
         memory the guest never touched costs a host fault per page on first use, which \
         would otherwise fall on whichever method runs first."
            .to_string(),
        "the target keeps two threads busy (a spinner and a sequence writer): with few CPUs \
         they compete with a dumper that lets the target run (reflect, dd), but not with one \
         that stops it (suspend, gcore)."
            .to_string(),
    ];
    let mut cpu = Vec::new();
    for o in outcomes {
        // (The threads scenario shows its breakdown among the ratios.)
        if !matches!(o.scenario.kind, Kind::Threads(_)) {
            if let Some(b) = o.row(Method::Reflect).and_then(breakdown) {
                notes.push(format!(
                    "{}: reflect pause breakdown (medians): {b}.",
                    o.scenario.label
                ));
            }
        }
        notes.extend(o.notes.iter().cloned());
        for r in &o.rows {
            let fails = r.failures();
            if !fails.is_empty() && fails.len() < r.runs.len() {
                notes.push(format!(
                    "{} / {}: {} of {} runs failed: {}",
                    o.scenario.label,
                    r.method.label(),
                    fails.len(),
                    r.runs.len(),
                    cell(&fails.join("; "))
                ));
            }
            if let (Some(c), Some(w)) = (r.median(|s| s.cpu_s), r.median(|s| s.wall_s)) {
                cpu.push(format!(
                    "{} / {}: {} s CPU in {} s",
                    o.scenario.label,
                    r.method.label(),
                    secs(c),
                    secs(w)
                ));
            }
            let mut warned: Vec<&str> = r
                .runs
                .iter()
                .filter_map(|x| x.as_ref().ok()?.warnings.as_deref())
                .collect();
            warned.dedup();
            for w in warned {
                notes.push(format!(
                    "{} / {}: coreflect warned: {}",
                    o.scenario.label,
                    r.method.label(),
                    cell(w)
                ));
            }
        }
    }
    if !cpu.is_empty() {
        notes.push(format!(
            "CPU time (user + system, medians) of the tools, against their wall time: {}.",
            cpu.join("; ")
        ));
    }
    let _ = writeln!(s, "\n### Notes\n");
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Row, Scenario};

    fn sample(seen: f64, tool: f64) -> Sample {
        Sample {
            seen_us: Some(seen),
            tool_us: Some(tool),
            wall_s: Some(1.0),
            written: Some(2e9),
            ..Sample::default()
        }
    }

    #[test]
    fn renders_rows_and_failures() {
        let o = Outcome {
            scenario: Scenario {
                label: "1 GiB 4K".into(),
                kind: Kind::Size {
                    gib: 1.0,
                    thp: false,
                },
                target_args: vec![],
                touched_gib: 1.0,
                threads: 0,
                methods: vec![Method::Fork, Method::Reflect, Method::Gcore],
            },
            rows: vec![
                Row {
                    method: Method::Fork,
                    runs: vec![Ok(sample(500.0, 10_000.0))],
                },
                Row {
                    method: Method::Reflect,
                    runs: vec![Ok(sample(12_000.0, 11_000.0)), Err("boom | x".into())],
                },
                Row {
                    method: Method::Gcore,
                    runs: vec![Err("gcore exit code 1".into())],
                },
            ],
            notes: vec![],
        };
        let r = render("Machine: test", &[o], 2);
        assert!(r.starts_with("Machine: test\n"));
        assert!(r.contains("| 1 GiB 4K | gcore | failed: gcore exit code 1 |"));
        assert!(r.contains("coreflect reflect (1 of 2 runs failed)"));
        assert!(r.contains("boom \\| x"));
        assert!(r.contains("11.0 ms ÷ 10.0 ms = 1.10×"));
        assert!(r.contains("goal ≤ 1.2 × fork + 1 ms = 13.0 ms: met"));
        assert!(r.contains("| 2.00 |"));
    }
}
