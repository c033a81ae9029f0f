//! Helpers shared by the meta_* integration tests.
#![allow(dead_code)]

use rand::Rng;
use snapmv_engine::dev::BlockDev;
use snapmv_engine::meta::{Meta, Tree};
use snapmv_engine::{Error, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that keeps a durable image (as of the last completed flush)
/// and the writes issued since, so a test can build any crash state: the
/// durable image plus any subset of the pending writes, some torn.
pub struct CrashDev {
    inner: Mutex<Inner>,
    size: u64,
}

/// Called before every write and flush.
pub type Hook = Box<dyn FnMut(&CrashView) + Send>;

struct Inner {
    cur: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    /// Called before every write and flush with the device: lets a test take
    /// crash images at every step of a commit.
    hook: Option<Hook>,
}

/// What a hook sees: the durable image and the pending writes.
pub struct CrashView<'a> {
    pub durable: &'a [u8],
    pub pending: &'a [(u64, Vec<u8>)],
}

impl CrashView<'_> {
    /// A crash image: durable + a random selection of pending writes, each
    /// dropped, kept, or torn at 512-byte granularity.
    pub fn crash_image(&self, rng: &mut impl Rng) -> Vec<u8> {
        let mut img = self.durable.to_vec();
        let mode = rng.gen_range(0..4);
        for (off, data) in self.pending {
            let keep = match mode {
                0 => false,
                1 => true,
                _ => rng.gen_bool(0.5),
            };
            let off = *off as usize;
            if !keep {
                continue;
            }
            if mode == 3 && rng.gen_bool(0.3) {
                for (i, sector) in data.chunks(512).enumerate() {
                    if rng.gen_bool(0.5) {
                        let o = off + i * 512;
                        img[o..o + sector.len()].copy_from_slice(sector);
                    }
                }
            } else {
                img[off..off + data.len()].copy_from_slice(data);
            }
        }
        img
    }
}

impl CrashDev {
    pub fn new(size: u64) -> Arc<Self> {
        Self::from_image(vec![0u8; size as usize])
    }

    pub fn from_image(img: Vec<u8>) -> Arc<Self> {
        Arc::new(CrashDev {
            size: img.len() as u64,
            inner: Mutex::new(Inner {
                cur: img.clone(),
                durable: img,
                pending: Vec::new(),
                hook: None,
            }),
        })
    }

    pub fn set_hook(&self, hook: Option<Hook>) {
        self.inner.lock().unwrap().hook = hook;
    }

    pub fn durable_image(&self) -> Vec<u8> {
        self.inner.lock().unwrap().durable.clone()
    }

    /// Overwrite bytes in both views (simulated media corruption).
    pub fn poke(&self, off: u64, f: impl Fn(&mut u8)) {
        let mut g = self.inner.lock().unwrap();
        f(&mut g.cur[off as usize]);
        f(&mut g.durable[off as usize]);
    }

    fn run_hook(g: &mut Inner) {
        if let Some(mut h) = g.hook.take() {
            h(&CrashView {
                durable: &g.durable,
                pending: &g.pending,
            });
            g.hook = Some(h);
        }
    }
}

fn range_check(off: u64, len: usize, size: u64) -> Result<()> {
    snapmv_engine::dev::check_range("crashdev", off, len as u64, size)
}

impl BlockDev for CrashDev {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        range_check(offset, buf.len(), self.size)?;
        let g = self.inner.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&g.cur[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        range_check(offset, buf.len(), self.size)?;
        let mut g = self.inner.lock().unwrap();
        Self::run_hook(&mut g);
        let o = offset as usize;
        g.cur[o..o + buf.len()].copy_from_slice(buf);
        g.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        let mut g = self.inner.lock().unwrap();
        Self::run_hook(&mut g);
        let pending = std::mem::take(&mut g.pending);
        for (off, data) in pending {
            let o = off as usize;
            g.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

/// Model of the metadata a test expects: the trees and the app state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub trees: [BTreeMap<u128, Vec<u8>>; 4],
    pub app: Vec<u8>,
}

pub fn tree_ix(t: Tree) -> usize {
    match t {
        Tree::Exceptions => 0,
        Tree::Nodes => 1,
        Tree::Origins => 2,
        Tree::ByNode => 3,
    }
}

/// Read everything a Meta holds into a Model (full range scans).
pub fn snapshot<D: BlockDev>(m: &mut Meta<D>) -> Result<Model> {
    let mut out = Model {
        app: m.app_state().to_vec(),
        ..Model::default()
    };
    for t in Tree::ALL {
        for (k, v) in m.range(t, 0, u128::MAX, usize::MAX)? {
            out.trees[tree_ix(t)].insert(k, v);
        }
    }
    Ok(out)
}

/// Commit early when the transaction nears the journal limit.
pub fn maybe_commit<D: BlockDev>(m: &mut Meta<D>) -> Result<()> {
    if m.dirty_pages() + 16 >= m.max_dirty_pages() {
        m.commit()?;
    }
    Ok(())
}

pub fn is_corrupt(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. } | Error::CorruptTree { .. })
}
