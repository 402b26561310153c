//! The core reader on untrusted input: every corpus file, and seeded mutations of each
//! (random truncations, bit flips, overwritten header words), must give a value or an
//! error, never a panic. Deterministic: the seed is fixed, and a failure prints the
//! mutation that caused it.

use coreflect::elf::reader::{self, CoreFile};
use std::path::{Path, PathBuf};

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "md"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "corpus missing in {}", dir.display());
    v
}

/// Everything `coreflect info` does with a file. Returns whether it was accepted.
fn exercise(path: &Path) -> bool {
    let Ok(core) = CoreFile::open(path) else {
        return false;
    };
    let _ = core.expected_len();
    let _ = core.hole_bytes();
    for p in core.phdrs.iter().take(64) {
        let _ = core.read(p.vaddr, 16);
        let _ = core.read(p.vaddr.wrapping_add(p.filesz).wrapping_sub(8), 8);
    }
    let _ = core.read(u64::MAX - 4, 16);
    match core.notes() {
        Ok(n) => {
            let _ = reader::thread_ids(&n);
            match reader::parse_notes(&n) {
                Ok(typed) => {
                    let sym = coreflect::elf::symbols::Symbolizer::new(&core, &typed.files);
                    for t in &typed.threads {
                        let _ = sym.lookup(t.rip());
                    }
                    true
                }
                Err(_) => false,
            }
        }
        Err(_) => false,
    }
}

fn check(path: &Path, what: &str) -> bool {
    match std::panic::catch_unwind(|| exercise(path)) {
        Ok(ok) => ok,
        Err(_) => panic!("the reader panicked on {what}"),
    }
}

#[test]
fn corpus_files() {
    let mut accepted = 0;
    for p in corpus() {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let ok = check(&p, &name);
        if name.starts_with("mini-stripped") {
            assert!(ok, "{name} must read as a valid core");
            let c = CoreFile::open(&p).unwrap();
            let n = reader::parse_notes(&c.notes().unwrap()).unwrap();
            assert_eq!(n.threads.len(), 9, "{name}");
            assert!(n.metadata.is_some(), "{name} has coreflect's note");
            assert!(n.files.iter().any(|f| f.path.contains("libc.so")), "{name}");
            accepted += 1;
        } else {
            assert!(!ok, "{name} must be rejected");
        }
    }
    assert_eq!(accepted, 2);
}

#[test]
fn seeded_mutations() {
    let dir = std::env::temp_dir().join(format!("coreflect-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rounds: usize = std::env::var("COREFLECT_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng(0x5eed_c0de_f1ec_7001);
    let (mut accepted, mut rejected) = (0, 0);
    for src in corpus() {
        let orig = std::fs::read(&src).unwrap();
        let name = src.file_name().unwrap().to_string_lossy().to_string();
        let out = dir.join(&name);
        for round in 0..rounds {
            let mut b = orig.clone();
            let kind = rng.below(4);
            let what = match kind {
                0 => {
                    let n = rng.below(b.len() as u64 + 1) as usize;
                    b.truncate(n);
                    format!("{name} truncated to {n} bytes")
                }
                1 => {
                    let flips = 1 + rng.below(8);
                    let mut at = Vec::new();
                    for _ in 0..flips {
                        let i = rng.below(b.len() as u64) as usize;
                        if let Some(x) = b.get_mut(i) {
                            *x ^= 1 << rng.below(8);
                            at.push(i);
                        }
                    }
                    format!("{name} with bits flipped at {at:?}")
                }
                2 => {
                    // A header word (ELF header or program headers) set to an extreme.
                    let limit = (64 + 56 * 100).min(b.len().saturating_sub(8)) as u64;
                    let i = (rng.below(limit.max(1)) & !7) as usize;
                    let v = [u64::MAX, 0, 1 << 40, 0xffff, rng.next()][rng.below(5) as usize];
                    if i + 8 <= b.len() {
                        b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    format!("{name} with the word at {i} set to {v:#x}")
                }
                _ => {
                    // Note headers: overwrite bytes inside the notes area.
                    let i = rng.below(b.len() as u64) as usize;
                    let n = (1 + rng.below(16)) as usize;
                    for k in i..(i + n).min(b.len()) {
                        b[k] = rng.next() as u8;
                    }
                    format!("{name} with {n} random bytes at {i}")
                }
            };
            std::fs::write(&out, &b).unwrap();
            if check(&out, &format!("round {round}: {what}")) {
                accepted += 1;
            } else {
                rejected += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Both outcomes must occur, or the mutations test nothing.
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}
