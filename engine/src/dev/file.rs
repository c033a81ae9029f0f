//! `FileDev`: a regular file or a real block device.
//!
//! The size of a block device comes from the device (BLKGETSIZE64), not
//! from `metadata().len()`, which is 0 for device nodes. With O_DIRECT the
//! caller's buffers need not be aligned: unaligned requests bounce through
//! an aligned buffer, so the rest of the engine never sees the constraint.

use super::{check_range, BlockDev};
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// O_DIRECT needs buffer, offset and length aligned to the logical block
/// size; 4096 covers every device we target.
const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    pub direct: bool,
    /// Create a regular file of this size if it does not exist.
    pub create_size: Option<u64>,
}

pub struct FileDev {
    file: File,
    size: u64,
    direct: bool,
    read_only: bool,
    name: String,
    path: PathBuf,
}

// BLKGETSIZE64 = _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live, correctly sized local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

impl FileDev {
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |e| Error::io("open", 0, e);
        if let Some(sz) = opts.create_size {
            if !path.exists() {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let f = File::create(path).map_err(io)?;
                f.set_len(sz).map_err(io)?;
            }
        }
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| Error::Io {
            what: "open",
            offset: 0,
            source: std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        })?;
        let meta = file.metadata().map_err(io)?;
        let size = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(io)?
        } else {
            meta.len()
        };
        Ok(FileDev {
            file,
            size,
            direct: opts.direct,
            read_only: opts.read_only,
            name,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn aligned(&self, offset: u64, ptr: *const u8, len: usize) -> bool {
        !self.direct
            || ((offset as usize).is_multiple_of(DIRECT_ALIGN)
                && (ptr as usize).is_multiple_of(DIRECT_ALIGN)
                && len.is_multiple_of(DIRECT_ALIGN))
    }

    /// The aligned window covering `[offset, offset+len)`, for bouncing.
    fn window(offset: u64, len: usize) -> (u64, usize) {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    fn raw_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read", offset, e))
    }
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .map_err(|e| Error::Invalid(format!("bad bounce size {len}: {e}")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Ok(AlignedBuf { ptr, layout })
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range("file read", offset, buf.len() as u64, self.size)?;
        if self.aligned(offset, buf.as_ptr(), buf.len()) {
            return self.raw_read(offset, buf);
        }
        let (start, wlen) = Self::window(offset, buf.len());
        let mut b = AlignedBuf::new(wlen)?;
        self.raw_read(start, &mut b.as_mut()[..wlen])?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&b.as_mut()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range("file write", offset, buf.len() as u64, self.size)?;
        if self.aligned(offset, buf.as_ptr(), buf.len()) {
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(|e| Error::io("write", offset, e));
        }
        // Read-modify-write through an aligned bounce buffer. Callers that
        // race on one 4 KiB block must serialise themselves; the engine's
        // chunk locks do (chunks are >= 4 KiB and aligned).
        let (start, wlen) = Self::window(offset, buf.len());
        let mut b = AlignedBuf::new(wlen)?;
        self.raw_read(start, &mut b.as_mut()[..wlen])?;
        let skip = (offset - start) as usize;
        b.as_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file
            .write_all_at(&b.as_mut()[..wlen], start)
            .map_err(|e| Error::io("write", start, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| Error::io("flush", 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range("file discard", offset, len, self.size)?;
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

// SAFETY: AlignedBuf is only used locally within one call.
unsafe impl Send for AlignedBuf {}
