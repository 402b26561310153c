//! Creating the core file safely: an unnamed file (`O_TMPFILE`) in the target directory,
//! mode 0600, linked to its final name only once complete. Never through a symlink, never
//! over an existing file unless asked. A dump that fails leaves nothing at the path.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

/// A core file being written.
#[derive(Debug)]
pub struct OutputFile {
    file: File,
    path: PathBuf,
    overwrite: bool,
    /// The visible temporary name, when the filesystem has no `O_TMPFILE`.
    temp: Option<PathBuf>,
    committed: bool,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn out_err(what: &'static str, path: &Path, e: io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(libc::ENOENT) => "; the directory does not exist: create it or choose another path",
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            "; the directory is not writable by this user: choose another path"
        }
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            "; the filesystem is full: free space or choose another path"
        }
        Some(libc::EEXIST) => "; it exists: allow overwriting it, or choose another path",
        Some(libc::ENAMETOOLONG) => "; choose a shorter path",
        _ => "",
    };
    Error::Output {
        what,
        path: path.to_path_buf(),
        source: e,
        hint: hint.to_string(),
    }
}

/// The longest file name the filesystem holding `dir` accepts (`f_namemax`), 255 if unknown.
fn name_max(dir: &Path) -> u64 {
    let c = cstr(dir);
    // SAFETY: statvfs is a plain C struct of integers, valid when zeroed.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs the call fills.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r == 0 && st.f_namemax > 0 {
        st.f_namemax
    } else {
        255
    }
}

fn invalid(what: &'static str, path: &Path, errno: i32, hint: String) -> Error {
    Error::Output {
        what,
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(errno),
        hint,
    }
}

/// Everything about the path that can be checked before the target is touched, beyond what
/// creating the unnamed file checks (an `O_TMPFILE` file has no name yet, so a name the
/// filesystem would refuse only shows when the finished core is linked to it).
fn check_path(path: &Path, dir: &Path) -> Result<()> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(invalid(
            "cannot use the (empty) output path",
            path,
            libc::ENOENT,
            "; give a file name".into(),
        ));
    }
    if bytes.contains(&0) {
        return Err(invalid(
            "cannot use the output path",
            path,
            libc::EINVAL,
            "; it contains a NUL byte: choose another path".into(),
        ));
    }
    let name = match path.file_name() {
        Some(n) if !bytes.ends_with(b"/") => n,
        _ => {
            return Err(invalid(
                "cannot use the output path",
                path,
                libc::EISDIR,
                "; it names a directory, not a file: add a file name to -o".into(),
            ))
        }
    };
    // PATH_MAX counts the terminating NUL.
    if bytes.len() >= libc::PATH_MAX as usize {
        return Err(invalid(
            "cannot use the output path",
            path,
            libc::ENAMETOOLONG,
            format!(
                " ({} bytes, more than the {} a path may have): choose a shorter path",
                bytes.len(),
                libc::PATH_MAX - 1
            ),
        ));
    }
    // Directory components: the kernel's own answer, before anything is stopped.
    if let Err(e) = std::fs::metadata(dir) {
        if e.raw_os_error() == Some(libc::ENAMETOOLONG) {
            return Err(out_err("cannot use output directory", dir, e));
        }
    }
    let max = name_max(dir);
    if name.len() as u64 > max {
        return Err(invalid(
            "cannot use the output path",
            path,
            libc::ENAMETOOLONG,
            format!(
                " (its file name is {} bytes, more than the {max} this filesystem allows): choose a shorter path",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Only a regular file is ever replaced: not a FIFO, a device node, a socket.
fn not_regular(path: &Path, m: &std::fs::Metadata) -> Error {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    let kind = if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    invalid(
        "refusing to replace",
        path,
        libc::EEXIST,
        format!(
            "; it is {kind}, and coreflect creates or replaces only regular files: choose another path"
        ),
    )
}

impl OutputFile {
    /// Creates the (still unnamed) output for `path`, checking up front that it can be
    /// committed there.
    pub fn create(path: &Path, overwrite: bool) -> Result<OutputFile> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        check_path(path, &dir)?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Output {
                    what: "refusing to write through the symbolic link",
                    path: path.to_path_buf(),
                    source: io::Error::from_raw_os_error(libc::ELOOP),
                    hint: "; coreflect never follows or replaces a symlink at the output path: remove it or choose another path".into(),
                })
            }
            Ok(m) if m.is_dir() => {
                return Err(out_err(
                    "output path is a directory",
                    path,
                    io::Error::from_raw_os_error(libc::EISDIR),
                ))
            }
            Ok(m) if !m.is_file() => return Err(not_regular(path, &m)),
            Ok(_) if !overwrite => {
                return Err(out_err(
                    "output file already exists",
                    path,
                    io::Error::from_raw_os_error(libc::EEXIST),
                ))
            }
            _ => {}
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(out_err(
                    "output directory is not a directory",
                    &dir,
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                ))
            }
            Err(e) => return Err(out_err("cannot use output directory", &dir, e)),
        }
        let cdir = cstr(&dir);
        // SAFETY: `cdir` is a NUL-terminated C string alive for the call; open takes no other
        // pointer.
        let fd = unsafe {
            libc::open(
                cdir.as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by open (>= 0) and is owned by nothing else: the File
            // takes sole ownership.
            let file = unsafe { File::from_raw_fd(fd) };
            return Ok(OutputFile {
                file,
                path: path.to_path_buf(),
                overwrite,
                temp: None,
                committed: false,
            });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL) => {}
            _ => return Err(out_err("cannot create a file in", &dir, e)),
        }
        // No O_TMPFILE here: a hidden temporary name, renamed at the end (a short one when
        // the name itself is near the filesystem's limit).
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut temp = dir.join(format!(".{name}.coreflect-{}.tmp", std::process::id()));
        if temp.file_name().map_or(0, |n| n.len() as u64) > name_max(&dir)
            || temp.as_os_str().len() >= libc::PATH_MAX as usize
        {
            temp = dir.join(format!(".coreflect-{}.tmp", std::process::id()));
        }
        let ct = cstr(&temp);
        // SAFETY: `ct` is a NUL-terminated C string alive for the call; open takes no other
        // pointer.
        let fd = unsafe {
            libc::open(
                ct.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(out_err("cannot create", &temp, io::Error::last_os_error()));
        }
        Ok(OutputFile {
            // SAFETY: `fd` was just returned by open (>= 0, checked above) and is owned by nothing
            // else: the File takes sole ownership.
            file: unsafe { File::from_raw_fd(fd) },
            path: path.to_path_buf(),
            overwrite,
            temp: Some(temp),
            committed: false,
        })
    }

    /// The file to write into.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the complete file its name. Without `overwrite`, fails if the name was taken
    /// meanwhile; with it, atomically replaces the old file (a symlink is never followed).
    pub fn commit(mut self) -> Result<PathBuf> {
        let cpath = cstr(&self.path);
        if self.overwrite {
            // Something else may have appeared at the path since `create`: still only a
            // regular file (or nothing) is replaced.
            match std::fs::symlink_metadata(&self.path) {
                Ok(m) if m.file_type().is_symlink() || m.is_file() => {}
                Ok(m) => return Err(not_regular(&self.path, &m)),
                Err(_) => {}
            }
        }
        if let Some(temp) = self.temp.clone() {
            let ct = cstr(&temp);
            let flags = if self.overwrite {
                0
            } else {
                libc::RENAME_NOREPLACE
            };
            // SAFETY: `ct` and `cpath` are NUL-terminated C strings alive for the call.
            let mut r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    ct.as_ptr(),
                    libc::AT_FDCWD,
                    cpath.as_ptr(),
                    flags,
                )
            };
            if r != 0
                && !self.overwrite
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
            {
                // No RENAME_NOREPLACE here (FUSE, NFS): link() fails atomically on an
                // existing name, then the temporary name goes.
                // SAFETY: `ct` and `cpath` are NUL-terminated C strings alive for the call.
                r = unsafe { libc::link(ct.as_ptr(), cpath.as_ptr()) };
                if r == 0 {
                    // SAFETY: `ct` is a NUL-terminated C string alive for the call.
                    unsafe { libc::unlink(ct.as_ptr()) };
                }
            }
            if r != 0 {
                return Err(out_err(
                    "cannot name the core",
                    &self.path,
                    io::Error::last_os_error(),
                ));
            }
            self.committed = true;
            return Ok(self.path.clone());
        }
        let fdpath = CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd())).unwrap();
        // SAFETY: `fdpath` and `to` are NUL-terminated C strings that outlive every call of the
        // closure.
        let link = |to: &CString| unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                fdpath.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if link(&cpath) == 0 {
            self.committed = true;
            return Ok(self.path.clone());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) || !self.overwrite {
            return Err(out_err("cannot name the core", &self.path, e));
        }
        // Replace: link under a temporary name, then rename over (atomic; replaces a
        // symlink itself rather than writing through it).
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let temp = dir.join(format!(
            ".coreflect-{}-{}.tmp",
            std::process::id(),
            self.file.as_raw_fd()
        ));
        let ct = cstr(&temp);
        if link(&ct) != 0 {
            return Err(out_err(
                "cannot name the core",
                &temp,
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `ct` and `cpath` are NUL-terminated C strings alive for the call.
        if unsafe { libc::rename(ct.as_ptr(), cpath.as_ptr()) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: `ct` is a NUL-terminated C string alive for the call.
            unsafe { libc::unlink(ct.as_ptr()) };
            return Err(out_err("cannot name the core", &self.path, e));
        }
        self.committed = true;
        Ok(self.path.clone())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.committed {
            if let Some(t) = &self.temp {
                let _ = std::fs::remove_file(t);
            }
        }
    }
}

/// A command name made safe for a file name: ASCII letters, digits and `_` kept, `-` and
/// `.` kept except first (no option-like or hidden name), anything else `_`; `process` if
/// empty.
pub fn file_safe_comm(comm: &str) -> String {
    let safe: String = comm
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_ascii_alphanumeric() || c == '_' || (i > 0 && "-.".contains(c)) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() {
        "process".into()
    } else {
        safe
    }
}

/// `time` (seconds since the epoch) in local time as `yymmdd_HHMMSS`.
pub fn local_stamp(time: i64) -> String {
    let t = time as libc::time_t;
    // SAFETY: `libc::tm` is integers and a `*const c_char` (tm_zone): all-zero bytes are a valid
    // value (a null pointer); localtime_r fills it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes one `tm` to `tm`, both live locals; it is the
    // reentrant variant (no shared static buffer).
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:02}{:02}{:02}_{:02}{:02}{:02}",
        tm.tm_year % 100,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Now, in seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The default file name: `<comm>_<yymmdd_HHMMSS>.<pid>.core` (local time, the name made
/// safe by [`file_safe_comm`]).
pub fn default_name(comm: &str, pid: i32) -> String {
    format!(
        "{}_{}.{}.core",
        file_safe_comm(comm),
        local_stamp(now_secs()),
        pid
    )
}
