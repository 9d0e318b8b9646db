//! Length-prefixed framing.
//!
//! ```text
//! +----------------+---------------------------------+
//! | len: u32 LE    | payload: `len` bytes (FlatBuffer) |
//! +----------------+---------------------------------+
//! ```
//!
//! A `len` of zero, or above the receiver's maximum, is rejected as soon as
//! the four header bytes are seen, before any buffer for the payload is
//! allocated or grown.

use crate::error::DecodeError;

/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 4;

/// The default maximum payload length of one frame: 4 MiB.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 4 << 20;

/// Reads a frame header and checks the announced length against `max`.
pub fn payload_len(header: [u8; FRAME_HEADER_BYTES], max: usize) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(header) as u64;
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len > max as u64 {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    Ok(len as usize)
}

/// Appends one frame (header and payload) to `out`.
///
/// # Panics
/// If `payload` is empty or longer than `u32::MAX`: the encoder never sends
/// what a receiver must reject.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    assert!(!payload.is_empty());
    let len = u32::try_from(payload.len()).expect("frame payload exceeds u32::MAX");
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits one complete frame off the front of `buf`.
///
/// Returns `Ok(None)` if more bytes are needed, or the payload and the total
/// number of bytes the frame occupies.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = payload_len(*header, max)?;
    let end = FRAME_HEADER_BYTES + len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((&buf[FRAME_HEADER_BYTES..end], end)))
}

/// Decodes exactly one frame that must fill `buf` entirely.
pub fn decode_whole_frame(buf: &[u8], max: usize) -> Result<&[u8], DecodeError> {
    match split_frame(buf, max)? {
        Some((payload, used)) if used == buf.len() => Ok(payload),
        Some((_, used)) => Err(DecodeError::BadField {
            field: "frame",
            reason: format!("{} trailing bytes after the frame", buf.len() - used),
        }),
        None => {
            let needed = match buf.first_chunk::<FRAME_HEADER_BYTES>() {
                Some(header) => FRAME_HEADER_BYTES + payload_len(*header, max)?,
                None => FRAME_HEADER_BYTES,
            };
            Err(DecodeError::Truncated {
                needed,
                available: buf.len(),
            })
        }
    }
}

/// An incremental frame reader for a byte stream.
///
/// Feed it whatever the socket returned with [`FrameReader::extend`] (or
/// read straight into [`FrameReader::spare`]), then take complete frames
/// with [`FrameReader::next_frame`]. The buffer holds at most one frame plus
/// one read's worth of bytes: it never grows past `max + read size`, and an
/// oversize length is refused from its header alone.
#[derive(Debug)]
pub struct FrameReader {
    /// Initialised storage; only `start..end` holds unconsumed bytes. It is
    /// kept at its length between reads so that `spare` does not zero a fresh
    /// tail on every socket read.
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    start: usize,
    /// End of received bytes in `buf`.
    end: usize,
    /// Length of the tail handed out by `spare` and not yet `filled`.
    spare_len: usize,
    max: usize,
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        assert!(max > 0);
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            spare_len: 0,
            max,
        }
    }

    /// The maximum payload length this reader accepts.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        assert_eq!(self.spare_len, 0, "filled() must follow spare()");
        self.compact();
        if self.buf.len() >= self.end + bytes.len() {
            self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        } else {
            // Grow by exactly what arrived, without zeroing storage that is written at once.
            self.buf.truncate(self.end);
            self.buf.extend_from_slice(bytes);
        }
        self.end += bytes.len();
    }

    /// Frees the storage if nothing is buffered, so that a connection waiting for its next
    /// request holds no buffer at all; returns whether it did. A caller reading from many
    /// sockets can then read each into one shared buffer and [`FrameReader::extend`] only what
    /// arrived.
    pub fn release_if_empty(&mut self) -> bool {
        assert_eq!(self.spare_len, 0, "filled() must follow spare()");
        if self.start != self.end {
            return false;
        }
        self.buf = Vec::new();
        self.start = 0;
        self.end = 0;
        true
    }

    /// Bytes of storage this reader holds (its capacity), whether buffered or not.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Returns a writable tail of at least `min` bytes for a socket read to
    /// fill; report how much was filled with [`FrameReader::filled`].
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        assert_eq!(self.spare_len, 0, "filled() must follow spare()");
        self.compact();
        self.reserve_tail(min);
        self.spare_len = min;
        &mut self.buf[self.end..self.end + min]
    }

    /// Records that `n` bytes of the last [`FrameReader::spare`] were filled.
    pub fn filled(&mut self, n: usize) {
        assert!(n <= self.spare_len);
        self.end += n;
        self.spare_len = 0;
    }

    /// The next complete frame's payload, if one is buffered.
    ///
    /// After an error the stream cannot be resynchronised; the caller should
    /// answer with an error and close the connection.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        assert_eq!(self.spare_len, 0, "filled() must follow spare()");
        match split_frame(&self.buf[self.start..self.end], self.max)? {
            None => Ok(None),
            Some((_, used)) => {
                let from = self.start + FRAME_HEADER_BYTES;
                let to = self.start + used;
                self.start = to;
                Ok(Some(&self.buf[from..to]))
            }
        }
    }

    /// Bytes the current partial frame still needs, if its header is known.
    pub fn pending_frame_bytes(&self) -> Option<usize> {
        let rest = &self.buf[self.start..self.end];
        let header = rest.first_chunk::<FRAME_HEADER_BYTES>()?;
        let len = payload_len(*header, self.max).ok()?;
        Some((FRAME_HEADER_BYTES + len).saturating_sub(rest.len()))
    }

    /// Makes `buf[end..end + n]` exist, zeroing only storage never used before.
    fn reserve_tail(&mut self, n: usize) {
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
    }

    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Give memory back after a large frame, so an idle connection stays small.
        if self.buf.len() > 4 * READ_CHUNK_BYTES && self.end < READ_CHUNK_BYTES {
            self.buf.truncate(READ_CHUNK_BYTES);
            self.buf.shrink_to_fit();
        }
    }
}

/// A typical socket read size.
pub const READ_CHUNK_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(payload, &mut out);
        out
    }

    #[test]
    fn an_empty_reader_gives_its_storage_back_and_a_partial_frame_keeps_it() {
        let mut r = FrameReader::new(1 << 20);
        let two = [frame(&[1; 100]), frame(&[2; 300])].concat();
        // Everything but the last byte: one whole frame and a partial one.
        r.extend(&two[..two.len() - 1]);
        assert_eq!(r.next_frame(), Ok(Some(&[1u8; 100][..])));
        assert_eq!(r.next_frame(), Ok(None));
        assert!(!r.release_if_empty(), "a partial frame is kept");
        assert_eq!(r.pending_frame_bytes(), Some(1));
        r.extend(&two[two.len() - 1..]);
        assert_eq!(r.next_frame(), Ok(Some(&[2u8; 300][..])));
        assert!(r.release_if_empty());
        assert_eq!(r.capacity(), 0);
        assert_eq!(r.buffered(), 0);
        // It works on from nothing, through `spare` as well as `extend`.
        let one = frame(&[3; 10]);
        r.spare(one.len()).copy_from_slice(&one);
        r.filled(one.len());
        assert_eq!(r.next_frame(), Ok(Some(&[3u8; 10][..])));
    }

    #[test]
    fn extend_grows_by_what_arrived() {
        let mut r = FrameReader::new(1 << 20);
        r.extend(&frame(&[9; 1000])[..500]);
        assert!(r.capacity() < 1000, "capacity {}", r.capacity());
    }
}
