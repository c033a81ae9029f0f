//! One panic policy: a panic that unwinds out of the engine (here from a
//! device it calls, mid-write, with engine locks held) stops the store, the
//! way a failed commit does. Whoever catches the panic (the NBD frontend
//! turns it into EIO) gets errors from then on, never service over a
//! half-updated structure; a reopen recovers the last durable state.

use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::{BlockDev, Error, MemDev, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CS: usize = 16 << 10;

/// A device that panics on its next write once armed.
struct PanicDev {
    inner: MemDev,
    armed: AtomicBool,
}

impl BlockDev for PanicDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("planted panic in the COW device");
        }
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_panic_inside_a_write_stops_the_store() {
    let cow = Arc::new(PanicDev {
        inner: MemDev::new(8 << 20),
        armed: AtomicBool::new(false),
    });
    let fo = FormatOptions {
        chunk_size: CS as u32,
        force: false,
    };
    let store = Store::format(cow.clone() as Dev, &fo).unwrap();
    store
        .bind("o", "mem://o", Arc::new(MemDev::new(256 << 10)), 1)
        .unwrap();
    let tag = store.snapshot("o", None, "s", 2).unwrap();
    let snap = store.volume("o", Some(tag)).unwrap();
    snap.write(0, &[1; 512], false).unwrap();

    // The next snapshot write fills a fresh chunk on the COW device: panic
    // there, with the chunk lock and the origin's gate held.
    cow.armed.store(true, Ordering::SeqCst);
    let caught = catch_unwind(AssertUnwindSafe(|| snap.write(CS as u64, &[2; 512], false)));
    assert!(
        caught.is_err(),
        "the planted panic propagates to the caller"
    );

    // From now on every operation fails: reads, writes, flush, admin.
    let mut b = [0u8; 512];
    assert!(matches!(snap.read(0, &mut b), Err(Error::Poisoned(_))));
    assert!(matches!(
        snap.write(0, &[3; 512], false),
        Err(Error::Poisoned(_))
    ));
    let origin = store.volume("o", None).unwrap();
    assert!(matches!(origin.read(0, &mut b), Err(Error::Poisoned(_))));
    assert!(matches!(store.flush(), Err(Error::Poisoned(_))));
    assert!(store.snapshot("o", None, "t", 3).is_err());
    assert!(store.status().status.starts_with("failed"));
}
