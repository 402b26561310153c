//! `coreflect man` and `coreflect completions`: the manual page and shell completions,
//! generated from the command-line definition (so they never drift from it).

use clap::{Arg, Command, CommandFactory};
use std::io::Write;

/// Exit codes, for the manual page (the same as in `--help`).
pub const EXIT_CODES: &[(&str, &str)] = &[
    ("0", "success"),
    (
        "1",
        "an error: one line on stderr says what failed and what to do",
    ),
    ("2", "bad arguments"),
    (
        "130",
        "cancelled by SIGINT/SIGTERM/SIGHUP: the target was released, no file was left",
    ),
];

/// Examples, for the manual page.
pub const EXAMPLES: &str = "\
coreflect dump 4081                       # -> ./<comm>_<yymmdd_HHMMSS>.4081.core
coreflect dump 4081 -o /tmp/svc.core --max-pause 50ms
coreflect dump $(pidof myservice) -q      # print nothing but errors
coreflect -v dump 4081                    # phase timings, why each mapping is in the core
gdb -batch -ex 'thread apply all bt' /path/to/exe /tmp/svc.core
sudo coreflect crash-handler install --dir /var/crash/coreflect --max-files 5 --max-size 20G
coreflect completions bash > /etc/bash_completion.d/coreflect";

/// `--help`'s closing text for `coreflect`.
pub const AFTER_HELP: &str = "\
Examples:
  coreflect dump 4081                    dump pid 4081 to ./<comm>_<yymmdd_HHMMSS>.4081.core
  coreflect dump 4081 -o /tmp/svc.core   dump to a chosen path (0600, never over a file)
  coreflect -v dump 4081                 phase timings and each mapping's decision
  coreflect demo                         dump a sample process and explain the core
  sudo coreflect crash-handler install   keep a core of every crash (post-mortem)
  coreflect man | man -l -               the manual

Exit codes: 0 success, 1 error (one line on stderr: what failed, what to do),
2 bad arguments, 130 cancelled (target released, no file left).

Permissions: a user may dump its own processes where the kernel allows ptrace
(kernel.yama.ptrace_scope 0, or no Yama); otherwise run as root or give the binary
the capabilities: sudo setcap cap_sys_ptrace,cap_dac_read_search,cap_kill+ep coreflect";

/// `--help`'s closing text for `coreflect dump`.
pub const DUMP_AFTER_HELP: &str = "\
Examples:
  coreflect dump 4081                       ./<comm>_<yymmdd_HHMMSS>.4081.core
  coreflect dump 4081 -o /tmp/svc.core --overwrite
  coreflect dump 4081 --max-pause 20ms      refuse if the pause would be longer
  coreflect dump 4081 --json -q | jq .pause_us
  gdb -batch -ex 'thread apply all bt' /proc/4081/exe /tmp/svc.core

Output: a progress bar on a terminal once the write takes a moment, then a summary on
stderr; -q: only errors; -v: phase timings and each mapping's decision.

Exit codes: 0 success, 1 error, 2 bad arguments, 130 cancelled (Ctrl-C, SIGTERM):
the target is always released and a failed dump leaves no file.";

/// The FILES section.
pub const FILES_SECTION: &str = "/proc/sys/kernel/core_pattern (crash-handler), /var/lib/coreflect/crash-handler.conf and core_pattern.saved (crash-handler state), /var/lib/coreflect/crashes (crash dumps by default), /proc/sys/kernel/yama/ptrace_scope (who may ptrace).";

/// Escapes text for roff: backslashes, and a leading `.` or `'` (control characters).
fn roff(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// Text with one paragraph per blank-line-separated block.
fn paragraphs(out: &mut String, text: &str) {
    for (i, p) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str(".PP\n");
        }
        for line in p.lines() {
            out.push_str(&roff(line.trim_end()));
            out.push('\n');
        }
    }
}

/// One option as a `.TP` entry.
fn option(out: &mut String, a: &Arg) {
    let mut head = Vec::new();
    if let Some(s) = a.get_short() {
        head.push(format!("\\fB\\-{s}\\fR"));
    }
    if let Some(l) = a.get_long() {
        head.push(format!("\\fB\\-\\-{}\\fR", roff(l)));
    }
    let takes_value = a.get_num_args().is_some_and(|n| n.takes_values())
        && !matches!(
            a.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::Count | clap::ArgAction::Help
        );
    let value = a
        .get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
    let mut h = head.join(", ");
    if a.is_positional() {
        h = format!("\\fI{}\\fR", roff(&value));
    } else if takes_value {
        h.push_str(&format!(" \\fI{}\\fR", roff(&value)));
    }
    out.push_str(".TP\n");
    out.push_str(&h);
    out.push('\n');
    let help = a
        .get_long_help()
        .or(a.get_help())
        .map(|s| s.to_string())
        .unwrap_or_default();
    paragraphs(out, &help);
    let pv: Vec<String> = a
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| match v.get_help() {
            Some(h) => format!("{} ({})", v.get_name(), h),
            None => v.get_name().to_string(),
        })
        .collect();
    if !pv.is_empty() && takes_value {
        out.push_str(".br\n");
        out.push_str(&roff(&format!("Values: {}.", pv.join("; "))));
        out.push('\n');
    }
    let defaults: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if !defaults.is_empty() && takes_value {
        out.push_str(".br\n");
        out.push_str(&roff(&format!("Default: {}.", defaults.join(", "))));
        out.push('\n');
    }
}

/// A `.SS` section for `cmd` (named by its full path) and its subcommands, recursively.
fn command_section(out: &mut String, cmd: &Command, path: &str) {
    let usage = cmd
        .clone()
        .render_usage()
        .to_string()
        .trim_start_matches("Usage:")
        .trim()
        .to_string();
    out.push_str(&format!(".SS \"{}\"\n", roff(path)));
    out.push_str(&format!(".B {}\n.PP\n", roff(&usage)));
    let about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|s| s.to_string())
        .unwrap_or_default();
    paragraphs(out, &about);
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    if !args.is_empty() {
        out.push_str(".RS\n");
        for a in args {
            option(out, a);
        }
        out.push_str(".RE\n");
    }
    if let Some(after) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        out.push_str(".PP\n.nf\n");
        for line in after.to_string().lines() {
            out.push_str(&roff(line));
            out.push('\n');
        }
        out.push_str(".fi\n");
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        command_section(out, sub, &format!("{path} {}", sub.get_name()));
    }
}

/// The whole manual page (roff, section 1).
pub fn page() -> String {
    let mut cmd = crate::Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut buf: Vec<u8> = Vec::new();
    // clap_mangen writes the title, NAME, SYNOPSIS, DESCRIPTION, global OPTIONS and the
    // (not its list of subcommands: it names pages coreflect-dump(1)… that do not exist);
    // each subcommand, with its own options, follows in COMMANDS.
    let _ = man.render_title(&mut buf);
    let _ = man.render_name_section(&mut buf);
    let _ = man.render_synopsis_section(&mut buf);
    let _ = man.render_description_section(&mut buf);
    let _ = man.render_options_section(&mut buf);
    let mut out = String::from_utf8_lossy(&buf).into_owned();
    out.push_str(".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        command_section(&mut out, sub, &format!("coreflect {}", sub.get_name()));
    }
    out.push_str(".SH \"EXIT STATUS\"\n");
    for (code, what) in EXIT_CODES {
        out.push_str(&format!(".TP\n.B {code}\n{}\n", roff(what)));
    }
    out.push_str(".SH EXAMPLES\n.nf\n");
    for line in EXAMPLES.lines() {
        out.push_str(&roff(line));
        out.push('\n');
    }
    out.push_str(".fi\n");
    out.push_str(&format!(".SH FILES\n{}\n", roff(FILES_SECTION)));
    out.push_str(".SH \"SEE ALSO\"\n.BR gdb (1),\n.BR gcore (1),\n.BR core (5),\n.BR ptrace (2),\n.BR setcap (8)\n");
    let mut v = Vec::new();
    let _ = man.render_version_section(&mut v);
    out.push_str(&String::from_utf8_lossy(&v));
    ascii_roff(&out)
}

/// Spells every non-ASCII character (a dash, an arrow in a help text) as a groff Unicode
/// escape (`\[u2013]`): troff reads its input as Latin-1 and warns on UTF-8 bytes.
fn ascii_roff(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            o.push(c);
        } else {
            o.push_str(&format!("\\[u{:04X}]", c as u32));
        }
    }
    o
}

/// Prints the manual page.
pub fn run_man() -> i32 {
    let mut o = std::io::stdout().lock();
    match o.write_all(page().as_bytes()).and_then(|_| o.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("coreflect: error: writing the manual page to stdout: {e}");
            1
        }
    }
}

/// Prints the completion script for `shell`.
pub fn run_completions(shell: clap_complete::Shell) -> i32 {
    let mut cmd = crate::Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "coreflect", &mut buf);
    let mut o = std::io::stdout().lock();
    match o.write_all(&buf).and_then(|_| o.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("coreflect: error: writing the completions to stdout: {e}");
            1
        }
    }
}
