//! `snapmv check --repair` on the COW device a power cut of a live server
//! left with a leaked chunk (engine/tests/fixtures/powercut-leak.cow.zst):
//! check finds the leak (exit 1; with --json as structured damage), repair
//! fixes it (exit 0), check is clean.

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
    // The same as structured damage: space accounting, in no one page.
    let r = snapmv(&["check", "--json", s(&cow)]).expect_code(1);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let damage = v["damage"].as_array().unwrap();
    let leak = damage.iter().find(|d| d["kind"] == "leaked").unwrap();
    assert_eq!(leak["tree"], "space map", "{leak}");
    assert_eq!(leak["path"], serde_json::json!([]));
    assert!(leak["detail"].as_str().unwrap().ends_with("43568..43583"));
    let counter = damage
        .iter()
        .find(|d| d["kind"] == "counter_mismatch")
        .unwrap();
    assert_eq!(counter["counter"], "data chunks", "{counter}");
    assert_eq!(
        (&counter["recorded"], &counter["found"]),
        (&2343.into(), &2342.into())
    );
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
