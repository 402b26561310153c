//! `coreflect info`: what a core holds, without a debugger.

use crate::report::{bytes, esc, json_str};
use coreflect::elf::reader::{self, CoreFile, CoreNotes};
use coreflect::elf::{EM_X86_64, ET_CORE, PT_LOAD};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `coreflect info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// The core file (or a zstd-compressed one, `.zst`).
    core: PathBuf,
    /// One JSON object on stdout (`threads`, `mappings` and `notes` are arrays).
    #[arg(long)]
    json: bool,
    /// List every mapping (by default only the totals, and mappings with data in text).
    #[arg(long)]
    all: bool,
}

/// One PT_LOAD, named.
struct Seg {
    start: u64,
    end: u64,
    dumped: u64,
    flags: u32,
    name: String,
}

/// Everything `info` shows.
struct Info {
    path: PathBuf,
    core: CoreFile,
    notes: CoreNotes,
    /// (owner, type, type name, size) of every note.
    note_list: Vec<(String, u32, String, usize)>,
    segs: Vec<Seg>,
    holes: u64,
    /// Each thread's function, when resolvable from the files on this machine.
    symbols: Vec<Option<String>>,
}

fn load(path: &Path) -> Result<Info, String> {
    let core = CoreFile::open(path).map_err(|e| e.to_string())?;
    if core.e_type != ET_CORE {
        return Err(format!(
            "not a core file (an ELF file of type {}, not ET_CORE)",
            core.e_type
        ));
    }
    if core.machine != EM_X86_64 {
        return Err(format!(
            "a core of machine {}, not x86-64: not supported",
            core.machine
        ));
    }
    let need = core.expected_len();
    if core.len < need {
        return Err(format!(
            "truncated core: it has {} bytes but its segments need {} (an interrupted copy or dump?)",
            core.len, need
        ));
    }
    let raw = core.notes().map_err(|e| e.to_string())?;
    let notes = reader::parse_notes(&raw).map_err(|e| e.to_string())?;
    if notes.threads.is_empty() {
        return Err("corrupt core: no NT_PRSTATUS note (no threads)".into());
    }
    let note_list = raw
        .iter()
        .map(|n| {
            let tn = reader::note_type_name(&n.name, n.ntype)
                .map(str::to_string)
                .unwrap_or_else(|| format!("{:#x}", n.ntype));
            (n.name.clone(), n.ntype, tn, n.desc.len())
        })
        .collect();
    let vdso = notes.auxv.iter().find(|e| e.0 == 33).map(|e| e.1);
    let segs = core
        .phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| {
            let (start, end) = (p.vaddr, p.vaddr.saturating_add(p.memsz));
            let name = if let Some(f) = notes
                .files
                .iter()
                .find(|f| start >= f.start && start < f.end)
            {
                f.path.clone()
            } else if vdso == Some(start) {
                "[vdso]".into()
            } else if let Some(t) = notes
                .threads
                .iter()
                .find(|t| t.rsp() >= start && t.rsp() < end)
            {
                format!("[stack of thread {}]", t.tid)
            } else {
                String::new()
            };
            Seg {
                start,
                end,
                dumped: p.filesz,
                flags: p.flags,
                name,
            }
        })
        .collect();
    let holes = core.hole_bytes();
    let sym = coreflect::elf::symbols::Symbolizer::new(&core, &notes.files);
    let symbols = notes.threads.iter().map(|t| sym.lookup(t.rip())).collect();
    Ok(Info {
        symbols,
        path: path.to_path_buf(),
        core,
        notes,
        note_list,
        segs,
        holes,
    })
}

fn flags(f: u32) -> String {
    format!(
        "{}{}{}",
        if f & 4 != 0 { 'r' } else { '-' },
        if f & 2 != 0 { 'w' } else { '-' },
        if f & 1 != 0 { 'x' } else { '-' }
    )
}

fn signal_name(s: i32) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local string, read at once.
    let p = unsafe { libc::strsignal(s) };
    if p.is_null() {
        return format!("signal {s}");
    }
    // SAFETY: as above; a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy();
    format!("{s} ({name})")
}

/// Note counts in order of first appearance: (owner, type name, count, total size).
fn note_counts(i: &Info) -> Vec<(String, String, usize, usize)> {
    let mut v: Vec<(String, String, usize, usize)> = Vec::new();
    for (owner, _, tn, size) in &i.note_list {
        match v.iter_mut().find(|e| &e.0 == owner && &e.1 == tn) {
            Some(e) => {
                e.2 += 1;
                e.3 += size;
            }
            None => v.push((owner.clone(), tn.clone(), 1, *size)),
        }
    }
    v
}

fn text(i: &Info, all: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let n = &i.notes;
    let _ = write!(
        o,
        "core: {} ({}",
        esc(&i.path.display().to_string()),
        bytes(i.core.len)
    );
    if let Some(c) = i.core.compressed_len {
        let _ = write!(o, ", zstd-compressed to {}", bytes(c));
    }
    let _ = writeln!(o, ")");
    if let Some(p) = &n.psinfo {
        let _ = writeln!(
            o,
            "process: pid {} ({}), parent {}, uid {}, gid {}, state {}",
            p.pid,
            esc(&p.fname),
            p.ppid,
            p.uid,
            p.gid,
            esc(&p.state.to_string())
        );
        let _ = writeln!(o, "command line: {}", esc(&p.psargs));
    }
    if let Some(s) = n.siginfo_signo {
        let _ = writeln!(o, "signal: {}", signal_name(s));
    }
    let _ = writeln!(o, "threads: {}", n.threads.len());
    for (t, sym) in n.threads.iter().zip(&i.symbols) {
        let _ = write!(
            o,
            "  tid {:<8} rip {:#018x}  rsp {:#018x}",
            t.tid,
            t.rip(),
            t.rsp()
        );
        if let Some(s) = sym {
            let _ = write!(o, "  {}", esc(s));
        }
        if t.signal != 0 {
            let _ = write!(o, "  signal {}", signal_name(t.signal));
        }
        let _ = writeln!(o);
    }
    let total: u64 = i.segs.iter().map(|s| s.end - s.start).sum();
    let dumped: u64 = i.segs.iter().map(|s| s.dumped).sum();
    let with_data = i.segs.iter().filter(|s| s.dumped > 0).count();
    let _ = writeln!(
        o,
        "mappings: {} segments ({} with data): {} dumped of {} mapped; holes {}",
        i.segs.len(),
        with_data,
        bytes(dumped),
        bytes(total),
        bytes(i.holes)
    );
    for s in i.segs.iter().filter(|s| all || s.dumped > 0) {
        let _ = writeln!(
            o,
            "  {:#014x}-{:#014x} {} {:>10} of {:>10}  {}",
            s.start,
            s.end,
            flags(s.flags),
            bytes(s.dumped),
            bytes(s.end - s.start),
            esc(&s.name)
        );
    }
    let _ = writeln!(o, "notes: {}", i.note_list.len());
    for (owner, tn, count, size) in note_counts(i) {
        let _ = writeln!(
            o,
            "  {:<10} {:<17} x{count:<6} {}",
            esc(&owner),
            esc(&tn),
            bytes(size as u64)
        );
    }
    match &n.metadata {
        Some(m) => {
            let _ = writeln!(o, "written by coreflect:");
            for (k, v) in &m.entries {
                let _ = writeln!(o, "  {}: {}", esc(k), esc(v.trim()));
            }
        }
        None => {
            let _ = writeln!(o, "written by: not coreflect (no COREFLECT note)");
        }
    }
    o
}

fn json(i: &Info) -> String {
    let n = &i.notes;
    let mut parts: Vec<String> = vec![
        format!("\"path\":{}", json_str(&i.path.display().to_string())),
        format!("\"size\":{}", i.core.len),
        format!(
            "\"compressed_size\":{}",
            i.core
                .compressed_len
                .map_or_else(|| "null".into(), |c| c.to_string())
        ),
    ];
    parts.push(match &n.psinfo {
        Some(p) => format!(
            "\"process\":{{\"pid\":{},\"ppid\":{},\"uid\":{},\"gid\":{},\"state\":{},\"comm\":{},\"cmdline\":{}}}",
            p.pid,
            p.ppid,
            p.uid,
            p.gid,
            json_str(&p.state.to_string()),
            json_str(&p.fname),
            json_str(&p.psargs)
        ),
        None => "\"process\":null".into(),
    });
    parts.push(format!(
        "\"signal\":{}",
        n.siginfo_signo
            .map_or_else(|| "null".into(), |s| s.to_string())
    ));
    let threads: Vec<String> = n
        .threads
        .iter()
        .zip(&i.symbols)
        .map(|(t, sym)| {
            format!(
                "{{\"tid\":{},\"signal\":{},\"rip\":{},\"rsp\":{},\"symbol\":{}}}",
                t.tid,
                t.signal,
                t.rip(),
                t.rsp(),
                sym.as_deref().map_or_else(|| "null".into(), json_str)
            )
        })
        .collect();
    parts.push(format!("\"threads\":[{}]", threads.join(",")));
    let segs: Vec<String> = i
        .segs
        .iter()
        .map(|s| {
            format!(
                "{{\"start\":{},\"end\":{},\"size\":{},\"dumped\":{},\"flags\":{},\"name\":{}}}",
                s.start,
                s.end,
                s.end - s.start,
                s.dumped,
                json_str(&flags(s.flags)),
                json_str(&s.name)
            )
        })
        .collect();
    parts.push(format!("\"mappings\":[{}]", segs.join(",")));
    parts.push(format!(
        "\"mapped_bytes\":{},\"dumped_bytes\":{},\"hole_bytes\":{}",
        i.segs.iter().map(|s| s.end - s.start).sum::<u64>(),
        i.segs.iter().map(|s| s.dumped).sum::<u64>(),
        i.holes
    ));
    let notes: Vec<String> = i
        .note_list
        .iter()
        .map(|(owner, ty, tn, size)| {
            format!(
                "{{\"owner\":{},\"type\":{},\"name\":{},\"size\":{}}}",
                json_str(owner),
                ty,
                json_str(tn),
                size
            )
        })
        .collect();
    parts.push(format!("\"notes\":[{}]", notes.join(",")));
    parts.push(match &n.metadata {
        Some(m) => {
            let mut kv: Vec<String> = m
                .entries
                .iter()
                .filter(|(k, _)| k != "warning")
                .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v.trim())))
                .collect();
            let w: Vec<String> = m.all("warning").iter().map(|w| json_str(w)).collect();
            kv.push(format!("\"warnings\":[{}]", w.join(",")));
            format!("\"coreflect\":{{{}}}", kv.join(","))
        }
        None => "\"coreflect\":null".into(),
    });
    format!("{{{}}}", parts.join(","))
}

/// Runs `coreflect info`; returns the exit code.
pub fn run(a: &InfoArgs) -> i32 {
    match load(&a.core) {
        Ok(i) => {
            let out = if a.json {
                json(&i) + "\n"
            } else {
                text(&i, a.all)
            };
            let mut so = std::io::stdout().lock();
            match so.write_all(out.as_bytes()).and_then(|_| so.flush()) {
                Ok(()) => 0,
                // `coreflect info core | head`: the reader has what it wanted.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => {
                    eprintln!("coreflect: error: writing to standard output: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("coreflect: error: {}: {e}", a.core.display());
            if a.json {
                println!("{{\"error\":{}}}", json_str(&e));
            }
            1
        }
    }
}
