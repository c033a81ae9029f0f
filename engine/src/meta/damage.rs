//! Structured damage: what `check` found, as data a program can act on
//! (which structure, the path of blocks from its root to the damaged page,
//! the keys that page or record covers, and the kind) and, through
//! `Display`, as the one human-readable line `CheckReport::errors` holds.

use super::types::Tree;
use std::fmt;

/// Where damage lies: one of the trees, or a fixed structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Tree(Tree),
    Superblock,
    Journal,
    StatePage,
    SpaceMap,
    /// The store's own record in the state page.
    AppState,
    /// The store as a whole: a version tree, or a pass that could not run.
    Store,
}

impl Place {
    pub fn name(self) -> &'static str {
        match self {
            Place::Tree(t) => t.name(),
            Place::Superblock => "superblock",
            Place::Journal => "journal",
            Place::StatePage => "state page",
            Place::SpaceMap => "space map",
            Place::AppState => "app state",
            Place::Store => "store",
        }
    }
}

/// Keys `from <= key < to`; `to` None: up to the end of the key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub from: u128,
    pub to: Option<u128>,
}

impl KeyRange {
    /// The range holding `key` alone.
    pub fn key(key: u128) -> Self {
        KeyRange {
            from: key,
            to: key.checked_add(1),
        }
    }

    fn is_one_key(&self) -> bool {
        self.to == self.from.checked_add(1)
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to {
            Some(to) => write!(f, "{:#x}..{to:#x}", self.from),
            None => write!(f, "{:#x}..end", self.from),
        }
    }
}

/// What is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// The block could not be read from the device.
    Unreadable,
    /// A page fails its checksum, type or block number, or a record does
    /// not decode.
    Corrupt,
    /// A valid page, but of another tree, level or value size than its
    /// parent implies.
    WrongNode,
    /// A node other than a lone root leaf holds no key.
    EmptyNode,
    /// A key outside the range the parent gives the page.
    KeyOutOfRange,
    /// A child pointer outside the allocation area.
    PointerOutsideArea,
    /// A page that a second pointer, or other space, already uses.
    ReferencedTwice,
    /// A mapping to a data chunk outside the allocation area.
    DataChunkOutsideArea,
    /// A mapping to a data chunk whose blocks are already in use.
    DataChunkOverlap,
    /// Blocks marked in use that nothing references.
    Leaked,
    /// Blocks the trees use that the space map marks free.
    MissingFromSpaceMap,
    /// A counter of the state page disagrees with the trees.
    CounterMismatch {
        what: &'static str,
        recorded: u64,
        found: u64,
    },
    /// A superblock slot that does not decode.
    BadSuperblockSlot,
    /// A damaged journal transaction that a later one follows.
    JournalDamage,
    /// An exception or node of an origin that is not bound.
    UnboundOrigin,
    /// An exception past its origin's last chunk.
    PastOriginEnd,
    /// An exception naming a node its origin's version tree lacks.
    NoSuchNode,
    /// An origin's node records do not form a version tree.
    BrokenVersionTree,
    /// A node record's own-chunk counter disagrees with the index.
    OwnChunksMismatch { recorded: u64, found: u64 },
    /// The index by node (`ByNode`) is not the exception index transposed:
    /// one node's chunks differ between the two.
    IndexMismatch,
    /// A pass stopped early: what it did not reach is unchecked.
    Incomplete,
}

impl DamageKind {
    /// The kind's stable name, as `check --json` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            DamageKind::Unreadable => "unreadable",
            DamageKind::Corrupt => "corrupt",
            DamageKind::WrongNode => "wrong_node",
            DamageKind::EmptyNode => "empty_node",
            DamageKind::KeyOutOfRange => "key_out_of_range",
            DamageKind::PointerOutsideArea => "pointer_outside_area",
            DamageKind::ReferencedTwice => "referenced_twice",
            DamageKind::DataChunkOutsideArea => "data_chunk_outside_area",
            DamageKind::DataChunkOverlap => "data_chunk_overlap",
            DamageKind::Leaked => "leaked",
            DamageKind::MissingFromSpaceMap => "missing_from_space_map",
            DamageKind::CounterMismatch { .. } => "counter_mismatch",
            DamageKind::BadSuperblockSlot => "bad_superblock_slot",
            DamageKind::JournalDamage => "journal_damage",
            DamageKind::UnboundOrigin => "unbound_origin",
            DamageKind::PastOriginEnd => "past_origin_end",
            DamageKind::NoSuchNode => "no_such_node",
            DamageKind::BrokenVersionTree => "broken_version_tree",
            DamageKind::OwnChunksMismatch { .. } => "own_chunks_mismatch",
            DamageKind::IndexMismatch => "index_mismatch",
            DamageKind::Incomplete => "incomplete",
        }
    }

    /// Space accounting (the space map's bits, the state page's counters),
    /// which `repair` rewrites from the trees; every other kind is damage
    /// to the structure, which it refuses.
    pub fn is_space_accounting(&self) -> bool {
        matches!(
            self,
            DamageKind::Leaked
                | DamageKind::MissingFromSpaceMap
                | DamageKind::CounterMismatch { .. }
        )
    }
}

/// One damage `check` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub place: Place,
    /// Blocks from the tree's root down to the damaged page; for a fixed
    /// structure, its damaged block; empty when no one page is to blame.
    pub path: Vec<u64>,
    /// The keys the damaged page (or record) covers.
    pub keys: Option<KeyRange>,
    pub kind: DamageKind,
    /// What is wrong, in words.
    pub detail: String,
}

impl Damage {
    pub fn new(place: Place, kind: DamageKind, detail: impl Into<String>) -> Self {
        Damage {
            place,
            path: Vec::new(),
            keys: None,
            kind,
            detail: detail.into(),
        }
    }

    pub fn with_path(mut self, path: Vec<u64>) -> Self {
        self.path = path;
        self
    }

    pub fn with_keys(mut self, keys: KeyRange) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The damaged block, for a line that names it.
    fn block(&self) -> Option<u64> {
        self.path.last().copied()
    }
}

impl fmt::Display for Damage {
    /// `exceptions: block 9012 (path 812 -> 4391 -> 9012, keys 0x..): ...`
    /// for a tree page; the structure's own words for the fixed ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.place.name();
        match (self.place, self.block()) {
            (Place::Tree(_), Some(block)) => {
                write!(f, "{name}: block {block} (")?;
                match self.path.len() {
                    1 => write!(f, "root")?,
                    _ => write!(f, "path {}", join_path(&self.path))?,
                }
                if let Some(k) = self.keys {
                    write!(f, ", keys {k}")?;
                }
                write!(f, "): {}", self.detail)
            }
            (Place::Tree(_), None) => match self.keys {
                Some(k) if k.is_one_key() => {
                    write!(f, "{name}: key {:#x}: {}", k.from, self.detail)
                }
                Some(k) => write!(f, "{name}: keys {k}: {}", self.detail),
                None => write!(f, "{name} tree: {}", self.detail),
            },
            (Place::Superblock, Some(slot)) => {
                let letter = if slot == 0 { "A" } else { "B" };
                write!(
                    f,
                    "superblock slot {letter} (block {slot}): {}",
                    self.detail
                )
            }
            (Place::SpaceMap, Some(block)) => {
                write!(f, "space map: bitmap block {block}: {}", self.detail)
            }
            (_, Some(block)) => write!(f, "{name} (block {block}): {}", self.detail),
            (_, None) => write!(f, "{name}: {}", self.detail),
        }
    }
}

fn join_path(path: &[u64]) -> String {
    let blocks: Vec<String> = path.iter().map(u64::to_string).collect();
    blocks.join(" -> ")
}
