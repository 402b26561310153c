//! `coreflect demo`: start the built-in sample process, dump it live, check the core, and
//! show how to open it.

use crate::report;
use coreflect::elf::reader::{self, CoreFile};
use coreflect::{DumpOptions, Mode, Options};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Arguments of `coreflect demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the sample process's heap buffer, in MiB.
    #[arg(long, default_value_t = 256)]
    heap_mib: usize,
    /// Where to write the core.
    #[arg(short, long, default_value = "coreflect-demo.core")]
    output: PathBuf,
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

/// Runs the demo; returns the exit code.
pub fn run(a: &DemoArgs) -> i32 {
    match demo(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("coreflect demo: error: {e:#}");
            1
        }
    }
}

fn demo(a: &DemoArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    eprintln!(
        "coreflect demo: starting a sample process with 9 threads and a {} MiB heap buffer...",
        a.heap_mib
    );
    let mut child = Command::new(&exe)
        .args(["__target", "--heap-mib", &a.heap_mib.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready)?;
    let pid = field(&ready, "pid")
        .ok_or_else(|| anyhow::anyhow!("sample process did not start: {ready:?}"))?
        as i32;
    let marker_addr = field(&ready, "marker_addr").unwrap_or(0);
    eprintln!("coreflect demo: sample process is pid {pid}; dumping it while it runs...");
    let result = coreflect::dump(
        pid,
        &DumpOptions {
            snapshot: Options {
                mode: Mode::Auto,
                cancel: Some(crate::cancel_flag()),
                ..Options::default()
            },
            output: a.output.clone(),
            overwrite: true,
            filter: None,
            level: Default::default(),
            compress: None,
            stdout: false,
        },
        &mut |_, _| true,
    );
    // The sample keeps running; ask it whether it noticed anything, then stop it.
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "quit")?;
    let mut stats = String::new();
    out.read_line(&mut stats)?;
    let _ = child.wait();
    let r = result?;
    report::success(false, &r);
    let core = CoreFile::open(&r.path)?;
    let notes = core.notes()?;
    let marker = core
        .read(marker_addr, 8)?
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    eprintln!(
        "coreflect demo: the core holds {} threads and {} segments; the sample's marker reads {}",
        reader::thread_ids(&notes).len(),
        core.loads().count(),
        marker
            .map(|m| format!("{m:#x}"))
            .unwrap_or_else(|| "(missing)".into())
    );
    eprintln!(
        "coreflect demo: the sample process reported after the dump: {}",
        stats.trim()
    );
    // Show what a debugger sees, when one is installed.
    if let Ok(o) = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-iex",
            "set debuginfod enabled off",
            "-ex",
            "info threads",
        ])
        .arg(&exe)
        .arg(&r.path)
        .stderr(Stdio::null())
        .output()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        let threads: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("(LWP ") && !l.starts_with('['))
            .collect();
        if !threads.is_empty() {
            eprintln!("coreflect demo: gdb sees these threads in the core:");
            for l in threads {
                eprintln!("  {}", l.trim_end());
            }
        }
    }
    eprintln!(
        "coreflect demo: open the core with\n    gdb {} {}\n  e.g. gdb -batch -ex 'info threads' -ex 'thread apply all bt' {} {}",
        exe.display(),
        r.path.display(),
        exe.display(),
        r.path.display()
    );
    Ok(())
}
