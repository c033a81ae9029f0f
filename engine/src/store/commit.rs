//! Group commit: many writers that need durability share one commit, so one
//! pair of flushes serves every copy pending at that moment.
//!
//! Each metadata change bumps a generation number under the meta lock. A
//! writer that needs its change durable asks for that generation; if no
//! commit is running it becomes the committer for everything pending,
//! otherwise it waits for one that covers it.
//!
//! **Flush cover.** NBD says a FLUSH reply covers every write *replied*
//! before it, not only those completed before the FLUSH was issued; a write
//! can complete (and be replied, on any connection) while a FLUSH's commit
//! is already past capturing the metadata. So a FLUSH is *open* from before
//! its commit starts until its reply is sent (`FlushHold`), and a write that
//! completes while any FLUSH is open makes itself durable before it returns.
//! Either the write's completion precedes the FLUSH's opening (SeqCst on
//! both sides), so the FLUSH's commit covers it, or the write sees the FLUSH
//! open and waits for a commit itself.

use crate::error::{Error, Result};
use crate::planted::{self, Bug};
use crate::sync::{self, AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

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
    /// FLUSHes whose replies are not yet sent (see "Flush cover").
    flushes_open: AtomicUsize,
    /// Commits completed since the open (for statistics).
    commits: AtomicU64,
}

impl GroupCommit {
    /// Return once generation `want` is durable. `commit_once` performs one
    /// commit and returns the generation it covered.
    pub fn sync(&self, want: u64, commit_once: impl Fn() -> Result<u64>) -> Result<()> {
        let mut st = sync::lock_consistent(&self.st);
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
                if planted::on(Bug::NoFlushBarrier) {
                    return Ok(());
                }
                st = sync::wait(&self.cv, st);
                continue;
            }
            st.running = true;
            drop(st);
            let r = commit_once();
            st = sync::lock_consistent(&self.st);
            st.running = false;
            match r {
                Ok(gen) => {
                    st.done = st.done.max(gen);
                    self.commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    st.failed = Some(e.to_string());
                    self.stopped.store(true, Ordering::Release);
                }
            }
            self.cv.notify_all();
        }
    }

    /// Commits completed since the open.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The highest generation known durable.
    pub fn durable(&self) -> u64 {
        sync::lock_consistent(&self.st).done
    }

    /// Stop the store: every later operation fails until a reopen.
    pub fn stop(&self, why: String) {
        let mut st = sync::lock_consistent(&self.st);
        st.failed.get_or_insert(why);
        self.stopped.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// A guard for an engine entry point: if a panic unwinds through it,
    /// the store stops, so nothing serves over a half-updated structure.
    pub fn panic_stop(&self) -> PanicStop<'_> {
        PanicStop(self)
    }

    /// Lock-free: has the store stopped?
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// A FLUSH starts: until `close_flush`, completing writes are durable
    /// before they return.
    pub fn open_flush(&self) {
        self.flushes_open.fetch_add(1, Ordering::SeqCst);
    }

    pub fn close_flush(&self) {
        let before = self.flushes_open.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "close_flush without open_flush");
    }

    /// Whether a write completing now must make itself durable first.
    pub fn flush_open(&self) -> bool {
        if planted::on(Bug::FlushNoCover) {
            // Planted bug: a write replied while a FLUSH runs stays volatile.
            return false;
        }
        self.flushes_open.load(Ordering::SeqCst) > 0
    }

    pub fn note_change(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> Option<String> {
        sync::lock_consistent(&self.st).failed.clone()
    }

    /// Run `f` with no commit running beside it (for the full checkpoint
    /// at close, which must not interleave with a commit's journal writes).
    pub fn exclusive(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut st = sync::lock_consistent(&self.st);
        while st.running {
            st = sync::wait(&self.cv, st);
        }
        if let Some(f) = &st.failed {
            return Err(Error::Poisoned(f.clone()));
        }
        st.running = true;
        drop(st);
        let r = f();
        let mut st = sync::lock_consistent(&self.st);
        st.running = false;
        if let Err(e) = &r {
            st.failed = Some(e.to_string());
            self.stopped.store(true, Ordering::Release);
        }
        self.cv.notify_all();
        r
    }
}

/// See `GroupCommit::panic_stop`.
pub struct PanicStop<'a>(&'a GroupCommit);

impl Drop for PanicStop<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .stop("a panic inside the engine (see the log); reopen to recover".into());
        }
    }
}
