//! Resolving addresses of a core to function names, from the mapped files on this machine
//! (their `.symtab`, else `.dynsym`), only when a file's GNU build-id matches the one in the
//! core's copy of its ELF header page. Rust legacy-mangled names are demangled (the hash
//! dropped); other names are returned as they are.

use super::reader::{CoreFile, FileMapping};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

fn u16at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The GNU build-id in the notes of an ELF image whose first bytes are `head` and whose
/// program-header notes can be read with `read(offset_or_vaddr, len)`.
fn build_id(
    head: &[u8],
    read: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
    by_vaddr: bool,
) -> Option<Vec<u8>> {
    if head.get(..4)? != b"\x7fELF" {
        return None;
    }
    let phoff = u64at(head, 32)? as usize;
    let phnum = u16at(head, 56)? as usize;
    for i in 0..phnum.min(64) {
        let p = phoff.checked_add(i * 56)?;
        if u32at(head, p)? != 4 {
            continue;
        }
        let at = if by_vaddr {
            u64at(head, p + 16)?
        } else {
            u64at(head, p + 8)?
        };
        let size = u64at(head, p + 32)?.min(4096) as usize;
        let n = read(at, size)?;
        let mut o = 0;
        while o + 12 <= n.len() {
            let namesz = u32at(&n, o)? as usize;
            let descsz = u32at(&n, o + 4)? as usize;
            let ty = u32at(&n, o + 8)?;
            let name_at = o + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            if ty == 3 && n.get(name_at..name_at + namesz)? == b"GNU\0" {
                return n.get(desc_at..desc_at + descsz).map(|d| d.to_vec());
            }
            o = desc_at + descsz.div_ceil(4) * 4;
        }
    }
    None
}

/// The page of the lowest `PT_LOAD` address of an ELF image whose headers are in `head`.
fn first_load_page(head: &[u8]) -> u64 {
    let phoff = u64at(head, 32).unwrap_or(0) as usize;
    (0..u16at(head, 56).unwrap_or(0).min(64) as usize)
        .filter_map(|i| {
            let p = phoff.checked_add(i * 56)?;
            (u32at(head, p)? == 1)
                .then(|| u64at(head, p + 16))
                .flatten()
        })
        .min()
        .unwrap_or(0)
        & !0xfff
}

/// Demangles a Rust legacy symbol (`_ZN3foo3bar17h0123456789abcdefE` → `foo::bar`);
/// anything else is returned unchanged.
pub fn demangle(s: &str) -> String {
    let Some(mut r) = s.strip_prefix("_ZN") else {
        return s.to_string();
    };
    let mut parts = Vec::new();
    while let Some(c) = r.chars().next() {
        if c == 'E' {
            break;
        }
        let digits = r.chars().take_while(|c| c.is_ascii_digit()).count();
        let Ok(n) = r[..digits].parse::<usize>() else {
            return s.to_string();
        };
        let Some(part) = r.get(digits..digits + n) else {
            return s.to_string();
        };
        parts.push(part);
        r = &r[digits + n..];
    }
    if parts
        .last()
        .is_some_and(|h| h.len() == 17 && h.starts_with('h'))
    {
        parts.pop();
    }
    parts
        .join("::")
        .replace("$LT$", "<")
        .replace("$GT$", ">")
        .replace("$u20$", " ")
        .replace("$RF$", "&")
        .replace("$C$", ",")
        .replace("..", "::")
}

/// One loaded object's function symbols.
#[derive(Debug)]
struct Object {
    lo: u64,
    hi: u64,
    /// (start, end, name), run-time addresses, sorted.
    syms: Vec<(u64, u64, String)>,
}

/// Function names for the addresses of one core.
#[derive(Debug, Default)]
pub struct Symbolizer {
    objects: Vec<Object>,
}

impl Symbolizer {
    /// Loads the symbols of every mapped file of `core` that exists here with the same
    /// build-id as in the core. Files that are missing, differ or have no symbols are skipped.
    pub fn new(core: &CoreFile, files: &[FileMapping]) -> Symbolizer {
        let mut objects = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for f in files.iter().filter(|f| f.offset == 0) {
            if !seen.insert(f.path.clone()) {
                continue;
            }
            let lo = files
                .iter()
                .filter(|g| g.path == f.path)
                .map(|g| g.start)
                .min()
                .unwrap_or(f.start);
            let hi = files
                .iter()
                .filter(|g| g.path == f.path)
                .map(|g| g.end)
                .max()
                .unwrap_or(f.end);
            if let Ok(Some(syms)) = load(core, f.start, &f.path) {
                objects.push(Object { lo, hi, syms });
            }
        }
        Symbolizer { objects }
    }

    /// The function containing `addr`, as `name+0xoff`.
    pub fn lookup(&self, addr: u64) -> Option<String> {
        let o = self.objects.iter().find(|o| addr >= o.lo && addr < o.hi)?;
        let i = o.syms.partition_point(|s| s.0 <= addr);
        let (start, end, name) = o.syms.get(i.checked_sub(1)?)?;
        (addr < *end || *end == *start).then(|| format!("{}+{:#x}", demangle(name), addr - start))
    }
}

/// The function symbols of the file at `path`, mapped with its first page at `base`, if its
/// build-id matches the core's copy of that page.
fn load(core: &CoreFile, base: u64, path: &str) -> io::Result<Option<Vec<(u64, u64, String)>>> {
    let Some(head) = core.read(base, 4096)? else {
        return Ok(None);
    };
    let first = first_load_page(&head);
    let in_core = build_id(
        &head,
        &|a, n| {
            core.read(base.wrapping_add(a.wrapping_sub(first)), n)
                .ok()
                .flatten()
        },
        true,
    );
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let rd = |off: u64, n: usize| -> Option<Vec<u8>> {
        if off.checked_add(n as u64)? > len {
            return None;
        }
        let mut b = vec![0u8; n];
        file.read_exact_at(&mut b, off).ok()?;
        Some(b)
    };
    let Some(fh) = rd(0, 64) else { return Ok(None) };
    let fhead = rd(
        0,
        u64at(&fh, 32)
            .unwrap_or(64)
            .saturating_add(56 * u16at(&fh, 56).unwrap_or(0) as u64)
            .min(65536) as usize,
    );
    let Some(fhead) = fhead else { return Ok(None) };
    let on_disk = build_id(&fhead, &|o, n| rd(o, n), false);
    if in_core.is_none() || in_core != on_disk {
        return Ok(None);
    }
    // The load bias: the first PT_LOAD's page is mapped at `base`.
    let bias = base.wrapping_sub(first_load_page(&fhead));
    // Section headers: .symtab, else .dynsym, and their string tables.
    let (Some(shoff), Some(shnum)) = (u64at(&fh, 40), u16at(&fh, 60)) else {
        return Ok(None);
    };
    let Some(sh) = rd(shoff, shnum as usize * 64) else {
        return Ok(None);
    };
    let sec = |i: usize| -> Option<(u32, u64, u64, u32)> {
        let s = i * 64;
        Some((
            u32at(&sh, s + 4)?,
            u64at(&sh, s + 24)?,
            u64at(&sh, s + 32)?,
            u32at(&sh, s + 40)?,
        ))
    };
    let pick = |want: u32| (0..shnum as usize).find(|&i| sec(i).is_some_and(|s| s.0 == want));
    let Some(si) = pick(2).or_else(|| pick(11)) else {
        return Ok(None);
    };
    let Some((_, off, size, link)) = sec(si) else {
        return Ok(None);
    };
    let Some((_, stroff, strsize, _)) = sec(link as usize) else {
        return Ok(None);
    };
    let (Some(tab), Some(strs)) = (
        rd(off, size.min(256 << 20) as usize),
        rd(stroff, strsize.min(256 << 20) as usize),
    ) else {
        return Ok(None);
    };
    let mut syms = Vec::new();
    for e in tab.chunks_exact(24) {
        let info = e[4];
        let value = u64at(e, 8).unwrap_or(0);
        if info & 0xf != 2 || value == 0 {
            continue; // functions only
        }
        let name_at = u32at(e, 0).unwrap_or(0) as usize;
        let Some(rest) = strs.get(name_at..) else {
            continue;
        };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let size = u64at(e, 16).unwrap_or(0);
        let start = bias.wrapping_add(value);
        syms.push((
            start,
            start.saturating_add(size),
            String::from_utf8_lossy(&rest[..end]).into_owned(),
        ));
    }
    syms.sort_by_key(|s| s.0);
    Ok(Some(syms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_legacy_rust() {
        assert_eq!(
            demangle("_ZN16coreflect_target11spin_worker17h0123456789abcdefE"),
            "coreflect_target::spin_worker"
        );
        assert_eq!(demangle("__libc_read"), "__libc_read");
        assert_eq!(demangle("_ZN3foo"), "foo");
        assert_eq!(demangle("_ZN99x"), "_ZN99x");
    }
}
