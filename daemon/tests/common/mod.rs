//! Runs the real `shardlogd` binary for tests: a fresh data directory on the target's disk (not
//! /tmp, which may be tmpfs without O_DIRECT), port 0, the listening address parsed from stdout,
//! and SIGKILL on drop so a failed test never leaves a daemon behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use proto::client::Client;
use proto::codec::decode_response;
use proto::wire::ResponseT;

pub const BIN: &str = env!("CARGO_BIN_EXE_shardlogd");

/// How long a daemon may take to print its listening line (recovery of a big directory, a busy
/// machine). Only a guard against hanging forever, not a measurement.
pub const STARTUP_GUARD: Duration = Duration::from_secs(60);

/// Segment size for test daemons.
pub const SEGMENT_BYTES: u64 = 2 << 20;

/// A directory for a test's data, under the target directory.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("create test data dir")
}

pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// Lines the daemon printed on stdout after its listening line.
    stdout: Arc<Mutex<Vec<String>>>,
}

/// Options of a daemon to start.
#[derive(Clone, Debug)]
pub struct DaemonOpts {
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
}

impl DaemonOpts {
    /// Unpinned (tests share two cores with everything else), `shards` shards, small segments
    /// (quick to prepare, and rotation gets exercised).
    pub fn shards(shards: u16) -> DaemonOpts {
        DaemonOpts {
            args: vec![
                "--pin".into(),
                "none".into(),
                "--shards".into(),
                shards.to_string(),
                "--segment-bytes".into(),
                SEGMENT_BYTES.to_string(),
            ],
            envs: Vec::new(),
        }
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_string(), v.to_string()));
        self
    }
}

fn command(data_dir: &Path, opts: &DaemonOpts) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--log")
        .arg(std::env::var("TEST_LOG").unwrap_or("info".into()))
        .args(&opts.args)
        .env_remove("SHARDLOG_FAULTS");
    for (k, v) in &opts.envs {
        cmd.env(k, v);
    }
    cmd
}

impl Daemon {
    /// Starts a daemon and waits for its listening line.
    pub fn start(data_dir: &Path, opts: &DaemonOpts) -> Daemon {
        match Daemon::try_start(data_dir, opts) {
            Ok(d) => d,
            Err(stderr) => panic!("shardlogd did not start:\n{stderr}"),
        }
    }

    /// Starts a daemon under a wrapper command such as `prlimit ... --`.
    pub fn start_wrapped(data_dir: &Path, opts: &DaemonOpts, wrap: &[&str]) -> Daemon {
        match Daemon::try_start_wrapped(data_dir, opts, Some(wrap)) {
            Ok(d) => d,
            Err(stderr) => panic!("shardlogd did not start:\n{stderr}"),
        }
    }

    /// Starts a daemon; on failure returns its stderr.
    pub fn try_start(data_dir: &Path, opts: &DaemonOpts) -> Result<Daemon, String> {
        Daemon::try_start_wrapped(data_dir, opts, None)
    }

    fn try_start_wrapped(data_dir: &Path, opts: &DaemonOpts, wrap: Option<&[&str]>) -> Result<Daemon, String> {
        let mut child = wrapped(data_dir, opts, wrap)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardlogd");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().expect("stderr");
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        {
            let stdout = child.stdout.take().expect("stdout");
            let sink = stdout_lines.clone();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = lines.next();
                let _ = tx.send(first);
                // Keep draining so the daemon never blocks on a full pipe.
                for line in lines.map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let line = rx.recv_timeout(STARTUP_GUARD);
        let addr = match line {
            Ok(Some(Ok(line))) => {
                let addr = line
                    .strip_prefix("shardlogd listening on ")
                    .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
                addr.parse().expect("address")
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                // Let the stderr thread catch up with the last bytes.
                std::thread::sleep(Duration::from_millis(100));
                let text = stderr.lock().unwrap().clone();
                return Err(text);
            }
        };
        Ok(Daemon {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            stderr,
            stdout: stdout_lines,
        })
    }

    /// Waits (bounded by [`STARTUP_GUARD`]) for a stdout line starting with `prefix` and returns
    /// the rest of it.
    pub fn stdout_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + STARTUP_GUARD;
        loop {
            if let Some(rest) = self.stdout.lock().unwrap().iter().find_map(|l| l.strip_prefix(prefix)) {
                return rest.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no stdout line starting with {prefix:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        let c = Client::connect(self.addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Resident memory of the daemon, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.take().expect("running").wait().expect("wait")
    }

    /// Waits for the daemon to exit by itself (after a signal sent with `signal`).
    pub fn wait_exit(mut self) -> ExitStatus {
        self.child.take().expect("running").wait().expect("wait")
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wrapped(data_dir: &Path, opts: &DaemonOpts, wrap: Option<&[&str]>) -> Command {
    match wrap {
        None => command(data_dir, opts),
        Some(prefix) => {
            let inner = command(data_dir, opts);
            let mut cmd = Command::new(prefix[0]);
            cmd.args(&prefix[1..]).arg(inner.get_program()).args(inner.get_args());
            for (k, v) in inner.get_envs() {
                match v {
                    Some(v) => cmd.env(k, v),
                    None => cmd.env_remove(k),
                };
            }
            cmd
        }
    }
}

/// Runs the daemon expecting it to fail at startup; returns (status, stderr).
pub fn run_expecting_failure(data_dir: &Path, opts: &DaemonOpts, wrap: Option<&[&str]>) -> (ExitStatus, String) {
    let out = wrapped(data_dir, opts, wrap)
        .stdin(Stdio::null())
        .output()
        .expect("run shardlogd");
    assert!(
        out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "daemon started when it should have refused"
    );
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Reads one response frame; `None` once the daemon closed the connection.
pub fn read_response(s: &mut TcpStream) -> Option<ResponseT> {
    let mut header = [0u8; 4];
    match s.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => return None,
        Err(e) => panic!("reading a response: {e}"),
    }
    let len = u32::from_le_bytes(header) as usize;
    assert!(len > 0 && len <= 8 << 20, "response length {len}");
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("response payload");
    Some(decode_response(&payload).expect("the daemon sends valid responses"))
}
