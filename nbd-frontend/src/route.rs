//! Where an admin command runs: on the COW device itself when it is free
//! (we take its lock), or through the control socket of the `snapmv serve`
//! holding it. A command that finds the lock taken by a short-lived
//! command, or by a server still starting, waits for the holder to close
//! the device or for a socket to appear (inotify), never by polling.

use crate::control::{Client, Reply, Request};
use crate::lock::{self, CowLock, LockMode, SocketCandidate};
use anyhow::{bail, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long an admin command waits for a lock held by a short-lived
/// command (not a server) before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// How long a control socket candidate may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off between looks when inotify is unavailable (an error: out of
/// instances or watches), so the wait does not spin.
const NO_WATCH_BACKOFF: Duration = Duration::from_millis(100);

/// Where a command runs.
pub enum Route {
    /// The COW device was free; we hold its lock.
    Offline(CowLock),
    /// A server holds it; this is a client of its control socket.
    Live(Client),
}

/// Decide where to run. `live_ok` is false for commands a running server
/// cannot do for us (format, bind, unbind, check).
pub fn route(cow: &Path, mode: LockMode, live_ok: bool) -> Result<Route> {
    let canon = lock::canonical(cow)?;
    // Fail early, with the reason, if the candidates cannot be worked out.
    lock::socket_candidates(cow)?;
    let file = lock::open_for_lock(cow)?;
    let deadline = Instant::now() + LOCK_WAIT;
    // Set up only once a first look failed: the usual case (the device is
    // free, or a server answers) pays nothing for it.
    let mut watch: Option<Option<Watch>> = None;
    loop {
        if let Some(l) = lock::try_lock_open(&file, cow, mode)? {
            return Ok(Route::Offline(l));
        }
        // No need to reach the server just to refuse.
        if let (false, Some(pid)) = (live_ok, serving_holder(cow)) {
            bail!(in_use_by_server(cow, pid));
        }
        match find_server(cow, &canon) {
            Ok(found) if !live_ok => bail!(in_use_by_server(cow, found.pid)),
            Ok(found) => {
                tracing::debug!(pid = found.pid, socket = %found.path.display(), "using the running server");
                return Ok(Route::Live(found.client));
            }
            Err(tried) if Instant::now() >= deadline => return Err(busy(cow, live_ok, &tried)),
            // Watch, then look again at once: nothing since is missed.
            Err(_) if watch.is_none() => watch = Some(Watch::start(cow, &canon)),
            Err(_) => match watch.as_ref().and_then(Option::as_ref) {
                Some(w) => {
                    w.wait(deadline);
                    w.watch_places(cow, &canon);
                }
                None => std::thread::sleep(NO_WATCH_BACKOFF),
            },
        }
    }
}

fn in_use_by_server(cow: &Path, pid: u32) -> String {
    format!(
        "COW device {} is in use by a running server (pid {pid}); stop it first",
        cow.display()
    )
}

/// Why a command gave up: the lock stayed taken and no server answered.
fn busy(cow: &Path, live_ok: bool, tried: &[(PathBuf, String)]) -> anyhow::Error {
    let paths = tried_list(tried);
    match serving_holder(cow) {
        Some(pid) if !live_ok => anyhow::anyhow!(in_use_by_server(cow, pid)),
        Some(pid) => anyhow::anyhow!(
            "COW device {} is in use by a running server (pid {pid}) that has no control \
             socket (its log says why; or it is still starting up), so this cannot be done \
             while it runs; tried {paths}",
            cow.display()
        ),
        None => anyhow::anyhow!(
            "COW device {} is locked by another process, and no snapmv server answers on {paths}",
            cow.display()
        ),
    }
}

/// The pid of the `snapmv serve` holding `cow`, if that is who holds it.
pub fn serving_holder(cow: &Path) -> Option<u32> {
    lock::exclusive_holder(cow).filter(|&pid| lock::is_snapmv_server(pid))
}

/// A server answering for a COW device.
pub struct Found {
    pub client: Client,
    pub pid: u32,
    pub path: PathBuf,
}

/// Where the control socket of `cow` (canonical path `canon`) may be, in
/// the order to try them, and the users trusted to serve it: root, us, the
/// COW device's owner, and the user of the `snapmv serve` holding its lock.
/// That server's runtime directories (from its environment, which may
/// differ from ours, or be another user's when root asks) come after ours.
fn candidates(cow: &Path, canon: &Path) -> Result<(Vec<SocketCandidate>, Vec<u32>)> {
    use std::os::unix::fs::MetadataExt;
    let mut cands = lock::socket_candidates(cow)?;
    let mut trusted = vec![0, lock::euid()];
    trusted.extend(std::fs::metadata(canon).map(|m| m.uid()).ok());
    let holder = serving_holder(cow).and_then(|pid| Some((pid, lock::process_uid(pid)?)));
    if let Some((pid, uid)) = holder {
        trusted.push(uid);
        let theirs = lock::candidates_from(canon, false, &lock::process_runtime_dirs(pid, uid));
        for c in theirs {
            if !cands.iter().any(|x| x.path == c.path) {
                cands.push(c);
            }
        }
    }
    Ok((cands, trusted))
}

/// Try the control socket candidates of `cow` (canonical path `canon`) in
/// order and return the first server that answers the hello, runs as a
/// trusted user (see [`candidates`]), and serves `canon`. Otherwise every
/// path tried, each with why it was passed over.
pub fn find_server(cow: &Path, canon: &Path) -> std::result::Result<Found, Vec<(PathBuf, String)>> {
    let (cands, trusted) = match candidates(cow, canon) {
        Ok(c) => c,
        Err(e) => return Err(vec![(canon.to_path_buf(), format!("{e:#}"))]),
    };
    let mut tried = Vec::new();
    for c in &cands {
        match probe(c, canon, &trusted) {
            Ok((client, pid)) => {
                return Ok(Found {
                    client,
                    pid,
                    path: c.path.clone(),
                })
            }
            Err(e) => tried.push((c.path.clone(), e.root_cause().to_string())),
        }
    }
    Err(tried)
}

fn probe(c: &SocketCandidate, canon: &Path, trusted: &[u32]) -> Result<(Client, u32)> {
    c.check()?;
    let mut client = Client::connect(&c.path)?;
    // Before telling it anything: a socket in a shared directory may have
    // been planted by someone else.
    match client.peer_uid() {
        Some(uid) if trusted.contains(&uid) => {}
        Some(uid) => bail!(
            "served by uid {uid}, which is neither root, us, the COW device's owner, nor the \
             user of the server holding it; not trusted"
        ),
        None => bail!("cannot tell who serves it; not trusted"),
    }
    // A server answers hello at once; something that accepts but never
    // answers must not hold up the next candidate for long.
    client.set_timeout(Some(HELLO_TIMEOUT))?;
    match client.call(&Request::Hello)? {
        Reply::Hello { pid, cow, .. } if Path::new(&cow) == canon => {
            client.set_timeout(None)?;
            Ok((client, pid))
        }
        Reply::Hello { cow, .. } => bail!("it belongs to a server of {cow}"),
        other => bail!("unexpected reply to hello: {other:?}"),
    }
}

/// `A (why), B (why)` for an error message.
pub fn tried_list(tried: &[(PathBuf, String)]) -> String {
    tried
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An inotify instance that wakes a waiting command when what it waits
/// for may have happened: some process closed the COW device (its lock may
/// be free: flock locks die with the last close), or an entry appeared or
/// changed in a directory where its control socket may be (a server
/// binds, then restricts, its socket). A wake-up only says "look again".
struct Watch {
    fd: OwnedFd,
}

impl Watch {
    /// A watch on the places of `cow`; `None` (logged) without inotify.
    fn start(cow: &Path, canon: &Path) -> Option<Watch> {
        let w = Watch::new()
            .inspect_err(|e| tracing::debug!(error = %e, "no inotify; waits back off instead"))
            .ok()?;
        w.watch_places(cow, canon);
        Some(w)
    }

    fn new() -> std::io::Result<Watch> {
        // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by no
        // one else.
        Ok(Watch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watch `path` for `mask`; false if it cannot be watched (it does not
    /// exist, or no watches are left). Watching a path twice is harmless.
    fn add(&self, path: &Path, mask: u32) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: a live inotify fd and a NUL-terminated path that outlives
        // the call.
        unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) >= 0 }
    }

    /// Watch the COW device for closes, and the directory of each control
    /// socket candidate (or, while it does not exist, its parent, where a
    /// server creates it) for new and changed entries.
    fn watch_places(&self, cow: &Path, canon: &Path) {
        self.add(canon, libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE);
        let Ok((cands, _)) = candidates(cow, canon) else {
            return;
        };
        let mask = libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO;
        for dir in cands.iter().filter_map(|c| c.path.parent()) {
            if !self.add(dir, mask | libc::IN_ONLYDIR) {
                if let Some(up) = dir.parent() {
                    self.add(up, mask | libc::IN_ONLYDIR);
                }
            }
        }
    }

    /// Block until an event or `deadline`, then drain what is queued.
    fn wait(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one live pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a live local buffer of the given length; the
        // fd is non-blocking, so this ends at EAGAIN once drained.
        while unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command that finds the device locked by a short-lived command
    /// goes on as soon as that command closes it (inotify), well before
    /// its give-up deadline.
    #[test]
    fn a_released_lock_ends_the_wait_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow.img");
        std::fs::write(&cow, b"").unwrap();
        let held = lock::try_lock(&cow, LockMode::Exclusive).unwrap().unwrap();
        let hold = Duration::from_millis(300);
        let holder = std::thread::spawn(move || {
            std::thread::sleep(hold);
            drop(held);
        });
        let started = Instant::now();
        let r = route(&cow, LockMode::Exclusive, true).unwrap();
        let waited = started.elapsed();
        holder.join().unwrap();
        assert!(matches!(r, Route::Offline(_)));
        assert!(waited >= hold && waited < LOCK_WAIT / 2, "{waited:?}");
    }
}
