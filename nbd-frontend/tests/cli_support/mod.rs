//! Shared helpers for the CLI and example tests: run the `snapmv` binary,
//! make sparse image files, and run `snapmv serve` under a guard that
//! always stops it.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapmv");

/// The result of one `snapmv` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panic with the whole output unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        self.expect_code(0)
    }

    /// Expect failure with a message containing every one of `needles`.
    #[track_caller]
    pub fn fails_with(self, code: i32, needles: &[&str]) -> Run {
        let r = self.expect_code(code);
        for n in needles {
            assert!(
                r.stderr.contains(n),
                "stderr lacks {n:?}\nstderr: {}",
                r.stderr
            );
        }
        r
    }
}

/// Environment changes for a `snapmv` run: set (`Some`) or remove (`None`).
pub type Env<'a> = &'a [(&'a str, Option<&'a str>)];

fn apply_env(c: &mut Command, env: Env) {
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
}

/// Run `snapmv args...` in `cwd` (or the current directory).
pub fn snapmv_in(cwd: Option<&Path>, args: &[&str]) -> Run {
    snapmv_env(cwd, &[], args)
}

/// Run `snapmv args...` in `cwd` with `env` applied.
pub fn snapmv_env(cwd: Option<&Path>, env: Env, args: &[&str]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args).env("RUST_LOG", "warn").stdin(Stdio::null());
    apply_env(&mut c, env);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    Run::from(c.output().expect("cannot run the snapmv binary"))
}

pub fn snapmv(args: &[&str]) -> Run {
    snapmv_in(None, args)
}

/// Shorthand for a path argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A sparse file of `size` bytes.
pub fn sparse(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Deterministic, position-dependent content: every 8 bytes hold
/// `seed ^ offset`, so a misplaced or stale block is caught by position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut off = 0u64;
    while v.len() < len {
        v.extend_from_slice(&(seed ^ off).to_le_bytes());
        off += 8;
    }
    v.truncate(len);
    v
}

pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}

/// A temp directory with a COW image and an origin image named `sdb1`
/// (so the default origin id is `sdb1`, as in the dm-snap-mv example).
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub cow: PathBuf,
    pub origin: PathBuf,
}

pub const COW_SIZE: u64 = 64 << 20;
pub const ORIGIN_SIZE: u64 = 8 << 20;

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let cow = dir.path().join("cow.img");
        let origin = dir.path().join("sdb1");
        sparse(&cow, COW_SIZE);
        sparse(&origin, ORIGIN_SIZE);
        Fixture { dir, cow, origin }
    }

    /// Formatted (default 64 KiB chunks) with `sdb1` bound.
    pub fn bound() -> Fixture {
        let f = Fixture::new();
        snapmv(&["format", s(&f.cow)]).ok();
        snapmv(&["bind", s(&f.cow), s(&f.origin)]).ok();
        f
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn sock(&self) -> PathBuf {
        let mut p = std::fs::canonicalize(&self.cow)
            .expect("canonical cow")
            .into_os_string();
        p.push(".snapmv.sock");
        PathBuf::from(p)
    }

    pub fn list_json(&self) -> serde_json::Value {
        let r = snapmv(&["list", s(&self.cow), "--json"]).ok();
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("list --json: {e}\n{}", r.stdout))
    }
}

/// A running `snapmv serve`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Server {
    /// Start `snapmv serve args...` in `cwd`, with its log in `log`, and
    /// wait until the control socket `ready` answers.
    pub fn start(cwd: &Path, args: &[&str], ready: &Path, log: &Path) -> Server {
        let mut srv = Server::spawn(cwd, &[], args, log);
        srv.wait_ready(ready);
        srv
    }

    /// Start `snapmv serve args...` in `cwd` with `env` applied, without
    /// waiting for anything.
    pub fn spawn(cwd: &Path, env: Env, args: &[&str], log: &Path) -> Server {
        Server::spawn_via(&[], cwd, env, args, log)
    }

    /// [`Server::spawn`] through `wrapper` (a command that execs its
    /// arguments, such as `setpriv --reuid=...`), so the pid is the server's.
    pub fn spawn_via(wrapper: &[&str], cwd: &Path, env: Env, args: &[&str], log: &Path) -> Server {
        let logf = std::fs::File::create(log).expect("log file");
        let mut c = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        c.arg("serve")
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        apply_env(&mut c, env);
        let child = c.spawn().expect("spawn snapmv serve");
        Server {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// Wait until the log contains `needle` (the server must stay up).
    pub fn wait_log(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            self.assert_running();
            if Instant::now() > deadline {
                panic!(
                    "snapmv serve never logged {needle:?} in 60s:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("snapmv serve exited early ({st}):\n{}", self.log_text());
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `sock` (a control or NBD socket) takes connections.
    pub fn wait_ready(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(sock).is_ok() {
                return;
            }
            self.assert_running();
            if Instant::now() > deadline {
                panic!("snapmv serve not ready after 60s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; returns the exit code (must be a clean stop).
    pub fn stop(mut self) -> i32 {
        self.stop_inner(libc::SIGTERM)
    }

    /// Stop with signal `sig` and wait; returns the exit code.
    pub fn stop_with(mut self, sig: libc::c_int) -> i32 {
        self.stop_inner(sig)
    }

    fn stop_inner(&mut self, sig: libc::c_int) -> i32 {
        let Some(mut c) = self.child.take() else {
            return -1;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return st.code().unwrap_or(-1),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return -1;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_inner(libc::SIGTERM);
        }
    }
}

/// Whether an external tool is installed. With SNAPMV_CI=1 a missing tool
/// fails the test instead of skipping it.
pub fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found && std::env::var("SNAPMV_CI").as_deref() == Ok("1") {
        panic!("{name} is required in CI (SNAPMV_CI=1) but not installed");
    }
    if !found {
        eprintln!("skipping: {name} not installed");
    }
    found
}

/// Run an external command, panicking with its output on failure.
#[track_caller]
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .env("PATH", "/usr/bin:/usr/sbin:/bin:/sbin")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// NBD URI of export `name` on a Unix socket.
pub fn nbd_unix(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", s(sock))
}

/// Export names listed by `nbdinfo --list --json`.
pub fn nbd_list(uri: &str) -> Vec<String> {
    let out = sh("nbdinfo", &["--list", "--json", uri]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo json: {e}\n{out}"));
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["export-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Copy `src` to `dst` with nbdcopy (either may be a file or an NBD URI).
pub fn nbdcopy(src: &str, dst: &str) {
    sh("nbdcopy", &[src, dst]);
}
