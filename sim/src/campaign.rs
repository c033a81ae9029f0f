//! Many seeds in parallel (swarm), with a progress bar and a summary.

use crate::harness::{run_seed, RunOpts, RunResult, Stats};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct SwarmReport {
    pub seeds: u64,
    pub stats: Stats,
    pub failures: Vec<RunResult>,
    pub secs: f64,
}

impl SwarmReport {
    pub fn ops_per_sec(&self) -> f64 {
        self.stats.ops as f64 / self.secs.max(1e-9)
    }
}

/// Run seeds `from, from+1, ..` (`count` of them), `ops` operations each,
/// on `jobs` threads. Seeds are independent and each is deterministic, so
/// the thread count changes only the wall time.
pub fn swarm(
    from: u64,
    count: u64,
    ops: u64,
    jobs: usize,
    progress: bool,
    stop_on_failure: bool,
    opts: &RunOpts,
) -> SwarmReport {
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<RunResult>();
    let bar = if progress {
        let b = ProgressBar::new(count);
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} seeds {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut rep = SwarmReport {
        seeds: 0,
        ..Default::default()
    };
    std::thread::scope(|sc| {
        for _ in 0..jobs.max(1) {
            let tx = tx.clone();
            let (next, stop, opts) = (&next, &stop, opts);
            sc.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let r = run_seed(from.wrapping_add(i), ops, opts);
                if tx.send(r).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for r in rx {
            rep.seeds += 1;
            rep.stats.add(&r.stats);
            if let Some(f) = &r.failure {
                bar.println(format!("{f}  replay: {}", f.replay_command(&opts.flags())));
                rep.failures.push(r);
                if stop_on_failure {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} failed, {:.0} ops/s",
                rep.failures.len(),
                rep.stats.ops as f64 / secs
            ));
            bar.inc(1);
        }
    });
    bar.finish();
    rep.secs = start.elapsed().as_secs_f64();
    rep.failures.sort_by_key(|r| r.seed);
    rep
}
