//! The NBD export catalogue over open stores: origin `ID` is export `ID`,
//! snapshot `TAG` of it is `ID@TAG`. Every call asks the stores afresh, so a
//! snapshot taken through the control socket is exportable at once and a
//! deleted one vanishes from the list.

use crate::nbd::{Export, Exports};
use snapmv_engine::store::{Store, VersionId};

pub struct StoreExports {
    stores: Vec<Store>,
    read_only: bool,
}

impl StoreExports {
    /// `stores` must have pairwise distinct origin ids (the CLI checks this
    /// at start); lookups take the first store that knows an id.
    pub fn new(stores: Vec<Store>, read_only: bool) -> StoreExports {
        StoreExports { stores, read_only }
    }
}

/// The export name of a version.
pub fn export_name(v: &VersionId) -> String {
    match v.tag {
        None => v.origin.clone(),
        Some(t) => format!("{}@{t}", v.origin),
    }
}

/// Split an export name into (origin id, tag). `None` for names that cannot
/// name any version (empty id, a tag that is not a positive integer), and
/// for any spelling but the canonical one (`export_name`): `--allow`
/// patterns match the name a client asks for, so `sdb1@01` must not open
/// what `sdb1@1` names.
pub fn parse_export_name(name: &str) -> Option<(&str, Option<u64>)> {
    match name.rsplit_once('@') {
        None if !name.is_empty() => Some((name, None)),
        None => None,
        Some((id, tag)) => {
            // u64::from_str accepts a leading '+' and zeros, which would
            // give one version many names; insist on plain digits, no
            // leading zero.
            let plain =
                !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()) && !tag.starts_with('0');
            if id.is_empty() || !plain {
                return None;
            }
            match tag.parse::<u64>() {
                Ok(t) if t > 0 => Some((id, Some(t))),
                _ => None,
            }
        }
    }
}

impl Exports for StoreExports {
    fn list(&self) -> Vec<String> {
        self.stores
            .iter()
            .flat_map(|s| s.versions())
            .map(|v| export_name(&v))
            .collect()
    }

    fn open(&self, name: &str) -> Option<Export> {
        let (id, tag) = parse_export_name(name)?;
        self.stores.iter().find_map(|s| {
            let volume = s.volume(id, tag).ok()?;
            if !volume.is_live() {
                return None;
            }
            Some(Export {
                description: volume.memo(),
                volume,
                read_only: self.read_only,
            })
        })
    }

    /// With exactly one origin served, an empty export name means it, as
    /// with qemu-nbd's single export. Asked at every such connection: the
    /// origins alone, not a walk over every snapshot (`versions()`, tens
    /// of ms at 100,000 snapshots, holding the trees an admin call waits
    /// for).
    fn default_name(&self) -> Option<String> {
        let mut origins = self.stores.iter().flat_map(|s| s.origin_ids());
        let first = origins.next()?;
        if origins.next().is_some() {
            return None;
        }
        Some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let v = VersionId {
            origin: "orig".into(),
            tag: Some(12),
        };
        assert_eq!(export_name(&v), "orig@12");
        assert_eq!(parse_export_name("orig@12"), Some(("orig", Some(12))));
        assert_eq!(parse_export_name("orig"), Some(("orig", None)));
        for bad in [
            "",
            "@1",
            "orig@",
            "orig@0",
            "orig@+1",
            "orig@01",
            "orig@007",
            "orig@x",
            "orig@99999999999999999999999",
        ] {
            assert_eq!(parse_export_name(bad), None, "{bad:?}");
        }
    }

    /// The empty name means the one origin served, snapshots or not; with
    /// two origins (in one store or two) it means nothing.
    #[test]
    fn the_default_export_is_the_only_origin() {
        use snapmv_engine::store::FormatOptions;
        use snapmv_engine::MemDev;
        use std::sync::Arc;
        let store = || {
            let cow = Arc::new(MemDev::new(16 << 20));
            Store::format(cow, &FormatOptions::default()).unwrap()
        };
        let origin = || Arc::new(MemDev::new(1 << 20));
        let (a, b) = (store(), store());
        assert_eq!(
            StoreExports::new(vec![a.clone()], false).default_name(),
            None
        );
        a.bind("o", "/dev/o", origin(), 0).unwrap();
        a.snapshot("o", None, "", 0).unwrap();
        let one = StoreExports::new(vec![a.clone(), b.clone()], false);
        assert_eq!(one.default_name().as_deref(), Some("o"));
        b.bind("p", "/dev/p", origin(), 0).unwrap();
        assert_eq!(one.default_name(), None);
        a.bind("q", "/dev/q", origin(), 0).unwrap();
        assert_eq!(StoreExports::new(vec![a], false).default_name(), None);
    }
}
