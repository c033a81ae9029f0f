//! `BlockDev`: the one trait under all I/O (after thin-provisioning-tools'
//! `IoEngine` and redb's `StorageBackend`).
//!
//! All methods take `&self` so many threads share one device. Reads and
//! writes are exact: a request that does not fit the device is an error,
//! never a short transfer.

mod file;
mod mem;

pub use file::{FileDev, OpenOptions};
pub use mem::MemDev;

use crate::error::{Error, Result};

pub const SECTOR: u64 = 512;

pub trait BlockDev: Send + Sync {
    /// Size in bytes. Fixed for the life of the handle.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. Errors if `offset + buf.len() > size()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Write all of `buf` at `offset`. Volatile until `flush` returns.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Make every write that completed before this call durable.
    fn flush(&self) -> Result<()>;
    /// Hint that a range is unused. The content afterwards is unspecified.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// A short name for error messages.
    fn name(&self) -> &str {
        "device"
    }
}

/// Shared bounds check so every implementation refuses the same way.
pub fn check_range(what: &'static str, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            what,
            offset,
            len,
            size,
        }),
    }
}

impl<T: BlockDev + ?Sized> BlockDev for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

impl<T: BlockDev + ?Sized> BlockDev for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}
