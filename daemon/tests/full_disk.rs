//! A full disk: the daemon runs on a small loop-mounted ext4 image, the disk is filled, appends
//! get a clear `NoSpace` error (never a false ack, never a poisoned shard), acknowledged data
//! stays readable, and appends resume once space is freed.
//!
//! Needs root, `mkfs.ext4` and loop devices; where that is impossible the test prints why and
//! passes without running (the shard-level `no_space` tests still cover the engine's logic).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, DaemonOpts};
use proto::client::{Client, ReadParams};
use proto::wire::{AckLevel, ErrorCode};
use proto::ClientError;

const IMAGE_BYTES: u64 = 64 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;
const RECORD_BYTES: usize = 4000;
/// Bound on how long appends may keep failing after space is freed (the shard retries preparing
/// a segment every 200 ms). Only a guard against hanging forever.
const RESUME_GUARD: Duration = Duration::from_secs(60);

/// A loop-mounted ext4 image, unmounted and deleted on drop.
struct LoopMount {
    image: PathBuf,
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

impl LoopMount {
    fn new() -> Result<LoopMount, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let dir = common::data_dir();
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(IMAGE_BYTES).map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image))?;
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount))?;
        Ok(LoopMount {
            image,
            mount,
            _dir: dir,
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if run(Command::new("umount").arg(&self.mount)).is_err() {
            // Still busy (a daemon that has not quite exited): detach lazily.
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount));
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

fn opts() -> DaemonOpts {
    DaemonOpts {
        args: vec![
            "--pin".into(),
            "none".into(),
            "--shards".into(),
            "1".into(),
            "--segment-bytes".into(),
            SEGMENT_BYTES.to_string(),
        ],
        envs: Vec::new(),
    }
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = format!("full-disk-{i}-").into_bytes();
    p.resize(RECORD_BYTES, (i % 251) as u8);
    p
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 256 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // The last blocks may only run out at writeback.
    let _ = f.sync_all();
    written
}

fn check_acked(c: &mut Client, acked: &[u64]) {
    let mut from = 1;
    let mut seen = Vec::new();
    loop {
        let batch = c.read(ReadParams::new(0, from)).expect("read");
        let records = batch.records.unwrap_or_default();
        if records.is_empty() {
            break;
        }
        for r in records {
            seen.push((r.lsn, r.payload.unwrap_or_default()));
        }
        from = batch.next_lsn;
    }
    for (i, &lsn) in acked.iter().enumerate() {
        let found = seen.iter().find(|(l, _)| *l == lsn).map(|(_, p)| p);
        assert_eq!(found, Some(&payload(i as u64)), "acked record {i} at lsn {lsn}");
    }
}

#[test]
fn full_disk_gives_no_space_keeps_acked_data_and_recovers() {
    let disk = match LoopMount::new() {
        Ok(d) => d,
        Err(why) => {
            println!(
                "SKIP full_disk_gives_no_space_keeps_acked_data_and_recovers: cannot loop-mount an ext4 image ({why})"
            );
            return;
        }
    };
    let data = disk.mount.join("data");
    let d = Daemon::start(&data, &opts());
    let mut c = d.client();
    let mut acked: Vec<u64> = Vec::new();
    let append = |c: &mut Client, acked: &mut Vec<u64>| -> Result<(), ClientError> {
        let i = acked.len() as u64;
        let a = c.append(1, &payload(i), AckLevel::Durable)?.expect("Appended");
        acked.push(a.first_lsn);
        Ok(())
    };
    for _ in 0..100 {
        append(&mut c, &mut acked).expect("append before the disk is full");
    }
    let filler = disk.mount.join("filler");
    let filled = fill(&filler);
    println!("filler took {} MiB", filled >> 20);

    // Append until the shard runs out of prepared space.
    let mut no_space = None;
    for _ in 0..20_000 {
        match append(&mut c, &mut acked) {
            Ok(()) => {}
            Err(e) => {
                no_space = Some(e);
                break;
            }
        }
    }
    let e = no_space.expect("appends eventually fail on a full disk");
    assert_eq!(
        e.server_code(),
        Some(ErrorCode::NoSpace),
        "a clear NoSpace error, got {e}"
    );
    println!("NoSpace after {} acked records: {e}", acked.len());
    // Still NoSpace, not poisoned, and every acked record is intact.
    let again = append(&mut c, &mut acked).expect_err("still full");
    assert_eq!(again.server_code(), Some(ErrorCode::NoSpace), "{again}");
    check_acked(&mut c, &acked);
    let stats = c.stats().expect("stats");
    for shard in stats.shards.unwrap_or_default() {
        assert_eq!(
            shard.poisoned, None,
            "a full disk must not poison shard {}",
            shard.shard
        );
    }

    // Free the space: appends resume.
    std::fs::remove_file(&filler).expect("remove filler");
    let started = std::time::Instant::now();
    loop {
        match append(&mut c, &mut acked) {
            Ok(()) => break,
            Err(e) if e.server_code() == Some(ErrorCode::NoSpace) => {
                assert!(
                    started.elapsed() < RESUME_GUARD,
                    "appends did not resume after freeing space"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("after freeing space: {e}"),
        }
    }
    for _ in 0..300 {
        append(&mut c, &mut acked).expect("appends after space was freed");
    }
    check_acked(&mut c, &acked);

    // And a restart recovers all of it.
    drop(c);
    let status = d.terminate();
    assert!(status.success(), "clean shutdown: {status:?}");
    let d = Daemon::start(&data, &opts());
    let mut c = d.client();
    check_acked(&mut c, &acked);
    println!(
        "{} acked records intact after NoSpace, freeing space and a restart",
        acked.len()
    );
    drop(c);
    d.kill();
}
