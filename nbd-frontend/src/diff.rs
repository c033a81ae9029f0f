//! `snapmv diff`: the byte ranges where two versions of an origin may
//! differ, gathered page by page (offline from the store, live from the
//! control socket: the same pages either way) and printed as a table or
//! one JSON object.

use crate::control::{DiffPage, ExtentWire};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// A diff gathered whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffReport {
    pub origin: String,
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub chunk_size: u32,
    pub extents: Vec<ExtentWire>,
}

impl DiffReport {
    /// Ask `page(offset)` for pages until the last one, each starting where
    /// the previous one's description ended.
    pub fn gather(
        origin: &str,
        (from, to): (Option<u64>, Option<u64>),
        mut page: impl FnMut(u64) -> Result<DiffPage>,
    ) -> Result<DiffReport> {
        let mut extents = Vec::new();
        let mut offset = 0;
        let chunk_size = loop {
            let p = page(offset)?;
            let inside = p
                .extents
                .iter()
                .all(|e| offset <= e.offset && e.offset + e.length <= p.end);
            // A page that describes nothing would be asked for again forever.
            if !inside || p.end > p.size || (p.end <= offset && p.end < p.size) {
                bail!("a diff page of origin {origin} from byte {offset} makes no sense: {p:?}");
            }
            extents.extend(p.extents);
            if p.end >= p.size {
                break p.chunk_size;
            }
            offset = p.end;
        };
        Ok(DiffReport {
            origin: origin.to_string(),
            from,
            to,
            chunk_size,
            extents,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }

    /// `{"origin","from","to","chunk_size","extents":[{"offset","length"}],"bytes"}`;
    /// `from` and `to` are tags, or "origin".
    pub fn to_json(&self) -> Value {
        let version = |t: Option<u64>| t.map_or(json!("origin"), |t| json!(t));
        json!({
            "origin": self.origin,
            "from": version(self.from),
            "to": version(self.to),
            "chunk_size": self.chunk_size,
            "extents": self.extents,
            "bytes": self.bytes(),
        })
    }

    /// One extent a line (offset, length in bytes), then the total.
    pub fn to_table(&self) -> String {
        let name =
            |t: Option<u64>| t.map_or(self.origin.clone(), |t| format!("{}@{t}", self.origin));
        let mut out = format!("{:>20} {:>20}\n", "OFFSET", "LENGTH");
        for e in &self.extents {
            out += &format!("{:>20} {:>20}\n", e.offset, e.length);
        }
        out += &format!(
            "total: {} bytes in {} extent(s) may differ between {} and {} (chunk size {})\n",
            self.bytes(),
            self.extents.len(),
            name(self.from),
            name(self.to),
            self.chunk_size
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(extents: &[(u64, u64)], end: u64) -> DiffPage {
        DiffPage {
            chunk_size: 4096,
            size: 16384,
            extents: extents
                .iter()
                .map(|&(offset, length)| ExtentWire { offset, length })
                .collect(),
            end,
        }
    }

    #[test]
    fn pages_join_and_print() {
        let mut pages = vec![page(&[(0, 4096)], 8192), page(&[(8192, 8192)], 16384)].into_iter();
        let r = DiffReport::gather("o", (Some(1), None), |_| Ok(pages.next().unwrap())).unwrap();
        assert_eq!(r.bytes(), 12288);
        assert_eq!(
            r.to_json(),
            json!({"origin": "o", "from": 1, "to": "origin", "chunk_size": 4096,
                   "extents": [{"offset": 0, "length": 4096}, {"offset": 8192, "length": 8192}],
                   "bytes": 12288})
        );
        let t = r.to_table();
        assert!(t.contains("8192                 8192\n"), "{t}");
        assert!(t.ends_with("total: 12288 bytes in 2 extent(s) may differ between o@1 and o (chunk size 4096)\n"), "{t}");
    }

    #[test]
    fn pages_that_go_nowhere_are_refused() {
        let stuck = DiffReport::gather("o", (None, Some(2)), |_| Ok(page(&[], 0)));
        assert!(stuck.is_err());
        let outside = DiffReport::gather("o", (None, Some(2)), |_| Ok(page(&[(0, 8192)], 4096)));
        assert!(outside.is_err());
    }
}
