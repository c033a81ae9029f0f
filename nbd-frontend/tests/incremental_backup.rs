//! scripts/incremental-backup.sh's demo, end to end with real tools: an
//! ext4 filesystem on a live origin served by the `snapmv` binary, files
//! written through the server (nbdfuse + debugfs), snapshot 1 copied in
//! full with nbdcopy, more writes, snapshot 2, then only the extents that
//! `nbdinfo --map=snapmv:changed-since:1` marks copied into the backup.
//! Skipped when a tool is missing, unless SNAPMV_CI=1.

mod nbd_support;

use std::path::Path;
use std::time::Duration;

use nbd_support::{run, tool};

#[test]
fn incremental_backup_demo() {
    let tools = [
        "mkfs.ext4",
        "debugfs",
        "e2fsck",
        "nbdfuse",
        "fusermount3",
        "nbdinfo",
        "nbdcopy",
        "nbdsh",
        "bc",
    ];
    if tools.iter().any(|t| tool(t).is_none()) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/incremental-backup.sh");
    let bash = tool("bash").unwrap();
    let out = run(
        &bash,
        &[
            "-c",
            &format!(
                "SNAPMV={} {} demo 64M",
                env!("CARGO_BIN_EXE_snapmv"),
                script.display()
            ),
        ],
        Duration::from_secs(300),
    );
    assert!(out.ok, "{out}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("MOVED="))
        .unwrap_or_else(|| panic!("no summary\n{out}"));
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} missing in {line}"))
            .to_string()
    };
    let moved: u64 = field("MOVED=").parse().unwrap();
    let bound: u64 = field("BOUND=").parse().unwrap();
    assert_eq!(
        field("SAME="),
        "yes",
        "backup differs from snapshot 2\n{out}"
    );
    assert!(
        moved > 0 && moved <= bound,
        "moved {moved}, bound {bound}\n{out}"
    );
    // About 3 MiB of new file data on a 64 MiB filesystem: far from a
    // full copy.
    assert!(moved < (64 << 20) / 8, "moved {moved}\n{out}");
    println!("{}", out.stdout);
}
