//! Group commit: many writers that need durability share one commit, so one
//! pair of flushes serves every copy pending at that moment.
//!
//! Each metadata change bumps a generation number under the meta lock. A
//! writer that needs its change durable asks for that generation; if no
//! commit is running it becomes the committer for everything pending,
//! otherwise it waits for one that covers it.

use crate::error::{Error, Result};
use crate::sync::{self, AtomicBool, AtomicU64, Condvar, Mutex, Ordering};

#[derive(Default)]
struct State {
    /// Highest generation known durable.
    done: u64,
    running: bool,
    failed: Option<String>,
}

#[derive(Default)]
pub struct GroupCommit {
    st: Mutex<State>,
    cv: Condvar,
    /// Mirrors `st.failed.is_some()` so the data path checks it lock-free.
    stopped: AtomicBool,
    /// Metadata changes so far (a lock-free hint for "commit early?").
    changes: AtomicU64,
}

impl GroupCommit {
    /// Return once generation `want` is durable. `commit_once` performs one
    /// commit and returns the generation it covered.
    pub fn sync(&self, want: u64, commit_once: impl Fn() -> Result<u64>) -> Result<()> {
        let mut st = sync::lock(&self.st);
        // Bounded: each round either finishes a commit or waits for one.
        loop {
            if let Some(f) = &st.failed {
                return Err(Error::Poisoned(f.clone()));
            }
            if st.done >= want {
                return Ok(());
            }
            if st.running {
                // Planted bug: return while another commit runs, without
                // waiting for one that covers `want`.
                if cfg!(snapmv_planted_bug = "no_flush_barrier") {
                    return Ok(());
                }
                st = sync::wait(&self.cv, st);
                continue;
            }
            st.running = true;
            drop(st);
            let r = commit_once();
            st = sync::lock(&self.st);
            st.running = false;
            match r {
                Ok(gen) => st.done = st.done.max(gen),
                Err(e) => {
                    st.failed = Some(e.to_string());
                    self.stopped.store(true, Ordering::Release);
                }
            }
            self.cv.notify_all();
        }
    }

    /// Stop the store: every later operation fails until a reopen.
    pub fn stop(&self, why: String) {
        let mut st = sync::lock(&self.st);
        st.failed.get_or_insert(why);
        self.stopped.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Lock-free: has the store stopped?
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub fn note_change(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> Option<String> {
        sync::lock(&self.st).failed.clone()
    }

    /// Run `f` with no commit running beside it (for the full checkpoint
    /// at close, which must not interleave with a commit's journal writes).
    pub fn exclusive(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut st = sync::lock(&self.st);
        while st.running {
            st = sync::wait(&self.cv, st);
        }
        if let Some(f) = &st.failed {
            return Err(Error::Poisoned(f.clone()));
        }
        st.running = true;
        drop(st);
        let r = f();
        let mut st = sync::lock(&self.st);
        st.running = false;
        if let Err(e) = &r {
            st.failed = Some(e.to_string());
            self.stopped.store(true, Ordering::Release);
        }
        self.cv.notify_all();
        r
    }
}
