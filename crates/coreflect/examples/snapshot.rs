//! Snapshot-and-attach: take a reflected snapshot of a live process and inspect it while the
//! process runs on.
//!
//! `snapshot <PID> <hex-address>` prints `threads=<N>`, one line per thread (tid, name, pc,
//! sp), the command line, the mapped modules with their load bias and build-id, and
//! `u64=0x<hex>` (the 8 bytes at the address, little-endian, as the snapshot holds them,
//! with whether they are frozen or read live). The snapshot is inspected and ended on
//! another thread than the one that took it.

use coreflect::{Freshness, Options, Snapshot};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: snapshot <PID> <hex-address>");
        std::process::exit(2);
    }
    let pid: i32 = match args[1].parse() {
        Ok(p) => p,
        Err(_) => {
            eprintln!("snapshot: '{}' is not a pid", args[1]);
            std::process::exit(2);
        }
    };
    let addr = match u64::from_str_radix(args[2].trim_start_matches("0x"), 16) {
        Ok(a) => a,
        Err(_) => {
            eprintln!("snapshot: '{}' is not a hex address", args[2]);
            std::process::exit(2);
        }
    };
    let snap = match Snapshot::capture(pid, &Options::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("snapshot: {}", e.with_causes());
            std::process::exit(1);
        }
    };
    // The target runs again here; the snapshot stays frozen. It is Send: inspect it on
    // another thread.
    let code = std::thread::spawn(move || {
        println!("threads={}", snap.threads().len());
        for t in snap.threads() {
            println!(
                "  {:>7} {:<16} pc={:#014x} sp={:#014x}",
                t.tid(),
                t.name(),
                t.pc(),
                t.sp()
            );
        }
        println!("argv={:?}", snap.argv());
        for m in snap.modules() {
            println!(
                "  module {:#014x} {:<40} {}",
                m.load_bias,
                m.build_id_hex().unwrap_or_else(|| "-".into()),
                m.path
            );
        }
        let code = match snap.read_u64(addr) {
            Ok(v) => {
                let how = match snap.freshness(addr) {
                    Some(Freshness::Live(why)) => format!("read live ({why:?})"),
                    _ => "frozen".to_string(),
                };
                println!("u64={v:#x} ({how})");
                0
            }
            Err(e) => {
                eprintln!("snapshot: {e}");
                1
            }
        };
        eprintln!(
            "snapshot: mode {}, target paused {:.2} ms",
            snap.mode().as_str(),
            snap.pause().total_us as f64 / 1000.0
        );
        // Ending the snapshot kills the clone and reaps it inside the target.
        if let Some(w) = snap.finish() {
            eprintln!("snapshot: warning: {w}");
        }
        code
    })
    .join()
    .unwrap_or(1);
    std::process::exit(code);
}
