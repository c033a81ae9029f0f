//! `snapmv check --json` gives each damage as structured fields: over a
//! damaged leaf of an exceptions tree of height 2, the tree, the path of
//! blocks from the root, the leaf's key range and the kind; the text output
//! gives the same path on one line.

mod cli_support;
use cli_support::*;

use snapmv_engine::dev::OpenOptions;
use snapmv_engine::format::{self, node};
use snapmv_engine::meta::{FormatOptions, Meta, Tree, ZERO_CHUNK};
use snapmv_engine::{BlockDev, FileDev};
use std::path::Path;

/// A COW device whose exceptions tree has height 2; returns the path root
/// -> second leaf and that leaf's key range, from the pages themselves.
fn two_level_cow(cow: &Path) -> (Vec<u64>, u128, Option<u128>) {
    sparse(cow, 16 << 20);
    let dev = FileDev::open(cow, &OpenOptions::default()).unwrap();
    let opts = FormatOptions {
        chunk_size: 4096,
        force: false,
    };
    let mut m = Meta::format(dev, &opts).unwrap();
    for i in 0..700u128 {
        m.insert(Tree::Exceptions, i * 1000 + 7, &ZERO_CHUNK.to_le_bytes())
            .unwrap();
    }
    m.checkpoint().unwrap();
    let (root, height) = m.tree_root(Tree::Exceptions);
    assert_eq!(height, 2);
    let mut page = vec![0u8; 4096];
    m.dev().read_at(root * 4096, &mut page).unwrap();
    let info = format::decode_node(&page, root).unwrap();
    let key = |i: usize| node::key_at(&page, i, info.entry_size());
    let to = (info.count > 2).then(|| key(2));
    (vec![root, node::child_at(&page, 1)], key(1), to)
}

fn flip_byte(cow: &Path, at: u64) {
    let dev = FileDev::open(cow, &OpenOptions::default()).unwrap();
    let mut b = [0u8; 1];
    dev.read_at(at, &mut b).unwrap();
    dev.write_at(at, &[b[0] ^ 0x08]).unwrap();
    dev.flush().unwrap();
}

#[test]
fn check_json_names_tree_path_keys_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let cow = dir.path().join("cow.img");
    let (path, from, to) = two_level_cow(&cow);
    let leaf = path[1];
    flip_byte(&cow, leaf * 4096 + 2000);

    let r = snapmv(&["check", "--json", s(&cow)]).expect_code(1);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["clean"], false, "{}", r.stdout);
    let damage = v["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 1, "{}", r.stdout);
    let d = &damage[0];
    assert_eq!(d["tree"], "exceptions");
    assert_eq!(d["path"], serde_json::json!(path));
    assert_eq!(d["keys"]["from"], format!("{from:#x}"));
    assert_eq!(
        d["keys"]["to"],
        serde_json::json!(to.map(|t| format!("{t:#x}")))
    );
    assert_eq!(d["kind"], "corrupt");
    assert!(d["detail"].as_str().unwrap().contains("checksum"), "{d}");
    assert_eq!(v["errors"].as_array().unwrap().len(), 1);

    let r = snapmv(&["check", s(&cow)]).expect_code(1);
    let want = format!(
        "exceptions: block {leaf} (path {} -> {leaf}, keys {from:#x}..",
        path[0]
    );
    assert!(r.stdout.contains(&want), "{}", r.stdout);
}
