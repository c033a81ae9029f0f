//! The driver thread of one store: the engine starts no threads and reads
//! no clock, so this thread advances its background work (cleaner,
//! rollback copier), commits staged first writes after the commit delay,
//! and flushes once a second. It sleeps until woken: by the engine's
//! waker (writes staged, a delete or rollback made background work), by
//! the stop, or by its own deadlines (the commit delay, the periodic
//! flush); never by polling.

use snapmv_engine::store::Store;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Chunks per background step: large enough to copy quickly, small enough
/// that the stop and the staged writes are looked at often.
const BG_BUDGET: usize = 64;
/// The periodic flush bounds what a crash can lose of unflushed writes.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Back-off after a failed step, so that a persistent error (a failed
/// device) is logged and retried rather than spun on.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    /// The engine signalled work since the driver last looked.
    work: bool,
    stop: bool,
}

/// Wakes a driver: shared by the engine's waker and the stopper.
#[derive(Default)]
pub struct Signal {
    state: Mutex<State>,
    cv: Condvar,
}

impl Signal {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two flags, consistent at every instant.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn work(&self) {
        self.lock().work = true;
        self.cv.notify_all();
    }

    pub fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    fn stopped(&self) -> bool {
        self.lock().stop
    }

    /// Wait until `deadline`, the stop, or (with `for_work`) a wake-up;
    /// consumes the wake-up.
    fn wait(&self, deadline: Instant, for_work: bool) {
        let mut st = self.lock();
        loop {
            if st.stop || (for_work && st.work) {
                break;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            st = match self.cv.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        st.work = false;
    }
}

/// Settings of the driver.
#[derive(Clone, Copy, Debug)]
pub struct DriverConfig {
    /// How long staged first writes wait for more to join their commit.
    pub commit_delay: Duration,
}

/// Run until `signal.stop()`. Registers the store's waker.
pub fn run(store: Store, signal: Arc<Signal>, cfg: DriverConfig, cow: String) {
    let waker = signal.clone();
    store.set_waker(move || waker.work());
    let mut log = ErrorLog::default();
    let mut next_flush = Instant::now() + FLUSH_EVERY;
    let mut was_busy = false;
    while !signal.stopped() {
        let more = match store.step_background(BG_BUDGET) {
            Ok(r) => {
                log.last = None;
                r.more
            }
            Err(e) => log.failed(&cow, "background work", &e),
        };
        if was_busy && !more {
            tracing::info!(%cow, "background work (cleaning/rollback) caught up");
        }
        was_busy = more;
        if store.staging_stats().chunks > 0 {
            if !store.staging_pressing() {
                // Let more first writes join this commit; a wake-up (staging
                // past half its budget) ends the wait early.
                signal.wait(Instant::now() + cfg.commit_delay, true);
            }
            if let Err(e) = store.commit_staged() {
                log.failed(&cow, "committing staged writes", &e);
            }
        }
        if Instant::now() >= next_flush {
            // No client waits on this flush: no FLUSH cover (see `sync`).
            if let Err(e) = store.sync() {
                log.failed(&cow, "periodic flush", &e);
            }
            next_flush = Instant::now() + FLUSH_EVERY;
        }
        if log.backing_off {
            signal.wait(Instant::now() + ERROR_BACKOFF, false);
            log.backing_off = false;
        } else if !more && store.staging_stats().chunks == 0 {
            signal.wait(next_flush, true);
        }
    }
}

/// Logs each distinct error once, and asks for a back-off.
#[derive(Default)]
struct ErrorLog {
    last: Option<String>,
    backing_off: bool,
}

impl ErrorLog {
    fn failed(&mut self, cow: &str, what: &str, e: &snapmv_engine::Error) -> bool {
        let msg = e.to_string();
        if self.last.as_deref() != Some(&msg) {
            tracing::error!(%cow, error = %msg, "{what} failed");
            self.last = Some(msg);
        }
        self.backing_off = true;
        false
    }
}
