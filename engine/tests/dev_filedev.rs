//! FileDev on regular files (buffered and O_DIRECT, aligned and not) and on
//! a real block device: a loop device set up with losetup when running as
//! root (as CI does). With SNAPMV_CI=1 the loop test must run, not skip.

use snapmv_engine::dev::OpenOptions;
use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use snapmv_engine::{BlockDev, FileDev};
use std::process::Command;
use std::sync::Arc;

fn roundtrip(d: &FileDev) {
    let size = d.size();
    // Unaligned offset and length: O_DIRECT must bounce, never fail.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    d.write_at(513, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    d.read_at(513, &mut back).unwrap();
    assert_eq!(back, data);
    d.flush().unwrap();
    assert!(
        d.read_at(size - 10, &mut [0u8; 11]).is_err(),
        "a read past the end is an error"
    );
    assert!(d.write_at(size, &[1]).is_err());
}

#[test]
fn regular_file_buffered_and_direct() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("dev.img");
    let d = FileDev::open(
        &p,
        &OpenOptions {
            create_size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(d.size(), 1 << 20);
    roundtrip(&d);
    match FileDev::open(
        &p,
        &OpenOptions {
            direct: true,
            ..Default::default()
        },
    ) {
        Ok(d) => roundtrip(&d),
        Err(e) => println!("O_DIRECT not supported on this filesystem: {e}"),
    }
    let ro = FileDev::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ro.write_at(0, &[1]).is_err());
    assert!(FileDev::open(dir.path().join("missing"), &OpenOptions::default()).is_err());
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn losetup(file: &std::path::Path) -> Option<Loop> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .ok()?;
    if !out.status.success() {
        println!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(Loop(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

#[test]
fn loop_device_sized_from_the_device_and_usable_as_cow_and_origin() {
    let is_root = unsafe_geteuid() == 0;
    let ci = std::env::var("SNAPMV_CI").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (cf, of) = (dir.path().join("cow.img"), dir.path().join("origin.img"));
    std::fs::File::create(&cf)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::File::create(&of)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let (Some(cl), Some(ol)) = (
        is_root.then(|| losetup(&cf)).flatten(),
        is_root.then(|| losetup(&of)).flatten(),
    ) else {
        assert!(
            !ci,
            "SNAPMV_CI=1 but no loop device could be set up (root: {is_root})"
        );
        println!("skipping: needs root and losetup");
        return;
    };
    for direct in [false, true] {
        let d = FileDev::open(
            &cl.0,
            &OpenOptions {
                direct,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            d.size(),
            16 << 20,
            "size comes from BLKGETSIZE64, not the inode"
        );
        roundtrip(&d);
    }
    let cow: Dev = Arc::new(
        FileDev::open(
            &cl.0,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let origin: Dev = Arc::new(
        FileDev::open(
            &ol.0,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let s = Store::format(cow.clone(), &FormatOptions::default()).unwrap();
    s.bind("loop", &ol.0, origin.clone(), 0).unwrap();
    let v = s.volume("loop", None).unwrap();
    v.write(4096, &[0x11; 8192], true).unwrap();
    let tag = s.snapshot("loop", None, "on loop", 0).unwrap();
    v.write(4096, &[0x22; 100], true).unwrap();
    let mut b = vec![0u8; 8192];
    s.volume("loop", Some(tag))
        .unwrap()
        .read(4096, &mut b)
        .unwrap();
    assert_eq!(b, vec![0x11; 8192]);
    s.close().unwrap();
    let r = store::check(cow).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // The origin loop device holds the origin's current content in place.
    let mut raw = [0u8; 100];
    origin.read_at(4096, &mut raw).unwrap();
    assert_eq!(raw, [0x22; 100]);
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
