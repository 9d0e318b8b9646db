//! Writing to stdout: buffered, flushed at the points where a reader expects output (after each
//! acknowledged batch, after each read), and every error tagged as a stdout failure so a closed
//! pipe ends the run quietly.

use std::io::{BufWriter, Stdout, Write};

use crate::failure::Failure;

pub struct Out {
    w: BufWriter<Stdout>,
}

impl Out {
    pub fn new() -> Out {
        Out {
            w: BufWriter::with_capacity(64 << 10, std::io::stdout()),
        }
    }

    pub fn bytes(&mut self, b: &[u8]) -> Result<(), Failure> {
        self.w.write_all(b).map_err(Failure::Stdout)
    }

    pub fn line(&mut self, s: &str) -> Result<(), Failure> {
        self.bytes(s.as_bytes())?;
        self.bytes(b"\n")
    }

    /// One JSON value on its own line.
    pub fn json<T: serde::Serialize>(&mut self, v: &T) -> Result<(), Failure> {
        serde_json::to_writer(&mut self.w, v).map_err(|e| Failure::Stdout(e.into()))?;
        self.bytes(b"\n")
    }

    pub fn flush(&mut self) -> Result<(), Failure> {
        self.w.flush().map_err(Failure::Stdout)
    }
}

/// Microseconds since the Unix epoch: the conventional record timestamp.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Turns `\n`, `\t`, `\r`, `\0`, `\\` and `\xNN` in a delimiter given on the command line into bytes.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('r') => out.push(b'\r'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let b = u8::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\x{hex} in {s:?}"))?;
                out.push(b);
            }
            other => {
                return Err(format!(
                    "unknown escape \\{} in {s:?}",
                    other.map(String::from).unwrap_or_default()
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimiter_escapes() {
        assert_eq!(unescape("\\n").unwrap(), b"\n");
        assert_eq!(unescape("").unwrap(), b"");
        assert_eq!(unescape("a\\0b\\x7f\\\\").unwrap(), b"a\0b\x7f\\");
        assert!(unescape("\\q").is_err());
        assert!(unescape("\\xZ").is_err());
    }
}
