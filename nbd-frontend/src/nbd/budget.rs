//! Byte budgets: counting semaphores over bytes, so the memory held for
//! requests in flight is bounded per connection and for the whole server.
//!
//! Waiters are served in arrival order (a ticket queue). Without that, a
//! stream of small requests could starve a 64 MiB one forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub struct Budget {
    cap: usize,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    avail: usize,
    next_ticket: u64,
    serving: u64,
}

impl Budget {
    pub fn new(cap: usize) -> Arc<Budget> {
        Arc::new(Budget {
            cap,
            state: Mutex::new(State {
                avail: cap,
                next_ticket: 0,
                serving: 0,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two counters updated without panicking code in
        // between, so a poisoned lock still holds consistent values.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take `n` bytes (clamped to the capacity, so it always succeeds
    /// eventually), waiting in line behind earlier callers.
    pub fn acquire(&self, n: usize) -> usize {
        let n = n.min(self.cap);
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        while s.serving != ticket || s.avail < n {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.avail -= n;
        s.serving += 1;
        drop(s);
        // The next in line may be satisfiable right away.
        self.cv.notify_all();
        n
    }

    pub fn release(&self, n: usize) {
        let mut s = self.lock();
        s.avail = (s.avail + n).min(self.cap);
        drop(s);
        self.cv.notify_all();
    }

    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.lock().avail
    }
}

/// Bytes held in both the connection's and the server's budget; given
/// back when the reply that used them has been written (or dropped).
pub struct Permit {
    conn: Arc<Budget>,
    server: Arc<Budget>,
    conn_n: usize,
    server_n: usize,
}

impl Permit {
    /// Connection budget first: a connection then holds at most its own
    /// budget's worth of the server's, so one connection stuck behind a
    /// slow reader cannot drain the shared pool beyond that.
    pub fn acquire(conn: &Arc<Budget>, server: &Arc<Budget>, n: usize) -> Permit {
        let conn_n = conn.acquire(n);
        let server_n = server.acquire(n);
        Permit {
            conn: conn.clone(),
            server: server.clone(),
            conn_n,
            server_n,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.server.release(self.server_n);
        self.conn.release(self.conn_n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waits_in_order_and_releases() {
        let b = Budget::new(100);
        assert_eq!(b.acquire(60), 60);
        let b2 = b.clone();
        let big = std::thread::spawn(move || b2.acquire(80));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!big.is_finished(), "80 bytes are not available yet");
        b.release(60);
        assert_eq!(big.join().unwrap(), 80);
        assert_eq!(b.available(), 20);
        b.release(80);
        assert_eq!(b.acquire(1000), 100, "clamped to the capacity");
    }

    #[test]
    fn permit_returns_both() {
        let c = Budget::new(10);
        let s = Budget::new(20);
        {
            let _p = Permit::acquire(&c, &s, 7);
            assert_eq!((c.available(), s.available()), (3, 13));
        }
        assert_eq!((c.available(), s.available()), (10, 20));
    }
}
