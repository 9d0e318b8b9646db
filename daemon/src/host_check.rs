//! `shardlogd check --data-dir DIR`: is this host fit to run shardlogd on that directory?
//!
//! Each check gives a verdict (`ok`, `warn`, `fail`), what it found, and, when it is not `ok`,
//! what to do. `fail` means shardlogd cannot run or cannot keep its promises there (the daemon
//! refuses to start on the same conditions); `warn` means it runs but slower or with a risk the
//! operator should know about. The command exits 1 when anything fails, 0 otherwise.
//!
//! The measured checks write a preallocated, zero-filled 64 MiB file in the directory with
//! O_DIRECT (the way segments are written) and delete it afterwards: a 4 KiB write + fdatasync
//! latency and a 1 MiB write + fdatasync bandwidth, as in docs/BENCHMARKS.md's fio baselines.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::checks;
use crate::config::CheckArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub check: &'static str,
    pub verdict: Verdict,
    pub found: String,
    /// What to do; empty when the verdict is `ok`.
    pub action: String,
}

fn ok(check: &'static str, found: impl Into<String>) -> Finding {
    Finding {
        check,
        verdict: Verdict::Ok,
        found: found.into(),
        action: String::new(),
    }
}

fn not_ok(check: &'static str, verdict: Verdict, found: impl Into<String>, action: impl Into<String>) -> Finding {
    Finding {
        check,
        verdict,
        found: found.into(),
        action: action.into(),
    }
}

/// Bytes of the file the measured checks write.
const PROBE_FILE_BYTES: u64 = 64 << 20;
/// 4 KiB commits measured.
const LATENCY_COMMITS: usize = 500;
/// Above this p50 a durable commit is slow for a log built to ack at device speed.
const COMMIT_P50_WARN: Duration = Duration::from_millis(2);
/// Below this a data directory fills before long (a few default segments).
const FREE_BYTES_FAIL: u64 = 256 << 20;
const FREE_BYTES_WARN: u64 = 4 << 30;

pub fn run(args: &CheckArgs) -> ExitCode {
    let findings = check_all(&args.data_dir, !args.no_measure);
    if args.json {
        println!("{}", to_json(&args.data_dir, &findings));
    } else {
        print!("{}", to_table(&args.data_dir, &findings));
    }
    if findings.iter().any(|f| f.verdict == Verdict::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs every check; the measured ones only when `measure` and the directory takes O_DIRECT.
pub fn check_all(dir: &Path, measure: bool) -> Vec<Finding> {
    let mut out = vec![check_io_uring(), check_memlock()];
    if let Err(e) = std::fs::create_dir_all(dir) {
        out.push(not_ok(
            "data directory",
            Verdict::Fail,
            format!("cannot create {}: {e}", dir.display()),
            "create it, or pass a writable --data-dir",
        ));
        return out;
    }
    let direct = checks::check_direct_io(dir);
    out.push(match &direct {
        Ok(()) => ok("O_DIRECT", format!("{} accepts direct I/O", dir.display())),
        Err(e) => not_ok(
            "O_DIRECT",
            Verdict::Fail,
            e.to_string(),
            "use a directory on ext4 or xfs",
        ),
    });
    out.push(check_filesystem(dir));
    out.extend(check_device(dir));
    out.push(check_free_space(dir));
    if measure && direct.is_ok() {
        out.extend(measure_device(dir));
    }
    out
}

fn check_io_uring() -> Finding {
    match checks::check_io_uring() {
        Ok(()) => ok("io_uring", "a ring can be set up"),
        Err(e) => not_ok(
            "io_uring",
            Verdict::Fail,
            e.to_string(),
            "see the message: shardlogd needs io_uring",
        ),
    }
}

fn check_memlock() -> Finding {
    let executors = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = checks::memlock_limit();
    let shown = limit.map_or("unlimited".to_string(), |l| format!("{} KiB", l >> 10));
    match checks::io_memory_for(limit, executors, shards::IO_MEMORY_BYTES_DEFAULT) {
        Ok((_, false)) => ok(
            "memlock",
            format!("RLIMIT_MEMLOCK {shown}: enough for {executors} executors"),
        ),
        Ok((io_memory, true)) => not_ok(
            "memlock",
            Verdict::Warn,
            format!(
                "RLIMIT_MEMLOCK {shown}: {executors} executors get {} KiB of I/O memory each instead of {} KiB",
                io_memory >> 10,
                shards::IO_MEMORY_BYTES_DEFAULT >> 10
            ),
            "raise it: `ulimit -l 65536`, or LimitMEMLOCK=64M in the systemd unit",
        ),
        Err(e) => not_ok(
            "memlock",
            Verdict::Fail,
            e.to_string(),
            "raise RLIMIT_MEMLOCK as the message says",
        ),
    }
}

/// The file system holding `dir`, from `statfs`'s magic number.
fn filesystem_name(dir: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills `st` for a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(match st.f_type as i64 {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x6969 => "nfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        _ => "other",
    })
}

fn check_filesystem(dir: &Path) -> Finding {
    match filesystem_name(dir) {
        Some(fs @ ("ext4" | "xfs")) => ok("file system", format!("{fs}: tested with shardlog")),
        Some(fs @ ("tmpfs" | "nfs" | "overlayfs")) => not_ok(
            "file system",
            Verdict::Fail,
            format!("{fs}: no O_DIRECT, or an fdatasync that does not reach a disk"),
            "put the data directory on a local ext4 or xfs file system",
        ),
        Some(fs) => not_ok(
            "file system",
            Verdict::Warn,
            format!("{fs}: not tested with shardlog (its crash tests run on ext4 and xfs)"),
            "prefer ext4 or xfs on the NVMe device",
        ),
        None => not_ok(
            "file system",
            Verdict::Warn,
            "statfs failed",
            "check that the directory exists",
        ),
    }
}

/// The sysfs directory of the whole block device holding `dir` (a partition's parent).
fn block_device_sysfs(dir: &Path) -> Option<PathBuf> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if link.join("partition").exists() {
        link.parent().map(Path::to_path_buf)
    } else {
        Some(link)
    }
}

fn sysfs(dev: &Path, attr: &str) -> Option<String> {
    std::fs::read_to_string(dev.join(attr))
        .ok()
        .map(|s| s.trim().to_string())
}

fn check_device(dir: &Path) -> Vec<Finding> {
    let Some(dev) = block_device_sysfs(dir) else {
        return vec![not_ok(
            "device",
            Verdict::Warn,
            "no block device behind the directory (a network, overlay or memory file system?)",
            "put the data directory on a local NVMe device",
        )];
    };
    let name = dev
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut out = Vec::new();
    out.push(match sysfs(&dev, "queue/rotational").as_deref() {
        Some("0") => ok("rotational", format!("{name}: solid state")),
        Some("1") => not_ok(
            "rotational",
            Verdict::Warn,
            format!("{name}: a rotating disk; each fdatasync costs a seek"),
            "use an NVMe or SSD device for the data directory",
        ),
        _ => not_ok(
            "rotational",
            Verdict::Warn,
            format!("{name}: unknown"),
            "check the device",
        ),
    });
    out.push(match sysfs(&dev, "queue/write_cache").as_deref() {
        Some("write through") => ok("write cache", format!("{name}: write through (or power-loss protected)")),
        Some("write back") => ok(
            "write cache",
            format!("{name}: write back; fdatasync sends a flush, so acks stay durable (slower than a power-loss-protected device)"),
        ),
        other => not_ok(
            "write cache",
            Verdict::Warn,
            format!("{name}: unknown ({})", other.unwrap_or("missing")),
            "check that the device honours flushes",
        ),
    });
    if let Some(sched) = sysfs(&dev, "queue/scheduler") {
        let active = sched
            .split_whitespace()
            .find(|s| s.starts_with('['))
            .map(|s| s.trim_matches(['[', ']']).to_string())
            .unwrap_or(sched.clone());
        out.push(if active == "none" || active == "mq-deadline" {
            ok("scheduler", format!("{name}: {active}"))
        } else {
            not_ok(
                "scheduler",
                Verdict::Warn,
                format!("{name}: {active}, which adds latency to every commit"),
                format!("echo none > /sys/block/{name}/queue/scheduler (and persist it with a udev rule)"),
            )
        });
    }
    let logical = sysfs(&dev, "queue/logical_block_size").and_then(|s| s.parse::<u64>().ok());
    let physical = sysfs(&dev, "queue/physical_block_size").and_then(|s| s.parse::<u64>().ok());
    if let (Some(logical), Some(physical)) = (logical, physical) {
        out.push(if shards::format::BLOCK_BYTES % physical == 0 {
            ok(
                "block size",
                format!("{name}: logical {logical}, physical {physical}; shardlog writes 4 KiB blocks"),
            )
        } else {
            not_ok(
                "block size",
                Verdict::Fail,
                format!("{name}: physical block {physical} does not divide shardlog's 4 KiB block"),
                "reformat the namespace with a 4 KiB or 512 B LBA format",
            )
        });
    }
    out
}

fn check_free_space(dir: &Path) -> Finding {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return not_ok("free space", Verdict::Warn, "path has a NUL byte", "");
    };
    // SAFETY: statvfs fills `st` for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return not_ok("free space", Verdict::Warn, "statvfs failed", "check the directory");
    }
    #[allow(clippy::unnecessary_cast)]
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let found = format!("{} MiB available", free >> 20);
    if free < FREE_BYTES_FAIL {
        not_ok(
            "free space",
            Verdict::Fail,
            found,
            "free space or use another device; appends fail with NoSpace when it runs out",
        )
    } else if free < FREE_BYTES_WARN {
        not_ok(
            "free space",
            Verdict::Warn,
            found,
            "set --retention-bytes below the free space, or add space",
        )
    } else {
        ok("free space", found)
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT writes.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("a valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Writes a zero-filled probe file, then measures 4 KiB write + fdatasync latency and 1 MiB
/// write + fdatasync bandwidth on it, as the hot path does on a prepared segment.
fn measure_device(dir: &Path) -> Vec<Finding> {
    let path = dir.join(".shardlog-check.probe");
    let result = measure_on(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Ok((p50, p99, bandwidth)) => {
            let latency = format!(
                "4 KiB write + fdatasync: p50 {} us, p99 {} us",
                p50.as_micros(),
                p99.as_micros()
            );
            vec![
                if p50 <= COMMIT_P50_WARN {
                    ok("commit latency", latency)
                } else {
                    not_ok(
                        "commit latency",
                        Verdict::Warn,
                        latency,
                        "a durable ack waits for this: use a device with power-loss protection or a faster flush",
                    )
                },
                ok(
                    "bandwidth",
                    format!("1 MiB write + fdatasync: {} MB/s", bandwidth / 1_000_000),
                ),
            ]
        }
        Err(e) => vec![not_ok(
            "commit latency",
            Verdict::Fail,
            format!("cannot write {}: {e}", path.display()),
            "check permissions and free space in the data directory",
        )],
    }
}

fn measure_on(path: &Path) -> std::io::Result<(Duration, Duration, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let big = Aligned::new(1 << 20);
    // Zero-fill first: a growing or unwritten-extent file costs 2-3x on fdatasync.
    for i in 0..PROBE_FILE_BYTES >> 20 {
        file.write_all_at(big.as_slice(), i << 20)?;
    }
    file.sync_all()?;

    let small = Aligned::new(4096);
    let mut samples = Vec::with_capacity(LATENCY_COMMITS);
    for i in 0..LATENCY_COMMITS as u64 {
        let start = Instant::now();
        file.write_all_at(small.as_slice(), (i * 4096) % PROBE_FILE_BYTES)?;
        file.sync_data()?;
        samples.push(start.elapsed());
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];

    let start = Instant::now();
    for i in 0..PROBE_FILE_BYTES >> 20 {
        file.write_all_at(big.as_slice(), i << 20)?;
        file.sync_data()?;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok((p50, p99, (PROBE_FILE_BYTES as f64 / secs) as u64))
}

fn to_table(dir: &Path, findings: &[Finding]) -> String {
    let mut s = format!("shardlogd check: {}\n", dir.display());
    for f in findings {
        let _ = writeln!(s, "{:<5} {:<15} {}", f.verdict.as_str(), f.check, f.found);
        if !f.action.is_empty() {
            let _ = writeln!(s, "{:<21} -> {}", "", f.action);
        }
    }
    let worst = findings.iter().map(|f| f.verdict).max().unwrap_or(Verdict::Ok);
    let _ = writeln!(
        s,
        "{}",
        match worst {
            Verdict::Ok => "host is fit",
            Verdict::Warn => "host is fit, with warnings",
            Verdict::Fail => "host is NOT fit: fix the failed checks",
        }
    );
    s
}

fn to_json(dir: &Path, findings: &[Finding]) -> String {
    let checks: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "check": f.check,
                "verdict": f.verdict.as_str(),
                "found": f.found,
                "action": f.action,
            })
        })
        .collect();
    let fit = !findings.iter().any(|f| f.verdict == Verdict::Fail);
    serde_json::json!({ "data_dir": dir.display().to_string(), "fit": fit, "checks": checks }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_makes_the_host_unfit_and_names_an_action() {
        let findings = vec![
            ok("io_uring", "fine"),
            not_ok("free space", Verdict::Fail, "1 MiB available", "free space"),
        ];
        let table = to_table(Path::new("/d"), &findings);
        assert!(table.contains("host is NOT fit"), "{table}");
        assert!(table.contains("-> free space"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&to_json(Path::new("/d"), &findings)).unwrap();
        assert_eq!(json["fit"], false);
        assert_eq!(json["checks"][1]["verdict"], "fail");
    }

    #[test]
    fn tmpfs_is_refused() {
        let dir = Path::new("/dev/shm");
        if filesystem_name(dir) != Some("tmpfs") {
            eprintln!("skipped: /dev/shm is not tmpfs here");
            return;
        }
        let f = check_filesystem(dir);
        assert_eq!(f.verdict, Verdict::Fail, "{f:?}");
    }
}
