//! Who owns a COW device: the exclusive lock, and where the control socket
//! of a server holding it lives.
//!
//! # Lock
//! `flock(2)` on the COW device itself (the regular file or the block device
//! node). flock locks belong to the open file description, so the engine's
//! own descriptors are unaffected, the lock dies with the process (no stale
//! lock files after a crash), and it works the same for files and devices.
//! Writers (`serve`, `format`, `bind`, `unbind`, `snapshot`, `delete`,
//! `rollback`) take it exclusive; `list` and `check` take it shared so that
//! several readers may run at once, but never beside a writer.
//!
//! # Control socket path rule
//! - COW device is a regular file: `<canonical COW path>.snapmv.sock`, next
//!   to the file (e.g. `/srv/cow.img` -> `/srv/cow.img.snapmv.sock`).
//! - anything else (a block device): `/run/snapmv/<escaped canonical
//!   path>.sock`, where `%` becomes `%25` and `/` becomes `%2F`
//!   (e.g. `/dev/sdc1` -> `/run/snapmv/%2Fdev%2Fsdc1.sock`), because `/dev`
//!   is no place for sockets.
//!
//! Canonicalising first means every spelling of the device (relative path,
//! symlink such as `/dev/disk/by-id/...`) finds the same socket.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Directory for the control sockets of block-device COWs.
pub const RUN_DIR: &str = "/run/snapmv";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A held lock; released when dropped (the descriptor closes).
#[derive(Debug)]
pub struct CowLock {
    _file: File,
}

/// Try to lock `cow` without blocking. `Ok(None)` means another process
/// holds a conflicting lock.
pub fn try_lock(cow: &Path, mode: LockMode) -> Result<Option<CowLock>> {
    // Read-only is enough for flock, and works on read-only media too.
    let file =
        File::open(cow).with_context(|| format!("cannot open COW device {}", cow.display()))?;
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(Some(CowLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(None),
            _ => {
                return Err(err)
                    .with_context(|| format!("cannot lock COW device {}", cow.display()))
            }
        }
    }
}

/// The control socket of the server that would hold `cow` (see the module
/// docs for the rule). `cow` must exist.
pub fn socket_path(cow: &Path) -> Result<PathBuf> {
    let canon = canonical(cow)?;
    let meta = std::fs::metadata(&canon)
        .with_context(|| format!("cannot stat COW device {}", canon.display()))?;
    if meta.is_file() {
        let mut s = canon.into_os_string();
        s.push(".snapmv.sock");
        Ok(PathBuf::from(s))
    } else {
        Ok(Path::new(RUN_DIR).join(format!("{}.sock", escape(&canon.to_string_lossy()))))
    }
}

/// Canonical path of an existing COW device, with a clear error if missing.
pub fn canonical(cow: &Path) -> Result<PathBuf> {
    match std::fs::canonicalize(cow) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("COW device {} does not exist", cow.display())
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot resolve COW device path {}", cow.display()))
        }
    }
}

fn escape(p: &str) -> String {
    p.replace('%', "%25").replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_next_to_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow.img");
        std::fs::write(&cow, b"x").unwrap();
        let s = socket_path(&cow).unwrap();
        assert_eq!(
            s,
            std::fs::canonicalize(dir.path())
                .unwrap()
                .join("cow.img.snapmv.sock")
        );
        // A relative spelling finds the same socket.
        let rel = dir.path().join(".").join("cow.img");
        assert_eq!(socket_path(&rel).unwrap(), s);
    }

    #[test]
    fn block_device_socket_under_run() {
        assert_eq!(escape("/dev/sd%1"), "%2Fdev%2Fsd%251");
        if Path::new("/dev/null").exists() {
            // A character device takes the non-file branch too.
            let s = socket_path(Path::new("/dev/null")).unwrap();
            assert_eq!(s, Path::new("/run/snapmv/%2Fdev%2Fnull.sock"));
        }
    }

    #[test]
    fn missing_cow_is_named() {
        let e = socket_path(Path::new("/nonexistent/cow.img")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/cow.img does not exist"));
    }

    #[test]
    fn exclusive_excludes_shared_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow.img");
        std::fs::write(&cow, b"x").unwrap();
        let a = try_lock(&cow, LockMode::Shared).unwrap();
        assert!(a.is_some());
        assert!(try_lock(&cow, LockMode::Shared).unwrap().is_some());
        assert!(try_lock(&cow, LockMode::Exclusive).unwrap().is_none());
        drop(a);
        let x = try_lock(&cow, LockMode::Exclusive).unwrap();
        assert!(x.is_some());
        assert!(try_lock(&cow, LockMode::Shared).unwrap().is_none());
    }
}
