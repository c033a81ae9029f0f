//! One bounded pool of worker threads shared by every connection, for the
//! requests a connection does not serve inline: those that wait (FLUSH,
//! FUA, and requests of a connection whose requests have been slow).
//!
//! Threads start on demand, when a task arrives and none is idle, up to
//! `max_threads`; they then stay until the pool closes. The queue is
//! bounded: when it is full, `try_submit` hands the task back and the
//! connection runs it itself, so a burst never grows memory or threads
//! without bound, and nobody blocks on the pool.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::warn;

pub type Task = Box<dyn FnOnce() + Send>;

pub struct WorkerPool {
    state: Mutex<PoolState>,
    work: Condvar,
    max_threads: usize,
    max_queued: usize,
}

struct PoolState {
    queue: VecDeque<Task>,
    idle: usize,
    threads: Vec<JoinHandle<()>>,
    closed: bool,
}

impl WorkerPool {
    pub fn new(max_threads: usize, max_queued: usize) -> Arc<WorkerPool> {
        assert!(max_threads >= 1 && max_queued >= 1);
        Arc::new(WorkerPool {
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                idle: 0,
                threads: Vec::new(),
                closed: false,
            }),
            work: Condvar::new(),
            max_threads,
            max_queued,
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Nothing that can panic runs under this lock (tasks run outside
        // it), so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `task`, or give it back when the queue is full, the pool is
    /// closed, or it has no thread and cannot start one.
    pub fn try_submit(self: &Arc<Self>, task: Task) -> Result<(), Task> {
        let mut s = self.lock();
        if s.closed || s.queue.len() >= self.max_queued {
            return Err(task);
        }
        if s.idle <= s.queue.len() && s.threads.len() < self.max_threads {
            let pool = self.clone();
            let name = format!("nbd-pool-{}", s.threads.len());
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || pool.work_loop())
            {
                Ok(t) => s.threads.push(t),
                Err(e) => warn!("cannot start a pool thread: {e}"),
            }
        }
        if s.threads.is_empty() {
            return Err(task);
        }
        s.queue.push_back(task);
        drop(s);
        self.work.notify_one();
        Ok(())
    }

    fn work_loop(&self) {
        loop {
            let mut s = self.lock();
            let task = loop {
                if let Some(t) = s.queue.pop_front() {
                    break t;
                }
                if s.closed {
                    return;
                }
                s.idle += 1;
                s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
                s.idle -= 1;
            };
            drop(s);
            // A task answers its own panics (as an EIO reply); this catch
            // only keeps the thread alive if one slips through.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).is_err() {
                warn!("a pool task panicked");
            }
        }
    }

    /// Run what is queued, then stop every thread and wait for them.
    pub fn close(&self) {
        let threads = {
            let mut s = self.lock();
            s.closed = true;
            std::mem::take(&mut s.threads)
        };
        self.work.notify_all();
        for t in threads {
            let _ = t.join();
        }
    }

    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.lock().threads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_tasks_and_gives_back_what_does_not_fit() {
        let pool = WorkerPool::new(2, 2);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let blocked = |i: u32| -> Task {
            let (gate, done) = (gate.clone(), done_tx.clone());
            Box::new(move || {
                gate.lock().unwrap().recv().unwrap();
                done.send(i).unwrap();
            })
        };
        // Two threads at most; two more tasks may queue; the fifth is
        // handed back (the first two may still be queued, not yet taken).
        let mut refused = 0;
        for i in 0..5 {
            if pool.try_submit(blocked(i)).is_err() {
                refused += 1;
            }
        }
        assert!(refused >= 1, "a full queue hands tasks back");
        assert!(pool.threads() <= 2);
        for _ in 0..5 {
            let _ = gate_tx.send(());
        }
        let ran = 5 - refused;
        let mut seen: Vec<u32> = (0..ran).map(|_| done_rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(seen.len(), ran as usize);
        pool.close();
        assert!(pool.try_submit(Box::new(|| {})).is_err(), "closed");
    }
}
