//! The control socket when it cannot go beside the COW file: `serve` falls
//! back to the runtime directory (or, failing everything, serves NBD with no
//! control socket at all), and the admin commands find it there. Needs
//! libnbd-bin (nbdinfo, nbdcopy); the read-only and FUSE cases need root
//! (mount) and nbdfuse + nbdkit, and are skipped without them.

mod cli_support;
use cli_support::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn may_write(p: &str) -> bool {
    let c = std::ffi::CString::new(p).unwrap();
    // SAFETY: faccessat reads the NUL-terminated path `c`, alive for the call.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

/// The runtime directories, in order, of a `snapmv` whose environment has
/// `xdg` as XDG_RUNTIME_DIR and `tmp` as its temp dir: the documented rule,
/// restated here independently of the code under test.
fn runtime_dirs(xdg: Option<&Path>, tmp: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if euid() == 0 || may_write("/run/snapmv") {
        v.push(PathBuf::from("/run/snapmv"));
    }
    if let Some(x) = xdg.filter(|x| x.is_absolute()) {
        v.push(x.join("snapmv"));
    }
    v.push(tmp.join(format!("snapmv-{}", euid())));
    v
}

/// The runtime directories of a `snapmv` that inherits our environment.
fn inherited_runtime_dirs() -> Vec<PathBuf> {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    runtime_dirs(xdg.as_deref(), &std::env::temp_dir())
}

/// `<escaped canonical path>.sock` (test paths are short enough to escape
/// in full).
fn runtime_name(cow: &Path) -> String {
    let canon = std::fs::canonicalize(cow).unwrap();
    let name = format!("{}.sock", s(&canon).replace('%', "%25").replace('/', "%2F"));
    assert!(name.len() <= 80, "test path too long: {name}");
    name
}

/// Where a server that cannot bind beside `cow` puts its control socket.
fn runtime_sock(cow: &Path) -> PathBuf {
    inherited_runtime_dirs()[0].join(runtime_name(cow))
}

/// The path beside the COW file.
fn beside(cow: &Path) -> PathBuf {
    let mut p = std::fs::canonicalize(cow).unwrap().into_os_string();
    p.push(".snapmv.sock");
    PathBuf::from(p)
}

fn tools() -> bool {
    have_tool("nbdinfo") && have_tool("nbdcopy")
}

fn in_ci() -> bool {
    std::env::var("SNAPMV_CI").as_deref() == Ok("1")
}

/// Removes, at the end of a test, directories it made outside its temp dir.
struct RmDirs(Vec<PathBuf>);

impl Drop for RmDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// `serve COW --unix NBD` waiting on control socket `ready`.
fn serve_at(f: &Fixture, cow: &Path, ready: &Path) -> Server {
    let nbd = f.path("nbd.sock");
    Server::start(
        f.dir.path(),
        &[s(cow), "--unix", s(&nbd)],
        ready,
        &f.path("serve.log"),
    )
}

fn nbd_exports(f: &Fixture) -> Vec<String> {
    nbd_list(&nbd_unix(&f.path("nbd.sock"), ""))
}

/// Live admin through whatever socket the server uses: a snapshot (which
/// only a live server can export at once), `list` in both forms, and a
/// refused offline-only command naming the server.
fn exercise_live_admin(f: &Fixture, cow: &Path, srv: &Server, origin: &str) {
    assert_eq!(nbd_exports(f), [origin]);
    let r = snapmv(&["snapshot", s(cow), origin, "-m", "fallback"]).ok();
    assert_eq!(r.stdout, "1\n");
    assert_eq!(nbd_exports(f), [origin.to_string(), format!("{origin}@1")]);
    let v: Value = serde_json::from_str(&snapmv(&["list", s(cow), "--json"]).ok().stdout).unwrap();
    let snaps = v["origins"][0]["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{v}");
    assert_eq!(snaps[0]["memo"], "fallback");
    assert!(snapmv(&["list", s(cow)])
        .ok()
        .stdout
        .contains("\"fallback\""));
    let pid = srv.pid().to_string();
    snapmv(&["check", s(cow)]).fails_with(1, &["in use by a running server", &pid]);
}

/// A directory sits where the socket would go beside the COW file: it
/// cannot be bound there, must not be deleted as a "stale socket", and the
/// server falls back to the runtime directory, where the admin commands
/// find it. A crash leaves a stale socket there, which the next start
/// replaces.
#[test]
fn directory_in_the_way_beside_the_cow_file() {
    if !tools() {
        return;
    }
    let f = Fixture::bound();
    let side = beside(&f.cow);
    std::fs::create_dir(&side).unwrap();
    std::fs::write(side.join("keep"), b"mine").unwrap();
    let rt = runtime_sock(&f.cow);

    let srv = serve_at(&f, &f.cow, &rt);
    let log = srv.log_text();
    assert!(
        log.contains("falling back")
            && log.contains(s(&side))
            && log.contains("is a directory; not removing it"),
        "no warning naming the path and the reason:\n{log}"
    );
    exercise_live_admin(&f, &f.cow, &srv, "sdb1");
    // A second server is refused, naming this one.
    snapmv_in(
        Some(f.dir.path()),
        &["serve", s(&f.cow), "--unix", s(&f.path("nbd2.sock"))],
    )
    .fails_with(1, &["in use by a running server", &srv.pid().to_string()]);

    // Crash: the runtime socket stays behind, and the next server replaces it.
    srv.stop_with(libc::SIGKILL);
    assert!(rt.exists(), "a killed server cannot remove its socket");
    let srv = serve_at(&f, &f.cow, &rt);
    assert!(srv.log_text().contains("removed stale control socket"));
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "2\n");
    assert_eq!(srv.stop(), 0);

    assert!(
        !rt.exists(),
        "control socket left behind in the runtime dir"
    );
    assert_eq!(std::fs::read(side.join("keep")).unwrap(), b"mine");
    assert_eq!(
        f.list_json()["origins"][0]["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    snapmv(&["check", s(&f.cow)]).ok();
}

/// Some other live process owns a socket beside the COW file and answers
/// for another COW device: the server leaves it alone and falls back, and
/// the admin commands pass over it to the right server.
#[test]
fn foreign_live_socket_beside_the_cow_file() {
    if !tools() {
        return;
    }
    let f = Fixture::bound();
    let side = beside(&f.cow);
    let fake = UnixListener::bind(&side).unwrap();
    // Answers every line with a hello for another device; lives as long as
    // the test binary.
    std::thread::spawn(move || {
        for conn in fake.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines() {
                    if line.is_err() {
                        return;
                    }
                    let hello =
                        r#"{"reply":"hello","pid":1,"cow":"/elsewhere/cow.img","version":"0"}"#;
                    if writeln!(w, "{hello}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let rt = runtime_sock(&f.cow);
    let srv = serve_at(&f, &f.cow, &rt);
    let log = srv.log_text();
    assert!(
        log.contains("live process") && log.contains(s(&side)),
        "{log}"
    );
    exercise_live_admin(&f, &f.cow, &srv, "sdb1");
    assert_eq!(srv.stop(), 0);
    assert!(side.exists(), "someone else's socket was removed");
    assert!(!rt.exists());
}

/// No candidate works: the server logs an error, keeps serving NBD, and
/// the admin commands say the server has no control socket, naming every
/// path they tried.
#[test]
fn no_control_socket_anywhere_still_serves_nbd() {
    if !tools() {
        return;
    }
    let f = Fixture::bound();
    let tmp = f.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // A known environment, so the test knows every candidate.
    let env: Env = &[("XDG_RUNTIME_DIR", None), ("TMPDIR", Some(s(&tmp)))];
    let name = runtime_name(&f.cow);
    let mut blocked = vec![beside(&f.cow)];
    let mut cleanup = RmDirs(Vec::new());
    for d in runtime_dirs(None, &tmp) {
        if !d.exists() {
            std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
            cleanup.0.push(d.clone());
        }
        blocked.push(d.join(&name));
    }
    for b in &blocked {
        std::fs::create_dir(b).unwrap();
        cleanup.0.push(b.clone());
    }

    let nbd = f.path("nbd.sock");
    let mut srv = Server::spawn(
        f.dir.path(),
        env,
        &[s(&f.cow), "--unix", s(&nbd)],
        &f.path("serve.log"),
    );
    srv.wait_log("no control socket");
    srv.wait_ready(&nbd);
    let log = srv.log_text();
    for b in &blocked {
        assert!(
            log.contains(s(b)),
            "log does not name {}:\n{log}",
            b.display()
        );
    }
    assert!(log.contains("ERROR"), "{log}");

    // NBD works, reads and writes.
    assert_eq!(nbd_exports(&f), ["sdb1"]);
    let src = f.path("data.bin");
    let data = pattern(0x5eed, ORIGIN_SIZE as usize);
    std::fs::write(&src, &data).unwrap();
    nbdcopy(s(&src), &nbd_unix(&nbd, "sdb1"));
    let back = f.path("back.bin");
    nbdcopy(&nbd_unix(&nbd, "sdb1"), s(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "NBD read-back differs"
    );

    // Admin commands explain, naming the server and every path tried.
    let pid = srv.pid().to_string();
    let mut needles = vec!["running server", pid.as_str(), "has no control socket"];
    needles.extend(blocked.iter().map(|b| s(b)));
    snapmv_env(None, env, &["snapshot", s(&f.cow), "sdb1"]).fails_with(1, &needles);
    snapmv_env(None, env, &["list", s(&f.cow)]).fails_with(1, &needles);
    snapmv_env(None, env, &["check", s(&f.cow)])
        .fails_with(1, &["in use by a running server", &pid]);

    assert_eq!(srv.stop(), 0);
    for b in &blocked {
        assert!(b.is_dir(), "{} was removed", b.display());
    }
    assert!(f.list_json()["origins"][0]["snapshots"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// Blocks `name` in every runtime directory in `dirs` that a root process
/// uses before `keep` (directories in the way), creating missing ones.
fn block_runtime_dirs_before(dirs: &[PathBuf], keep: &Path, name: &str, rm: &mut RmDirs) {
    for d in dirs.iter().take_while(|d| d.as_path() != keep) {
        if !d.exists() {
            std::fs::DirBuilder::new().mode(0o700).create(d).unwrap();
            rm.0.push(d.clone());
        }
        let b = d.join(name);
        std::fs::create_dir(&b).unwrap();
        rm.0.push(b);
    }
}

/// The server runs with another TMPDIR than the admin commands, so its
/// socket is where they would not look by themselves: they find it through
/// the environment of the process holding the lock.
#[test]
fn admin_finds_a_server_with_another_environment() {
    if !tools() {
        return;
    }
    let f = Fixture::bound();
    let tmp = f.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let env: Env = &[("XDG_RUNTIME_DIR", None), ("TMPDIR", Some(s(&tmp)))];
    let name = runtime_name(&f.cow);
    let dirs = runtime_dirs(None, &tmp);
    let last = dirs.last().unwrap().clone();
    let mut rm = RmDirs(Vec::new());
    std::fs::create_dir(beside(&f.cow)).unwrap();
    block_runtime_dirs_before(&dirs, &last, &name, &mut rm);
    let sock = last.join(&name);
    let mut srv = Server::spawn(
        f.dir.path(),
        env,
        &[s(&f.cow), "--unix", s(&f.path("nbd.sock"))],
        &f.path("serve.log"),
    );
    srv.wait_ready(&sock);
    assert!(
        !inherited_runtime_dirs().contains(&last),
        "the test needs another dir"
    );
    exercise_live_admin(&f, &f.cow, &srv, "sdb1");
    assert_eq!(srv.stop(), 0);
    assert!(!sock.exists());
}

/// Root runs the admin commands against a server run by another user (in
/// that user's runtime directory); root must find it there.
#[test]
fn root_admin_finds_a_users_server() {
    if !tools() {
        return;
    }
    if euid() != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipping: needs root and setpriv");
        return;
    }
    const NOBODY: u32 = 65534;
    let f = Fixture::bound();
    let tmp = f.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    for p in [f.dir.path(), &f.cow, &f.origin, &tmp] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(beside(&f.cow)).unwrap();
    let sock = tmp
        .join(format!("snapmv-{NOBODY}"))
        .join(runtime_name(&f.cow));
    let wrapper = [
        "/usr/bin/setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let env: Env = &[("XDG_RUNTIME_DIR", None), ("TMPDIR", Some(s(&tmp)))];
    let mut srv = Server::spawn_via(
        &wrapper,
        f.dir.path(),
        env,
        &[s(&f.cow), "--unix", s(&f.path("nbd.sock"))],
        &f.path("serve.log"),
    );
    srv.wait_ready(&sock);
    let m = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.uid(), NOBODY, "the server does not run as the other user");
    exercise_live_admin(&f, &f.cow, &srv, "sdb1");
    assert_eq!(srv.stop(), 0);
    assert!(!sock.exists());
}

/// Unmounts, last first, when dropped.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let ok = Command::new("umount")
                .arg(m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

fn mount(args: &[&str]) -> Result<(), String> {
    let o = Command::new("mount")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

/// The COW file is bind-mounted (writable) into a read-only directory, as
/// containers do: binding beside it fails with EROFS.
#[test]
fn read_only_directory_around_the_cow_file() {
    if !tools() {
        return;
    }
    let f = Fixture::bound();
    let ro = f.path("ro");
    std::fs::create_dir(&ro).unwrap();
    let cow = ro.join("cow.img");
    std::fs::write(&cow, b"").unwrap();
    let mut mounts = Mounts(Vec::new());
    let r = mount(&["--bind", s(&ro), s(&ro)])
        .map(|()| mounts.0.push(ro.clone()))
        .and_then(|()| mount(&["-o", "remount,bind,ro", s(&ro)]))
        .and_then(|()| mount(&["--bind", s(&f.cow), s(&cow)]))
        .map(|()| mounts.0.push(cow.clone()));
    if let Err(e) = r {
        assert!(!in_ci(), "mount needed in CI (SNAPMV_CI=1): {e}");
        eprintln!("skipping: cannot mount ({e})");
        return;
    }
    let e = std::fs::write(ro.join("probe"), b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    let rt = runtime_sock(&cow);
    let srv = serve_at(&f, &cow, &rt);
    let log = srv.log_text();
    assert!(
        log.contains("falling back")
            && log.contains(s(&beside(&cow)))
            && log.contains("Read-only file system"),
        "{log}"
    );
    exercise_live_admin(&f, &cow, &srv, "sdb1");
    assert_eq!(srv.stop(), 0);
    assert!(!rt.exists());
    snapmv(&["check", s(&cow)]).ok();
}

/// nbdfuse's filesystem cannot hold sockets (bind gives ENOSYS). The COW
/// file lives there, on an nbdkit memory disk.
#[test]
fn cow_file_on_fuse() {
    if !tools() {
        return;
    }
    let found = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !Path::new("/dev/fuse").exists()
        || !["nbdfuse", "nbdkit", "fusermount3"]
            .iter()
            .all(|t| found(t))
    {
        eprintln!("skipping: needs /dev/fuse, nbdfuse, nbdkit and fusermount3");
        return;
    }
    let f = Fixture::new();
    let mnt = f.path("fuse");
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = f.path("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .args([
            "-P",
            s(&pidfile),
            s(&mnt),
            "--command",
            "nbdkit",
            "-s",
            "memory",
        ])
        .arg((COW_SIZE).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(f.path("nbdfuse.log")).unwrap())
        .spawn()
        .unwrap();
    struct Fuse(PathBuf, Child);
    impl Drop for Fuse {
        fn drop(&mut self) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
            let _ = self.1.wait();
        }
    }
    let mut fuse = Fuse(mnt.clone(), child);
    let t0 = Instant::now();
    while std::fs::read(&pidfile).map_or(true, |p| p.is_empty()) {
        if let Ok(Some(st)) = fuse.1.try_wait() {
            let log = std::fs::read_to_string(f.path("nbdfuse.log")).unwrap_or_default();
            eprintln!("skipping: nbdfuse could not mount ({st}): {log}");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nbdfuse never got ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cow = mnt.join("nbd");
    snapmv(&["format", s(&cow)]).ok();
    snapmv(&["bind", s(&cow), s(&f.origin)]).ok();

    let rt = runtime_sock(&cow);
    let srv = serve_at(&f, &cow, &rt);
    let log = srv.log_text();
    assert!(
        log.contains("falling back") && log.contains(s(&beside(&cow))),
        "{log}"
    );
    exercise_live_admin(&f, &cow, &srv, "sdb1");
    assert_eq!(srv.stop(), 0);
    assert!(!rt.exists());
    snapmv(&["check", s(&cow)]).ok();
    drop(fuse);
}
