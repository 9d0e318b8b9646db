//! Startup checks. Each failure says what is wrong and what to do about it, because the operator
//! meets these before anything else works.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// glommio refuses to start an executor below this RLIMIT_MEMLOCK (its own check).
pub const MEMLOCK_MIN_BYTES: u64 = 512 << 10;
/// The smallest `io_memory` glommio uses, whatever it is asked for.
pub const IO_MEMORY_MIN_BYTES: usize = 64 << 10;
/// `statfs` magic numbers of memory filesystems that have no O_DIRECT.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

const META_FILE: &str = "META";
const META_MAGIC: &str = "shardlog-meta 1";
const LOCK_FILE: &str = "LOCK";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    IoUring(String),
    #[error("{0}")]
    MemLock(String),
    #[error(
        "data directory {dir} is on {fs}, which does not support O_DIRECT; shardlog writes with \
         direct I/O to know when data is on stable storage. Use a directory on a disk filesystem \
         such as ext4 or xfs, e.g. --data-dir /var/lib/shardlog"
    )]
    NoDirectIo { dir: PathBuf, fs: String },
    #[error(
        "data directory {dir} is in use by another shardlogd{owner}: stop it first, or pass a \
         different --data-dir"
    )]
    Locked { dir: PathBuf, owner: String },
    #[error(
        "data directory {dir} was created with {existing} shards, but {requested} were asked for. \
         Each stream lives on shard_for(stream, shard_count), so a different count would send a \
         stream's new records to a different shard than its old ones. Start with --shards \
         {existing}, or use a new --data-dir"
    )]
    ShardCountChanged {
        dir: PathBuf,
        existing: u16,
        requested: u16,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a shardlog META file ({reason}); move it away if the directory is not shardlog's")]
    BadMeta { path: PathBuf, reason: String },
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StartupError + 'a {
    move |source| StartupError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

// ---------------------------------------------------------------- io_uring

/// Reads `kernel.io_uring_disabled` (0 allowed, 1 only for privileged users or
/// `kernel.io_uring_group`, 2 disabled); `None` on kernels without the sysctl.
pub fn io_uring_disabled_sysctl() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The message for an io_uring that cannot be set up.
pub fn io_uring_unavailable_message(errno: Option<i32>, sysctl: Option<u8>) -> String {
    let why = match errno {
        Some(libc::ENOSYS) => {
            return "io_uring is not available: this kernel lacks it (ENOSYS). shardlog needs \
                    Linux 5.19 or newer built with CONFIG_IO_URING=y"
                .to_string()
        }
        Some(libc::EPERM) | Some(libc::EACCES) => "io_uring is disabled for this process (EPERM)",
        Some(libc::ENOMEM) => {
            return "io_uring setup failed with ENOMEM: RLIMIT_MEMLOCK is probably too low; raise it \
                    with `ulimit -l 65536` or LimitMEMLOCK=64M in the systemd unit"
                .to_string()
        }
        Some(_) | None => "io_uring setup failed",
    };
    let detail = match errno {
        Some(e) => format!(" ({})", std::io::Error::from_raw_os_error(e)),
        None => String::new(),
    };
    let hint = match sysctl {
        Some(2) => "kernel.io_uring_disabled is 2: run `sysctl -w kernel.io_uring_disabled=0`",
        Some(1) => {
            "kernel.io_uring_disabled is 1, which allows only privileged users or members of \
             kernel.io_uring_group: run `sysctl -w kernel.io_uring_disabled=0` or add this user to that group"
        }
        _ => {
            "check `sysctl kernel.io_uring_disabled` (set it with `sysctl -w kernel.io_uring_disabled=0`) \
             and any seccomp profile (containers often block io_uring_setup)"
        }
    };
    format!("{why}{detail}; {hint}")
}

/// Sets up and drops a tiny ring, so a disabled io_uring is reported clearly instead of as an
/// executor failure deep inside glommio.
pub fn check_io_uring() -> Result<(), StartupError> {
    match io_uring::IoUring::new(2) {
        Ok(_) => Ok(()),
        Err(e) => Err(StartupError::IoUring(io_uring_unavailable_message(
            e.raw_os_error(),
            io_uring_disabled_sysctl(),
        ))),
    }
}

// ---------------------------------------------------------------- memlock

/// The soft RLIMIT_MEMLOCK in bytes; `None` if unlimited.
pub fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(lim.rlim_cur)
}

pub fn memlock_too_low_message(limit: u64) -> String {
    format!(
        "RLIMIT_MEMLOCK is {} KiB, below the {} KiB that io_uring (glommio) needs to start. Raise it: \
         `ulimit -l 65536` in the shell that starts shardlogd, LimitMEMLOCK=64M in its systemd unit, or \
         a `memlock` line in /etc/security/limits.conf",
        limit >> 10,
        MEMLOCK_MIN_BYTES >> 10
    )
}

/// Chooses each executor's glommio `io_memory` so that all of them fit under RLIMIT_MEMLOCK:
/// glommio registers it on each of its three rings, so it counts three times per executor.
///
/// Returns the size and whether it had to be cut below `wanted`.
pub fn io_memory_for(limit: Option<u64>, executors: usize, wanted: usize) -> Result<(usize, bool), StartupError> {
    assert!(executors > 0);
    let Some(limit) = limit else {
        return Ok((wanted, false));
    };
    if limit < MEMLOCK_MIN_BYTES {
        return Err(StartupError::MemLock(memlock_too_low_message(limit)));
    }
    // Keep a quarter for private rings and anything else that locks memory.
    let share = (limit - limit / 4) / (3 * executors as u64);
    let fit = (share as usize & !4095).max(IO_MEMORY_MIN_BYTES);
    if fit >= wanted {
        Ok((wanted, false))
    } else {
        Ok((fit, true))
    }
}

// ---------------------------------------------------------------- data dir

/// Refuses filesystems without O_DIRECT, naming tmpfs when that is the cause.
pub fn check_direct_io(dir: &Path) -> Result<(), StartupError> {
    let fs = filesystem_kind(dir);
    if let Some(fs) = &fs {
        if fs == "tmpfs" || fs == "ramfs" {
            return Err(StartupError::NoDirectIo {
                dir: dir.to_path_buf(),
                fs: fs.clone(),
            });
        }
    }
    let probe = dir.join(".direct-io-probe");
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    match opened {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(StartupError::NoDirectIo {
            dir: dir.to_path_buf(),
            fs: fs.unwrap_or_else(|| "a filesystem".to_string()),
        }),
        Err(e) => Err(io_err(&probe, "cannot create a file in the data directory")(e)),
    }
}

fn filesystem_kind(dir: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills `st` for a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    Some(match magic {
        TMPFS_MAGIC => "tmpfs".to_string(),
        RAMFS_MAGIC => "ramfs".to_string(),
        other => format!("filesystem 0x{other:x}"),
    })
}

/// Holds `<data-dir>/LOCK` locked for the life of the process.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes an exclusive `flock` on `<data-dir>/LOCK` and writes our pid into it.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, StartupError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path, "cannot open the lock file"))?;
    // SAFETY: flock on an open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let owner = if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            return Err(StartupError::Locked {
                dir: dir.to_path_buf(),
                owner,
            });
        }
        return Err(io_err(&path, "cannot lock the data directory")(e));
    }
    // The pid is only for the message above; the lock itself is the flock.
    file.set_len(0)
        .map_err(io_err(&path, "cannot truncate the lock file"))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_err(&path, "cannot seek the lock file"))?;
    writeln!(file, "{}", std::process::id()).map_err(io_err(&path, "cannot write the lock file"))?;
    Ok(DirLock { _file: file })
}

/// Reads the shard count recorded in `<data-dir>/META`, if the file exists.
pub fn read_meta(dir: &Path) -> Result<Option<u16>, StartupError> {
    let path = dir.join(META_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "cannot read")(e)),
    };
    let bad = |reason: &str| StartupError::BadMeta {
        path: path.clone(),
        reason: reason.to_string(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(META_MAGIC) {
        return Err(bad("unknown first line"));
    }
    for line in lines {
        if let Some(n) = line.strip_prefix("shards ") {
            let n: u16 = n.trim().parse().map_err(|_| bad("bad shard count"))?;
            if n == 0 {
                return Err(bad("zero shards"));
            }
            return Ok(Some(n));
        }
    }
    Err(bad("no shard count"))
}

/// Writes `<data-dir>/META` durably: temp file, fsync, rename, fsync the directory. A crash
/// leaves either no META (the next start writes it again) or a complete one.
pub fn write_meta(dir: &Path, shards: u16) -> Result<(), StartupError> {
    assert!(shards > 0);
    let tmp = dir.join("META.tmp");
    let path = dir.join(META_FILE);
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp, "cannot create"))?;
        write!(f, "{META_MAGIC}\nshards {shards}\n").map_err(io_err(&tmp, "cannot write"))?;
        f.sync_all().map_err(io_err(&tmp, "cannot fsync"))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path, "cannot rename META.tmp to"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "cannot fsync the data directory"))
}

/// Decides the shard count: the directory's when it has one (refusing a different explicit
/// count), else the requested or planned default, which is then recorded.
pub fn settle_shard_count(dir: &Path, requested: Option<u16>, default: u16) -> Result<u16, StartupError> {
    match (read_meta(dir)?, requested) {
        (Some(existing), Some(requested)) if existing != requested => Err(StartupError::ShardCountChanged {
            dir: dir.to_path_buf(),
            existing,
            requested,
        }),
        (Some(existing), _) => Ok(existing),
        (None, requested) => {
            let n = requested.unwrap_or(default);
            write_meta(dir, n)?;
            Ok(n)
        }
    }
}

/// The directory of one shard.
pub fn shard_dir(data_dir: &Path, shard: u16) -> PathBuf {
    data_dir.join(format!("shard-{shard:03}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_memory_shrinks_to_fit_the_limit() {
        let (m, cut) = io_memory_for(Some(8 << 20), 5, 2 << 20).unwrap();
        assert!(cut);
        assert!(3 * 5 * m as u64 <= 8 << 20);
        assert_eq!(io_memory_for(None, 5, 2 << 20).unwrap(), (2 << 20, false));
        assert_eq!(io_memory_for(Some(1 << 30), 5, 2 << 20).unwrap(), (2 << 20, false));
        let err = io_memory_for(Some(256 << 10), 2, 2 << 20).unwrap_err().to_string();
        assert!(err.contains("ulimit -l"), "{err}");
        assert!(err.contains("LimitMEMLOCK"), "{err}");
    }

    #[test]
    fn io_uring_messages_name_the_fix() {
        let m = io_uring_unavailable_message(Some(libc::EPERM), Some(2));
        assert!(m.contains("sysctl -w kernel.io_uring_disabled=0"), "{m}");
        let m = io_uring_unavailable_message(Some(libc::EPERM), None);
        assert!(m.contains("sysctl -w kernel.io_uring_disabled=0"), "{m}");
        let m = io_uring_unavailable_message(Some(libc::ENOSYS), None);
        assert!(m.contains("kernel"), "{m}");
    }
}
