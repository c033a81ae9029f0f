//! Journal records (jbd2-style physical journal).
//!
//! A transaction occupies consecutive ring blocks:
//! `desc, image*, [desc, image*]..., commit`. Each descriptor lists the
//! home block numbers of the page images that follow it, then the blocks
//! *revoked* by the transaction (tree pages it freed: older images of them
//! must not be written home on replay, since the block may now hold data).
//! The commit block's `data_crc` covers every descriptor and image, so a
//! transaction is replayed entirely or not at all.
//!
//! Descriptor: header seq = txn seq; 24 uuid u64; 32 n_homes u32;
//! 36 n_revokes u32; 40 flags u32 (bit 0: last descriptor); 64.. u64 entries.
//! Commit: header seq = txn seq; 24 uuid u64; 32 blocks u32 (whole txn,
//! commit included); 36 data_crc u32.

use super::{check_header, init_header, new_page, rd_u32, rd_u64, wr_u32, wr_u64};
use super::{BlockKind, Page, HEADER_SIZE, PAGE_SIZE};
use crate::error::{Error, Result};

/// u64 entries (homes + revokes) one descriptor holds.
pub const DESC_SLOTS: usize = (PAGE_SIZE - HEADER_SIZE) / 8;
/// Seed of the commit block's crc over the transaction's blocks.
pub const JOURNAL_DATA_SALT: u32 = 0x3b1f_a908;
const FLAG_LAST: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub seq: u64,
    pub uuid: u64,
    pub last: bool,
    pub homes: Vec<u64>,
    pub revokes: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRec {
    pub seq: u64,
    pub uuid: u64,
    pub blocks: u32,
    pub data_crc: u32,
}

pub fn encode_descriptor(d: &Descriptor, block: u64) -> Box<Page> {
    assert!(d.homes.len() + d.revokes.len() <= DESC_SLOTS);
    let mut p = new_page();
    init_header(&mut p, BlockKind::JournalDesc, block, d.seq);
    wr_u64(&mut p[..], 24, d.uuid);
    wr_u32(&mut p[..], 32, d.homes.len() as u32);
    wr_u32(&mut p[..], 36, d.revokes.len() as u32);
    wr_u32(&mut p[..], 40, if d.last { FLAG_LAST } else { 0 });
    for (i, v) in d.homes.iter().chain(d.revokes.iter()).enumerate() {
        wr_u64(&mut p[..], HEADER_SIZE + 8 * i, *v);
    }
    super::seal(&mut p);
    p
}

pub fn decode_descriptor(buf: &[u8], expected_block: u64) -> Result<Descriptor> {
    let h = check_header(buf, expected_block, &[BlockKind::JournalDesc])?;
    let homes = rd_u32(buf, 32) as usize;
    let revokes = rd_u32(buf, 36) as usize;
    if homes.saturating_add(revokes) > DESC_SLOTS {
        return Err(Error::Corrupt {
            block: expected_block,
            kind: "journal descriptor",
            reason: format!("{homes} images + {revokes} revokes exceed {DESC_SLOTS} slots"),
        });
    }
    let entry = |i: usize| rd_u64(buf, HEADER_SIZE + 8 * i);
    Ok(Descriptor {
        seq: h.seq,
        uuid: rd_u64(buf, 24),
        last: rd_u32(buf, 40) & FLAG_LAST != 0,
        homes: (0..homes).map(entry).collect(),
        revokes: (homes..homes + revokes).map(entry).collect(),
    })
}

pub fn encode_commit(c: &CommitRec, block: u64) -> Box<Page> {
    let mut p = new_page();
    init_header(&mut p, BlockKind::JournalCommit, block, c.seq);
    wr_u64(&mut p[..], 24, c.uuid);
    wr_u32(&mut p[..], 32, c.blocks);
    wr_u32(&mut p[..], 36, c.data_crc);
    super::seal(&mut p);
    p
}

pub fn decode_commit(buf: &[u8], expected_block: u64) -> Result<CommitRec> {
    let h = check_header(buf, expected_block, &[BlockKind::JournalCommit])?;
    Ok(CommitRec {
        seq: h.seq,
        uuid: rd_u64(buf, 24),
        blocks: rd_u32(buf, 32),
        data_crc: rd_u32(buf, 36),
    })
}
