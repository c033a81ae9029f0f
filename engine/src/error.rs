//! Typed errors of the engine. Each variant carries enough context (block
//! number, key range, tree path, tag) to say what went wrong and where.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {what} at byte {offset}: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("I/O request out of range on {what}: offset {offset} len {len} device size {size}")]
    OutOfRange {
        what: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("corrupt metadata block {block} ({kind}): {reason}")]
    Corrupt {
        block: u64,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "corrupt metadata in {tree} at block {block}, keys {key_lo:#x}..{key_hi:#x}: {reason}"
    )]
    CorruptTree {
        tree: &'static str,
        block: u64,
        key_lo: u128,
        key_hi: u128,
        reason: String,
    },
    #[error("not a snapmv COW device: {0}")]
    NotFormatted(String),
    #[error("device already holds a snapmv superblock (use --force to format anyway)")]
    AlreadyFormatted,
    #[error("unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("no space left on the COW device")]
    NoSpace,
    #[error("no such origin: {0}")]
    NoSuchOrigin(String),
    /// The store was opened without this origin's device (read-only, for
    /// listing); its versions have metadata but no data to read.
    #[error("origin {origin}'s device ({path}) is not available: {reason}")]
    OriginAbsent {
        origin: String,
        path: String,
        reason: String,
    },
    #[error("origin {0} is already bound")]
    OriginExists(String),
    #[error("no snapshot with tag {tag} on origin {origin}")]
    NoSuchSnapshot { origin: String, tag: u64 },
    #[error("origin {origin} still has {count} snapshot(s); delete them first")]
    HasSnapshots { origin: String, count: u64 },
    #[error("{0}")]
    Busy(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("version is read-only")]
    ReadOnly,
    #[error("the store was closed after a fatal error: {0}")]
    Poisoned(String),
    /// Internal to the engine, never returned by the store: a lookup under
    /// the metadata read lock needs a page the cache does not hold; the
    /// store reads it with no lock held and runs the lookup again.
    #[error("metadata page {} is not cached (an internal retry that escaped)", .0.block())]
    NotCached(crate::meta::PageMiss),
}

impl Error {
    pub fn io(what: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            what,
            offset,
            source,
        }
    }

    /// The errno a block-device client should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace => libc::ENOSPC,
            Error::OutOfRange { .. } | Error::Invalid(_) => libc::EINVAL,
            Error::ReadOnly => libc::EPERM,
            Error::NoSuchOrigin(_) | Error::NoSuchSnapshot { .. } => libc::ENOENT,
            Error::Busy(_) => libc::EBUSY,
            _ => libc::EIO,
        }
    }
}
