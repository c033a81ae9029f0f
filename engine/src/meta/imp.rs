//! PLACEHOLDER signatures; the meta helper replaces the bodies.
#![allow(unused)]
use super::*;
use crate::dev::BlockDev;
use crate::error::{Error, Result};

pub struct Meta<D: BlockDev> {
    dev: D,
}

pub struct CommitBatch;
pub struct CheckpointBatch;

impl CommitBatch {
    /// Flush data, write journal records, flush. Call without the meta lock.
    pub fn write(&self) -> Result<()> {
        todo!()
    }
}
impl CheckpointBatch {
    pub fn write(&self) -> Result<()> {
        todo!()
    }
}

#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Each damage found, with its block, tree and key range.
    pub errors: Vec<String>,
    pub pages_checked: u64,
    pub exceptions: u64,
    pub data_chunks_referenced: u64,
}

impl<D: BlockDev> Meta<D> {
    /// Write a fresh, empty store. Refuses a device that already holds a valid
    /// superblock unless `opts.force`.
    pub fn format(dev: D, opts: &FormatOptions) -> Result<Self> {
        todo!()
    }
    /// Open: pick the newest valid superblock, replay the journal.
    pub fn open(dev: D) -> Result<Self> {
        todo!()
    }
    /// Open without writing anything (replay in memory only).
    pub fn open_read_only(dev: D) -> Result<Self> {
        todo!()
    }
    pub fn dev(&self) -> &D {
        &self.dev
    }
    pub fn geometry(&self) -> Geometry {
        todo!()
    }
    pub fn usage(&self) -> Usage {
        todo!()
    }
    pub fn get(&mut self, t: Tree, key: u128) -> Result<Option<Vec<u8>>> {
        todo!()
    }
    pub fn get_u64(&mut self, t: Tree, key: u128) -> Result<Option<u64>> {
        todo!()
    }
    /// First entry with lo <= key <= hi.
    pub fn seek(&mut self, t: Tree, lo: u128, hi: u128) -> Result<Option<(u128, Vec<u8>)>> {
        todo!()
    }
    /// Entries with lo <= key <= hi, ascending, at most `limit`.
    pub fn range(&mut self, t: Tree, lo: u128, hi: u128, limit: usize) -> Result<Vec<(u128, Vec<u8>)>> {
        todo!()
    }
    /// Insert or replace. `val.len()` must equal `t.value_size()`.
    pub fn insert(&mut self, t: Tree, key: u128, val: &[u8]) -> Result<()> {
        todo!()
    }
    /// Remove; returns whether the key was present.
    pub fn remove(&mut self, t: Tree, key: u128) -> Result<bool> {
        todo!()
    }
    /// Allocate one data chunk. `Error::NoSpace` when none is free (a small
    /// reserve is kept back for metadata so commits can always complete).
    pub fn alloc_chunk(&mut self) -> Result<u64> {
        todo!()
    }
    pub fn free_chunk(&mut self, chunk: u64) -> Result<()> {
        todo!()
    }
    pub fn app_state(&self) -> &[u8] {
        todo!()
    }
    pub fn set_app_state(&mut self, s: &[u8]) -> Result<()> {
        todo!()
    }
    /// Pages dirtied by the open transaction.
    pub fn dirty_pages(&self) -> usize {
        todo!()
    }
    /// Close the open transaction. None if it changed nothing.
    pub fn begin_commit(&mut self) -> Result<Option<CommitBatch>> {
        todo!()
    }
    pub fn end_commit(&mut self, b: CommitBatch) -> Result<()> {
        todo!()
    }
    /// Some when the journal is past its threshold: home-write pages.
    pub fn begin_checkpoint(&mut self) -> Result<Option<CheckpointBatch>> {
        todo!()
    }
    pub fn end_checkpoint(&mut self, b: CheckpointBatch) -> Result<()> {
        todo!()
    }
    /// begin/write/end commit, then checkpoint if due, all under `&mut self`.
    pub fn commit(&mut self) -> Result<()> {
        todo!()
    }
}

/// Walk every metadata page read-only; verify checksums, types, block
/// numbers, key order and bounds; rebuild the space map from the trees and
/// compare it with the stored one.
pub fn check<D: BlockDev>(dev: D) -> Result<CheckReport> {
    todo!()
}
