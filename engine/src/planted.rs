//! Planted bugs: the checkers' self-test. Each [`Bug`] removes one
//! protection, and a named checker (the simulator, a loom model, a model
//! test) must fail with it in place; `sim/planted.sh` and
//! `engine/loom-planted.sh` show that it does.
//!
//! A bug is planted only in a build made with `--cfg snapmv_planted` (the
//! scripts add it to the workspace crates alone), and then only the one
//! named by `SNAPMV_PLANTED_BUG` in the environment. So one build serves
//! every bug, and without the cfg [`on`] is a constant `false` that the
//! compiler removes: a shipped build carries no planted code path.

/// A protection a planted bug removes. The name is what
/// `SNAPMV_PLANTED_BUG` takes (see [`Bug::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The origin is overwritten before its copy is durable.
    SkipCowFlush,
    /// Metadata checksums are not compared.
    SkipChecksum,
    /// Freed space is reused before the freeing commit is durable.
    EarlyReuse,
    /// A snapshot read takes no lock on its chunk.
    NoChunkLock,
    /// A write does not hold its origin's gate against a snapshot.
    NoGate,
    /// A flush returns while another commit runs, covered or not.
    NoFlushBarrier,
    /// A write takes no lock on its chunks.
    NoWriteLock,
    /// The cleaner takes no lock on the chunk it cleans.
    NoCleanLock,
    /// The rollback copier takes no lock on its chunks.
    NoRbLock,
    /// A reserved chunk is allocated at once, before it is mapped.
    AllocEarly,
    /// A write replied while a FLUSH runs stays volatile.
    FlushNoCover,
    /// The cleaner's free may commit before the unmapping it follows.
    CleanFreeEarly,
    /// The page cache evicts dirty and not-yet-checkpointed pages.
    EvictDirty,
    /// A page read with no lock held enters the cache although a
    /// checkpoint or a free raced the read.
    FetchIgnoresEpoch,
    /// Staged first writes go in place before their copy's commit.
    DestageEarly,
    /// The flag index misses the interior nodes a delete flags.
    UnindexedFlag,
    /// A diff's gather by node goes on after the cleaner moved exceptions.
    GatherIgnoresMoves,
    /// The NBD frontend: a pool thread waits on a client that does not
    /// read its replies.
    PoolBlocksOnClient,
}

impl Bug {
    /// Every planted bug.
    pub const ALL: [Bug; 18] = [
        Bug::SkipCowFlush,
        Bug::SkipChecksum,
        Bug::EarlyReuse,
        Bug::NoChunkLock,
        Bug::NoGate,
        Bug::NoFlushBarrier,
        Bug::NoWriteLock,
        Bug::NoCleanLock,
        Bug::NoRbLock,
        Bug::AllocEarly,
        Bug::FlushNoCover,
        Bug::CleanFreeEarly,
        Bug::EvictDirty,
        Bug::FetchIgnoresEpoch,
        Bug::DestageEarly,
        Bug::UnindexedFlag,
        Bug::GatherIgnoresMoves,
        Bug::PoolBlocksOnClient,
    ];

    /// The bug's name, as the scripts and `SNAPMV_PLANTED_BUG` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Bug::SkipCowFlush => "skip_cow_flush",
            Bug::SkipChecksum => "skip_checksum",
            Bug::EarlyReuse => "early_reuse",
            Bug::NoChunkLock => "no_chunk_lock",
            Bug::NoGate => "no_gate",
            Bug::NoFlushBarrier => "no_flush_barrier",
            Bug::NoWriteLock => "no_write_lock",
            Bug::NoCleanLock => "no_clean_lock",
            Bug::NoRbLock => "no_rb_lock",
            Bug::AllocEarly => "alloc_early",
            Bug::FlushNoCover => "flush_no_cover",
            Bug::CleanFreeEarly => "clean_free_early",
            Bug::EvictDirty => "evict_dirty",
            Bug::FetchIgnoresEpoch => "fetch_ignores_epoch",
            Bug::DestageEarly => "destage_early",
            Bug::UnindexedFlag => "unindexed_flag",
            Bug::GatherIgnoresMoves => "gather_ignores_moves",
            Bug::PoolBlocksOnClient => "pool_blocks_on_client",
        }
    }

    /// The bug named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// Whether `bug` is planted in this process.
#[cfg(snapmv_planted)]
pub fn on(bug: Bug) -> bool {
    active() == Some(bug)
}

/// Whether `bug` is planted in this process: never, in a build without
/// `--cfg snapmv_planted`.
#[cfg(not(snapmv_planted))]
#[inline(always)]
pub const fn on(_bug: Bug) -> bool {
    false
}

/// The bug planted in this process: the one `SNAPMV_PLANTED_BUG` names, in
/// a build with `--cfg snapmv_planted`. Read once. A name that is no bug
/// stops the process, so a script's typo cannot pass as "caught nothing".
#[cfg(snapmv_planted)]
pub fn active() -> Option<Bug> {
    static ACTIVE: std::sync::OnceLock<Option<Bug>> = std::sync::OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let name = std::env::var("SNAPMV_PLANTED_BUG").ok()?;
        match Bug::from_name(&name) {
            Some(bug) => Some(bug),
            None => panic!("SNAPMV_PLANTED_BUG={name:?} names no planted bug"),
        }
    })
}

/// The bug planted in this process: none, in a build without
/// `--cfg snapmv_planted`.
#[cfg(not(snapmv_planted))]
pub fn active() -> Option<Bug> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_maps_back_to_its_bug() {
        for bug in Bug::ALL {
            assert_eq!(Bug::from_name(bug.name()), Some(bug));
        }
        assert_eq!(Bug::from_name("no_such_bug"), None);
    }
}
