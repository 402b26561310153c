//! Why each mapping is (or is not) in a core: the per-mapping decisions of
//! [`crate::select::KernelPolicy`] in words, emitted as `tracing` events (the library never
//! prints; a subscriber such as `coreflect -v` shows them).

use crate::elf::writer::Source;
use crate::proc::{Mapping, MappingKind};
use crate::select::{self, Extent, KernelPolicy};
use crate::Snapshot;

/// Why `policy` chose `extent` for `m`, in a few words.
pub fn reason(m: &Mapping, extent: Extent, policy: &KernelPolicy) -> String {
    let bit = |b: u32| {
        format!(
            "coredump_filter {:#x} {} bit {:#x}",
            policy.filter,
            if policy.filter & b != 0 {
                "has"
            } else {
                "lacks"
            },
            b
        )
    };
    match m.kind() {
        MappingKind::Vdso => return "the vDSO is always dumped".into(),
        MappingKind::Special => return "kernel-special mapping, never dumped".into(),
        _ => {}
    }
    if m.has_flag("dd") {
        return "MADV_DONTDUMP".into();
    }
    if m.has_flag("ht") {
        return format!(
            "hugetlb, {}",
            bit(if m.shared {
                select::FILTER_HUGETLB_SHARED
            } else {
                select::FILTER_HUGETLB_PRIVATE
            })
        );
    }
    if m.has_flag("io") {
        return "I/O memory (VM_IO), never dumped".into();
    }
    if m.shared {
        let anon = m.inode == 0 || m.name.ends_with(" (deleted)");
        return if anon {
            format!("shared anonymous, {}", bit(select::FILTER_ANON_SHARED))
        } else {
            format!("shared file, {}", bit(select::FILTER_MAPPED_SHARED))
        };
    }
    let has_anon = m.anonymous_kb > 0 || m.swap_kb > 0;
    match extent {
        Extent::Whole if has_anon && policy.filter & select::FILTER_ANON_PRIVATE != 0 => format!(
            "private with {} KiB anonymous pages, {}",
            m.anonymous_kb + m.swap_kb,
            bit(select::FILTER_ANON_PRIVATE)
        ),
        Extent::Whole => format!("private file, {}", bit(select::FILTER_MAPPED_PRIVATE)),
        Extent::FirstPage => format!(
            "ELF header only (build-id), {}",
            bit(select::FILTER_ELF_HEADERS)
        ),
        Extent::None if m.kind() == MappingKind::Anonymous => {
            if has_anon {
                format!("private anonymous, {}", bit(select::FILTER_ANON_PRIVATE))
            } else {
                "private anonymous, never touched".into()
            }
        }
        Extent::None => format!(
            "private file, unmodified: its contents are in the file ({})",
            bit(select::FILTER_MAPPED_PRIVATE)
        ),
    }
}

/// Emits one `debug` event per mapping of `snap`: its range, permissions, name, how much
/// goes into the core and why, and where it is read from. Does nothing (and reads no
/// memory) unless a subscriber wants `debug` events.
pub fn log_plan(snap: &Snapshot, policy: &KernelPolicy) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let plan = snap.plan(policy);
    for (m, s) in snap.mappings().iter().zip(plan.iter()) {
        let extent = if s.filesz == 0 {
            Extent::None
        } else if s.filesz == s.memsz {
            Extent::Whole
        } else {
            Extent::FirstPage
        };
        let what = match extent {
            Extent::None => "skip".to_string(),
            Extent::Whole => format!("whole ({} KiB)", s.memsz / 1024),
            Extent::FirstPage => format!("first {} KiB", s.filesz / 1024),
        };
        tracing::debug!(
            "mapping {:#x}-{:#x} {}{}{}{} {}: {what}: {}{}",
            m.start,
            m.end,
            if m.read { 'r' } else { '-' },
            if m.write { 'w' } else { '-' },
            if m.exec { 'x' } else { '-' },
            if m.shared { 's' } else { 'p' },
            if m.name.is_empty() { "[anon]" } else { &m.name },
            reason(m, extent, policy),
            if s.filesz > 0 && s.source == Source::Live {
                "; read from the live target (a clone cannot hold it)"
            } else {
                ""
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::RegionPolicy;

    fn map(line: &str, flags: &str, anon_kb: u64) -> Mapping {
        let mut m = Mapping::parse_line(line).unwrap();
        m.vmflags = flags
            .split_whitespace()
            .map(|w| [w.as_bytes()[0], w.as_bytes()[1]])
            .collect();
        m.anonymous_kb = anon_kb;
        m
    }

    #[test]
    fn reasons_match_the_policy() {
        let p = KernelPolicy::default();
        let heap = map("1000-3000 rw-p 00000000 00:00 0", "rd wr", 8);
        assert!(reason(&heap, p.extent(&heap, &mut || false), &p).contains("8 KiB anonymous"));
        let untouched = map("1000-3000 rw-p 00000000 00:00 0", "rd wr", 0);
        assert_eq!(
            reason(&untouched, p.extent(&untouched, &mut || false), &p),
            "private anonymous, never touched"
        );
        let lib = map(
            "1000-3000 r-xp 00000000 fe:01 77 /lib/libc.so.6",
            "rd ex",
            0,
        );
        assert!(reason(&lib, p.extent(&lib, &mut || true), &p).starts_with("ELF header"));
        assert!(reason(&lib, p.extent(&lib, &mut || false), &p).contains("lacks bit 0x4"));
        let dd = map("1000-3000 rw-p 00000000 00:00 0", "rd wr dd", 4);
        assert_eq!(reason(&dd, Extent::None, &p), "MADV_DONTDUMP");
    }
}
