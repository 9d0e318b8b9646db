//! The harness both CLI test files use: the `shardlogd` binary (which belongs to another
//! package, so Cargo gives no `CARGO_BIN_EXE_` for it: it is taken from `SHARDLOGD`, or next to
//! this test's profile directory, where `cargo test --workspace` has built it, or built once into
//! a separate target directory), and a daemon on a fresh data directory, killed on drop.

#![allow(dead_code)]

#[path = "../../../daemon/tests/support/locate_daemon.rs"]
mod locate_daemon;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use proto::client::Client;

pub use locate_daemon::shardlogd;

/// A guard against hangs, not a performance bound.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A daemon on a fresh data directory under the target dir (not /tmp, which may be tmpfs
/// without O_DIRECT), killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(shards: u16, options: &[&str]) -> Daemon {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("data dir");
        let mut child = Command::new(shardlogd())
            .args(["--listen", "127.0.0.1:0", "--pin", "none", "--log", "warn"])
            .args(["--segment-bytes", "2097152", "--shards"])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .args(options)
            .env_remove("SHARDLOG_FAULTS")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn shardlogd");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = match rx.recv_timeout(RUN_LIMIT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("shardlogd did not print its address: {other:?}");
            }
        };
        let addr = line
            .strip_prefix("shardlogd listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from shardlogd: {line:?}"));
        Daemon { child, addr, _dir: dir }
    }

    pub fn client(&self) -> Client {
        let c = Client::connect(self.addr).expect("connect");
        c.set_read_timeout(Some(RUN_LIMIT)).unwrap();
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with `stdin` as its input, killing it (and failing) if it outlives `RUN_LIMIT`.
pub fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardlog");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = wait_limited(child, "shardlog");
    writer.join().expect("stdin writer");
    out
}

pub fn wait_limited(mut child: Child, what: &str) -> Output {
    // Drain stdout and stderr while waiting, so a chatty child never blocks on a full pipe.
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut s) = stdout {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut s) = stderr {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {RUN_LIMIT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_thread.join().expect("stdout reader"),
        stderr: err_thread.join().expect("stderr reader"),
    }
}

pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "shardlog failed: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .expect("JSON output is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}
