//! snapmv-sim: a deterministic crash-injecting simulator for the snapmv
//! engine, with a contract oracle, seeded swarm campaigns and an
//! exhaustive crash-state enumerator. See sim/README.md.

pub mod campaign;
#[cfg(feature = "shuttle")]
pub mod concurrent;
pub mod exhaustive;
pub mod harness;
pub mod metaclass;
pub mod model;
pub mod pattern;
pub mod seed;
pub mod simdev;
pub mod workload;

pub use harness::{run_seed, Clause, Failure, RunOpts, RunResult, Stats, World};
pub use seed::parse_seed;
pub use simdev::{Domain, Image, SimDev};
