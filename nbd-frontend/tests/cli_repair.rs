//! `snapmv check --repair` on the COW device a power cut of a live server
//! left with a leaked chunk (engine/tests/fixtures/powercut-leak.cow.zst):
//! check finds the leak (exit 1), repair fixes it (exit 0), check is clean.

mod cli_support;
use cli_support::*;

fn fixture(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/fixtures/powercut-leak.cow.zst"
    );
    let cow = dir.join("cow.img");
    let st = std::process::Command::new("zstd")
        .args(["-dq", src, "-o"])
        .arg(&cow)
        .status();
    match st {
        Ok(s) if s.success() => Some(cow),
        r if std::env::var_os("SNAPMV_CI").is_none() => {
            println!("skipped: zstd not available ({r:?})");
            None
        }
        r => panic!("zstd is needed (scripts/setup.sh installs it): {r:?}"),
    }
}

#[test]
fn repair_reclaims_the_powercut_leak() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cow) = fixture(dir.path()) else {
        return;
    };
    let r = snapmv(&["check", s(&cow)]).expect_code(1);
    assert!(r.stdout.contains("(leaked): 43568..43583"), "{}", r.stdout);
    let r = snapmv(&["check", "--repair", s(&cow)]).ok();
    assert!(
        r.stdout
            .contains("repaired: state page: data chunks: 2343 -> 2342"),
        "{}",
        r.stdout
    );
    let r = snapmv(&["check", "--json", s(&cow)]).ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["clean"], true, "{}", r.stdout);
    assert_eq!(v["data_chunks_referenced"], 2342);
    // A second repair has nothing to do.
    let r = snapmv(&["check", "--repair", "--json", s(&cow)]).ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["fixed"], serde_json::json!([]), "{}", r.stdout);
}
