//! `snapmv-sim`: run one seed, a swarm of seeds, or the exhaustive crash
//! enumeration against the snapmv engine. See sim/README.md.

use clap::{Parser, Subcommand};
use snapmv_sim::exhaustive::{self, Limits};
use snapmv_sim::workload::Kind;
use snapmv_sim::{campaign, parse_seed, run_seed, RunOpts};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "snapmv-sim",
    about = "Deterministic crash simulator and contract oracle for snapmv"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one seed.
    Run {
        /// A u64 (decimal or 0x-hex) or a 40-hex git commit id.
        #[arg(long)]
        seed: String,
        #[arg(long, default_value_t = 2000)]
        ops: u64,
        /// Print every operation and its result.
        #[arg(long)]
        verbose: bool,
        /// Use the standard operation mix instead of the seed's swarm member.
        #[arg(long)]
        no_swarm: bool,
        /// Operation kinds to switch off (comma-separated, e.g. eio,latent).
        #[arg(long, default_value = "")]
        off: String,
    },
    /// Run many seeds, each with its own swarm configuration.
    Swarm {
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed (u64 or 40-hex commit id); seeds are from, from+1, ...
        #[arg(long, default_value = "1")]
        from: String,
        #[arg(long, default_value_t = 2000)]
        ops: u64,
        /// Worker threads (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
        #[arg(long)]
        stop_on_failure: bool,
        /// Operation kinds to switch off (comma-separated, e.g. eio,latent).
        #[arg(long, default_value = "")]
        off: String,
    },
    /// Enumerate every crash state of the scripted workloads.
    Exhaustive {
        /// Only workloads whose name contains this.
        #[arg(long)]
        workload: Option<String>,
        /// Keep checking after the first failing state of a workload.
        #[arg(long)]
        all_failures: bool,
        #[arg(long)]
        verbose: bool,
        /// List the workloads and exit.
        #[arg(long)]
        list: bool,
        /// Instead of the scripted workloads: run this seed (u64 or commit
        /// id) for --at operations, then enumerate every crash state of the
        /// next --window operations.
        #[arg(long)]
        seed: Option<String>,
        #[arg(long, default_value_t = 0)]
        at: u64,
        #[arg(long, default_value_t = 1)]
        window: u64,
        /// With --seed: operation kinds to switch off, as for `run`.
        #[arg(long, default_value = "")]
        off: String,
    },
}

fn seed_or_exit(s: &str) -> Result<u64, ExitCode> {
    parse_seed(s).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn off_or_exit(s: &str) -> Result<Vec<Kind>, ExitCode> {
    Kind::parse_list(s).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    match real_main() {
        Ok(c) | Err(c) => c,
    }
}

fn real_main() -> Result<ExitCode, ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            seed,
            ops,
            verbose,
            no_swarm,
            off,
        } => {
            let s = seed_or_exit(&seed)?;
            let opts = RunOpts {
                verbose,
                no_swarm,
                off: off_or_exit(&off)?,
                ..Default::default()
            };
            let t = Instant::now();
            let r = run_seed(s, ops, &opts);
            let secs = t.elapsed().as_secs_f64();
            println!("seed {s} ({seed}): {}", r.config);
            println!("{}", r.stats);
            println!(
                "trace hash {:08x}; {} ops in {:.3}s = {:.0} simulated ops/s",
                r.trace_hash,
                r.stats.ops,
                secs,
                r.stats.ops as f64 / secs.max(1e-9)
            );
            match r.failure {
                None => {
                    println!("PASS");
                    Ok(ExitCode::SUCCESS)
                }
                Some(f) => {
                    print!("{f}");
                    println!("replay: {}", f.replay_command(&opts.flags()));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Swarm {
            seeds,
            from,
            ops,
            jobs,
            stop_on_failure,
            off,
        } => {
            let s = seed_or_exit(&from)?;
            let opts = RunOpts {
                off: off_or_exit(&off)?,
                ..Default::default()
            };
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            println!(
                "swarm: seeds {s}..{} ({seeds} seeds), {ops} ops each, {jobs} jobs {}",
                s.wrapping_add(seeds),
                opts.flags()
            );
            let rep = campaign::swarm(s, seeds, ops, jobs, true, stop_on_failure, &opts);
            println!("{}", rep.stats);
            println!(
                "{} seeds, {} ops in {:.1}s = {:.0} simulated ops/s; {} failed",
                rep.seeds,
                rep.stats.ops,
                rep.secs,
                rep.ops_per_sec(),
                rep.failures.len()
            );
            for r in &rep.failures {
                if let Some(f) = &r.failure {
                    println!(
                        "FAILED seed {} op {}: {}: {}\n  replay: {}",
                        f.seed,
                        f.op,
                        f.clause,
                        f.what,
                        f.replay_command(&opts.flags())
                    );
                }
            }
            Ok(if rep.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Exhaustive {
            workload,
            all_failures,
            verbose,
            list,
            seed,
            at,
            window,
            off,
        } => {
            if list {
                for s in exhaustive::scripts() {
                    println!("{:<34} {}", s.name, s.about);
                }
                println!(
                    "{:<34} commit until one checkpoints the journal; enumerate that round",
                    "checkpoint"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let lim = Limits::default();
            let reps = match &seed {
                Some(sd) => {
                    let opts = RunOpts {
                        verbose,
                        off: off_or_exit(&off)?,
                        ..Default::default()
                    };
                    vec![exhaustive::run_at(
                        seed_or_exit(sd)?,
                        at,
                        window,
                        &opts,
                        &lim,
                        !all_failures,
                    )]
                }
                None => exhaustive::run_all(workload.as_deref(), &lim, verbose, !all_failures),
            };
            for l in exhaustive::table(&reps) {
                println!("{l}");
            }
            let mut failed = false;
            for r in &reps {
                if !r.note.is_empty() {
                    println!("{}: {}", r.name, r.note);
                }
                for (at, f) in &r.failures {
                    failed = true;
                    println!("FAILED workload {} at {at}:\n{f}", r.name);
                    println!(
                        "replay: cargo run --release -p snapmv-sim -- exhaustive --workload {} --all-failures",
                        r.name
                    );
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
