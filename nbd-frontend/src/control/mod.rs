//! The control socket: how `snapmv snapshot|delete|rollback|list` reach a
//! running `serve` that holds the COW device (see `lock` for the path rule).
//! `wire` is the format, `client` the CLI's side, `server` the serve side;
//! the operations themselves are `operations`, shared with the offline
//! commands.
//!
//! Protocol: line-delimited JSON over a Unix stream socket. The client
//! writes one [`Request`] object per line; the server answers each with one
//! [`Reply`] object per line, in order, and keeps the connection open for
//! more (`rollback --wait` follows the copy on one connection). A request
//! line is at most [`wire::MAX_LINE`] bytes; a longer or malformed line gets
//! an `error` reply (and, if too long, the connection is closed, since the
//! rest of the line cannot be skipped reliably). Only root and the server's
//! own user may connect (socket mode 0600 plus an SO_PEERCRED check).
//!
//! ```text
//! -> {"op":"hello"}
//! <- {"reply":"hello","pid":1234,"cow":"/srv/cow.img","version":"0.1.0"}
//! -> {"op":"snapshot","origin":"orig","of":null,"memo":"snap1"}
//! <- {"reply":"tag","tag":1}
//! -> {"op":"delete","origin":"orig","tag":9}
//! <- {"reply":"error","message":"cannot delete snapshot 9 of origin orig: no snapshot with tag 9 on origin orig"}
//! -> {"op":"diff","origin":"orig","from":1,"to":null,"offset":0}
//! <- {"reply":"diff","chunk_size":65536,"size":1073741824,"extents":[{"offset":0,"length":131072}],"end":1073741824}
//! -> {"op":"rollback_progress","seen":{"origin":"orig","tag":1,"done_chunks":64,"total_chunks":256},"wait_ms":500}
//! <- {"reply":"rollback_progress","rollback":{"origin":"orig","tag":1,"done_chunks":128,"total_chunks":256}}
//! ```
//!
//! `list` replies with the whole status (every snapshot, with its space
//! accounting), so its cost grows with the snapshot count; `hello` and
//! `rollback_progress` cost the same whatever the store holds. A `diff`
//! reply is one page of at most 65,536 extents (its `end` says where the
//! next page starts); its cost grows with the chunks holding exceptions in
//! the part of the device it covers.

mod client;
mod server;
mod wire;

pub use client::Client;
pub use server::ControlServer;
pub use wire::{DiffPage, ExtentWire, Reply, Request};
// For the control fuzz target, which compiles this module in place.
#[allow(unused_imports)]
pub use {server::handle_request, wire::MAX_LINE};

use anyhow::{bail, Context, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Unix socket addresses hold at most 107 bytes of path. A longer path is
/// reached through `/proc/self/fd/<dir fd>/<name>`, which the kernel
/// resolves like the real directory; the returned descriptor must outlive
/// the bind/connect call.
fn short_addr(path: &Path) -> Result<(PathBuf, Option<OwnedFd>)> {
    if path.as_os_str().len() < 100 {
        return Ok((path.to_path_buf(), None));
    }
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => bail!("bad control socket path {}", path.display()),
    };
    use std::os::unix::fs::OpenOptionsExt;
    let dirf = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
        .open(dir)
        .with_context(|| format!("cannot open directory {}", dir.display()))?;
    let fd: OwnedFd = dirf.into();
    let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name);
    Ok((p, Some(fd)))
}

/// The uid of the process at the other end of `s`, if the kernel says.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live local
    // of exactly that size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn long_socket_paths_go_through_proc() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("cow.img.snapmv.sock");
        let (addr, fd) = short_addr(&path).unwrap();
        assert!(fd.is_some());
        assert!(addr.as_os_str().len() < 100);
        let l = UnixListener::bind(&addr).unwrap();
        drop(fd);
        assert!(path.exists());
        let (addr2, _fd2) = short_addr(&path).unwrap();
        let _c = UnixStream::connect(&addr2).unwrap();
        let _ = l.accept().unwrap();
    }
}
