//! Errors of the codec and of the clients.

use crate::wire::{ErrorCode, ErrorT};

/// Why a frame or a message could not be decoded.
///
/// Every decoding path returns one of these; none panics, whatever the input.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A frame announced a length of zero.
    #[error("frame length is zero")]
    EmptyFrame,
    /// A frame announced a length above the receiver's maximum. Rejected before
    /// any buffer for it is allocated.
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    /// The input ended inside a frame.
    #[error("frame truncated: {needed} bytes announced, {available} present")]
    Truncated { needed: usize, available: usize },
    /// The payload is not a valid FlatBuffer of the expected root type, or it
    /// exceeds the verifier's depth or table limits.
    #[error("payload failed FlatBuffers verification: {reason}")]
    Invalid { reason: String },
    /// The union tag names a message this version does not know.
    #[error("unknown message type tag {tag}")]
    UnknownMessage { tag: u8 },
    /// A message carried no body.
    #[error("message has no body")]
    MissingBody,
    /// A field holds a value this version does not accept.
    #[error("invalid field {field}: {reason}")]
    BadField { field: &'static str, reason: String },
}

impl DecodeError {
    /// The wire error code a server answers this decoding failure with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::EmptyFrame | DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
            DecodeError::Truncated { .. }
            | DecodeError::Invalid { .. }
            | DecodeError::MissingBody
            | DecodeError::BadField { .. } => ErrorCode::BadRequest,
        }
    }

    /// Whether the byte stream can still be trusted after this error.
    ///
    /// A bad length prefix leaves the reader unable to find the next frame,
    /// so the connection must be closed. A frame with a good length but a bad
    /// payload can be answered with an error and skipped.
    pub fn is_fatal_to_stream(&self) -> bool {
        matches!(
            self,
            DecodeError::EmptyFrame | DecodeError::FrameTooLarge { .. } | DecodeError::Truncated { .. }
        )
    }
}

/// An `Error` response from the server.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("server error {}: {message}", code_name(*code))]
pub struct ServerError {
    pub code: ErrorCode,
    pub message: String,
    /// With `Truncated`: the shard's first retained lsn, where a reader continues. `None` with
    /// other codes, and from a server that predates the field.
    pub first_available_lsn: Option<u64>,
}

impl From<ErrorT> for ServerError {
    fn from(e: ErrorT) -> ServerError {
        ServerError {
            code: e.code,
            message: e.message.unwrap_or_default(),
            // 0 is the wire's "absent": lsns start at 1.
            first_available_lsn: (e.first_available_lsn > 0).then_some(e.first_available_lsn),
        }
    }
}

fn code_name(code: ErrorCode) -> &'static str {
    code.variant_name().unwrap_or("Unknown")
}

/// Errors seen by the clients.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("could not decode a response: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("unexpected response to request {id}: expected {expected}, got {got}")]
    UnexpectedResponse {
        id: u64,
        expected: &'static str,
        got: &'static str,
    },
}

impl ClientError {
    /// The server's error code, if this is a server `Error` response.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// The shard's first retained lsn, if this is a `Truncated` error that reports it.
    pub fn first_available_lsn(&self) -> Option<u64> {
        match self {
            ClientError::Server(e) if e.code == ErrorCode::Truncated => e.first_available_lsn,
            _ => None,
        }
    }
}
