//! The warden: the dump runs in a child process of its own process group, so that killing
//! `coreflect` — even with SIGKILL, even its whole process group — never interrupts the
//! millisecond window in which a target thread runs an injected syscall. The child sees
//! its parent die (`PR_SET_PDEATHSIG`), treats it as a cancel at the next safe point:
//! releases the target, kills and reaps the clone, and leaves no file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Runs `work` in the warden and returns its exit code. `work` gets the cancel flag, set
/// by SIGINT/SIGTERM/SIGHUP or by the death of this process. If the warden cannot be
/// forked, `work` runs here.
pub fn run_guarded(work: impl FnOnce(Arc<AtomicBool>) -> i32) -> i32 {
    let parent = std::process::id();
    // SAFETY: fork is sound here because the process is single-threaded at this point (the CLI
    // starts no thread before the warden; `cancel_flag` only registers signal handlers), so the
    // child, which goes on to run ordinary Rust, inherits no lock held by another thread.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return work(crate::cancel_flag());
    }
    if child == 0 {
        // SAFETY: setpgid(0, 0) and signal(SIGTTOU, SIG_IGN) take no pointers; SIG_IGN installs no
        // handler code.
        unsafe {
            libc::setpgid(0, 0);
            // A background process group writing to a terminal with `stty tostop` would be
            // stopped by SIGTTOU, clone alive: write anyway.
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        }
        let cancel = crate::cancel_flag();
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number, no pointers.
        unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
        }
        if std::os::unix::process::parent_id() != parent {
            cancel.store(true, Ordering::SeqCst);
        }
        let code = work(cancel);
        std::process::exit(code);
    }
    // The parent: forward cancellation, relay the exit code.
    let cancel = crate::cancel_flag();
    let mut forwarded = false;
    let started = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int to `status`, a live local.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                eprintln!(
                    "coreflect: error: the dump process was killed by signal {}",
                    libc::WTERMSIG(status)
                );
                return 128 + libc::WTERMSIG(status);
            }
            continue;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
        if !forwarded && cancel.load(Ordering::SeqCst) {
            // SAFETY: kill takes no pointers; `child` is our child, not yet reaped (we only reap it
            // above, then return), so its pid names no other process.
            unsafe { libc::kill(child, libc::SIGTERM) };
            forwarded = true;
        }
        // Short naps while a dump is likely to end soon; a long-lived warden (`watch`)
        // must cost next to nothing.
        let nap = if started.elapsed() < Duration::from_secs(2) {
            5
        } else {
            50
        };
        std::thread::sleep(Duration::from_millis(nap));
    }
}
