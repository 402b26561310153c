//! Snapshot-and-attach: take a reflected snapshot of a live process and read from it while
//! the process runs on.
//!
//! `snapshot <PID> <hex-address>` prints `threads=<N>` and `u64=0x<hex>` (the 8 bytes at the
//! address, little-endian, as the snapshot holds them).

use coreflect::{Options, Snapshot};

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
    // The target runs again here; the snapshot stays frozen.
    println!("threads={}", snap.threads().len());
    let mut b = [0u8; 8];
    match snap.read_memory(addr, &mut b) {
        Ok(8) => println!("u64={:#x}", u64::from_le_bytes(b)),
        Ok(n) => {
            eprintln!("snapshot: only {n} bytes readable at {addr:#x}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("snapshot: cannot read {addr:#x}: {e}");
            std::process::exit(1);
        }
    }
    eprintln!(
        "snapshot: mode {}, target paused {:.2} ms",
        snap.mode().as_str(),
        snap.pause().total_us as f64 / 1000.0
    );
    // Dropping the snapshot kills the clone and reaps it inside the target.
}
