//! Regression tests for the mechanism behind the power-cut leak (issue 9,
//! defect 1): an operation reserves a data chunk, writes it with no lock
//! held, then maps it. A commit that another writer starts in between must
//! not make the allocation durable without the mapping.
//!
//! The "other writer" is played deterministically by a device hook: the
//! first whole-chunk write to the COW device (the operation's data I/O)
//! triggers a store-wide flush from inside the operation, exactly where a
//! concurrent group commit could run. The durable images at that instant
//! are what a power cut right then would leave; they must check clean.
//! Before the fix (allocation in the space map at plan time) both tests
//! reported "marked in use but referenced by nothing (leaked)".

use snapmv_engine::dev::BlockDev;
use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use snapmv_engine::Result;
use snapmv_sim::simdev::Image;
use snapmv_sim::{Domain, SimDev};
use std::sync::{Arc, Mutex, OnceLock};

const CHUNK: u32 = 16 << 10;
const CS: usize = CHUNK as usize;

type Hook = Box<dyn FnOnce() + Send>;

/// A COW device that runs a hook once, right after the first whole-chunk
/// write once armed.
struct HookDev {
    inner: SimDev,
    hook: Mutex<Option<Hook>>,
}

impl BlockDev for HookDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)?;
        if buf.len() == CS {
            let hook = self.hook.lock().unwrap().take();
            if let Some(h) = hook {
                h();
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

struct Rig {
    store: Store,
    cow: SimDev,
    origin: SimDev,
    hooked: Arc<HookDev>,
    /// Durable images (COW, origin) taken inside the hook.
    cut: Arc<Mutex<Option<(Image, Image)>>>,
}

fn rig() -> Rig {
    let d = Domain::new();
    let cow = SimDev::new(&d, 0, "cow", 8 << 20, 1);
    let origin = SimDev::new(&d, 1, "o", 256 << 10, 1);
    let hooked = Arc::new(HookDev {
        inner: cow.clone(),
        hook: Mutex::new(None),
    });
    let fo = FormatOptions {
        chunk_size: CHUNK,
        force: false,
    };
    let store = Store::format(hooked.clone() as Dev, &fo).unwrap();
    store
        .bind("o", "sim://o", Arc::new(origin.clone()), 1)
        .unwrap();
    origin.write_at(0, &vec![0x11; 256 << 10]).unwrap();
    store.flush().unwrap();
    Rig {
        store,
        cow,
        origin,
        hooked,
        cut: Arc::new(Mutex::new(None)),
    }
}

impl Rig {
    /// Arm the hook: flush the whole store (as a concurrent writer's group
    /// commit would), then record the durable images (a power cut now).
    fn arm(&self) {
        let store = OnceLock::new();
        let _ = store.set(self.store.clone());
        let (cow, origin, cut) = (self.cow.clone(), self.origin.clone(), self.cut.clone());
        let hook: Hook = Box::new(move || {
            store.get().unwrap().flush().unwrap();
            *cut.lock().unwrap() = Some((cow.durable(), origin.durable()));
        });
        *self.hooked.hook.lock().unwrap() = Some(hook);
    }

    /// `check` of the COW image a power cut inside the hook leaves.
    fn check_cut(&self) -> Vec<String> {
        let (cow, _) = self.cut.lock().unwrap().take().expect("hook ran");
        let dev = SimDev::from_image(&Domain::new(), 0, "cow", cow, 1);
        store::check(Arc::new(dev)).unwrap().errors
    }
}

#[test]
fn snapshot_write_allocation_is_durable_only_with_its_mapping() {
    let r = rig();
    let tag = r.store.snapshot("o", None, "s", 2).unwrap();
    r.arm();
    // A write to the snapshot needs a fresh chunk (filled from the origin).
    let v = r.store.volume("o", Some(tag)).unwrap();
    v.write(CS as u64 + 512, &[0xaa; 512], false).unwrap();
    let errors = r.check_cut();
    assert!(
        errors.is_empty(),
        "power cut inside a snapshot write: {errors:?}"
    );
    // And the write itself completed normally.
    let mut b = vec![0u8; 512];
    v.read(CS as u64 + 512, &mut b).unwrap();
    assert_eq!(b, vec![0xaa; 512]);
}

#[test]
fn origin_copy_allocation_is_durable_only_with_its_mapping() {
    let r = rig();
    let tag = r.store.snapshot("o", None, "s", 2).unwrap();
    r.arm();
    // An origin write after a snapshot copies the old chunk first.
    let o = r.store.volume("o", None).unwrap();
    o.write(2 * CS as u64, &[0xbb; 4096], false).unwrap();
    let errors = r.check_cut();
    assert!(
        errors.is_empty(),
        "power cut inside an origin copy: {errors:?}"
    );
    let mut b = vec![0u8; 4096];
    r.store
        .volume("o", Some(tag))
        .unwrap()
        .read(2 * CS as u64, &mut b)
        .unwrap();
    assert_eq!(b, vec![0x11; 4096], "the snapshot keeps the old data");
}
