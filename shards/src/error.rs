//! The one error type of the storage engine.

use std::io;
use std::path::PathBuf;

use crate::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "shard {shard}: corrupt commit in segment {segment} at offset {offset}: {reason} \
         (open with repair to truncate the log there, losing everything after it)"
    )]
    Corruption {
        shard: u16,
        segment: u64,
        offset: u64,
        reason: String,
    },
    /// A write or fdatasync failed. The shard acknowledges nothing more: after a failed fsync the
    /// kernel may have dropped the dirty pages, so a retry could report success for lost data.
    #[error("shard is poisoned after a failed write or fdatasync: {cause}; restart to recover")]
    Poisoned { cause: String },
    /// The next segment could not be prepared because the device is full. Not sticky: appends
    /// succeed again once space is freed.
    #[error("no space left to prepare the next segment; free disk space or lower retention")]
    NoSpace,
    #[error("lsn {requested} is below the oldest retained lsn {first_available}")]
    Truncated { requested: Lsn, first_available: Lsn },
    #[error("shard is closed")]
    Closed,
    #[error("append of {bytes} bytes exceeds the maximum of {max} bytes per append")]
    TooLarge { bytes: usize, max: usize },
    /// More bytes are queued than `ShardOptions::queue_bytes_max`; retry after earlier appends complete.
    #[error("append queue holds {queued_bytes} bytes, limit {max}; retry later")]
    Busy { queued_bytes: usize, max: usize },
    #[error("append carries no records")]
    Empty,
    #[error("invalid shard options: {reason}")]
    InvalidOptions { reason: String },
}

impl ShardError {
    /// A stable, short name of the error kind, for mapping to wire error codes and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ShardError::Io { .. } => "io",
            ShardError::Corruption { .. } => "corruption",
            ShardError::Poisoned { .. } => "poisoned",
            ShardError::NoSpace => "no_space",
            ShardError::Truncated { .. } => "truncated",
            ShardError::Closed => "closed",
            ShardError::TooLarge { .. } => "too_large",
            ShardError::Busy { .. } => "busy",
            ShardError::Empty => "empty",
            ShardError::InvalidOptions { .. } => "invalid_options",
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ShardError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

pub fn is_no_space(e: &io::Error) -> bool {
    // glommio rebuilds its I/O errors from the error kind and a message, dropping the raw errno,
    // so ENOSPC from a DMA file arrives as `StorageFull` with no `raw_os_error`.
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
}
