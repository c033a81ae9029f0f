//! `Store` (one COW device with its origins) and `Volume` (one version's
//! data path). See ARCHITECTURE.md for the protocol and its invariants.

mod api;
pub use api::*;
mod stub;
pub use stub::{Store, Volume};
