//! `snapmv-sim-concurrent`: the concurrent crash simulator's command line
//! (see sim/src/concurrent.rs and sim/README.md).
//!
//!   snapmv-sim-concurrent run --seed S           # one seed, replayable
//!   snapmv-sim-concurrent swarm --seeds N        # many seeds
//!   snapmv-sim-concurrent swarm --seeds N --expect-failure   # planted bugs

use clap::{Parser, Subcommand};
use snapmv_sim::concurrent::{run_seed, Opts, Outcome};
use snapmv_sim::parse_seed;
use snapmv_sim::workload::cache_budget_text;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "snapmv-sim-concurrent",
    about = "The engine's threads under a seeded scheduler, a power cut, and the contract"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one seed and print its outcome.
    Run {
        #[arg(long)]
        seed: String,
        #[command(flatten)]
        size: Size,
    },
    /// Run seeds from, from+1, ... and report every failure.
    Swarm {
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        #[arg(long, default_value = "1")]
        from: String,
        /// OS threads running seeds side by side (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Succeed only if some seed fails (planted-bug self-tests), and
        /// stop at the first failure.
        #[arg(long)]
        expect_failure: bool,
        #[command(flatten)]
        size: Size,
    },
}

#[derive(clap::Args, Clone, Copy)]
struct Size {
    #[arg(long, default_value_t = Opts::default().clients)]
    clients: usize,
    #[arg(long, default_value_t = Opts::default().ops_per_client)]
    ops: usize,
    #[arg(long, default_value_t = Opts::default().cut_range)]
    cut_range: u64,
}

impl Size {
    fn opts(self) -> Opts {
        Opts {
            clients: self.clients.max(1),
            ops_per_client: self.ops,
            cut_range: self.cut_range.max(1),
        }
    }
}

fn show(o: &Outcome) -> String {
    format!(
        "seed {}: page cache {} ({} misses, {} evictions, {} stale fetches), {} ops, {} writes ok, {} flushes ok, {} durable writes checked, cut {}, trace {:016x}",
        o.seed,
        cache_budget_text(o.cache_budget),
        o.cache_misses,
        o.cache_evictions,
        o.cache_stale_fetches,
        o.ops,
        o.writes_ok,
        o.flushes_ok,
        o.sure_writes,
        if o.cut_mid_run { "mid-run" } else { "at the end" },
        o.trace_hash
    )
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run { seed, size } => {
            let seed = match parse_seed(&seed) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bad --seed: {e}");
                    return ExitCode::from(2);
                }
            };
            let o = run_seed(seed, &size.opts());
            println!("{}", show(&o));
            match &o.failure {
                None => ExitCode::SUCCESS,
                Some(f) => {
                    println!("FAILED: {f}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Swarm {
            seeds,
            from,
            jobs,
            expect_failure,
            size,
        } => swarm(seeds, &from, jobs, expect_failure, size.opts()),
    }
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    ops: u64,
    writes: u64,
    flushes: u64,
    sure: u64,
    cuts_mid_run: u64,
    cache_misses: u64,
    cache_evictions: u64,
    cache_stale_fetches: u64,
    failures: Vec<Outcome>,
}

fn swarm(n: u64, from: &str, jobs: Option<usize>, expect: bool, opts: Opts) -> ExitCode {
    let first = match parse_seed(from) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bad --from: {e}");
            return ExitCode::from(2);
        }
    };
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let started = Instant::now();
    let workers: Vec<_> = (0..jobs.max(1))
        .map(|_| {
            let (next, stop, totals) = (next.clone(), stop.clone(), totals.clone());
            std::thread::spawn(move || loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= n || stop.load(Ordering::SeqCst) {
                    return;
                }
                let o = run_seed(first.wrapping_add(k), &opts);
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                t.seeds += 1;
                t.ops += o.ops;
                t.writes += o.writes_ok;
                t.flushes += o.flushes_ok;
                t.sure += o.sure_writes;
                t.cuts_mid_run += u64::from(o.cut_mid_run);
                t.cache_misses += o.cache_misses;
                t.cache_evictions += o.cache_evictions;
                t.cache_stale_fetches += o.cache_stale_fetches;
                if o.failure.is_some() {
                    t.failures.push(o);
                    stop.store(expect, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let t = totals.lock().unwrap_or_else(|p| p.into_inner());
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds in {secs:.1} s ({:.1} seeds/s): {} ops, {} writes ok, {} flushes ok, {} durable writes checked, {} cuts mid-run, page cache {} misses {} evictions {} stale fetches, {} failure(s)",
        t.seeds,
        t.seeds as f64 / secs.max(1e-9),
        t.ops,
        t.writes,
        t.flushes,
        t.sure,
        t.cuts_mid_run,
        t.cache_misses,
        t.cache_evictions,
        t.cache_stale_fetches,
        t.failures.len()
    );
    for f in &t.failures {
        println!(
            "FAILED seed {} (page cache {}): {}\n  replay: {}",
            f.seed,
            cache_budget_text(f.cache_budget),
            f.failure.as_deref().unwrap_or(""),
            f.replay_command()
        );
    }
    match (expect, t.failures.is_empty()) {
        (false, true) | (true, false) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
