//! Target modes built to be harmed by a careless live dumper (issue 8): a seccomp filter on
//! one worker, private hugetlb memory, threads that wait for any child with `__WALL`, a
//! thread that keeps calling `vfork`, no (or an unusable) vDSO, a main thread that exited.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::time::Duration;

/// Children seen by the thread blocked in `waitpid(-1, __WALL)` (`--wait-all`).
pub static WALL_CHILDREN: AtomicU64 = AtomicU64::new(0);
/// Children seen by the thread polling `waitpid(-1, WNOHANG|__WALL)` (`--wait-all`).
pub static WALL_POLL_CHILDREN: AtomicU64 = AtomicU64::new(0);
/// Children the vfork thread's `waitpid(-1, __WALL)` returned that were not its own.
pub static VFORK_FOREIGN: AtomicU64 = AtomicU64::new(0);
/// vfork children the vfork thread created and reaped.
pub static VFORKS: AtomicU64 = AtomicU64::new(0);
/// Loops of the seccomp-filtered worker.
pub static SECCOMP_SPINS: AtomicU64 = AtomicU64::new(0);
/// Set when the vDSO is gone or unusable: clock reads then go through the syscall.
pub static NO_VDSO: AtomicBool = AtomicBool::new(false);

/// `__WALL` for `waitpid`.
const WALL: i32 = 0x4000_0000;

fn quit() -> bool {
    crate::quitting()
}

/// Installs, on the calling thread only, a filter that kills the whole process
/// (`SECCOMP_RET_KILL_PROCESS`) on `clone`, `clone3` and `wait4`.
pub fn install_seccomp_kill_on_thread() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let prog = [
        f(0x20, 0, 0, 4),                 // ld [4] (arch)
        f(0x15, 0, 5, AUDIT_ARCH_X86_64), // jeq arch, next, allow
        f(0x20, 0, 0, 0),                 // ld [0] (nr)
        f(0x15, 2, 0, 56),                // jeq clone -> kill
        f(0x15, 1, 0, 435),               // jeq clone3 -> kill
        f(0x15, 0, 1, 61),                // jeq wait4 -> kill, else allow
        f(0x06, 0, 0, 0x8000_0000),       // ret KILL_PROCESS
        f(0x06, 0, 0, 0x7fff_0000),       // ret ALLOW
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a filter program that lives until the call returns (the kernel
    // copies it); no_new_privs first, as an unprivileged filter requires.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const _
            ),
            0,
            "seccomp filter"
        );
    }
}

/// A worker under its own seccomp filter (clone/clone3/wait4 kill the process), busy in
/// user mode most of the time: the thread a dumper most likely borrows.
#[inline(never)]
pub fn seccomp_worker(ready: std::sync::mpsc::Sender<()>) {
    install_seccomp_kill_on_thread();
    let _ = ready.send(());
    while !quit() {
        for _ in 0..2_000_000 {
            std::hint::black_box(SECCOMP_SPINS.fetch_add(1, Relaxed));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Blocks in `waitpid(-1, &st, __WALL)` whenever the process has a child, counting every
/// child it sees (the process has none of its own).
#[inline(never)]
pub fn wait_all_blocking() {
    while !quit() {
        let mut st = 0;
        // SAFETY: plain waitpid with a valid status pointer.
        let r = unsafe { libc::waitpid(-1, &mut st, WALL) };
        if r > 0 {
            WALL_CHILDREN.fetch_add(1, SeqCst);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Polls `waitpid(-1, WNOHANG|__WALL)` every millisecond, counting every child it sees.
#[inline(never)]
pub fn wait_all_polling() {
    while !quit() {
        let mut st = 0;
        // SAFETY: plain waitpid with a valid status pointer.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG | WALL) };
        if r > 0 {
            WALL_POLL_CHILDREN.fetch_add(1, SeqCst);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

extern "C" fn vfork_child(_: *mut libc::c_void) -> libc::c_int {
    let ts = libc::timespec {
        tv_sec: 3,
        tv_nsec: 0,
    };
    // SAFETY: raw syscalls only (the child shares the parent's memory, as after vfork):
    // sleep 3 s, then end this child alone.
    unsafe {
        libc::syscall(
            libc::SYS_nanosleep,
            &ts as *const libc::timespec,
            std::ptr::null_mut::<libc::timespec>(),
        );
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

/// Calls `clone(CLONE_VM|CLONE_VFORK)` (what `vfork` and `posix_spawn` do) in a loop: the
/// thread sits in uninterruptible sleep while each child lives (3 s, longer than a
/// default stop timeout), and then reaps with `waitpid(-1, __WALL)` and polls once more
/// with `WNOHANG|__WALL`, counting any child that is not its own.
#[inline(never)]
pub fn vfork_loop() {
    let mut stack = vec![0u8; 64 << 10];
    while !quit() {
        let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
        // SAFETY: the child runs `vfork_child` on its own stack, which outlives it (the
        // parent is suspended until the child exits: CLONE_VFORK).
        let pid = unsafe {
            libc::clone(
                vfork_child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK,
                std::ptr::null_mut(),
            )
        };
        if pid <= 0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        loop {
            let mut st = 0;
            // SAFETY: plain waitpid with a valid status pointer.
            let r = unsafe { libc::waitpid(-1, &mut st, WALL) };
            if r == pid {
                VFORKS.fetch_add(1, SeqCst);
                // Its own child came first (the kernel scans this thread's children
                // first): look once more for anyone else's.
                // SAFETY: plain waitpid with a valid status pointer.
                if unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG | WALL) } > 0 {
                    VFORK_FOREIGN.fetch_add(1, SeqCst);
                }
                break;
            }
            if r > 0 {
                VFORK_FOREIGN.fetch_add(1, SeqCst);
            } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
}

/// Maps `mib` MiB of private, unreserved hugetlb memory and fills it; returns its address.
/// Exits with a message if huge pages cannot be had.
pub fn map_hugetlb_private(mib: usize) -> usize {
    let len = mib << 20;
    // SAFETY: a fresh anonymous mapping; nothing else refers to that range.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        println!("NOHUGE mmap: {}", std::io::Error::last_os_error());
        std::process::exit(3);
    }
    hugetlb_fill(p as usize, len, 1);
    p as usize
}

/// Writes `gen` into every 4 KiB page of the hugetlb range (a copy-on-write of each huge
/// page if it is shared with a clone).
pub fn hugetlb_fill(addr: usize, len: usize, gen: u64) {
    let mut off = 0;
    while off < len {
        // SAFETY: inside the mapping made by `map_hugetlb_private`.
        unsafe { std::ptr::write_volatile((addr + off) as *mut u64, gen ^ off as u64) };
        off += 4096;
    }
}

/// Checks the hugetlb range holds generation `gen`.
pub fn hugetlb_check(addr: usize, len: usize, gen: u64) -> bool {
    (0..len)
        .step_by(4096)
        // SAFETY: inside the mapping made by `map_hugetlb_private`.
        .all(|off| unsafe { std::ptr::read_volatile((addr + off) as *const u64) } == gen ^ off as u64)
}

/// The `[vdso]` mapping's range, from /proc/self/maps.
fn vdso_range() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let l = maps.lines().find(|l| l.ends_with("[vdso]"))?;
    let (a, b) = l.split_whitespace().next()?.split_once('-')?;
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

/// Unmaps the vDSO (`how` = "unmap") or changes its protection ("none", "r"). Clock reads
/// switch to the real syscall first.
pub fn break_vdso(how: &str) {
    NO_VDSO.store(true, SeqCst);
    let Some((s, e)) = vdso_range() else { return };
    // SAFETY: the vDSO is only entered through clock reads, which no longer use it
    // (NO_VDSO); signal returns use libc's restorer, not the vDSO.
    let r = unsafe {
        match how {
            "unmap" => libc::munmap(s as *mut _, e - s),
            "none" => libc::mprotect(s as *mut _, e - s, libc::PROT_NONE),
            _ => libc::mprotect(s as *mut _, e - s, libc::PROT_READ),
        }
    };
    assert_eq!(
        r,
        0,
        "changing the vdso: {}",
        std::io::Error::last_os_error()
    );
}

/// Ends the calling (main) thread alone, as `pthread_exit` would, without unwinding Rust
/// frames: the leader becomes a zombie while the other threads run on.
pub fn exit_main_thread() -> ! {
    // SAFETY: SYS_exit ends only this thread; nothing of its stack is referred to by the
    // other threads (everything they share was moved into them or is static).
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned")
}
