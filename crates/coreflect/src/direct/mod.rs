//! Direct writing: the clone writes its own memory into the core file.
//!
//! Reading the clone through `/proc/CLONE/mem` costs two kernel copies per page (into a
//! bounce page, then to us) and a page-table walk per 4 KiB, before our own write copies the
//! data a third time. A `pwrite64` injected into the clone copies its memory into the page
//! cache once. The clone never runs user code for this: each write is one injected syscall,
//! like the `clone` itself.
//!
//! Setting it up takes a few injected syscalls in the clone, none in the target:
//! `close_range(0, ~0, CLOSE_RANGE_UNSHARE)` first (the clone was created sharing the
//! target's fd table; this gives it an empty one of its own without ever holding the
//! target's files), a scratch page, a non-blocking Unix socket connected to us under a
//! random abstract name, over which it receives the core's file descriptor (`SCM_RIGHTS`,
//! peer pid checked), then the scratch page and socket go. Before any of it the clone gets
//! ordinary scheduling on coreflect's CPUs, nice 10 and no file-size limit (it inherited
//! the borrowed thread's), and must share coreflect's network namespace.
//!
//! Not the default: when the target reaps the clone, the kernel adds the clone's CPU time
//! and I/O to the target's children's totals (`cutime`, `cstime`, `RUSAGE_CHILDREN`). The page cache, CPU time and I/O of the clone's writes
//! would be charged to its cgroups — the target's, with the target's limits — so the clone
//! is moved into coreflect's own cgroups first; where that is not possible (not root), or
//! the target runs under seccomp, direct writing is not used and the writer reads
//! `/proc/CLONE/mem` as before.
//!
//! Every syscall goes through an [`InjectedThread`] borrowing the clone (it is never
//! detached here, and keeps `PTRACE_O_EXITKILL`); once one fails, no more are made. Each
//! takes the clone through the kernel's return-to-user path, which rewrites its rseq area:
//! [`RseqArea`] (in `rseq.rs`) holds the snapshot's copy and how each write path puts it back.

use crate::error::{Error, InjectionFailure, Pid, Result};
use crate::inject::{self, InjectedThread};
use crate::ptrace;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

mod rseq;
pub(crate) use rseq::RseqArea;

const SYS_MMAP: u64 = 9;
const SYS_MUNMAP: u64 = 11;
const SYS_CLOSE: u64 = 3;
const SYS_PWRITE64: u64 = 18;
const SYS_SOCKET: u64 = 41;
const SYS_CONNECT: u64 = 42;
const SYS_RECVMSG: u64 = 47;
const SYS_CLOSE_RANGE: u64 = 436;

/// A clone set up to write its memory into the core file.
#[derive(Debug)]
pub struct DirectWriter {
    clone: Pid,
    /// The clone, borrowed (it stays attached: the snapshot's guard ends it).
    thread: std::cell::RefCell<InjectedThread>,
    fd: u64,
    rseq: Option<RseqArea>,
    /// Set once an injection went wrong: no more are made.
    failed: std::cell::Cell<bool>,
}

fn cgroup_lines(pid: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrl, path) = (it.next()?, it.next()?, it.next()?);
            Some((ctrl.to_string(), path.to_string()))
        })
        .collect()
}

/// Puts the clone into coreflect's own cgroups (every v1 hierarchy, and v2), so the page
/// cache, CPU time and I/O of its writes are not charged to the target's limits. False if
/// that fails for memory, CPU or I/O.
fn adopt_into_our_cgroups(clone: Pid) -> bool {
    let ours = cgroup_lines("self");
    let theirs = cgroup_lines(&clone.to_string());
    for (ctrl, path) in &ours {
        if theirs.iter().any(|(c, p)| c == ctrl && p == path) {
            continue; // already the same
        }
        let (dir, vital) = if ctrl.is_empty() {
            let v2 = if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            (format!("{v2}{path}"), true)
        } else {
            let name = ctrl.strip_prefix("name=").unwrap_or(ctrl);
            let vital = ctrl
                .split(',')
                .any(|c| matches!(c, "memory" | "cpu" | "cpuacct" | "blkio" | "io"));
            (format!("/sys/fs/cgroup/{name}{path}"), vital)
        };
        // Never create a file: the hierarchy must really be mounted there.
        let moved = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{dir}/cgroup.procs"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, clone.to_string().as_bytes()))
            .is_ok();
        if !moved && vital {
            return false;
        }
    }
    // Check that the moves took effect.
    let now = cgroup_lines(&clone.to_string());
    ours.iter()
        .filter(|(c, _)| {
            c.is_empty()
                || c.split(',')
                    .any(|x| matches!(x, "memory" | "cpu" | "cpuacct" | "blkio" | "io"))
        })
        .all(|o| now.contains(o))
}

/// Gives the clone ordinary scheduling on coreflect's CPUs and no file-size limit: it
/// inherited the borrowed thread's policy (possibly real-time), affinity, nice value and
/// limits, and must not compete with the target on them.
fn tame(clone: Pid) -> bool {
    // SAFETY: every pointer passed is to a live local (`p`, `set`, `inf`) of the type the call
    // expects, with its true size for the affinity calls; `cpu_set_t` is an array of integers, so
    // all-zero bytes are a valid value; prlimit64 accepts a null old-limit pointer.
    unsafe {
        let p = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(clone, libc::SCHED_OTHER, &p) != 0 {
            return false;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0
            || libc::sched_setaffinity(clone, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
        {
            return false;
        }
        if libc::setpriority(libc::PRIO_PROCESS, clone as libc::id_t, 10) != 0 {
            return false;
        }
        let inf = libc::rlimit64 {
            rlim_cur: libc::RLIM64_INFINITY,
            rlim_max: libc::RLIM64_INFINITY,
        };
        libc::prlimit64(clone, libc::RLIMIT_FSIZE, &inf, std::ptr::null_mut()) == 0
    }
}

fn same_net_namespace(clone: Pid) -> bool {
    let a = std::fs::read_link("/proc/self/ns/net");
    let b = std::fs::read_link(format!("/proc/{clone}/ns/net"));
    matches!((a, b), (Ok(a), Ok(b)) if a == b)
}

impl DirectWriter {
    /// Makes the clone run syscall `nr(args)`; its return value (`-errno` on failure).
    pub(crate) fn syscall(&self, nr: u64, args: [u64; 6]) -> Result<i64> {
        if self.failed.get() {
            return Err(Error::Injection {
                tid: self.clone,
                syscall: inject::syscall_name(nr),
                kind: InjectionFailure::EarlierFailed,
            });
        }
        let r = self.thread.borrow_mut().syscall(nr, args);
        // Whatever happened, the clone stays killable with its tracer.
        let _ = ptrace::set_options(self.clone, ptrace::O_EXITKILL);
        if r.is_err() {
            self.failed.set(true);
        }
        r
    }

    /// Sets up `clone` (stopped, traced by this thread, registers at `exit_group` on the
    /// `syscall` instruction `insn`) to write into `file`. `None` when direct writing cannot
    /// be used here; the clone is then left as it was, or at worst without its file table.
    pub fn setup(
        clone: Pid,
        insn: u64,
        file: &File,
        rseq: Option<RseqArea>,
    ) -> Option<DirectWriter> {
        let (mut w, fds) = Self::setup_fds(clone, insn, &[file.as_raw_fd()], rseq)?;
        w.fd = fds[0];
        Some(w)
    }

    /// As [`DirectWriter::setup`], passing the clone each of `fds` (its numbers there are
    /// returned, in order) instead of one core file.
    pub fn setup_fds(
        clone: Pid,
        insn: u64,
        fds: &[std::os::unix::io::RawFd],
        rseq: Option<RseqArea>,
    ) -> Option<(DirectWriter, Vec<u64>)> {
        // The borrowed thread's seccomp filter is the clone's: it may kill or trap on any of
        // the syscalls below.
        if crate::proc::Status::read(clone).ok().map(|s| s.seccomp) != Some(0) {
            return None;
        }
        let saved = ptrace::get_regs(clone).ok()?; // fails unless we are its tracer
        if !same_net_namespace(clone) || !tame(clone) || !adopt_into_our_cgroups(clone) {
            return None;
        }
        // Its signal mask (all blocked: it was made while the borrowed thread's was) is put
        // back after each syscall; it keeps PTRACE_O_EXITKILL between them.
        let thread = InjectedThread::borrow(
            clone,
            saved,
            insn,
            ptrace::O_EXITKILL,
            Duration::from_secs(10),
        )
        .ok()?
        .leaving_options(ptrace::O_EXITKILL);
        let w = DirectWriter {
            clone,
            thread: std::cell::RefCell::new(thread),
            fd: 0,
            rseq,
            failed: std::cell::Cell::new(false),
        };
        // An empty file table of its own, in one step (CLOSE_RANGE_UNSHARE): it never holds
        // a reference to the target's files, and the target's table is never touched.
        const CLOSE_RANGE_UNSHARE: u64 = 2;
        if w.syscall(
            SYS_CLOSE_RANGE,
            [0, u32::MAX as u64, CLOSE_RANGE_UNSHARE, 0, 0, 0],
        )
        .ok()?
            != 0
        {
            return None;
        }
        let mut theirs = Vec::with_capacity(fds.len());
        for &fd in fds {
            theirs.push(w.receive_fd(fd).ok().flatten()?);
        }
        Some((w, theirs))
    }

    /// Passes `file` to the clone over a Unix socket; returns its number there.
    fn receive_fd(&self, file: std::os::unix::io::RawFd) -> Result<Option<u64>> {
        let scratch = self.syscall(SYS_MMAP, [0, 4096, 3, 0x22, u64::MAX, 0])?;
        if scratch < 0 {
            return Ok(None);
        }
        let scratch = scratch as u64;
        let r = self.receive_fd_with(file, scratch);
        let _ = self.syscall(SYS_MUNMAP, [scratch, 4096, 0, 0, 0, 0]);
        r
    }

    fn receive_fd_with(&self, file: std::os::unix::io::RawFd, scratch: u64) -> Result<Option<u64>> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{}/mem", self.clone))
            .map_err(|e| Error::io("opening the clone's memory", e))?;
        // Our end: a listening socket in the abstract namespace.
        let mut rnd = [0u8; 16];
        // SAFETY: getrandom writes at most `rnd.len()` bytes to `rnd`, a live local array.
        if unsafe { libc::getrandom(rnd.as_mut_ptr() as *mut libc::c_void, rnd.len(), 0) } != 16 {
            return Ok(None);
        }
        let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("coreflect/fd/{hex}");
        // SAFETY: `sockaddr_un` is an integer and a byte array: all-zero bytes are a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in name.bytes().enumerate() {
            addr.sun_path[i + 1] = b as libc::c_char;
        }
        let alen = (std::mem::size_of::<libc::sa_family_t>() + 1 + name.len()) as u64;
        // SAFETY: socket() takes no pointers; the descriptor it returns is owned by `_close_l`
        // below.
        let lfd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if lfd < 0 {
            return Ok(None);
        }
        let _close_l = CloseOnDrop(lfd);
        // SAFETY: bind reads `alen` bytes at `&addr`, a live `sockaddr_un`; `alen` (family + NUL +
        // 45-byte name) is below its size.
        if unsafe { libc::bind(lfd, &addr as *const _ as *const libc::sockaddr, alen as u32) } != 0
            // SAFETY: listen takes no pointers.
            || unsafe { libc::listen(lfd, 1) } != 0
        {
            return Ok(None);
        }
        // Its end: socket + connect, the address in the scratch page.
        let abytes =
            // SAFETY: `addr` is a live `sockaddr_un` (110 bytes, no padding, all initialized since
            // it was zeroed) and `alen` is at most its size; the slice only borrows it for reading.
            unsafe { std::slice::from_raw_parts(&addr as *const _ as *const u8, alen as usize) };
        mem.write_all_at(abytes, scratch)
            .map_err(|e| Error::io("writing into the clone's scratch page", e))?;
        // Non-blocking: nothing another process does to our socket can make it wait.
        let sfd = self.syscall(SYS_SOCKET, [1, 1 | 0x800, 0, 0, 0, 0])?;
        if sfd < 0 {
            return Ok(None);
        }
        let sfd = sfd as u64;
        let result = (|| -> Result<Option<u64>> {
            if self.syscall(SYS_CONNECT, [sfd, scratch, alen, 0, 0, 0])? != 0 {
                return Ok(None);
            }
            // SAFETY: accept4 accepts null address pointers (it then writes no address); the
            // returned descriptor is owned by `_close_c` below.
            let conn = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if conn < 0 {
                return Ok(None);
            }
            let _close_c = CloseOnDrop(conn);
            // Only the clone may be at the other end.
            // SAFETY: `ucred` is three integers: all-zero bytes are a valid value.
            let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
            let mut clen = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `clen` = size_of::<ucred>() bytes to `cred` and
            // updates `clen`, both live locals.
            let ok = unsafe {
                libc::getsockopt(
                    conn,
                    libc::SOL_SOCKET,
                    libc::SO_PEERCRED,
                    &mut cred as *mut _ as *mut libc::c_void,
                    &mut clen,
                )
            } == 0;
            if !ok || cred.pid != self.clone {
                return Ok(None);
            }
            if !send_fd(conn, file) {
                return Ok(None);
            }
            // Its recvmsg: msghdr at +0, iovec at +64, 1-byte buffer at +96, cmsg at +128.
            let (msg_at, iov_at, buf_at, cmsg_at) =
                (scratch, scratch + 64, scratch + 96, scratch + 128);
            // SAFETY: CMSG_SPACE is pure arithmetic on its argument; it touches no memory.
            let cmsg_len = unsafe { libc::CMSG_SPACE(4) } as u64;
            let mut b = vec![0u8; 256];
            let put = |b: &mut Vec<u8>, at: u64, v: u64| {
                let o = (at - scratch) as usize;
                b[o..o + 8].copy_from_slice(&v.to_le_bytes());
            };
            put(&mut b, msg_at + 16, iov_at); // msg_iov
            put(&mut b, msg_at + 24, 1); // msg_iovlen
            put(&mut b, msg_at + 32, cmsg_at); // msg_control
            put(&mut b, msg_at + 40, cmsg_len); // msg_controllen
            put(&mut b, iov_at, buf_at); // iov_base
            put(&mut b, iov_at + 8, 1); // iov_len
            mem.write_all_at(&b, scratch)
                .map_err(|e| Error::io("writing into the clone's scratch page", e))?;
            if self.syscall(SYS_RECVMSG, [sfd, msg_at, 0, 0, 0, 0])? != 1 {
                return Ok(None);
            }
            let mut c = [0u8; 20];
            mem.read_exact_at(&mut c, cmsg_at)
                .map_err(|e| Error::io("reading the clone's scratch page", e))?;
            // struct cmsghdr { u64 len; i32 level; i32 type; } then the fd.
            let level = i32::from_le_bytes(c[8..12].try_into().unwrap());
            let ty = i32::from_le_bytes(c[12..16].try_into().unwrap());
            if level != libc::SOL_SOCKET || ty != libc::SCM_RIGHTS {
                return Ok(None);
            }
            Ok(Some(
                i32::from_le_bytes(c[16..20].try_into().unwrap()) as u64
            ))
        })();
        let _ = self.syscall(SYS_CLOSE, [sfd, 0, 0, 0, 0, 0]);
        result
    }

    /// The clone's rseq area as the snapshot holds it, if it has one: the kernel rewrites
    /// it in the clone at every injected syscall (see [`RseqArea`]).
    pub(crate) fn rseq(&self) -> Option<&RseqArea> {
        self.rseq.as_ref()
    }

    /// Makes the clone write `len` bytes of its memory at `addr` to the core at `offset`;
    /// returns how many it wrote (short at an unreadable page).
    pub fn pwrite(&self, addr: u64, len: u64, offset: u64) -> Result<u64> {
        let r = self.syscall(SYS_PWRITE64, [self.fd, addr, len, offset, 0, 0])?;
        if r < 0 {
            return Err(Error::io(
                "the clone writing its memory",
                std::io::Error::from_raw_os_error((-r) as i32),
            ));
        }
        Ok(r as u64)
    }
}

struct CloseOnDrop(libc::c_int);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // SAFETY: `CloseOnDrop` is only built right after a successful socket()/accept4() with the
        // descriptor it then owns alone; drop runs once.
        unsafe { libc::close(self.0) };
    }
}

fn send_fd(sock: libc::c_int, fd: libc::c_int) -> bool {
    // SAFETY: `msg` (zeroed: null pointers and zero lengths are valid) points to `iov`/`byte` and
    // `cbuf`, all live locals for the sendmsg; `cbuf` (64 bytes) holds CMSG_SPACE(4) = 24, so the
    // header from CMSG_FIRSTHDR (non-null, as msg_controllen >= its size) and its 4 data bytes lie
    // inside it; `cbuf` is a u64 array, so the header is 8-aligned as `cmsghdr` needs.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::copy_nonoverlapping(&fd as *const _ as *const u8, libc::CMSG_DATA(c), 4);
        libc::sendmsg(sock, &msg, 0) == 1
    }
}
