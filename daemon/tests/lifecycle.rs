//! Startup checks with their messages, and graceful shutdown.

mod common;

use std::collections::HashSet;
use std::process::Command;

use common::{data_dir, run_expecting_failure, Daemon, DaemonOpts};
use proto::client::ReadParams;
use proto::codec::AppendRecord;
use proto::wire::{AckLevel, ResponseBodyT};

#[test]
fn sigterm_answers_what_was_received_and_acked_records_survive_a_restart() {
    let dir = data_dir();
    let opts = DaemonOpts::shards(2);
    let d = Daemon::start(dir.path(), &opts);
    let mut c = d.client();
    let mut sent = Vec::new();
    for i in 0..3000u32 {
        let stream = u64::from(i % 13);
        let payload = i.to_le_bytes();
        // Once the server has stopped reading and closed, sending fails: that is expected.
        let Ok(id) = c.send_append(stream, &[AppendRecord::new(&payload)], AckLevel::Durable) else {
            break;
        };
        sent.push((id, stream, payload));
        if i == 1500 {
            d.signal(libc::SIGTERM);
        }
    }
    // Every request the server read is answered (Appended, or an error); then it closes.
    let mut acked = HashSet::new();
    while let Ok(r) = c.recv() {
        match r.body {
            ResponseBodyT::Appended(_) => {
                acked.insert(r.id);
            }
            ResponseBodyT::Error(e) => panic!("unexpected error {e:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The daemon reads a connection in order and answers everything it read, so the answered
    // requests are exactly the first ones sent.
    assert!(!acked.is_empty());
    let prefix: HashSet<u64> = sent.iter().take(acked.len()).map(|s| s.0).collect();
    let mut missing: Vec<_> = prefix.difference(&acked).copied().collect();
    missing.sort_unstable();
    let mut extra: Vec<_> = acked.difference(&prefix).copied().collect();
    extra.sort_unstable();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "answered requests are not a prefix of those sent ({} answered): unanswered {:?}, answered \
         beyond the prefix {:?}",
        acked.len(),
        &missing[..missing.len().min(10)],
        &extra[..extra.len().min(10)]
    );
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status:?}");

    let d = Daemon::start(dir.path(), &opts);
    let mut c = d.client();
    let mut present = HashSet::new();
    for shard in 0..2 {
        let mut from = 1;
        loop {
            let batch = c.read(ReadParams::new(shard, from)).unwrap();
            let records = batch.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            for r in records {
                present.insert((r.stream, r.payload.unwrap()));
            }
            from = batch.next_lsn;
        }
    }
    for (id, stream, payload) in &sent {
        if acked.contains(id) {
            assert!(
                present.contains(&(*stream, payload.to_vec())),
                "acked request {id} lost"
            );
        }
    }
}

#[test]
fn a_second_daemon_on_the_same_directory_is_refused() {
    let dir = data_dir();
    let opts = DaemonOpts::shards(1);
    let _first = Daemon::start(dir.path(), &opts);
    let (status, stderr) = run_expecting_failure(dir.path(), &opts, None);
    assert!(!status.success());
    assert!(stderr.contains("in use by another shardlogd"), "{stderr}");
    assert!(stderr.contains("pid"), "{stderr}");
}

#[test]
fn a_different_shard_count_is_refused_with_the_reason() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    drop(d);
    let (status, stderr) = run_expecting_failure(dir.path(), &DaemonOpts::shards(3), None);
    assert!(!status.success());
    assert!(stderr.contains("created with 2 shards"), "{stderr}");
    assert!(stderr.contains("--shards 2"), "{stderr}");
    // Without --shards, the directory's count is used.
    let opts = DaemonOpts {
        args: vec!["--pin".into(), "none".into()],
        envs: vec![],
    };
    let d = Daemon::start(dir.path(), &opts);
    assert_eq!(d.client().shard_count(), Some(2));
}

#[test]
fn tmpfs_data_dir_is_refused_with_a_suggestion() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = data_dir();
    let mnt = dir.path().join("tmpfs");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: could not mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let (status, stderr) = run_expecting_failure(&mnt.join("data"), &DaemonOpts::shards(1), None);
    assert!(!status.success());
    assert!(stderr.contains("tmpfs"), "{stderr}");
    assert!(stderr.contains("O_DIRECT"), "{stderr}");
    assert!(stderr.contains("ext4"), "{stderr}");
}

#[test]
fn a_tiny_memlock_limit_is_refused_naming_what_to_raise() {
    let dir = data_dir();
    let (status, stderr) = run_expecting_failure(
        dir.path(),
        &DaemonOpts::shards(1),
        Some(&["prlimit", "--memlock=262144:262144", "--"]),
    );
    assert!(!status.success());
    assert!(stderr.contains("RLIMIT_MEMLOCK"), "{stderr}");
    assert!(stderr.contains("ulimit -l"), "{stderr}");
    assert!(stderr.contains("LimitMEMLOCK"), "{stderr}");
}

#[test]
fn the_default_non_root_memlock_limit_still_starts() {
    let dir = data_dir();
    // 8 MiB, the usual default for non-root users, with five executors.
    let opts = DaemonOpts::shards(4);
    let d = Daemon::start_wrapped(dir.path(), &opts, &["prlimit", "--memlock=8388608:8388608", "--"]);
    let mut c = d.client();
    c.append(1, b"x", AckLevel::Durable).unwrap().unwrap();
}

#[test]
fn a_disabled_io_uring_is_explained() {
    // Turning io_uring off for the whole machine would disturb everything else running on it,
    // so this checks the message the startup check prints.
    let m = daemon::checks::io_uring_unavailable_message(Some(libc::EPERM), Some(2));
    assert!(m.contains("io_uring is disabled"), "{m}");
    assert!(m.contains("sysctl -w kernel.io_uring_disabled=0"), "{m}");
    let m = daemon::checks::io_uring_unavailable_message(Some(libc::EPERM), Some(1));
    assert!(m.contains("kernel.io_uring_group"), "{m}");
    // And the check itself passes on this machine, where io_uring works.
    daemon::checks::check_io_uring().unwrap();
}
