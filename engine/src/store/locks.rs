//! Per-chunk shared/exclusive locks, in a sharded table so that threads
//! working on different chunks never wait on each other. A chunk has an
//! entry only while someone holds or waits for it: the table's size is
//! bounded by the requests in flight, not by the device.
//!
//! Ordering rule (deadlock freedom): a thread holds at most one shared
//! lock at a time, or a set of exclusive locks taken in ascending
//! (origin, chunk) order.

use crate::sync::{self, Condvar, Mutex};
use std::collections::HashMap;

#[cfg(not(loom))]
const SHARDS: usize = 64;
#[cfg(loom)]
const SHARDS: usize = 2;

#[derive(Default)]
struct Entry {
    readers: u32,
    writer: bool,
    /// Threads waiting; the entry stays while any wait.
    waiting: u32,
}

struct Shard {
    map: Mutex<HashMap<(u32, u64), Entry>>,
    cv: Condvar,
}

pub struct ChunkLocks {
    shards: Vec<Shard>,
}

pub struct SharedGuard<'a> {
    locks: &'a ChunkLocks,
    key: (u32, u64),
}

pub struct ExclusiveGuard<'a> {
    locks: &'a ChunkLocks,
    key: (u32, u64),
}

impl Default for ChunkLocks {
    fn default() -> Self {
        ChunkLocks {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::new()),
                    cv: Condvar::new(),
                })
                .collect(),
        }
    }
}

impl ChunkLocks {
    fn shard(&self, key: (u32, u64)) -> &Shard {
        // Fibonacci hashing spreads consecutive chunks over shards.
        let h = (u64::from(key.0) ^ key.1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    fn acquire(&self, key: (u32, u64), exclusive: bool) {
        let s = self.shard(key);
        let mut map = sync::lock(&s.map);
        loop {
            let e = map.entry(key).or_default();
            let free = if exclusive {
                !e.writer && e.readers == 0
            } else {
                !e.writer
            };
            if free {
                if exclusive {
                    e.writer = true;
                } else {
                    e.readers += 1;
                }
                return;
            }
            e.waiting += 1;
            map = sync::wait(&s.cv, map);
            if let Some(e) = map.get_mut(&key) {
                e.waiting -= 1;
            }
        }
    }

    fn release(&self, key: (u32, u64), exclusive: bool) {
        let s = self.shard(key);
        let mut map = sync::lock(&s.map);
        let Some(e) = map.get_mut(&key) else {
            panic!("released a chunk lock that is not held: {key:?}");
        };
        if exclusive {
            assert!(e.writer);
            e.writer = false;
        } else {
            assert!(e.readers > 0);
            e.readers -= 1;
        }
        let (idle, waiters) = (!e.writer && e.readers == 0, e.waiting > 0);
        if idle && !waiters {
            map.remove(&key);
        }
        drop(map);
        if waiters {
            s.cv.notify_all();
        }
    }

    pub fn shared(&self, origin: u32, chunk: u64) -> SharedGuard<'_> {
        self.acquire((origin, chunk), false);
        SharedGuard {
            locks: self,
            key: (origin, chunk),
        }
    }

    pub fn exclusive(&self, origin: u32, chunk: u64) -> ExclusiveGuard<'_> {
        self.acquire((origin, chunk), true);
        ExclusiveGuard {
            locks: self,
            key: (origin, chunk),
        }
    }

    /// Exclusive locks on a run of chunks, taken in ascending order.
    pub fn exclusive_range(&self, origin: u32, first: u64, last: u64) -> Vec<ExclusiveGuard<'_>> {
        assert!(first <= last);
        (first..=last).map(|c| self.exclusive(origin, c)).collect()
    }

    /// Entries in the table (for tests: it must drain to zero).
    pub fn entries(&self) -> usize {
        self.shards.iter().map(|s| sync::lock(&s.map).len()).sum()
    }
}

impl Drop for SharedGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.key, false);
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.key, true);
    }
}
