//! snapmv-engine: a multi-version snapshot store for block devices.
//!
//! Layers, bottom to top (data flows downward only):
//! - [`dev`]: the `BlockDev` trait under all I/O, with `MemDev` and `FileDev`.
//! - [`format`]: on-disk encoding of superblocks and metadata pages.
//! - [`meta`]: journalled metadata: B+trees, space map, transactions, checker.
//! - [`vtree`]: the version tree and versioned-pointer algebra (pure, no I/O).
//! - [`store`]: `Store` (a COW device with its origins) and `Volume`.
//! - [`sync`]: facade over `std::sync` / `loom::sync`.
//!
//! See ARCHITECTURE.md at the repository root for the invariants.

pub mod dev;
pub mod error;
pub mod format;
pub mod meta;
pub mod planted;
pub mod store;
pub mod sync;
pub mod vtree;

pub use dev::{BlockDev, FileDev, MemDev};
pub use error::{Error, Result};
