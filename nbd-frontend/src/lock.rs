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
//! A server binds the first of these candidates that works, and the admin
//! commands try them in the same order ([`socket_candidates`]):
//! 1. only if the COW device is a regular file: `<canonical COW
//!    path>.snapmv.sock`, next to the file (e.g. `/srv/cow.img` ->
//!    `/srv/cow.img.snapmv.sock`);
//! 2. `<runtime dir>/<escaped canonical path>.sock` in each runtime
//!    directory, where `%` becomes `%25` and `/` becomes `%2F` (e.g.
//!    `/dev/sdc1` -> `/run/snapmv/%2Fdev%2Fsdc1.sock`), because `/dev` is no
//!    place for sockets, and a COW file may sit on a filesystem that cannot
//!    hold one (read-only, FUSE, some network filesystems). A name that
//!    would not fit in a Unix socket address is shortened to a hash of the
//!    path plus its tail ([`runtime_name`]).
//!
//! The runtime directories, in order ([`runtime_dirs`]): `/run/snapmv` if
//! we are root or may write it; `$XDG_RUNTIME_DIR/snapmv` if that variable
//! holds an absolute path; `<temp dir>/snapmv-<euid>` (`$TMPDIR` or `/tmp`).
//! The per-user ones are created mode 0700 and used only if they are real
//! directories (not symlinks) owned by us that nobody else may enter.
//! Since a server's environment (or user) may differ from an admin
//! command's, the admin commands then also try the runtime directories of
//! the `snapmv serve` holding the lock ([`exclusive_holder`],
//! [`process_runtime_dirs`]).
//!
//! A server that can bind none of them keeps serving NBD without a control
//! socket; the admin commands then say so, naming every path they tried.
//!
//! Canonicalising first means every spelling of the device (relative path,
//! symlink such as `/dev/disk/by-id/...`) finds the same socket.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The system-wide runtime directory for control sockets.
pub const RUN_DIR: &str = "/run/snapmv";
/// Longest socket file name placed in a runtime directory: even through the
/// `/proc/self/fd/<fd>/` detour that control.rs takes for long paths, the
/// address then stays within the 107 bytes a Unix socket path may have.
pub const MAX_RUNTIME_NAME: usize = 80;

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
    try_lock_open(&open_for_lock(cow)?, cow, mode)
}

/// Open `cow` for [`try_lock_open`].
pub fn open_for_lock(cow: &Path) -> Result<File> {
    // Read-only is enough for flock, and works on read-only media too.
    File::open(cow).with_context(|| format!("cannot open COW device {}", cow.display()))
}

/// [`try_lock`] through `file`, an open descriptor of `cow`, which the
/// caller may try again and again: a waiter that watches for the holder
/// closing the device must not open and close it itself.
pub fn try_lock_open(file: &File, cow: &Path, mode: LockMode) -> Result<Option<CowLock>> {
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            // A duplicate shares the open file description, hence the lock.
            let file = file
                .try_clone()
                .with_context(|| format!("cannot keep the lock on {}", cow.display()))?;
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

/// The pid holding the exclusive lock on `cow`, as `/proc/locks` shows it
/// (`None` if nobody does, or it cannot be told).
pub fn exclusive_holder(cow: &Path) -> Option<u32> {
    let m = std::fs::metadata(cow).ok()?;
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    parse_proc_locks(&text, m.dev(), m.ino())
}

/// Find the granted exclusive flock on (`dev`, `ino`) in `/proc/locks`
/// text. Lines look like `3: FLOCK  ADVISORY  WRITE 1234 08:02:131 0 EOF`
/// (device numbers in hex, inode in decimal); waiters carry a `->` marker.
fn parse_proc_locks(text: &str, dev: u64, ino: u64) -> Option<u32> {
    let (maj, min) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, id, ..] => {
                let mut parts = id.split(':');
                let lmaj = u64::from_str_radix(parts.next()?, 16).ok()?;
                let lmin = u64::from_str_radix(parts.next()?, 16).ok()?;
                let lino: u64 = parts.next()?.parse().ok()?;
                (lmaj == maj && lmin == min && lino == ino)
                    .then(|| pid.parse::<u32>().ok())
                    .flatten()
            }
            _ => None,
        }
    })
}

/// Whether process `pid` is a `snapmv serve`.
pub fn is_snapmv_server(pid: u32) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    if args.get(1).copied() != Some(&b"serve"[..]) {
        return false;
    }
    let named = args
        .first()
        .and_then(|a| Path::new(OsStr::from_bytes(a)).file_name())
        .is_some_and(|n| n.as_bytes().starts_with(b"snapmv"));
    let same_exe = match (
        std::fs::read_link(format!("/proc/{pid}/exe")),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    named || same_exe
}

/// Our effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A directory that may hold control sockets (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeDir {
    pub path: PathBuf,
    /// Private to user `uid`: created 0700, and used only if it belongs to
    /// `uid` and is closed to everyone else. The system-wide [`RUN_DIR`] may
    /// belong to root and be readable by all (the sockets are 0600).
    pub per_user: bool,
    /// The user whose directory this is (normally us).
    pub uid: u32,
}

impl RuntimeDir {
    /// Server side: create the directory if missing, then [`Self::check`].
    pub fn prepare(&self) -> Result<()> {
        let mode = if self.per_user { 0o700 } else { 0o755 };
        match std::fs::DirBuilder::new().mode(mode).create(&self.path) {
            Ok(()) => {
                tracing::info!(dir = %self.path.display(), "created runtime directory")
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create runtime directory {}", self.path.display())
                })
            }
        }
        self.check()
    }

    /// The directory exists and is safe to put a socket in, or to trust a
    /// socket found in: a real directory (not a symlink), owned by its user
    /// (or root, for [`RUN_DIR`]), that no other user may write (or, if per
    /// user, enter).
    pub fn check(&self) -> Result<()> {
        let p = self.path.display();
        let m = std::fs::symlink_metadata(&self.path)
            .with_context(|| format!("runtime directory {p}"))?;
        if m.file_type().is_symlink() {
            bail!("runtime directory {p} is a symlink; not using it");
        }
        if !m.is_dir() {
            bail!("runtime directory {p} is not a directory; not using it");
        }
        let want = self.uid;
        if m.uid() != want && (self.per_user || m.uid() != 0) {
            bail!(
                "runtime directory {p} belongs to uid {}, not uid {want}; not using it",
                m.uid()
            );
        }
        let open_to_others = if self.per_user { 0o077 } else { 0o022 };
        if m.mode() & open_to_others != 0 {
            bail!(
                "runtime directory {p} is open to other users (mode {:04o}); not using it",
                m.mode() & 0o7777
            );
        }
        Ok(())
    }
}

/// One place where the control socket of a COW device may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketCandidate {
    pub path: PathBuf,
    /// The runtime directory holding it; `None` for the path next to the
    /// COW file, whose directory is the user's business.
    pub runtime_dir: Option<RuntimeDir>,
}

impl SocketCandidate {
    /// Server side: make the place ready for binding.
    pub fn prepare(&self) -> Result<()> {
        self.runtime_dir
            .as_ref()
            .map_or(Ok(()), RuntimeDir::prepare)
    }

    /// Client side: whether a socket found here may be trusted.
    pub fn check(&self) -> Result<()> {
        self.runtime_dir.as_ref().map_or(Ok(()), RuntimeDir::check)
    }
}

/// The runtime directories for this process, in order (module docs).
pub fn runtime_dirs() -> Vec<RuntimeDir> {
    let me = euid();
    runtime_dirs_from(
        me,
        me == 0 || may_write(Path::new(RUN_DIR)),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        &std::env::temp_dir(),
    )
}

/// [`runtime_dirs`] with its inputs given: our euid, whether [`RUN_DIR`]
/// is usable, `$XDG_RUNTIME_DIR`, and the temp directory.
pub fn runtime_dirs_from(
    uid: u32,
    run_dir_usable: bool,
    xdg: Option<&OsStr>,
    tmp: &Path,
) -> Vec<RuntimeDir> {
    let mut v = Vec::new();
    if run_dir_usable {
        v.push(RuntimeDir {
            path: PathBuf::from(RUN_DIR),
            per_user: false,
            uid,
        });
    }
    if let Some(x) = xdg.map(Path::new).filter(|p| p.is_absolute()) {
        v.push(RuntimeDir {
            path: x.join("snapmv"),
            per_user: true,
            uid,
        });
    }
    let tmp = if tmp.is_absolute() {
        tmp
    } else {
        Path::new("/tmp")
    };
    let t = tmp.join(format!("snapmv-{uid}"));
    if !v.iter().any(|d| d.path == t) {
        v.push(RuntimeDir {
            path: t,
            per_user: true,
            uid,
        });
    }
    v
}

/// The effective uid of process `pid`.
pub fn process_uid(pid: u32) -> Option<u32> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uids = st.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// The per-user runtime directories of process `pid`, run by user `uid`
/// (someone else: a root admin command looking for a user's server). Read
/// from its environment when we may, else the usual places.
pub fn process_runtime_dirs(pid: u32, uid: u32) -> Vec<RuntimeDir> {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(raw) => {
            let var = |name: &[u8]| {
                raw.split(|&b| b == 0)
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix(b"="))
                    .map(OsStr::from_bytes)
            };
            let tmp = var(b"TMPDIR").map_or(Path::new("/tmp"), Path::new);
            runtime_dirs_from(uid, false, var(b"XDG_RUNTIME_DIR"), tmp)
        }
        Err(_) => {
            let xdg = format!("/run/user/{uid}");
            runtime_dirs_from(uid, false, Some(OsStr::new(&xdg)), Path::new("/tmp"))
        }
    }
}

fn may_write(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: faccessat reads the NUL-terminated path `c`, which outlives
    // the call.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

/// Every place the control socket of `cow` may be, in order (module docs).
/// `cow` must exist.
pub fn socket_candidates(cow: &Path) -> Result<Vec<SocketCandidate>> {
    let canon = canonical(cow)?;
    let meta = std::fs::metadata(&canon)
        .with_context(|| format!("cannot stat COW device {}", canon.display()))?;
    Ok(candidates_from(&canon, meta.is_file(), &runtime_dirs()))
}

/// [`socket_candidates`] for canonical path `canon` and runtime directories
/// `dirs`.
pub fn candidates_from(canon: &Path, is_file: bool, dirs: &[RuntimeDir]) -> Vec<SocketCandidate> {
    let mut v = Vec::new();
    if is_file {
        let mut s = canon.as_os_str().to_os_string();
        s.push(".snapmv.sock");
        v.push(SocketCandidate {
            path: PathBuf::from(s),
            runtime_dir: None,
        });
    }
    let name = runtime_name(canon);
    v.extend(dirs.iter().map(|d| SocketCandidate {
        path: d.path.join(&name),
        runtime_dir: Some(d.clone()),
    }));
    v
}

/// The socket's file name in a runtime directory: the escaped canonical
/// path plus `.sock`, or, if that is longer than [`MAX_RUNTIME_NAME`], a
/// hash of the whole path followed by the escaped path's tail.
pub fn runtime_name(canon: &Path) -> String {
    const EXT: &str = ".sock";
    let bytes = canon.as_os_str().as_bytes();
    let esc = escape(bytes);
    if esc.len() + EXT.len() <= MAX_RUNTIME_NAME {
        return format!("{esc}{EXT}");
    }
    let keep = MAX_RUNTIME_NAME - EXT.len() - 17;
    let mut start = esc.len() - keep;
    while !esc.is_char_boundary(start) {
        start += 1;
    }
    format!("{:016x}-{}{EXT}", fnv1a64(bytes), &esc[start..])
}

/// FNV-1a: stable across builds and versions, unlike std's hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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

/// `%` -> `%25`, `/` -> `%2F`. A path that is not UTF-8 also has every byte
/// from 0x80 up escaped, so it can never meet a UTF-8 path's name.
fn escape(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => s.replace('%', "%25").replace('/', "%2F"),
        Err(_) => p
            .iter()
            .map(|&b| match b {
                b'%' | b'/' | 0x80.. => format!("%{b:02X}"),
                _ => char::from(b).to_string(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn user_dir(p: &str, uid: u32) -> RuntimeDir {
        RuntimeDir {
            path: PathBuf::from(p),
            per_user: true,
            uid,
        }
    }

    fn run_dir(uid: u32) -> RuntimeDir {
        RuntimeDir {
            path: PathBuf::from(RUN_DIR),
            per_user: false,
            uid,
        }
    }

    /// A per-user directory of ours under `base`.
    fn mine(base: &Path, name: &str) -> RuntimeDir {
        RuntimeDir {
            path: base.join(name),
            per_user: true,
            uid: euid(),
        }
    }

    fn paths(c: &[SocketCandidate]) -> Vec<PathBuf> {
        c.iter().map(|c| c.path.clone()).collect()
    }

    #[test]
    fn regular_file_candidates_beside_first_then_runtime_dirs() {
        let dirs = [
            run_dir(0),
            user_dir("/run/user/0/snapmv", 0),
            user_dir("/tmp/snapmv-0", 0),
        ];
        let c = candidates_from(Path::new("/srv/cow.img"), true, &dirs);
        assert_eq!(
            paths(&c),
            [
                "/srv/cow.img.snapmv.sock",
                "/run/snapmv/%2Fsrv%2Fcow.img.sock",
                "/run/user/0/snapmv/%2Fsrv%2Fcow.img.sock",
                "/tmp/snapmv-0/%2Fsrv%2Fcow.img.sock",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(c[0].runtime_dir, None);
        assert_eq!(c[1].runtime_dir.as_ref(), Some(&dirs[0]));
        assert_eq!(c[3].runtime_dir.as_ref(), Some(&dirs[2]));
    }

    #[test]
    fn block_device_candidates_only_in_runtime_dirs() {
        let dirs = [run_dir(0), user_dir("/tmp/snapmv-0", 0)];
        let c = candidates_from(Path::new("/dev/sd%c1"), false, &dirs);
        assert_eq!(
            paths(&c),
            [
                "/run/snapmv/%2Fdev%2Fsd%25c1.sock",
                "/tmp/snapmv-0/%2Fdev%2Fsd%25c1.sock"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn runtime_dir_order() {
        let tmp = Path::new("/tmp");
        let xdg = Some(OsStr::new("/run/user/1000"));
        // Root (or anyone who may write /run/snapmv): /run/snapmv first.
        assert_eq!(
            runtime_dirs_from(0, true, xdg, tmp),
            [
                run_dir(0),
                user_dir("/run/user/1000/snapmv", 0),
                user_dir("/tmp/snapmv-0", 0)
            ]
        );
        // An ordinary user: $XDG_RUNTIME_DIR, then the temp dir.
        assert_eq!(
            runtime_dirs_from(1000, false, xdg, tmp),
            [
                user_dir("/run/user/1000/snapmv", 1000),
                user_dir("/tmp/snapmv-1000", 1000)
            ]
        );
        // No (or a relative, hence invalid) $XDG_RUNTIME_DIR.
        for x in [None, Some(OsStr::new("run/user")), Some(OsStr::new(""))] {
            assert_eq!(
                runtime_dirs_from(1000, false, x, Path::new("/var/tmp")),
                [user_dir("/var/tmp/snapmv-1000", 1000)]
            );
        }
        // A relative temp dir is not trusted either.
        assert_eq!(
            runtime_dirs_from(7, false, None, Path::new("tmp")),
            [user_dir("/tmp/snapmv-7", 7)]
        );
    }

    #[test]
    fn live_candidates_for_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow.img");
        std::fs::write(&cow, b"x").unwrap();
        let canon_dir = std::fs::canonicalize(dir.path()).unwrap();
        let c = socket_candidates(&cow).unwrap();
        assert_eq!(c[0].path, canon_dir.join("cow.img.snapmv.sock"));
        assert_eq!(c.len(), 1 + runtime_dirs().len());
        let name = runtime_name(&canon_dir.join("cow.img"));
        assert!(name.starts_with("%2F") && name.ends_with("%2Fcow.img.sock"));
        for (cand, d) in c[1..].iter().zip(runtime_dirs()) {
            assert_eq!(cand.path, d.path.join(&name));
        }
        // A relative spelling finds the same sockets.
        let rel = dir.path().join(".").join("cow.img");
        assert_eq!(socket_candidates(&rel).unwrap(), c);
    }

    #[test]
    fn char_device_has_no_beside_candidate() {
        if Path::new("/dev/null").exists() {
            let c = socket_candidates(Path::new("/dev/null")).unwrap();
            assert_eq!(c.len(), runtime_dirs().len());
            assert!(c.iter().all(|c| c.runtime_dir.is_some()));
            assert!(c.iter().all(|c| c.path.ends_with("%2Fdev%2Fnull.sock")));
        }
    }

    #[test]
    fn long_runtime_names_are_hashed_and_bounded() {
        let short = Path::new("/dev/sdc1");
        assert_eq!(runtime_name(short), "%2Fdev%2Fsdc1.sock");
        let a = PathBuf::from(format!("/mnt/{}/é/cow-a.img", "d".repeat(100)));
        let b = PathBuf::from(format!("/mnt/{}/é/cow-b.img", "d".repeat(100)));
        let (na, nb) = (runtime_name(&a), runtime_name(&b));
        for n in [&na, &nb] {
            assert!(n.len() <= MAX_RUNTIME_NAME, "{n}");
            assert!(!n.contains('/'), "{n}");
        }
        assert!(na.ends_with("%2Fcow-a.img.sock"), "{na}");
        assert_ne!(na, nb);
        assert_eq!(runtime_name(&a), na, "stable");
        // Exactly at the limit: still plain.
        let edge = "x".repeat(MAX_RUNTIME_NAME - ".sock".len() - 3);
        assert_eq!(
            runtime_name(&Path::new("/").join(&edge)),
            format!("%2F{edge}.sock")
        );
        let over = format!("{edge}x");
        assert_ne!(
            runtime_name(&Path::new("/").join(&over)),
            format!("%2F{over}.sock")
        );
    }

    #[test]
    fn escaping() {
        assert_eq!(escape(b"/dev/sd%1"), "%2Fdev%2Fsd%251");
        // Not UTF-8: high bytes escaped too, so no lossy collisions.
        assert_eq!(escape(b"/a\xff"), "%2Fa%FF");
        assert_ne!(escape(b"/a\xff"), escape(b"/a\xfe"));
    }

    #[test]
    fn missing_cow_is_named() {
        let e = socket_candidates(Path::new("/nonexistent/cow.img")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/cow.img does not exist"));
    }

    #[test]
    fn per_user_runtime_dir_is_created_private_and_checked() {
        let base = tempfile::tempdir().unwrap();
        let d = mine(base.path(), "snapmv-x");
        assert!(d.check().is_err(), "missing dir must not be trusted");
        d.prepare().unwrap();
        let m = std::fs::symlink_metadata(&d.path).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o077, 0, "mode {:o}", m.mode());
        assert_eq!(m.uid(), euid());
        d.prepare().unwrap(); // existing and fine: reused
        d.check().unwrap();

        // Open to others: refused, not "fixed" behind the user's back.
        std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = format!("{:#}", d.prepare().unwrap_err());
        assert!(e.contains("open to other users"), "{e}");

        // A symlink to a perfectly good directory: refused.
        let real = base.path().join("real");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&real)
            .unwrap();
        let link = mine(base.path(), "link");
        std::os::unix::fs::symlink(&real, &link.path).unwrap();
        let e = format!("{:#}", link.prepare().unwrap_err());
        assert!(e.contains("symlink"), "{e}");

        // A file in the way: refused.
        let file = mine(base.path(), "file");
        std::fs::write(&file.path, b"").unwrap();
        assert!(file.prepare().is_err());

        // Someone else's directory: refused (root can stage that).
        if euid() == 0 {
            let theirs = mine(base.path(), "theirs");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&theirs.path)
                .unwrap();
            std::os::unix::fs::chown(&theirs.path, Some(4242), None).unwrap();
            let e = format!("{:#}", theirs.prepare().unwrap_err());
            assert!(e.contains("belongs to uid 4242"), "{e}");
            // ...unless it is that user's directory we are looking into.
            RuntimeDir {
                uid: 4242,
                ..theirs
            }
            .check()
            .unwrap();
        }
    }

    #[test]
    fn another_process_runtime_dirs_come_from_its_environment() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .env("XDG_RUNTIME_DIR", "/x/y")
            .env("TMPDIR", "/var/tmp")
            .spawn()
            .unwrap();
        let pid = child.id();
        // exec may not have happened yet: wait for the new environment.
        let t0 = std::time::Instant::now();
        let dirs = loop {
            let d = process_runtime_dirs(pid, 4242);
            if d.len() == 2 || t0.elapsed().as_secs() > 10 {
                break d;
            }
            std::thread::yield_now();
        };
        let uid = process_uid(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(uid, Some(euid()));
        assert_eq!(
            dirs,
            [
                user_dir("/x/y/snapmv", 4242),
                user_dir("/var/tmp/snapmv-4242", 4242)
            ]
        );
        // Gone: the usual places.
        assert_eq!(process_uid(pid), None);
        assert_eq!(
            process_runtime_dirs(pid, 4242),
            [
                user_dir("/run/user/4242/snapmv", 4242),
                user_dir("/tmp/snapmv-4242", 4242)
            ]
        );
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
        assert_eq!(exclusive_holder(&cow), None, "shared locks are not holders");
        drop(a);
        let x = try_lock(&cow, LockMode::Exclusive).unwrap();
        assert!(x.is_some());
        assert!(try_lock(&cow, LockMode::Shared).unwrap().is_none());
        if Path::new("/proc/locks").exists() {
            assert_eq!(exclusive_holder(&cow), Some(std::process::id()));
            // The test binary is no `snapmv serve`.
            assert!(!is_snapmv_server(std::process::id()));
        }
        drop(x);
        assert_eq!(exclusive_holder(&cow), None);
    }

    #[test]
    fn proc_locks_parsing() {
        let dev = libc::makedev(0x103, 0x2a);
        let text = "\
1: POSIX  ADVISORY  WRITE 11 103:2a:77 0 EOF
2: FLOCK  ADVISORY  READ 12 103:2a:77 0 EOF
2: -> FLOCK  ADVISORY  WRITE 13 103:2a:77 0 EOF
3: FLOCK  ADVISORY  WRITE 14 103:2a:78 0 EOF
4: FLOCK  ADVISORY  WRITE 15 08:02:77 0 EOF
5: OFDLCK ADVISORY  WRITE -1 103:2a:77 0 EOF
garbage
6: FLOCK  ADVISORY  WRITE 16 103:2a:77 0 EOF
";
        assert_eq!(parse_proc_locks(text, dev, 77), Some(16));
        assert_eq!(parse_proc_locks(text, dev, 78), Some(14));
        assert_eq!(parse_proc_locks(text, dev, 79), None);
        assert_eq!(parse_proc_locks(text, libc::makedev(8, 2), 77), Some(15));
    }
}
