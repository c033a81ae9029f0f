//! The usage example of dm-snap-mv's documentation, replayed end to end on
//! snapmv: ext4 on the origin through nbdfuse and a loop mount, snapshot,
//! snapshot of the snapshot, list, rollback of snap2 onto the origin, stop,
//! then mount the origin FILE directly. Every listing must match the
//! example's.
//!
//! Needs root, /dev/fuse, nbdfuse (libnbd-bin), e2fsprogs and util-linux.
//! Without them the test is skipped, unless SNAPMV_CI=1, where it fails.

mod cli_support;
use cli_support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn available() -> bool {
    let ci = std::env::var("SNAPMV_CI").as_deref() == Ok("1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    if !(root && fuse) {
        assert!(!ci, "SNAPMV_CI=1 but root={root} /dev/fuse={fuse}");
        eprintln!("skipping: needs root and /dev/fuse (root={root}, fuse={fuse})");
        return false;
    }
    [
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fsfreeze",
    ]
    .iter()
    .all(|t| have_tool(t))
}

/// Run a command, returning whether it succeeded (for cleanup paths).
fn try_run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// An NBD export exposed as a file by nbdfuse; unmounted (and the process
/// reaped) on drop.
struct FuseFile {
    dir: PathBuf,
    file: PathBuf,
    child: Option<Child>,
}

impl FuseFile {
    fn start(dir: PathBuf, uri: &str, log: &Path) -> FuseFile {
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("disk");
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let logf = std::fs::File::create(log).unwrap();
        let child = Command::new("nbdfuse")
            .args(["-P", s(&pidfile), s(&file), uri])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn nbdfuse");
        let mut ff = FuseFile {
            dir,
            file,
            child: Some(child),
        };
        // The pid file appears once nbdfuse is ready to serve.
        let t0 = Instant::now();
        loop {
            let ready = std::fs::read_to_string(&pidfile)
                .map(|p| !p.trim().is_empty())
                .unwrap_or(false);
            if ready && ff.file.exists() {
                break;
            }
            if let Some(Ok(Some(st))) = ff.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nbdfuse for {uri} exited ({st}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "nbdfuse not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        ff
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        for _ in 0..50 {
            if try_run("fusermount3", &["-u", s(&self.dir)]) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.child.take() {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            let _ = try_run("fusermount3", &["-uz", s(&self.dir)]);
        }
    }
}

/// A loop mount of an image file; unmounted on drop.
struct LoopMount {
    mnt: PathBuf,
}

impl LoopMount {
    fn mount(image: &Path, mnt: PathBuf) -> LoopMount {
        std::fs::create_dir_all(&mnt).unwrap();
        sh("mount", &["-o", "loop", s(image), s(&mnt)]);
        LoopMount { mnt }
    }

    fn unmount(self) {
        sh("umount", &[s(&self.mnt)]);
        std::mem::forget(self);
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        for _ in 0..50 {
            if try_run("umount", &[s(&self.mnt)]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = try_run("umount", &["-l", s(&self.mnt)]);
    }
}

/// A mounted version: the loop mount drops before the FUSE file under it
/// (fields drop in declaration order).
struct Mounted {
    fs: Option<LoopMount>,
    _fuse: FuseFile,
}

impl Mounted {
    fn new(work: &Path, sock: &Path, export: &str) -> Mounted {
        let tag = export.replace('@', "-");
        let fuse = FuseFile::start(
            work.join(format!("fuse-{tag}")),
            &nbd_unix(sock, export),
            &work.join(format!("nbdfuse-{tag}.log")),
        );
        let fs = LoopMount::mount(&fuse.file, work.join(format!("mnt-{tag}")));
        Mounted {
            fs: Some(fs),
            _fuse: fuse,
        }
    }

    fn dir(&self) -> &Path {
        &self.fs.as_ref().expect("mounted").mnt
    }

    fn touch(&self, name: &str) {
        std::fs::File::create(self.dir().join(name)).unwrap();
        sh("sync", &[]);
    }

    /// Unmount cleanly (asserting success) before the FUSE file goes.
    fn close(mut self) {
        if let Some(fs) = self.fs.take() {
            fs.unmount();
        }
    }
}

/// `fsfreeze -f` for the life of the guard, so a snapshot of a mounted
/// filesystem is a clean image rather than a crash-consistent one.
struct Frozen<'a>(&'a Path);

impl<'a> Frozen<'a> {
    fn new(mnt: &'a Path) -> Frozen<'a> {
        sh("sync", &[]);
        sh("fsfreeze", &["-f", s(mnt)]);
        Frozen(mnt)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = try_run("fsfreeze", &["-u", s(self.0)]);
    }
}

/// File names in a mounted filesystem, sorted, without ext4's lost+found
/// (the example's `ll` listings show only the files).
fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found")
        .collect();
    v.sort();
    v
}

#[test]
fn dm_snap_mv_usage_example() {
    if !available() {
        return;
    }
    let f = Fixture::new();
    let work = f.dir.path();
    // Bigger images than the CLI tests: ext4 wants room for its journal.
    sparse(&f.cow, 512 << 20);
    sparse(&f.origin, 128 << 20);
    let nbd = f.path("nbd.sock");
    // Step timings, printed with the test output, to see where time goes.
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:7.2}s] {what}", t0.elapsed().as_secs_f64());

    // dms create orig sdb1 sdc1 -bF  (chunk size 1 page, as in the example)
    snapmv(&["format", s(&f.cow), "--chunk-size", "4096", "--force"]).ok();
    snapmv(&["bind", s(&f.cow), s(&f.origin), "--id", "orig"]).ok();
    let srv = Server::start(
        work,
        &[s(&f.cow), "--unix", s(&nbd)],
        &f.sock(),
        &f.path("serve.log"),
    );

    step("mkfs");
    // mkfs through the export, mount, touch this-is-orig
    let fuse = FuseFile::start(
        work.join("fuse-mkfs"),
        &nbd_unix(&nbd, "orig"),
        &f.path("mkfs.log"),
    );
    sh("mkfs.ext4", &["-q", "-F", s(&fuse.file)]);
    drop(fuse);
    let orig = Mounted::new(work, &nbd, "orig");
    orig.touch("this-is-orig");
    assert_eq!(ls(orig.dir()), ["this-is-orig"]);

    step("snapshot 1");
    // dms snapshot orig -m snap1; mount it; touch this-is-snap1
    {
        let _frozen = Frozen::new(orig.dir());
        let r = snapmv(&["snapshot", s(&f.cow), "orig", "-m", "snap1"]).ok();
        assert_eq!(r.stdout, "1\n");
    }
    let snap1 = Mounted::new(work, &nbd, "orig@1");
    snap1.touch("this-is-snap1");
    assert_eq!(ls(snap1.dir()), ["this-is-orig", "this-is-snap1"]);

    step("snapshot 2");
    // dms snapshot orig 1 -m snap2; mount it; touch this-is-snap2
    {
        let _frozen = Frozen::new(snap1.dir());
        let r = snapmv(&["snapshot", s(&f.cow), "orig", "--of", "1", "-m", "snap2"]).ok();
        assert_eq!(r.stdout, "2\n");
    }
    let snap2 = Mounted::new(work, &nbd, "orig@2");
    snap2.touch("this-is-snap2");
    assert_eq!(
        ls(snap2.dir()),
        ["this-is-orig", "this-is-snap1", "this-is-snap2"]
    );
    // Isolation: the origin and snap1 did not change.
    assert_eq!(ls(orig.dir()), ["this-is-orig"]);
    assert_eq!(ls(snap1.dir()), ["this-is-orig", "this-is-snap1"]);

    step("list");
    // dms list
    let t = snapmv(&["list", s(&f.cow)]).ok().stdout;
    println!("{t}");
    assert!(t.contains("chunk-size    : 4096 bytes (1 page(s))"), "{t}");
    assert!(t.contains("cow-status    : valid"), "{t}");
    assert!(t.contains("rollbacking   : no"), "{t}");
    let rows: Vec<Vec<&str>> = t
        .lines()
        .filter(|l| l.starts_with("20"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{t}");
    // Tag, parent, own, shared, memo (the origin has no own or shared).
    assert_eq!(rows[0][2..], ["0", ".", ".", ".", "\"ORIGIN\""]);
    assert_eq!(
        (rows[1][2], rows[1][3], rows[1][6]),
        ("1", ".", "\"snap1\"")
    );
    assert_eq!(
        (rows[2][2], rows[2][3], rows[2][6]),
        ("2", "1", "\"snap2\"")
    );
    assert!(
        rows[1][4].parse::<u64>().unwrap() > 0,
        "snap1 owns chunks: {t}"
    );

    step("rollback");
    // umount /mnt/orig; dms remove orig; dms rollback snap2 2; dms create orig
    orig.close();
    {
        // snap2 stays mounted, as in the example; freeze it so the origin
        // gets a clean image of it.
        let _frozen = Frozen::new(snap2.dir());
        snapmv(&["rollback", s(&f.cow), "orig", "2", "--wait"]).ok();
    }
    step("remount origin");
    let orig = Mounted::new(work, &nbd, "orig");
    orig.touch("this-is-orig-after-rollback");
    let four = [
        "this-is-orig",
        "this-is-orig-after-rollback",
        "this-is-snap1",
        "this-is-snap2",
    ];
    assert_eq!(ls(orig.dir()), four);
    // The snapshots are untouched by the rollback.
    assert_eq!(ls(snap1.dir()), ["this-is-orig", "this-is-snap1"]);
    assert_eq!(
        ls(snap2.dir()),
        ["this-is-orig", "this-is-snap1", "this-is-snap2"]
    );

    step("unmount all");
    // umount /mnt/orig /mnt/snap1 /mnt/snap2; dmsetup remove_all
    orig.close();
    snap1.close();
    snap2.close();
    step("stop");
    assert_eq!(srv.stop(), 0, "serve must stop cleanly");

    step("direct mount");
    // mount /dev/sdb1 /mnt/: the origin file itself holds the filesystem.
    sh("e2fsck", &["-fn", s(&f.origin)]);
    let direct = LoopMount::mount(&f.origin, work.join("mnt-direct"));
    assert_eq!(ls(&direct.mnt), four);
    direct.unmount();
    snapmv(&["check", s(&f.cow)]).ok();
    step("done");
}
