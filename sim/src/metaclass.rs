//! Which blocks of a COW image hold metadata (for aiming corruption).
//! Placeholder until the engine's on-disk format lands.

use crate::simdev::Image;
use std::collections::BTreeSet;

pub fn classify(_img: &Image) -> (Vec<u64>, BTreeSet<u64>) {
    (Vec::new(), BTreeSet::new())
}
