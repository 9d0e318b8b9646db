//! Why a run failed, and the exit code each reason maps to (documented in docs/CLI.md; scripts
//! rely on them, so they never change meaning).

use proto::wire::ErrorCode;
use proto::{ClientError, ServerError};

/// Something local failed (reading stdin, writing stdout, a thread).
pub const EXIT_LOCAL: i32 = 1;
/// The command line was wrong (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// The daemon could not be reached, closed the connection, or did not answer in time.
pub const EXIT_CONNECTION: i32 = 3;
/// The input to `produce` was not what `--input` says (bad JSON, bad base64, a record too large).
pub const EXIT_INPUT: i32 = 4;
/// The daemon's answer could not be decoded or was not the expected message.
pub const EXIT_PROTOCOL: i32 = 5;
/// The daemon answered with an `Error`: the exit code is this plus the wire `ErrorCode`.
pub const EXIT_SERVER_BASE: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach shardlogd at {addr}: {source}")]
    Connect { addr: String, source: ClientError },
    #[error("{0}")]
    Client(#[from] ClientError),
    /// A failure of one daemon of a cluster (with `--cluster`): the others were not at fault.
    #[error("daemon {daemon} of the cluster ({addr}): {source}")]
    Daemon {
        daemon: u32,
        addr: String,
        source: Box<Failure>,
    },
    /// The daemon's answer made no sense (beyond what the client library checks).
    #[error("{0}")]
    Protocol(String),
    #[error("input line {line}: {reason}")]
    Input { line: u64, reason: String },
    #[error("reading stdin: {0}")]
    Stdin(std::io::Error),
    /// Writing stdout failed; a closed pipe is not reported (see `main`).
    #[error("writing stdout: {0}")]
    Stdout(std::io::Error),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Connect { .. } => EXIT_CONNECTION,
            Failure::Client(e) => client_exit_code(e),
            Failure::Daemon { source, .. } => source.exit_code(),
            Failure::Input { .. } => EXIT_INPUT,
            Failure::Protocol(_) => EXIT_PROTOCOL,
            Failure::Stdin(_) | Failure::Stdout(_) => EXIT_LOCAL,
        }
    }

    /// A closed stdout (`shardlog consume ... | head`): the reader is done, and so are we.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Failure::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

fn client_exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Io(_) | ClientError::Closed => EXIT_CONNECTION,
        ClientError::Decode(_) | ClientError::UnexpectedResponse { .. } => EXIT_PROTOCOL,
        ClientError::Server(s) => server_exit_code(s.code),
    }
}

pub fn server_exit_code(code: ErrorCode) -> i32 {
    EXIT_SERVER_BASE + i32::from(code.0)
}

/// The message printed for a failure: a server error names its code and number, a timeout says so.
pub fn describe(f: &Failure) -> String {
    match f {
        Failure::Client(ClientError::Server(s))
        | Failure::Connect {
            source: ClientError::Server(s),
            ..
        } => describe_server(s),
        Failure::Daemon { daemon, addr, source } => {
            format!("daemon {daemon} of the cluster ({addr}): {}", describe(source))
        }
        Failure::Client(ClientError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            "no answer from shardlogd within --timeout-secs".to_string()
        }
        other => other.to_string(),
    }
}

pub fn describe_server(s: &ServerError) -> String {
    let name = s.code.variant_name().unwrap_or("Unknown");
    let mut out = format!("shardlogd answered {name} ({})", s.code.0);
    if !s.message.is_empty() {
        out.push_str(": ");
        out.push_str(&s.message);
    }
    if let Some(lsn) = s.first_available_lsn {
        out.push_str(&format!(" (first available lsn {lsn})"));
    }
    out
}
