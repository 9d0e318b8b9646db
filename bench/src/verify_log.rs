//! The verify log: one line per acknowledged record, written as acks arrive.
//!
//! ```text
//! # shardlog-bench verify-log v1: stream shard lsn crc32c len
//! 42 3 17 9a3c1f02 100
//! ```
//!
//! The acks of one socket read go to the kernel in one `write` on an
//! `O_APPEND` file before the generator sends anything else on that
//! connection, so
//! if the daemon is killed mid-run the log holds every record the daemon
//! acknowledged, and several threads can append to one file without
//! interleaving inside a line. If the generator itself is killed, the last
//! line may be torn: the parser drops an unterminated final line and says so.
//!
//! The file is appended to, never truncated, so a crash loop can keep one log
//! across daemon restarts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub const VERIFY_LOG_HEADER: &str = "# shardlog-bench verify-log v1: stream shard lsn crc32c len";

/// One acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckedRecord {
    pub stream: u64,
    pub shard: u16,
    pub lsn: u64,
    pub crc32c: u32,
    pub len: u32,
}

impl AckedRecord {
    pub fn write_line(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "{} {} {} {:08x} {}",
            self.stream, self.shard, self.lsn, self.crc32c, self.len
        );
    }

    fn parse(line: &str) -> Option<AckedRecord> {
        let mut it = line.split_ascii_whitespace();
        let rec = AckedRecord {
            stream: it.next()?.parse().ok()?,
            shard: it.next()?.parse().ok()?,
            lsn: it.next()?.parse().ok()?,
            crc32c: u32::from_str_radix(it.next()?, 16).ok()?,
            len: it.next()?.parse().ok()?,
        };
        if it.next().is_some() {
            return None;
        }
        Some(rec)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyLogError {
    #[error("cannot open verify log {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot read verify log {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot append to verify log {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("verify log {path} line {line}: expected `stream shard lsn crc32c(hex) len`, got `{text}`")]
    Malformed { path: PathBuf, line: u64, text: String },
}

/// One thread's handle on the shared verify log.
pub struct VerifyLogWriter {
    path: PathBuf,
    file: File,
    buf: String,
}

impl VerifyLogWriter {
    /// Opens (creating if needed) for appending; writes the header if the file is new.
    pub fn open(path: &Path) -> Result<VerifyLogWriter, VerifyLogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| VerifyLogError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let mut writer = VerifyLogWriter {
            path: path.to_path_buf(),
            file,
            buf: String::new(),
        };
        let empty = writer
            .file
            .metadata()
            .map_err(|source| VerifyLogError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len()
            == 0;
        if empty {
            writer.buf.push_str(VERIFY_LOG_HEADER);
            writer.buf.push('\n');
            writer.flush()?;
        }
        Ok(writer)
    }

    /// Writes the records of one ack in a single `write`.
    pub fn append(&mut self, records: impl IntoIterator<Item = AckedRecord>) -> Result<(), VerifyLogError> {
        for r in records {
            r.write_line(&mut self.buf);
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), VerifyLogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let res = self.file.write_all(self.buf.as_bytes());
        self.buf.clear();
        res.map_err(|source| VerifyLogError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// The parsed log.
#[derive(Debug, Default)]
pub struct VerifyLog {
    pub records: Vec<AckedRecord>,
    /// An unterminated last line was dropped (the writer died mid-line).
    pub torn_tail: bool,
}

pub fn read_verify_log(path: &Path) -> Result<VerifyLog, VerifyLogError> {
    let file = File::open(path).map_err(|source| VerifyLogError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    parse_verify_log(BufReader::new(file), path)
}

pub fn parse_verify_log(mut input: impl BufRead, path: &Path) -> Result<VerifyLog, VerifyLogError> {
    let mut log = VerifyLog::default();
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = input.read_line(&mut line).map_err(|source| VerifyLogError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            return Ok(log);
        }
        number += 1;
        if !line.ends_with('\n') {
            // Only the last line can lack its newline: read_line reads to EOF.
            log.torn_tail = true;
            return Ok(log);
        }
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match AckedRecord::parse(text) {
            Some(r) => log.records.push(r),
            None => {
                return Err(VerifyLogError::Malformed {
                    path: path.to_path_buf(),
                    line: number,
                    text: text.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lsn: u64) -> AckedRecord {
        AckedRecord {
            stream: 42,
            shard: 3,
            lsn,
            crc32c: 0x9a3c_1f02,
            len: 100,
        }
    }

    #[test]
    fn written_records_parse_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("acks.log");
        let mut a = VerifyLogWriter::open(&path).expect("open");
        let mut b = VerifyLogWriter::open(&path).expect("second handle on the same log");
        a.append([rec(1), rec(2)]).expect("append");
        b.append([rec(3)]).expect("append");
        drop((a, b));
        // Reopening an existing log appends and does not repeat the header.
        let mut c = VerifyLogWriter::open(&path).expect("reopen");
        c.append([rec(4)]).expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.matches(VERIFY_LOG_HEADER).count(), 1);
        let log = read_verify_log(&path).expect("parse");
        assert!(!log.torn_tail);
        assert_eq!(log.records, vec![rec(1), rec(2), rec(3), rec(4)]);
    }

    #[test]
    fn torn_last_line_is_dropped_and_reported() {
        let text = format!("{VERIFY_LOG_HEADER}\n42 3 1 9a3c1f02 100\n42 3 2 9a3");
        let log = parse_verify_log(text.as_bytes(), Path::new("x")).expect("parse");
        assert!(log.torn_tail);
        assert_eq!(log.records, vec![rec(1)]);
    }

    #[test]
    fn malformed_line_names_its_number() {
        let text = format!("{VERIFY_LOG_HEADER}\n42 3 1 9a3c1f02 100\nnot a record\n");
        let err = parse_verify_log(text.as_bytes(), Path::new("x")).expect_err("malformed");
        assert!(matches!(err, VerifyLogError::Malformed { line: 3, .. }), "{err}");
    }

    #[test]
    fn extra_fields_are_malformed() {
        let text = "42 3 1 9a3c1f02 100 7\n";
        assert!(parse_verify_log(text.as_bytes(), Path::new("x")).is_err());
    }
}
