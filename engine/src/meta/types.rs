//! The vocabulary the metadata owners share with the store: which trees
//! there are, fixed record sizes, and the geometry and usage reports. It
//! imports nothing else from `meta`, so every owner may use it.

use crate::format;

const _: () = assert!(APP_STATE_MAX == format::APP_STATE_CAP);
const _: () = assert!(PAGE_SIZE == format::PAGE_SIZE);

/// The trees the store keeps. Keys are u128; values have a fixed size per tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tree {
    /// (origin, chunk, node) -> data chunk number (u64 LE). The value
    /// [`ZERO_CHUNK`] means "reads as zeros, no data chunk".
    Exceptions,
    /// node id -> the store's node record.
    Nodes,
    /// origin number -> the store's origin record.
    Origins,
    /// (origin, node, chunk) -> nothing: the exception index transposed,
    /// so the chunks where one version node has exceptions are a range
    /// (a diff's cost then follows the versions it compares, not the
    /// device). Format 2 on; a format-1 device has no such tree.
    ByNode,
}

impl Tree {
    pub const ALL: [Tree; 4] = [Tree::Exceptions, Tree::Nodes, Tree::Origins, Tree::ByNode];

    pub fn value_size(self) -> usize {
        match self {
            Tree::Exceptions => 8,
            Tree::Nodes => NODE_REC_SIZE,
            Tree::Origins => ORIGIN_REC_SIZE,
            Tree::ByNode => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tree::Exceptions => "exceptions",
            Tree::Nodes => "nodes",
            Tree::Origins => "origins",
            Tree::ByNode => "exceptions by node",
        }
    }

    /// Position of the tree's root in the state page.
    pub(super) fn index(self) -> usize {
        match self {
            Tree::Exceptions => 0,
            Tree::Nodes => 1,
            Tree::Origins => 2,
            Tree::ByNode => 3,
        }
    }

    /// The tree id every node page of this tree records in its header.
    pub(super) fn node_id(self) -> u32 {
        self.index() as u32
    }
}

pub const NODE_REC_SIZE: usize = 256;
pub const ORIGIN_REC_SIZE: usize = 512;
/// Exception value meaning "all zeros; no data chunk behind it".
pub const ZERO_CHUNK: u64 = u64::MAX;
/// Bytes of opaque store state kept in the state page and journalled.
pub const APP_STATE_MAX: usize = 2048;
/// Metadata page size.
pub const PAGE_SIZE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per chunk: a power of two in [4 KiB, 1 MiB].
    pub chunk_size: u32,
    /// Chunks in the whole device (chunk n lives at byte n * chunk_size).
    pub device_chunks: u64,
    /// Chunks available for data and metadata after the fixed areas.
    pub chunks_total: u64,
}

impl Geometry {
    /// Byte offset of a chunk. Saturates: a value from a damaged index
    /// then fails the device's range check instead of wrapping around.
    pub fn chunk_offset(&self, chunk: u64) -> u64 {
        chunk.saturating_mul(self.chunk_size as u64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    /// Chunks holding exception data.
    pub data_chunks: u64,
    /// 4 KiB blocks holding B+tree pages.
    pub meta_blocks: u64,
    /// Chunks that are neither (whole chunks free for data).
    pub free_chunks: u64,
}

#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub chunk_size: u32,
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            chunk_size: 64 * 1024,
            force: false,
        }
    }
}
