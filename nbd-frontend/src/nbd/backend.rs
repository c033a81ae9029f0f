//! What the server needs from a version: the engine's `Volume` data path,
//! behind a small trait so the protocol code can also be driven by an
//! in-memory stand-in in unit tests.

use snapmv_engine::store::{Extent, ExtentKind, Volume};
use snapmv_engine::Error;

use super::proto::{STATE_HOLE, STATE_ZERO};

pub type BResult<T> = Result<T, Error>;

/// What a FLUSH leaves to keep until its reply is sent (opaque).
pub type FlushHold = Box<dyn Send>;

/// One exported version's data path. Blocking; called from worker threads.
pub trait Backend: Clone + Send + Sync + 'static {
    fn size(&self) -> u64;
    /// False once the version was deleted: requests then get ESHUTDOWN.
    fn is_live(&self) -> bool;
    fn read(&self, offset: u64, buf: &mut [u8]) -> BResult<()>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> BResult<()>;
    /// Make every completed write durable. The returned hold must live
    /// until the FLUSH's reply is on the socket: while it does, writes that
    /// complete are made durable before they return, so the reply covers
    /// every write replied before it, on every connection.
    fn flush(&self) -> BResult<FlushHold>;
    fn trim(&self, offset: u64, len: u64) -> BResult<()>;
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BResult<()>;
    /// Extents from `offset` on. May describe less than `len` (the engine
    /// stops after 65536 chunks a call), which bounds the work of a 64-bit
    /// BLOCK_STATUS from a client with extended headers.
    fn block_status(&self, offset: u64, len: u64) -> BResult<Vec<Extent>>;
    /// Where this version may differ from version `other` of the same
    /// origin (`None`: the origin), from `offset` on: ascending `(offset,
    /// len)` ranges, and how far they describe (the end of the range, or
    /// less when the engine cut its answer short). From current metadata
    /// at every call; never misses a differing byte before that end.
    fn diff_from(&self, other: Option<u64>, offset: u64, len: u64) -> BResult<DiffRanges>;
    /// `qemu:allocation-depth` runs `(offset, len, depth)` from `offset`
    /// (maybe fewer than asked: the client asks again). By default from
    /// `block_status`, which tells only the first layer from the rest.
    fn allocation_depth(&self, offset: u64, len: u64) -> BResult<Vec<(u64, u64, u32)>> {
        let extents = self.block_status(offset, len)?;
        Ok(extents
            .iter()
            .map(|e| (e.offset, e.len, shallow_depth(e.kind)))
            .collect())
    }
}

/// Changed ranges and how far they describe (`Backend::diff_from`).
pub type DiffRanges = (Vec<(u64, u64)>, u64);

/// Extents one `diff_from` returns at most (the client asks again from
/// where the reply ends).
pub const DIFF_MAX_EXTENTS: usize = 4096;

impl Backend for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn is_live(&self) -> bool {
        Volume::is_live(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> BResult<()> {
        Volume::read(self, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> BResult<()> {
        Volume::write(self, offset, data, fua)
    }
    fn flush(&self) -> BResult<FlushHold> {
        Ok(Box::new(Volume::flush_hold(self)?))
    }
    fn trim(&self, offset: u64, len: u64) -> BResult<()> {
        Volume::trim(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BResult<()> {
        Volume::write_zeroes(self, offset, len, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        Volume::block_status(self, offset, len)
    }
    fn diff_from(&self, other: Option<u64>, offset: u64, len: u64) -> BResult<DiffRanges> {
        let d = Volume::diff_from(self, other, offset, len, DIFF_MAX_EXTENTS)?;
        let ranges = d.extents.iter().map(|e| (e.offset, e.len)).collect();
        Ok((ranges, d.end))
    }
    fn allocation_depth(&self, offset: u64, len: u64) -> BResult<Vec<(u64, u64, u32)>> {
        let runs = Volume::allocation_depth(self, offset, len)?;
        Ok(runs.iter().map(|r| (r.offset, r.len, r.depth)).collect())
    }
}

/// `base:allocation` flags for an engine extent kind. A snapshot's shared
/// chunks are reported as holes: writing there needs a fresh chunk, so it
/// may fail with ENOSPC, which is exactly what NBD_STATE_HOLE warns of.
pub fn allocation_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Own => 0,
        ExtentKind::Shared => STATE_HOLE,
        ExtentKind::Zero => STATE_HOLE | STATE_ZERO,
    }
}

/// `qemu:allocation-depth` from an extent kind alone (backends that know
/// no layers): 0 reads as zeros, 1 is held by this version, 2 is read
/// from below it.
pub fn shallow_depth(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Zero => 0,
        ExtentKind::Own => 1,
        ExtentKind::Shared => 2,
    }
}

/// An export resolved at negotiation time.
#[derive(Clone)]
pub struct ExportOf<B> {
    pub backend: B,
    pub read_only: bool,
    pub description: String,
}

/// The catalogue, generic over the backend (the public `Exports` is the
/// `Volume` instance of it).
pub trait Catalog<B>: Send + Sync + 'static {
    fn list(&self) -> Vec<String>;
    /// Opens only the names `list` gives (one name an export: the access
    /// policy matches the name asked for).
    fn open(&self, name: &str) -> Option<ExportOf<B>>;
    fn default_name(&self) -> Option<String>;
}

#[cfg(test)]
pub mod mem {
    //! An in-memory backend and catalogue for unit tests of the protocol.
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;

    pub const ANY: u64 = u64::MAX;

    #[derive(Clone)]
    pub struct MemBackend {
        pub data: Arc<RwLock<Vec<u8>>>,
        pub live: Arc<AtomicBool>,
        /// Reads and writes at `slow_offset` (or at any offset when it is
        /// `ANY`) sleep this long, to force overlap and reordering.
        pub delay_ms: Arc<AtomicUsize>,
        pub slow_offset: Arc<AtomicU64>,
        pub flushes: Arc<AtomicUsize>,
        /// Every version of this backend's origin by tag (`None`: the
        /// origin), for `diff_from`.
        pub versions: Versions,
    }

    pub type Versions = Arc<Mutex<BTreeMap<Option<u64>, Arc<RwLock<Vec<u8>>>>>>;

    impl MemBackend {
        pub fn new(size: usize) -> Self {
            let data = Arc::new(RwLock::new(vec![0; size]));
            let versions = Arc::new(Mutex::new(BTreeMap::from([(None, data.clone())])));
            MemBackend {
                data,
                live: Arc::new(AtomicBool::new(true)),
                delay_ms: Arc::new(AtomicUsize::new(0)),
                slow_offset: Arc::new(AtomicU64::new(ANY)),
                flushes: Arc::new(AtomicUsize::new(0)),
                versions,
            }
        }
        /// A snapshot: a copy of this version's bytes now, known to every
        /// version of the origin as `tag`.
        pub fn snapshot(&self, tag: u64) -> MemBackend {
            let copy = self.data.read().unwrap().clone();
            let data = Arc::new(RwLock::new(copy));
            self.versions
                .lock()
                .unwrap()
                .insert(Some(tag), data.clone());
            MemBackend {
                data,
                live: Arc::new(AtomicBool::new(true)),
                delay_ms: Arc::new(AtomicUsize::new(0)),
                slow_offset: Arc::new(AtomicU64::new(ANY)),
                flushes: Arc::new(AtomicUsize::new(0)),
                versions: self.versions.clone(),
            }
        }
        fn pause(&self, offset: u64) {
            let d = self.delay_ms.load(Ordering::Relaxed);
            let slow = self.slow_offset.load(Ordering::Relaxed);
            if d > 0 && (slow == ANY || slow == offset) {
                std::thread::sleep(Duration::from_millis(d as u64));
            }
        }
        fn check(&self, offset: u64, len: u64) -> BResult<()> {
            if !self.is_live() {
                return Err(Error::NoSuchSnapshot {
                    origin: "mem".into(),
                    tag: 0,
                });
            }
            snapmv_engine::dev::check_range("mem", offset, len, self.size())
        }
    }

    impl Backend for MemBackend {
        fn size(&self) -> u64 {
            self.data.read().map(|d| d.len() as u64).unwrap_or(0)
        }
        fn is_live(&self) -> bool {
            self.live.load(Ordering::SeqCst)
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> BResult<()> {
            self.pause(offset);
            self.check(offset, buf.len() as u64)?;
            let d = self
                .data
                .read()
                .map_err(|_| Error::Invalid("poison".into()))?;
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _fua: bool) -> BResult<()> {
            self.pause(offset);
            self.check(offset, data.len() as u64)?;
            if data.first() == Some(&0xEE) && data.iter().all(|&b| b == 0xEE) {
                // Sentinel pattern: pretend the COW device is full.
                return Err(Error::NoSpace);
            }
            let mut d = self
                .data
                .write()
                .map_err(|_| Error::Invalid("poison".into()))?;
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> BResult<FlushHold> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(()))
        }
        fn trim(&self, offset: u64, len: u64) -> BResult<()> {
            self.check(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BResult<()> {
            self.check(offset, len)?;
            let mut d = self
                .data
                .write()
                .map_err(|_| Error::Invalid("poison".into()))?;
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
            self.check(offset, len)?;
            // 4 KiB granularity: all-zero blocks are Zero, others Own.
            let d = self
                .data
                .read()
                .map_err(|_| Error::Invalid("poison".into()))?;
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset - offset % 4096;
            while pos < offset + len {
                let end = (pos + 4096).min(d.len() as u64);
                let kind = if d[pos as usize..end as usize].iter().all(|&b| b == 0) {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Own
                };
                out.push(Extent {
                    offset: pos,
                    len: end - pos,
                    kind,
                });
                pos = end;
            }
            Ok(out)
        }
        fn diff_from(&self, other: Option<u64>, offset: u64, len: u64) -> BResult<DiffRanges> {
            self.check(offset, len)?;
            let Some(theirs) = self.versions.lock().unwrap().get(&other).cloned() else {
                return Err(Error::NoSuchSnapshot {
                    origin: "mem".into(),
                    tag: other.unwrap_or(0),
                });
            };
            // 4 KiB blocks that differ byte for byte, clipped to the range.
            let end = offset + len;
            let mut out: Vec<(u64, u64)> = Vec::new();
            let mut pos = offset - offset % 4096;
            while pos < end {
                let next = (pos + 4096).min(end);
                let differs = if Arc::ptr_eq(&theirs, &self.data) {
                    false
                } else {
                    let (a, b) = (self.data.read().unwrap(), theirs.read().unwrap());
                    let r = pos as usize..next as usize;
                    a.get(r.clone()) != b.get(r)
                };
                let lo = pos.max(offset);
                if differs {
                    match out.last_mut() {
                        Some(l) if l.0 + l.1 == lo => l.1 += next - lo,
                        _ => out.push((lo, next - lo)),
                    }
                }
                pos = next;
            }
            Ok((out, end))
        }
    }

    #[derive(Default)]
    pub struct MemCatalog {
        pub exports: Mutex<BTreeMap<String, ExportOf<MemBackend>>>,
        /// What an empty export name means (none by default).
        pub default: Mutex<Option<String>>,
    }

    impl MemCatalog {
        pub fn add(&self, name: &str, b: MemBackend, read_only: bool, desc: &str) {
            self.exports.lock().unwrap().insert(
                name.to_string(),
                ExportOf {
                    backend: b,
                    read_only,
                    description: desc.to_string(),
                },
            );
        }
    }

    impl Catalog<MemBackend> for MemCatalog {
        fn list(&self) -> Vec<String> {
            self.exports.lock().unwrap().keys().cloned().collect()
        }
        fn open(&self, name: &str) -> Option<ExportOf<MemBackend>> {
            self.exports.lock().unwrap().get(name).cloned()
        }
        fn default_name(&self) -> Option<String> {
            self.default.lock().unwrap().clone()
        }
    }
}
