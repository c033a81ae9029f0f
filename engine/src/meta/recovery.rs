//! Reading the journal at open: the newest valid superblock, then every
//! complete transaction from its tail with consecutive sequence numbers,
//! up to the first that is not. The result (`Replay`) says where the log
//! ends and holds the latest committed image of each page; the `Journal`
//! takes it over. Nothing here writes.

use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, BlockKind, Layout, Page, Superblock, BLOCK, PAGE_SIZE};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What replay found.
pub(super) struct Replay {
    /// Ring position and sequence number after the last complete
    /// transaction: where the next one goes.
    pub(super) head: u64,
    pub(super) next_seq: u64,
    /// Ring blocks the replayed transactions occupy, from the tail.
    pub(super) used: u64,
    /// Transactions replayed.
    pub(super) txns: u64,
    /// The latest committed image of each page they changed.
    pub(super) images: BTreeMap<u64, Arc<Page>>,
    /// Set when replay stopped at a damaged transaction that a later one
    /// follows: that is corruption (commits are written one after another,
    /// each flushed before the next starts), not a torn tail.
    pub(super) damage: Option<Error>,
}

/// The newest valid superblock of the two slots.
pub(super) fn read_superblock(dev: &dyn BlockDev) -> Result<Superblock> {
    if dev.size() < 2 * BLOCK {
        return Err(Error::NotFormatted(format!(
            "device of {} bytes cannot hold a superblock",
            dev.size()
        )));
    }
    let mut best: Option<Superblock> = None;
    let mut errs = Vec::new();
    let mut any_magic = false;
    for slot in 0..2u64 {
        let mut buf = format::new_page();
        dev.read_at(slot * BLOCK, &mut buf[..])?;
        any_magic |= format::has_magic(&buf[..]);
        match format::decode_superblock(&buf[..], slot) {
            Ok(sb) if best.is_none_or(|b| sb.seq > b.seq) => best = Some(sb),
            Ok(_) => {}
            Err(e) => errs.push(e),
        }
    }
    if let Some(sb) = best {
        return Ok(sb);
    }
    if let Some(i) = errs
        .iter()
        .position(|e| matches!(e, Error::UnsupportedVersion { .. }))
    {
        return Err(errs.swap_remove(i));
    }
    if !any_magic {
        return Err(Error::NotFormatted(
            "no snapmv superblock in block 0 or 1".into(),
        ));
    }
    Err(errs.swap_remove(0))
}

/// Replay committed transactions from the tail `sb` records.
pub(super) fn replay(dev: &dyn BlockDev, sb: &Superblock) -> Result<Replay> {
    let mut images: BTreeMap<u64, Arc<Page>> = BTreeMap::new();
    let end = read_committed(dev, sb, |txn| {
        for rev in &txn.revokes {
            images.remove(rev);
        }
        for (home, img) in txn.images {
            images.insert(home, Arc::from(img));
        }
    })?;
    tracing::debug!(txns = end.txns, pages = images.len(), "journal replayed");
    let r = RingReader {
        dev,
        layout: &sb.layout,
        uuid: sb.uuid,
    };
    let damage = r.find_later_txn(end.pos, end.seq)?;
    Ok(Replay {
        head: end.pos,
        next_seq: end.seq,
        used: end.scanned,
        txns: end.txns,
        images,
        damage,
    })
}

/// The home blocks `replay` holds an image of, without keeping the images
/// or looking past the log's end: the checker reads every other block
/// straight from home, in long runs.
pub(super) fn replayed_homes(dev: &dyn BlockDev, sb: &Superblock) -> Result<BTreeSet<u64>> {
    let mut homes = BTreeSet::new();
    read_committed(dev, sb, |txn| {
        for rev in &txn.revokes {
            homes.remove(rev);
        }
        homes.extend(txn.images.iter().map(|(home, _)| *home));
    })?;
    Ok(homes)
}

/// Where the committed transactions from the tail end.
struct LogEnd {
    pos: u64,
    seq: u64,
    scanned: u64,
    txns: u64,
}

/// Hand each committed transaction from the tail `sb` records to `each`,
/// in order.
fn read_committed(
    dev: &dyn BlockDev,
    sb: &Superblock,
    mut each: impl FnMut(Txn),
) -> Result<LogEnd> {
    let r = RingReader {
        dev,
        layout: &sb.layout,
        uuid: sb.uuid,
    };
    let n = sb.layout.journal_blocks;
    let mut end = LogEnd {
        pos: sb.tail_pos,
        seq: sb.tail_seq,
        scanned: 0,
        txns: 0,
    };
    while let Some(txn) = r.read_txn(end.pos, end.seq, n - end.scanned)? {
        end.pos = (end.pos + txn.len) % n;
        end.scanned += txn.len;
        end.seq += 1;
        end.txns += 1;
        each(txn);
    }
    Ok(end)
}

/// A parsed, verified transaction.
struct Txn {
    len: u64,
    images: Vec<(u64, Box<Page>)>,
    revokes: Vec<u64>,
}

struct RingReader<'a> {
    dev: &'a dyn BlockDev,
    layout: &'a Layout,
    uuid: u64,
}

impl RingReader<'_> {
    fn read(&self, pos: u64) -> Result<Box<Page>> {
        let mut p = format::new_page();
        self.dev
            .read_at(self.layout.ring_block(pos) * BLOCK, &mut p[..])?;
        Ok(p)
    }

    /// Parse the transaction at ring position `pos` that must carry `seq`.
    /// Ok(None) when there is none (end of the log, torn or stale records);
    /// Err only for I/O errors or a committed image that is damaged.
    fn read_txn(&self, pos: u64, seq: u64, max_len: u64) -> Result<Option<Txn>> {
        let mut k = 0u64;
        let mut crc = format::JOURNAL_DATA_SALT;
        let mut images = Vec::new();
        let mut revokes = Vec::new();
        loop {
            if k >= max_len {
                return Ok(None);
            }
            let buf = self.read(pos + k)?;
            let Ok(d) = format::decode_descriptor(&buf[..], self.layout.ring_block(pos + k)) else {
                return Ok(None);
            };
            if d.seq != seq || d.uuid != self.uuid || k + d.homes.len() as u64 + 1 > max_len {
                return Ok(None);
            }
            crc = crc32c::crc32c_append(crc, &buf[..]);
            k += 1;
            for home in d.homes {
                let img = self.read(pos + k)?;
                crc = crc32c::crc32c_append(crc, &img[..]);
                images.push((home, img));
                k += 1;
            }
            revokes.extend(d.revokes);
            if d.last {
                break;
            }
        }
        if k >= max_len {
            return Ok(None);
        }
        let buf = self.read(pos + k)?;
        let Ok(c) = format::decode_commit(&buf[..], self.layout.ring_block(pos + k)) else {
            return Ok(None);
        };
        if c.seq != seq || c.uuid != self.uuid || u64::from(c.blocks) != k + 1 || c.data_crc != crc
        {
            return Ok(None);
        }
        for (home, img) in &images {
            self.check_image(*home, img)?;
        }
        Ok(Some(Txn {
            len: k + 1,
            images,
            revokes,
        }))
    }

    /// A committed image must be a valid page for its home block: the commit
    /// crc matched, so anything else is damage, not a torn write.
    fn check_image(&self, home: u64, img: &Page) -> Result<()> {
        let l = self.layout;
        let kinds: &[BlockKind] = if home == l.state_block {
            &[BlockKind::State]
        } else if l.in_bitmap(home) {
            &[BlockKind::Bitmap]
        } else if l.in_area(home) {
            &[BlockKind::Leaf, BlockKind::Internal]
        } else {
            return Err(Error::Corrupt {
                block: home,
                kind: "journal",
                reason: format!("journalled image for block {home}, which is no page home"),
            });
        };
        format::check_header(&img[..], home, kinds).map(|_| ())
    }

    /// Look through the whole ring (bounded by the journal, not the device)
    /// for a descriptor of this format newer than `seq`, the transaction
    /// replay could not read at `pos`.
    fn find_later_txn(&self, pos: u64, seq: u64) -> Result<Option<Error>> {
        const BATCH: u64 = 256;
        let l = self.layout;
        let mut buf = vec![0u8; BATCH as usize * PAGE_SIZE];
        let mut at = 0;
        while at < l.journal_blocks {
            let k = BATCH.min(l.journal_blocks - at);
            let bytes = &mut buf[..k as usize * PAGE_SIZE];
            self.dev.read_at((l.journal_start + at) * BLOCK, bytes)?;
            for (i, blk) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                let block = l.journal_start + at + i as u64;
                // Cheap pre-filter on the raw fields before the crc.
                if format::rd_u32(blk, 0) != BlockKind::JournalDesc as u32
                    || format::rd_u64(blk, 16) <= seq
                    || format::rd_u64(blk, 24) != self.uuid
                {
                    continue;
                }
                if let Ok(d) = format::decode_descriptor(blk, block) {
                    return Ok(Some(Error::Corrupt {
                        block: l.ring_block(pos),
                        kind: "journal",
                        reason: format!(
                            "transaction {seq} at ring position {pos} is damaged, yet transaction {} \
                             follows at block {block}: committed metadata was lost",
                            d.seq
                        ),
                    }));
                }
            }
            at += k;
        }
        Ok(None)
    }
}
