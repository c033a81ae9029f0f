//! The checker's reads: pages asked for in ascending block order are read
//! from the device in runs of up to `RUN_BLOCKS` blocks, one request per
//! run instead of one per page, so a walk goes forward across the device.
//! A page the journal replay holds a newer image of is taken from there
//! (`Meta::peek_page`), as every other reader of the store would see it.

use super::meta::Meta;
use super::recovery::{read_superblock, replayed_homes};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, Page, BLOCK, PAGE_SIZE};
use std::collections::BTreeSet;

/// Blocks per read: 256 KiB.
const RUN_BLOCKS: u64 = 64;
/// Blocks not asked for that a run may read over to reach the next one
/// asked for: none. Tree pages come from their own cursor, so the pages of
/// a level are mostly adjacent anyway, and a checker that reads only what
/// the trees reference never touches a freed page: the simulator's damage
/// probe counts any read of a damaged block as a use of it (contract 5).
const MAX_GAP: u64 = 0;

/// Which blocks must not be read from home.
enum Newer {
    /// Those the journal replay holds an image of.
    Blocks(BTreeSet<u64>),
    /// Which ones is unknown (the journal could not be read again): every
    /// page goes through `peek_page`, one by one.
    All,
}

impl Newer {
    fn contains(&self, block: u64) -> bool {
        match self {
            Newer::Blocks(b) => b.contains(&block),
            Newer::All => true,
        }
    }
}

pub(super) struct BulkReader<'a, D: BlockDev> {
    m: &'a Meta<D>,
    newer: Newer,
    /// The last run read: `run_blocks` blocks from `run_start`.
    run: Vec<u8>,
    run_start: u64,
    run_blocks: u64,
    /// Blocks below this one, from the last run that failed, are read one
    /// at a time, so the error names the block and the rest still read.
    failed_until: u64,
    /// A page read alone.
    single: Box<Page>,
}

impl<'a, D: BlockDev> BulkReader<'a, D> {
    pub(super) fn new(m: &'a Meta<D>) -> Self {
        // Pages the journal replayed are pinned in the cache, newer than
        // home: with nothing in the journal there are none.
        let newer = if m.journal_used() == 0 {
            Newer::Blocks(BTreeSet::new())
        } else {
            let dev: &dyn BlockDev = m.dev();
            match read_superblock(dev).and_then(|sb| replayed_homes(dev, &sb)) {
                Ok(blocks) => Newer::Blocks(blocks),
                Err(_) => Newer::All,
            }
        };
        BulkReader {
            m,
            newer,
            run: Vec::new(),
            run_start: 0,
            run_blocks: 0,
            failed_until: 0,
            single: format::new_page(),
        }
    }

    /// The current content of `block`, unvalidated. `ahead` lists the
    /// blocks the caller asks for next, ascending: a run read now covers
    /// those it can reach.
    pub(super) fn read(&mut self, block: u64, ahead: impl Iterator<Item = u64>) -> Result<&Page> {
        if self.newer.contains(block) || block < self.failed_until {
            return self.read_single(block);
        }
        if !(self.run_start..self.run_start + self.run_blocks).contains(&block) {
            let end = self.run_end(block, ahead);
            if self.read_run(block, end).is_err() {
                self.failed_until = end;
                return self.read_single(block);
            }
        }
        let at = ((block - self.run_start) * BLOCK) as usize;
        self.run[at..at + PAGE_SIZE]
            .try_into()
            .map_err(|_| Error::Invalid(format!("block {block} is not a whole page of the run")))
    }

    fn read_single(&mut self, block: u64) -> Result<&Page> {
        self.single = self.m.peek_page(block)?;
        Ok(&self.single)
    }

    /// One past the last block a run from `block` reads: the blocks of
    /// `ahead` it reaches within `RUN_BLOCKS` with gaps of `MAX_GAP` at
    /// most, and none past the device.
    fn run_end(&self, block: u64, ahead: impl Iterator<Item = u64>) -> u64 {
        let mut end = block + 1;
        for next in ahead {
            if next < end {
                continue;
            }
            if next - block >= RUN_BLOCKS || next - end > MAX_GAP {
                break;
            }
            end = next + 1;
        }
        end.min(self.m.layout().device_blocks).max(block + 1)
    }

    fn read_run(&mut self, start: u64, end: u64) -> Result<()> {
        let bytes = ((end - start) * BLOCK) as usize;
        self.run.resize(bytes, 0);
        self.run_blocks = 0;
        self.m
            .dev()
            .read_at(start * BLOCK, &mut self.run[..bytes])?;
        self.run_start = start;
        self.run_blocks = end - start;
        Ok(())
    }
}
