//! Synchronisation facade. Every lock, condition variable and atomic in the
//! engine comes from here, so that `RUSTFLAGS="--cfg loom"` swaps the whole
//! engine onto loom's model-checked primitives (as tokio and bytes do), and
//! the `shuttle` feature swaps it onto shuttle's, for the concurrent crash
//! simulator (sim/src/concurrent.rs), which runs whole workloads of many
//! threads under a seeded scheduler. A cargo feature rather than a cfg:
//! the shuttle build then shares every dependency's build with the normal
//! one, instead of rebuilding them all under other RUSTFLAGS.

#[cfg(loom)]
pub use loom::sync::{
    atomic::Ordering, Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
#[cfg(loom)]
pub use loom_atomic::{AtomicBool, AtomicU64, AtomicUsize};

/// loom 0.7 lets a plain `store` slip between the read and the write of a
/// concurrent read-modify-write on the same atomic (tokio-rs/loom#254,
/// #389: RMW atomicity is not applied to later plain stores), so it reports
/// executions that C11 forbids: e.g. `flag.store(true)` in one thread, a
/// concurrent `flag.swap(false)` that read the old value in another, and
/// then a `swap` in the first thread that still returns `false`. Under loom
/// every `store` is therefore modelled as a `swap` (an RMW, which loom
/// orders correctly). That only drops executions in which a plain store is
/// ordered before a store loom already executed; the opposite order of the
/// two threads is still explored. Production code uses `std` unchanged.
#[cfg(loom)]
mod loom_atomic {
    use loom::sync::atomic as la;
    use std::sync::atomic::Ordering;

    macro_rules! atomic {
        ($name:ident, $t:ty, $($extra:ident),*) => {
            #[derive(Debug, Default)]
            pub struct $name(la::$name);

            impl $name {
                pub fn new(v: $t) -> Self {
                    $name(la::$name::new(v))
                }
                pub fn load(&self, o: Ordering) -> $t {
                    self.0.load(o)
                }
                pub fn store(&self, v: $t, o: Ordering) {
                    self.0.swap(v, o);
                }
                pub fn swap(&self, v: $t, o: Ordering) -> $t {
                    self.0.swap(v, o)
                }
                pub fn compare_exchange(
                    &self,
                    current: $t,
                    new: $t,
                    success: Ordering,
                    failure: Ordering,
                ) -> Result<$t, $t> {
                    self.0.compare_exchange(current, new, success, failure)
                }
                $(
                    pub fn $extra(&self, v: $t, o: Ordering) -> $t {
                        self.0.$extra(v, o)
                    }
                )*
            }
        };
    }

    atomic!(AtomicBool, bool, fetch_or, fetch_and);
    atomic!(AtomicU64, u64, fetch_add, fetch_sub, fetch_max, fetch_min);
    atomic!(
        AtomicUsize,
        usize,
        fetch_add,
        fetch_sub,
        fetch_max,
        fetch_min
    );
}

#[cfg(all(feature = "shuttle", not(loom)))]
pub use shuttle::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

#[cfg(not(any(loom, feature = "shuttle")))]
pub use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

/// Lock a mutex. A poisoned lock means a panic unwound while it was held,
/// so the structure behind it may be half-updated: never go on over it.
/// This panics too; every engine entry point holds a `PanicStop`, so the
/// panic stops the store (as a failed commit does) and the caller gets an
/// error from then on. (loom's and shuttle's `lock` have this signature.)
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(_) => poisoned(),
    }
}

/// Lock a mutex whose state stays consistent at every instant (the group
/// commit's own flags), so that stopping the store works even after a
/// panic. Only for such state.
pub fn lock_consistent<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    match m.read() {
        Ok(g) => g,
        Err(_) => poisoned(),
    }
}

pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    match m.write() {
        Ok(g) => g,
        Err(_) => poisoned(),
    }
}

/// Wait on a condition variable guarding state of the `lock_consistent` kind.
pub fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cold]
fn poisoned() -> ! {
    panic!("an engine lock was poisoned by an earlier panic; the store is stopped")
}
