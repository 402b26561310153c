//! x86_64: the general register set, syscall numbers, syscall-restart codes and the
//! XSAVE layout from CPUID.

/// The general registers (`struct user_regs_struct`), as `PTRACE_GETREGS` returns them and as
/// `NT_PRSTATUS` stores them (27 × u64).
#[derive(Clone, Copy)]
pub struct Regs(pub libc::user_regs_struct);

impl std::fmt::Debug for Regs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Regs {{ rip: {:#x}, rsp: {:#x}, rax: {:#x}, orig_rax: {:#x} }}",
            self.0.rip, self.0.rsp, self.0.rax, self.0.orig_rax
        )
    }
}

impl Regs {
    /// The registers as the 216 bytes of `elf_gregset_t`.
    pub fn to_bytes(self) -> [u8; 216] {
        let mut out = [0u8; 216];
        // SAFETY: user_regs_struct is 27 plain u64 fields, no padding.
        let src = unsafe {
            std::slice::from_raw_parts(
                &self.0 as *const _ as *const u8,
                std::mem::size_of::<libc::user_regs_struct>(),
            )
        };
        out.copy_from_slice(src);
        out
    }

    /// The registers as the 27 words of `elf_gregset_t`, in `user_regs_struct` order.
    pub fn words(&self) -> [u64; 27] {
        let b = self.to_bytes();
        std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    /// Builds registers from the 216 bytes of `elf_gregset_t`.
    #[cfg(test)]
    pub fn from_bytes(b: &[u8; 216]) -> Regs {
        // SAFETY: `user_regs_struct` is 27 plain u64 fields: all-zero bytes are a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), &mut r as *mut _ as *mut u8, 216);
        }
        Regs(r)
    }

    /// The syscall the thread is in (`orig_rax`), or `None` when it was stopped in user mode.
    pub fn syscall_nr(&self) -> Option<u64> {
        ((self.0.orig_rax as i64) >= 0).then_some(self.0.orig_rax)
    }

    /// `rax` as a signed return value.
    pub fn ret(&self) -> i64 {
        self.0.rax as i64
    }

    /// These registers, set to execute syscall `nr(args)` at the `syscall` instruction at
    /// `insn` when the thread resumes (from user mode: `orig_rax` says "in no syscall").
    pub fn at_syscall(self, insn: u64, nr: u64, args: [u64; 6]) -> Regs {
        let mut r = self;
        r.0.rip = insn;
        r.0.rax = nr;
        r.0.orig_rax = u64::MAX;
        r.0.rdi = args[0];
        r.0.rsi = args[1];
        r.0.rdx = args[2];
        r.0.r10 = args[3];
        r.0.r8 = args[4];
        r.0.r9 = args[5];
        r
    }
}

/// `__NR_clone`.
pub const SYS_CLONE: u64 = 56;
/// `__NR_wait4`.
pub const SYS_WAIT4: u64 = 61;
/// `__NR_exit_group`.
pub const SYS_EXIT_GROUP: u64 = 231;

/// Kernel-internal `-ERESTARTSYS`.
pub const ERESTARTSYS: i64 = -512;
/// Kernel-internal `-ERESTARTNOINTR`.
pub const ERESTARTNOINTR: i64 = -513;
/// Kernel-internal `-ERESTARTNOHAND`.
pub const ERESTARTNOHAND: i64 = -514;
/// Kernel-internal `-ERESTART_RESTARTBLOCK`.
pub const ERESTART_RESTARTBLOCK: i64 = -516;

/// Syscalls that swap the signal mask while they sleep and restore it on the way out: a thread
/// inside one of them must never be used for injection (changing its mask breaks the restore).
pub const MASK_SWAPPING_SYSCALLS: &[u64] = &[
    128, // rt_sigtimedwait
    130, // rt_sigsuspend
    270, // pselect6
    271, // ppoll
    281, // epoll_pwait
    333, // io_pgetevents
    441, // epoll_pwait2
];

/// True if a thread stopped in a syscall that returned one of the kernel's restart codes
/// (`-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`, `-ERESTART_RESTARTBLOCK`): the
/// kernel will restart it (or turn it into EINTR for a signal handler) on the way out.
pub fn restartable(regs: &Regs) -> bool {
    regs.syscall_nr().is_some()
        && matches!(
            regs.ret(),
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        )
}

fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    // SAFETY: cpuid is available on every x86_64 CPU.
    let r = std::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The largest XSAVE area any feature set of this CPU can need (CPUID 0xD.0 ECX), with a
/// floor of 4 KiB: the buffer for `PTRACE_GETREGSET NT_X86_XSTATE`.
pub fn xstate_buffer_size() -> usize {
    let (_, _, ecx, _) = cpuid(0xd, 0);
    (ecx as usize).max(4096)
}

/// One entry of `NT_X86_XSAVE_LAYOUT` (`struct x86_xfeat_component`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XfeatComponent {
    /// The XSAVE feature number.
    pub kind: u32,
    /// Its size in the standard-format XSAVE area.
    pub size: u32,
    /// Its offset in the standard-format XSAVE area.
    pub offset: u32,
    /// CPUID 0xD.n ECX flags.
    pub flags: u32,
}

/// The XSAVE layout of the user-visible features enabled in `xcr0`, from CPUID leaf 0xD,
/// as the kernel writes it into `NT_X86_XSAVE_LAYOUT`.
pub fn xsave_layout(xcr0: u64) -> Vec<XfeatComponent> {
    (2..64u32)
        .filter(|i| xcr0 & (1u64 << i) != 0)
        .filter_map(|i| {
            let (size, offset, flags, _) = cpuid(0xd, i);
            (size != 0).then_some(XfeatComponent {
                kind: i,
                size,
                offset,
                flags,
            })
        })
        .collect()
}

/// XCR0 as the kernel records it at byte 464 of an XSTATE regset.
pub fn xcr0_of(xstate: &[u8]) -> u64 {
    xstate
        .get(464..472)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_roundtrip() {
        // SAFETY: `user_regs_struct` is 27 plain u64 fields: all-zero bytes are a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.rip = 0x1234;
        r.gs = 7;
        let regs = Regs(r);
        let b = regs.to_bytes();
        assert_eq!(u64::from_le_bytes(b[128..136].try_into().unwrap()), 0x1234);
        assert_eq!(Regs::from_bytes(&b).0.gs, 7);
    }

    #[test]
    fn restart_rules() {
        // SAFETY: `user_regs_struct` is 27 plain u64 fields: all-zero bytes are a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.orig_rax = 0; // read
        r.rax = ERESTARTSYS as u64;
        assert!(restartable(&Regs(r)));
        r.orig_rax = 35; // nanosleep
        r.rax = ERESTART_RESTARTBLOCK as u64;
        assert!(restartable(&Regs(r)));
        r.rax = (-4i64) as u64; // EINTR: not restartable
        assert!(!restartable(&Regs(r)));
        r.orig_rax = u64::MAX; // user mode
        r.rax = ERESTARTSYS as u64;
        assert!(!restartable(&Regs(r)));
    }

    #[test]
    fn xstate_size_is_sane() {
        let n = xstate_buffer_size();
        assert!((4096..=1 << 20).contains(&n));
    }
}

/// Offset and size of each user XSAVE feature in Intel's standard layout, which gdb 13 and
/// older assume for every CPU (they ignore `NT_X86_XSAVE_LAYOUT`).
pub fn intel_standard_slot(feature: u32) -> Option<(u32, u32)> {
    Some(match feature {
        2 => (576, 256),    // AVX (YMM_Hi128)
        3 => (960, 64),     // MPX BNDREGS
        4 => (1024, 64),    // MPX BNDCSR
        5 => (1088, 64),    // AVX-512 opmask
        6 => (1152, 512),   // AVX-512 ZMM_Hi256
        7 => (1664, 1024),  // AVX-512 Hi16_ZMM
        9 => (2688, 8),     // PKRU
        17 => (2752, 64),   // AMX TILECFG
        18 => (2816, 8192), // AMX TILEDATA
        _ => return None,
    })
}

/// Re-lays an XSTATE area from this CPU's layout (`layout`, from CPUID) into Intel's
/// standard layout, so debuggers that assume it (gdb ≤ 13) read every register right on
/// CPUs whose offsets differ (AMD with AVX-512). Returns the area and the layout it now has;
/// unchanged if the layouts already agree or a feature has no known standard slot.
pub fn to_standard_layout(x: &[u8], layout: &[XfeatComponent]) -> (Vec<u8>, Vec<XfeatComponent>) {
    let slots: Option<Vec<(u32, u32)>> =
        layout.iter().map(|c| intel_standard_slot(c.kind)).collect();
    let Some(slots) = slots else {
        return (x.to_vec(), layout.to_vec());
    };
    let same = layout
        .iter()
        .zip(&slots)
        .all(|(c, s)| c.offset == s.0 && c.size == s.1);
    if same || x.len() < 576 {
        return (x.to_vec(), layout.to_vec());
    }
    let len = slots
        .iter()
        .map(|s| (s.0 + s.1) as usize)
        .max()
        .unwrap_or(576)
        .max(576);
    let mut out = vec![0u8; len];
    out[..576].copy_from_slice(&x[..576]);
    let mut new_layout = Vec::with_capacity(layout.len());
    for (c, s) in layout.iter().zip(&slots) {
        let (from, to, n) = (c.offset as usize, s.0 as usize, c.size.min(s.1) as usize);
        if from + n <= x.len() {
            out[to..to + n].copy_from_slice(&x[from..from + n]);
        }
        new_layout.push(XfeatComponent {
            offset: s.0,
            size: s.1,
            ..*c
        });
    }
    (out, new_layout)
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn relayout_moves_amd_avx512_to_intel_offsets() {
        let amd = [
            XfeatComponent {
                kind: 2,
                size: 256,
                offset: 576,
                flags: 0,
            },
            XfeatComponent {
                kind: 5,
                size: 64,
                offset: 832,
                flags: 0,
            },
            XfeatComponent {
                kind: 6,
                size: 512,
                offset: 896,
                flags: 0,
            },
            XfeatComponent {
                kind: 7,
                size: 1024,
                offset: 1408,
                flags: 0,
            },
        ];
        let mut x = vec![0u8; 2432];
        x[576] = 1; // ymm0 high
        x[832] = 5; // k0
        x[896] = 6; // zmm0 high
        x[1408] = 7; // zmm16
        let (y, l) = to_standard_layout(&x, &amd);
        assert_eq!(y.len(), 2688);
        assert_eq!((y[576], y[1088], y[1152], y[1664]), (1, 5, 6, 7));
        assert_eq!(l[1].offset, 1088);
        let (z, l2) = to_standard_layout(&y, &l);
        assert_eq!((z, l2), (y, l));
    }
}
