//! The memory map: `/proc/PID/maps` (fast) and `/proc/PID/smaps` (with `VmFlags`).

use super::{path, read_text};
use crate::error::{Error, Pid, Result};

/// What kind of mapping a [`Mapping`] is, by its name in the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MappingKind {
    /// Backed by a file (it has an inode).
    File,
    /// Anonymous memory (including `[heap]`, `[stack]` and unnamed mappings).
    Anonymous,
    /// The `[vdso]`: always dumped whole.
    Vdso,
    /// `[vvar]`, `[vvar_vclock]`, `[vsyscall]`: dumped whole by the kernel, as zeros (not
    /// readable through /proc/PID/mem).
    Special,
}

/// One line of the memory map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared (`s`) rather than private (`p`).
    pub shared: bool,
    /// Offset into the file.
    pub offset: u64,
    /// Device major:minor as written.
    pub dev: String,
    /// Inode (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `/lib/x.so (deleted)`), empty if none.
    pub name: String,
    /// Two-letter `VmFlags` codes (only from smaps; empty from maps).
    pub vmflags: Vec<[u8; 2]>,
    /// `Anonymous:` in KiB (only from smaps).
    pub anonymous_kb: u64,
    /// `Rss:` in KiB (only from smaps).
    pub rss_kb: u64,
    /// `Swap:` in KiB (only from smaps).
    pub swap_kb: u64,
    /// `AnonHugePages:` in KiB (only from smaps).
    pub anon_huge_kb: u64,
}

impl Mapping {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True if the mapping is empty (never for a real map line).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The mapping's kind.
    pub fn kind(&self) -> MappingKind {
        match self.name.as_str() {
            "[vdso]" => MappingKind::Vdso,
            "[vvar]" | "[vvar_vclock]" | "[vsyscall]" => MappingKind::Special,
            _ if self.inode != 0 => MappingKind::File,
            _ => MappingKind::Anonymous,
        }
    }

    /// True if `VmFlags` contains the two-letter code.
    pub fn has_flag(&self, code: &str) -> bool {
        let c = code.as_bytes();
        self.vmflags.iter().any(|f| f[..] == c[..2])
    }

    /// ELF `p_flags` for this mapping (PF_R=4, PF_W=2, PF_X=1).
    pub fn elf_flags(&self) -> u32 {
        (self.read as u32) << 2 | (self.write as u32) << 1 | self.exec as u32
    }

    /// Parses one header line of maps/smaps.
    pub fn parse_line(line: &str) -> Option<Mapping> {
        let mut it = line.splitn(6, ' ');
        let range = it.next()?;
        let perms = it.next()?.as_bytes();
        let offset = u64::from_str_radix(it.next()?, 16).ok()?;
        let dev = it.next()?.to_string();
        let inode = it.next()?.parse().ok()?;
        let name = it.next().unwrap_or("").trim_start().to_string();
        let (s, e) = range.split_once('-')?;
        if perms.len() < 4 {
            return None;
        }
        Some(Mapping {
            start: u64::from_str_radix(s, 16).ok()?,
            end: u64::from_str_radix(e, 16).ok()?,
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
            shared: perms[3] == b's',
            offset,
            dev,
            inode,
            name,
            vmflags: Vec::new(),
            anonymous_kb: 0,
            rss_kb: 0,
            swap_kb: 0,
            anon_huge_kb: 0,
        })
    }
}

/// Reads `/proc/PID/maps` (no VmFlags; cheap).
pub fn read_maps(pid: Pid) -> Result<Vec<Mapping>> {
    let text = read_text(pid, "maps")?;
    parse_maps(&text).ok_or_else(|| Error::Parse {
        path: path(pid, "maps"),
        detail: "unexpected line".into(),
    })
}

/// Parses the text of a maps file.
pub fn parse_maps(text: &str) -> Option<Vec<Mapping>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(Mapping::parse_line)
        .collect()
}

/// Reads `/proc/PID/smaps` (with VmFlags, Anonymous and Rss).
pub fn read_smaps(pid: Pid) -> Result<Vec<Mapping>> {
    let text = read_text(pid, "smaps")?;
    parse_smaps(&text).ok_or_else(|| Error::Parse {
        path: path(pid, "smaps"),
        detail: "unexpected line".into(),
    })
}

/// Parses the text of an smaps file.
pub fn parse_smaps(text: &str) -> Option<Vec<Mapping>> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            out.push(Mapping::parse_line(line)?);
            continue;
        }
        let cur = out.last_mut()?;
        if let Some(v) = line.strip_prefix("VmFlags:") {
            cur.vmflags = v
                .split_whitespace()
                .filter(|w| w.len() == 2)
                .map(|w| [w.as_bytes()[0], w.as_bytes()[1]])
                .collect();
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            cur.anonymous_kb = kb(v);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            cur.rss_kb = kb(v);
        } else if let Some(v) = line.strip_prefix("Swap:") {
            cur.swap_kb = kb(v);
        } else if let Some(v) = line.strip_prefix("AnonHugePages:") {
            cur.anon_huge_kb = kb(v);
        }
    }
    Some(out)
}

fn kb(v: &str) -> u64 {
    v.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps() {
        let t = "\
55d0c0000000-55d0c0021000 r--p 00000000 fe:01 1234  /usr/bin/x (deleted)
Size:                132 kB
Rss:                   8 kB
Anonymous:             4 kB
VmFlags: rd mr mw me dd sd
7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de sd
7ffe0000-7ffe1000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac sd
";
        let m = parse_smaps(t).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "/usr/bin/x (deleted)");
        assert_eq!(m[0].kind(), MappingKind::File);
        assert!(m[0].has_flag("dd"));
        assert_eq!(m[0].anonymous_kb, 4);
        assert_eq!(m[0].rss_kb, 8);
        assert_eq!(m[1].kind(), MappingKind::Vdso);
        assert_eq!(m[1].elf_flags(), 5);
        assert_eq!(m[2].kind(), MappingKind::Anonymous);
        assert!(!m[2].has_flag("dd"));
    }
}
