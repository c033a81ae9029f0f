//! Wire format of the NBD protocol: constants, and pure parsers and
//! encoders. Nothing here does I/O, so every function can be fuzzed: the
//! parsers take any bytes and return a typed error, never panic.
//!
//! Values are from `doc/proto.md` (NetworkBlockDevice/nbd); all integers
//! are big-endian on the wire.

// Handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

// NBD_INFO_* types (in NBD_REP_INFO and in OPT_INFO/OPT_GO requests).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REQUEST_HEADER_LEN: usize = 28;
/// Once NBD_OPT_EXTENDED_HEADERS is acknowledged, every request starts
/// with this 32-byte header (64-bit length) instead.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: `len` is the length of a payload that follows
/// the header, not an effect length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` in OPT_SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `qemu:allocation-depth`: the whole 32-bit value is a depth (0 = zero or
/// unallocated, 1 = this version's own data, 2 = read from the origin).
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const ALLOCATION_DEPTH_ID: u32 = 2;
/// `snapmv:changed-since:<tag>` (or `...:origin`): bit 0 set where the
/// export may differ from that version of the same origin.
pub const CHANGED_SINCE_PREFIX: &str = "snapmv:changed-since:";
/// Bit 0 of `snapmv:changed-since:*` (like qemu's NBD_STATE_DIRTY).
pub const STATE_CHANGED: u32 = 1 << 0;
/// Ids of the `changed-since` contexts of one selection start here, in the
/// order they were selected.
pub const CHANGED_SINCE_FIRST_ID: u32 = 3;
/// Contexts one OPT_SET_META_CONTEXT may select (each costs an engine walk
/// and a reply chunk per BLOCK_STATUS); more is refused with ERR_TOO_BIG.
pub const MAX_SELECTED_CONTEXTS: usize = 16;
/// `changed-since` contexts listed for one wildcard LIST query (the
/// newest tags); any other tag can still be selected by name.
pub const MAX_LISTED_TAGS: usize = 256;

// Error values the protocol allows on the wire (NBD_E*).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string the spec allows (export names, queries, messages).
pub const MAX_STRING: usize = 4096;
/// Largest option payload we accept. A GO with a 4096-byte name and every
/// info request fits many times over; anything bigger is refused unread.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Advertised block sizes (NBD_INFO_BLOCK_SIZE). Any byte offset works,
/// so the minimum is 1; the maximum advertised is the spec's portable 32
/// MiB even though requests up to `ServerConfig::max_request` are served.
pub const BLOCK_MIN: u32 = 1;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const BLOCK_MAX_ADVERTISED: u32 = 32 << 20;

/// Why a byte sequence is not a valid protocol message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// An extended request announcing a payload that no `NBD_INFO_BLOCK_SIZE`
    /// could allow (over 32 bits): not worth draining, the client is broken.
    #[error("request announces a payload of {0} bytes, over the 32-bit limit")]
    PayloadTooLong(u64),
}

/// Why an option's payload is unacceptable; answered with
/// `NBD_REP_ERR_INVALID` (negotiation goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option: {0}")]
pub struct OptInvalid(pub &'static str);

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// The fixed 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let (Some(magic), Some(option), Some(len)) = (be_u64(b, 0), be_u32(b, 8), be_u32(b, 12)) else {
        return Err(ProtoError::Truncated {
            need: 16,
            have: b.len(),
        });
    };
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader { option, len })
}

/// One parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// OPT_INFO (`go == false`) or OPT_GO.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ExtendedHeaders,
    /// OPT_LIST_META_CONTEXT (`set == false`) or OPT_SET_META_CONTEXT.
    MetaContext {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
    /// Anything else: answered ERR_UNSUP.
    Unsupported(u32),
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn parse_string(b: &[u8]) -> Result<String, OptInvalid> {
    if b.len() > MAX_STRING {
        return Err(OptInvalid("string longer than 4096 bytes"));
    }
    if b.contains(&0) {
        return Err(OptInvalid("string contains NUL"));
    }
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| OptInvalid("string is not UTF-8"))
}

/// A u32-length-prefixed string at `at`; returns it and the next offset.
fn parse_lp_string(b: &[u8], at: usize) -> Result<(String, usize), OptInvalid> {
    let len = be_u32(b, at).ok_or(OptInvalid("truncated string length"))? as usize;
    let start = at + 4;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= b.len())
        .ok_or(OptInvalid("string runs past the option"))?;
    Ok((parse_string(&b[start..end])?, end))
}

/// Parse an option's payload. Never panics, whatever `data` holds.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptInvalid> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data)?)),
        // The spec asks servers to ignore data sent with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST if data.is_empty() => Ok(ClientOption::List),
        OPT_LIST => Err(OptInvalid("OPT_LIST carries no data")),
        OPT_STARTTLS if data.is_empty() => Ok(ClientOption::StartTls),
        OPT_STARTTLS => Err(OptInvalid("OPT_STARTTLS carries no data")),
        OPT_STRUCTURED_REPLY if data.is_empty() => Ok(ClientOption::StructuredReply),
        OPT_STRUCTURED_REPLY => Err(OptInvalid("OPT_STRUCTURED_REPLY carries no data")),
        OPT_EXTENDED_HEADERS if data.is_empty() => Ok(ClientOption::ExtendedHeaders),
        OPT_EXTENDED_HEADERS => Err(OptInvalid("OPT_EXTENDED_HEADERS carries no data")),
        OPT_INFO | OPT_GO => {
            let (name, at) = parse_lp_string(data, 0)?;
            let n = be_u16(data, at).ok_or(OptInvalid("missing info request count"))? as usize;
            let reqs = &data[at + 2..];
            if reqs.len() != 2 * n {
                return Err(OptInvalid("info request count does not match length"));
            }
            let requests = reqs
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Ok(ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let (name, mut at) = parse_lp_string(data, 0)?;
            let n = be_u32(data, at).ok_or(OptInvalid("missing query count"))?;
            at += 4;
            // Each query takes at least 4 bytes, which bounds `n` by the
            // option length before anything is allocated for it.
            if (n as usize) > (data.len() - at) / 4 {
                return Err(OptInvalid("query count exceeds option length"));
            }
            let mut queries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (q, next) = parse_lp_string(data, at)?;
                queries.push(q);
                at = next;
            }
            if at != data.len() {
                return Err(OptInvalid("trailing bytes after queries"));
            }
            Ok(ClientOption::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                name,
                queries,
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// Which contexts of ours a meta-context query names. `list` is true for
/// OPT_LIST_META_CONTEXT, where "base:" is a wildcard.
pub fn query_matches_base_allocation(query: &str, list: bool) -> Result<bool, OptInvalid> {
    Ok(match parse_meta_query(query)? {
        MetaQuery::Exact(MetaContext::BaseAllocation) => true,
        MetaQuery::Namespace(Namespace::Base) => list,
        _ => false,
    })
}

/// One metadata context we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`.
    BaseAllocation,
    /// `qemu:allocation-depth`.
    AllocationDepth,
    /// `snapmv:changed-since:<tag>`; `None` is `...:origin`.
    ChangedSince(Option<u64>),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION.into(),
            MetaContext::AllocationDepth => ALLOCATION_DEPTH.into(),
            MetaContext::ChangedSince(None) => format!("{CHANGED_SINCE_PREFIX}origin"),
            MetaContext::ChangedSince(Some(t)) => format!("{CHANGED_SINCE_PREFIX}{t}"),
        }
    }
}

/// The namespaces we serve contexts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    Base,
    Qemu,
    Snapmv,
}

/// What one meta-context query names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaQuery {
    /// One context by its full name (selectable).
    Exact(MetaContext),
    /// `base:`, `qemu:` or `snapmv:`: every context of the namespace
    /// (LIST only; a SET selects nothing with it).
    Namespace(Namespace),
    /// `snapmv:changed-since:` with no tag: every tag it may name (LIST
    /// only).
    AnyChangedSince,
    /// A well-formed query for nothing we serve (another namespace, an
    /// unknown leaf, a tag that is not a number): ignored, as the spec
    /// asks.
    Unknown,
}

/// A tag as export names write it: decimal, no sign, no leading zeros.
fn parse_tag(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Parse one meta-context query. The only syntax error is a query without
/// a namespace (no colon); anything else we do not serve is `Unknown`.
/// Pure; never panics.
pub fn parse_meta_query(query: &str) -> Result<MetaQuery, OptInvalid> {
    let Some((ns, leaf)) = query.split_once(':') else {
        return Err(OptInvalid("query has no namespace"));
    };
    Ok(match (ns, leaf) {
        ("base", "") => MetaQuery::Namespace(Namespace::Base),
        ("base", "allocation") => MetaQuery::Exact(MetaContext::BaseAllocation),
        ("qemu", "") => MetaQuery::Namespace(Namespace::Qemu),
        ("qemu", "allocation-depth") => MetaQuery::Exact(MetaContext::AllocationDepth),
        ("snapmv", "") => MetaQuery::Namespace(Namespace::Snapmv),
        ("snapmv", _) => match leaf.strip_prefix("changed-since:") {
            Some("") => MetaQuery::AnyChangedSince,
            Some("origin") => MetaQuery::Exact(MetaContext::ChangedSince(None)),
            Some(tag) => parse_tag(tag)
                .map(|t| MetaQuery::Exact(MetaContext::ChangedSince(Some(t))))
                .unwrap_or(MetaQuery::Unknown),
            None => MetaQuery::Unknown,
        },
        _ => MetaQuery::Unknown,
    })
}

/// Encode one option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let s = truncate_str(s, MAX_STRING);
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

pub fn info_block_size() -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&BLOCK_MIN.to_be_bytes());
    v.extend_from_slice(&BLOCK_PREFERRED.to_be_bytes());
    v.extend_from_slice(&BLOCK_MAX_ADVERTISED.to_be_bytes());
    v
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a
/// character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A request header as sent; not yet checked against the export. Compact
/// (28-byte) and extended (32-byte) headers parse into the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    /// The length field: an effect length, or the payload's length when
    /// the request carries one (then equal to `payload`).
    pub len: u64,
    /// Bytes of payload that follow the header on the wire: a WRITE's
    /// length, or an extended request's length when it has
    /// `CMD_FLAG_PAYLOAD_LEN`. Framing depends on this alone.
    pub payload: u32,
}

/// Parse a compact (28-byte) request header.
pub fn parse_request_header(b: &[u8]) -> Result<RequestHeader, ProtoError> {
    let (Some(magic), Some(flags), Some(cmd), Some(handle), Some(offset), Some(len)) = (
        be_u32(b, 0),
        be_u16(b, 4),
        be_u16(b, 6),
        be_u64(b, 8),
        be_u64(b, 16),
        be_u32(b, 24),
    ) else {
        return Err(ProtoError::Truncated {
            need: REQUEST_HEADER_LEN,
            have: b.len(),
        });
    };
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    Ok(RequestHeader {
        flags,
        cmd,
        handle,
        offset,
        len: len.into(),
        // Compact framing: only a WRITE carries a payload.
        payload: if cmd == CMD_WRITE { len } else { 0 },
    })
}

/// Parse an extended (32-byte) request header. A payload is announced by
/// `CMD_FLAG_PAYLOAD_LEN` whatever the command, so the stream stays in step
/// even for requests that are then refused. A WRITE carries its data with
/// or without the flag: the spec asks for it, but qemu's client (10.0)
/// leaves it clear and qemu's server accepts that, so reading a flagless
/// WRITE as payload-free would only desynchronise the stream.
pub fn parse_extended_request_header(b: &[u8]) -> Result<RequestHeader, ProtoError> {
    let (Some(magic), Some(flags), Some(cmd), Some(handle), Some(offset), Some(len)) = (
        be_u32(b, 0),
        be_u16(b, 4),
        be_u16(b, 6),
        be_u64(b, 8),
        be_u64(b, 16),
        be_u64(b, 24),
    ) else {
        return Err(ProtoError::Truncated {
            need: EXTENDED_REQUEST_HEADER_LEN,
            have: b.len(),
        });
    };
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    let payload = if flags & CMD_FLAG_PAYLOAD_LEN != 0 || cmd == CMD_WRITE {
        u32::try_from(len).map_err(|_| ProtoError::PayloadTooLong(len))?
    } else {
        0
    };
    Ok(RequestHeader {
        flags,
        cmd,
        handle,
        offset,
        len,
        payload,
    })
}

/// How replies are framed on a connection; fixed at negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Nothing negotiated: simple replies only.
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: 20-byte chunks, simple replies for
    /// successes without payload.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests, and a 32-byte chunk
    /// header on every reply. Implies everything structured replies allow.
    Extended,
}

impl ReplyStyle {
    /// Replies come in chunks (structured or extended): READ errors carry a
    /// message, `NBD_CMD_FLAG_DF` and BLOCK_STATUS are possible.
    pub fn chunked(self) -> bool {
        self != ReplyStyle::Simple
    }
}

/// What the connection negotiated, as far as request checking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionContext {
    pub size: u64,
    pub read_only: bool,
    pub replies: ReplyStyle,
    /// `base:allocation` was selected for this export.
    pub meta_context: bool,
    /// Largest READ/WRITE payload served.
    pub max_request: u32,
}

/// A request that passed every check and can run against the backend.
/// Only READ and WRITE move data, so only theirs are bounded to 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload (`len` bytes) follows the header on the wire.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    Disconnect,
}

/// A request refused with an error reply. `drain` bytes of payload (the
/// header's `payload`) must still be read and discarded to stay in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub drain: u32,
    pub why: &'static str,
}

fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// The command flags a request may carry on this connection.
fn allowed_flags(cmd: u16, cx: &TransmissionContext) -> Option<u16> {
    let df = if cx.replies.chunked() { CMD_FLAG_DF } else { 0 };
    let payload = if cx.replies == ReplyStyle::Extended {
        CMD_FLAG_PAYLOAD_LEN
    } else {
        0
    };
    Some(match cmd {
        CMD_READ => CMD_FLAG_FUA | df,
        // With extended headers a WRITE should say that its data follows.
        CMD_WRITE => CMD_FLAG_FUA | payload,
        CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

/// Check a request against what was negotiated, with the spec's errno for
/// each refusal. Pure; never panics. A payload on any command but WRITE is
/// refused (EINVAL: the flag is not valid there) and drained.
pub fn check_request(h: &RequestHeader, cx: &TransmissionContext) -> Result<Command, Rejection> {
    let reject = |errno, why| Rejection {
        errno,
        drain: h.payload,
        why,
    };
    if h.cmd == CMD_DISC {
        // Flags on DISC do not matter: the connection ends either way.
        return Ok(Command::Disconnect);
    }
    let Some(allowed) = allowed_flags(h.cmd, cx) else {
        return Err(reject(EINVAL, "unknown command"));
    };
    if h.flags & !allowed != 0 {
        return Err(reject(EINVAL, "command flag not valid for this command"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    match h.cmd {
        CMD_READ => {
            let Some(len) = u32::try_from(len).ok().filter(|&l| l <= cx.max_request) else {
                let errno = if h.flags & CMD_FLAG_DF != 0 {
                    EOVERFLOW
                } else {
                    EINVAL
                };
                return Err(reject(errno, "read larger than the server's limit"));
            };
            if !in_range(offset, len.into(), cx.size) {
                return Err(reject(EINVAL, "read beyond the end of the export"));
            }
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE => {
            // Always equal for parsed headers; a write is its payload.
            if u64::from(h.payload) != len {
                return Err(reject(EINVAL, "write length differs from its payload"));
            }
            if cx.read_only {
                return Err(reject(EPERM, "export is read-only"));
            }
            if h.payload > cx.max_request {
                return Err(reject(EINVAL, "write larger than the server's limit"));
            }
            if !in_range(offset, len, cx.size) {
                return Err(reject(ENOSPC, "write beyond the end of the export"));
            }
            Ok(Command::Write {
                offset,
                len: h.payload,
                fua,
            })
        }
        CMD_FLUSH => {
            if offset != 0 || len != 0 {
                return Err(reject(EINVAL, "flush with nonzero offset or length"));
            }
            Ok(Command::Flush)
        }
        _ => check_effect(h, cx, reject),
    }
}

/// TRIM, WRITE_ZEROES and BLOCK_STATUS: no payload either way, so with
/// extended headers their length may use all 64 bits.
fn check_effect(
    h: &RequestHeader,
    cx: &TransmissionContext,
    reject: impl Fn(u32, &'static str) -> Rejection,
) -> Result<Command, Rejection> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    match h.cmd {
        CMD_TRIM => {
            if cx.read_only {
                return Err(reject(EPERM, "export is read-only"));
            }
            if !in_range(offset, len, cx.size) {
                return Err(reject(EINVAL, "trim beyond the end of the export"));
            }
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_WRITE_ZEROES => {
            if cx.read_only {
                return Err(reject(EPERM, "export is read-only"));
            }
            if !in_range(offset, len, cx.size) {
                return Err(reject(ENOSPC, "write zeroes beyond the end of the export"));
            }
            if h.flags & CMD_FLAG_FAST_ZERO != 0 {
                // Zeroing costs the engine about as much as writing, so a
                // fast zero is refused at once, as the spec asks.
                return Err(reject(ENOTSUP, "fast zero is not supported"));
            }
            Ok(Command::WriteZeroes { offset, len, fua })
        }
        CMD_BLOCK_STATUS => {
            if !cx.replies.chunked() || !cx.meta_context {
                return Err(reject(EINVAL, "no metadata context was negotiated"));
            }
            if len == 0 || !in_range(offset, len, cx.size) {
                return Err(reject(EINVAL, "block status beyond the end of the export"));
            }
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => Err(reject(EINVAL, "unknown command")),
    }
}

/// Map an engine errno onto the values the protocol allows on the wire.
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

pub fn simple_reply_header(errno: u32, handle: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h
}

pub fn structured_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

/// The header of an extended reply chunk: like a structured one, plus the
/// request's offset (echoed in every extended reply) and a 64-bit length.
pub fn extended_header(flags: u16, kind: u16, handle: u64, offset: u64, len: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..32].copy_from_slice(&len.to_be_bytes());
    h
}

/// Which request a reply answers: its handle, and its offset, which
/// extended replies echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub handle: u64,
    pub offset: u64,
}

/// Append a final chunk header in the connection's style. A simple
/// connection never gets chunks (`check_request` refuses what would need
/// one), so `Simple` writes the compact header too. A compact length
/// saturates at `u32::MAX`: the longest compact payload is a READ of at
/// most `max_request` (a u32) plus 8.
fn chunk_header(out: &mut Vec<u8>, style: ReplyStyle, kind: u16, to: ReplyTo, len: u64) {
    chunk_header_flags(out, style, REPLY_FLAG_DONE, kind, to, len)
}

/// `chunk_header` with explicit flags (0 for a chunk that is not the last
/// of its reply).
fn chunk_header_flags(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    flags: u16,
    kind: u16,
    to: ReplyTo,
    len: u64,
) {
    match style {
        ReplyStyle::Extended => {
            out.extend_from_slice(&extended_header(flags, kind, to.handle, to.offset, len))
        }
        ReplyStyle::Simple | ReplyStyle::Structured => {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            out.extend_from_slice(&structured_header(flags, kind, to.handle, len))
        }
    }
}

/// Append the reply to a request that succeeded without returning data.
pub fn encode_done(out: &mut Vec<u8>, style: ReplyStyle, to: ReplyTo) {
    match style {
        // Allowed even with structured replies: the reply has no payload.
        ReplyStyle::Simple | ReplyStyle::Structured => {
            out.extend_from_slice(&simple_reply_header(0, to.handle))
        }
        // Extended headers allow no simple reply: an empty final chunk.
        ReplyStyle::Extended => chunk_header(out, style, REPLY_TYPE_NONE, to, 0),
    }
}

/// Append an error reply; chunked styles carry `message` (cut to the
/// spec's 4096 bytes), which clients show to the user.
pub fn encode_error(out: &mut Vec<u8>, style: ReplyStyle, to: ReplyTo, errno: u32, message: &str) {
    if style == ReplyStyle::Simple {
        return out.extend_from_slice(&simple_reply_header(errno, to.handle));
    }
    let message = truncate_str(message, MAX_STRING);
    // At most 4096 bytes, so both lengths fit.
    let message_len = message.len() as u16;
    chunk_header(out, style, REPLY_TYPE_ERROR, to, 6 + u64::from(message_len));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Append the head of a successful READ's reply (one final chunk); the
/// `len` bytes of data follow it.
pub fn encode_read_head(out: &mut Vec<u8>, style: ReplyStyle, to: ReplyTo, len: u32) {
    match style {
        ReplyStyle::Simple => out.extend_from_slice(&simple_reply_header(0, to.handle)),
        // A data chunk must describe at least one byte.
        _ if len == 0 => chunk_header(out, style, REPLY_TYPE_NONE, to, 0),
        _ => {
            chunk_header(out, style, REPLY_TYPE_OFFSET_DATA, to, u64::from(len) + 8);
            out.extend_from_slice(&to.offset.to_be_bytes());
        }
    }
}

/// Append a final status chunk for one metadata context with `(length,
/// flags)` descriptors. Extended connections get BLOCK_STATUS_EXT (64-bit
/// lengths, with the descriptor count). Compact ones get BLOCK_STATUS: a
/// descriptor over 32 bits is cut to `u32::MAX` and ends the list, which
/// still describes a prefix of the range, as any reply may.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    to: ReplyTo,
    context: u32,
    descriptors: &[(u64, u32)],
) {
    encode_block_status_chunk(out, style, to, context, descriptors, true)
}

/// One metadata context's status chunk; `done` marks the last chunk of the
/// reply (a BLOCK_STATUS with several contexts selected sends one chunk
/// per context, each with its own id).
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    to: ReplyTo,
    context: u32,
    descriptors: &[(u64, u32)],
    done: bool,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    if style == ReplyStyle::Extended {
        let count = descriptors.len() as u64;
        let len = 8 + 16 * count;
        chunk_header_flags(out, style, flags, REPLY_TYPE_BLOCK_STATUS_EXT, to, len);
        out.extend_from_slice(&context.to_be_bytes());
        // A count of 0 means "see the length", which is never wrong.
        let count = u32::try_from(count).unwrap_or(0);
        out.extend_from_slice(&count.to_be_bytes());
        for &(len, flags) in descriptors {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        return;
    }
    let kept = descriptors
        .iter()
        .position(|&(len, _)| len > u64::from(u32::MAX))
        .map_or(descriptors.len(), |i| i + 1);
    chunk_header_flags(
        out,
        style,
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        to,
        4 + 8 * kept as u64,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for &(len, flags) in &descriptors[..kept] {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// `snapmv:changed-since` extents covering `[offset, end)` exactly:
/// `changed` (ascending byte ranges where the versions may differ, as
/// `Volume::diff_from` returns them) get `STATE_CHANGED`, the gaps between
/// them 0. Ranges are clipped to `[offset, end)`; out-of-order or
/// overlapping input is tolerated (never panics).
pub fn changed_triples(offset: u64, end: u64, changed: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::with_capacity(2 * changed.len() + 1);
    let mut pos = offset;
    for &(o, l) in changed {
        let (o, e) = (o.max(pos), o.saturating_add(l).min(end));
        if e <= o {
            continue;
        }
        if o > pos {
            out.push((pos, o - pos, 0));
        }
        out.push((o, e - o, STATE_CHANGED));
        pos = e;
    }
    if pos < end {
        out.push((pos, end - pos, 0));
    }
    out
}

/// At most this many descriptors go in one BLOCK_STATUS reply; the client
/// asks again from where the reply ended.
pub const MAX_DESCRIPTORS: usize = 1024;

/// Turn engine extents into `base:allocation` descriptors covering
/// `[offset, offset+len)`: clipped to the request, merged when adjacent
/// extents have the same flags, never zero-length, at most
/// [`MAX_DESCRIPTORS`] (one with `req_one`). Gaps or an empty answer are
/// reported as allocated (status 0), which the spec says is always safe.
pub fn extents_to_descriptors(
    offset: u64,
    len: u64,
    extents: &[(u64, u64, u32)],
    req_one: bool,
) -> Vec<(u64, u32)> {
    let end = offset.saturating_add(len);
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    // Every length is clipped to the request, so sums stay within `len`.
    let push = |out: &mut Vec<(u64, u32)>, l: u64, f: u32| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == f => last.0 += l,
            _ => out.push((l, f)),
        }
    };
    for &(e_off, e_len, flags) in extents {
        if pos >= end || out.len() > limit {
            break;
        }
        let e_end = e_off.saturating_add(e_len).min(end);
        if e_end <= pos {
            continue;
        }
        if e_off > pos {
            // A gap the engine did not describe.
            push(&mut out, e_off.min(end) - pos, 0);
            pos = e_off.min(end);
            if pos >= end {
                break;
            }
        }
        push(&mut out, e_end - pos, flags);
        pos = e_end;
    }
    if out.is_empty() {
        out.push((end - offset, 0));
    }
    out.truncate(limit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u16, cmd: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn cx() -> TransmissionContext {
        TransmissionContext {
            size: 1 << 20,
            read_only: false,
            replies: ReplyStyle::Structured,
            meta_context: true,
            max_request: 64 << 20,
        }
    }

    #[test]
    fn request_header_roundtrip_and_errors() {
        let b = hdr(1, CMD_WRITE, 4096, 512);
        let h = parse_request_header(&b).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: 1,
                cmd: CMD_WRITE,
                handle: 0x1122_3344_5566_7788,
                offset: 4096,
                len: 512,
                payload: 512,
            }
        );
        // Only a compact WRITE carries a payload.
        let read = parse_request_header(&hdr(0, CMD_READ, 0, 512)).unwrap();
        assert_eq!((read.len, read.payload), (512, 0));
        assert_eq!(
            parse_request_header(&b[..27]),
            Err(ProtoError::Truncated { need: 28, have: 27 })
        );
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(
            parse_request_header(&bad),
            Err(ProtoError::BadMagic(_))
        ));
        assert!(parse_request_header(&[]).is_err());
    }

    #[test]
    fn request_checks_give_spec_errnos() {
        let c = cx();
        let chk = |flags, cmd, off, len, c: &TransmissionContext| {
            check_request(
                &parse_request_header(&hdr(flags, cmd, off, len)).unwrap(),
                c,
            )
        };
        assert_eq!(
            chk(0, CMD_READ, 0, 4096, &c),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(chk(0, CMD_READ, 1 << 20, 1, &c).unwrap_err().errno, EINVAL);
        assert_eq!(chk(0, CMD_READ, u64::MAX, 2, &c).unwrap_err().errno, EINVAL);
        assert_eq!(chk(0, CMD_READ, 0, u32::MAX, &c).unwrap_err().errno, EINVAL);
        assert_eq!(
            chk(CMD_FLAG_DF, CMD_READ, 0, u32::MAX, &c)
                .unwrap_err()
                .errno,
            EOVERFLOW
        );
        let w = chk(0, CMD_WRITE, (1 << 20) - 1, 2, &c).unwrap_err();
        assert_eq!((w.errno, w.drain), (ENOSPC, 2));
        let big = chk(0, CMD_WRITE, 0, (64 << 20) + 1, &c).unwrap_err();
        assert_eq!((big.errno, big.drain), (EINVAL, (64 << 20) + 1));
        assert_eq!(chk(0, 99, 0, 0, &c).unwrap_err().errno, EINVAL);
        assert_eq!(chk(0x8000, CMD_READ, 0, 1, &c).unwrap_err().errno, EINVAL);
        assert_eq!(
            chk(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1, &c)
                .unwrap_err()
                .drain,
            1
        );
        assert_eq!(chk(0, CMD_FLUSH, 1, 0, &c).unwrap_err().errno, EINVAL);
        assert_eq!(chk(0, CMD_FLUSH, 0, 0, &c), Ok(Command::Flush));
        assert_eq!(
            chk(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 1, &c)
                .unwrap_err()
                .errno,
            ENOTSUP
        );
        assert_eq!(chk(0xffff, CMD_DISC, 5, 5, &c), Ok(Command::Disconnect));
        let ro = TransmissionContext {
            read_only: true,
            ..c
        };
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(chk(0, cmd, 0, 1, &ro).unwrap_err().errno, EPERM);
        }
        let simple = TransmissionContext {
            replies: ReplyStyle::Simple,
            meta_context: false,
            ..c
        };
        assert_eq!(
            chk(CMD_FLAG_DF, CMD_READ, 0, 1, &simple).unwrap_err().errno,
            EINVAL
        );
        assert_eq!(
            chk(0, CMD_BLOCK_STATUS, 0, 1, &simple).unwrap_err().errno,
            EINVAL
        );
        assert_eq!(
            chk(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1, &c),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 1,
                req_one: true
            })
        );
    }

    fn opt_go(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    #[test]
    fn option_parsing() {
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&7u32.to_be_bytes());
        h.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Ok(OptionHeader { option: 7, len: 9 })
        );
        assert!(parse_option_header(&h[..15]).is_err());
        assert_eq!(
            parse_option(OPT_GO, &opt_go(b"o@3", &[INFO_NAME, INFO_BLOCK_SIZE])),
            Ok(ClientOption::Info {
                go: true,
                name: "o@3".into(),
                requests: vec![INFO_NAME, INFO_BLOCK_SIZE]
            })
        );
        let mut bad = opt_go(b"o", &[1]);
        bad.push(0);
        assert!(parse_option(OPT_INFO, &bad).is_err());
        assert!(parse_option(OPT_INFO, &[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_option(OPT_INFO, &[]).is_err());
        assert!(parse_option(OPT_LIST, &[1]).is_err());
        assert!(parse_option(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert!(parse_option(OPT_EXPORT_NAME, &[0xff]).is_err());
        assert_eq!(
            parse_option(OPT_EXTENDED_HEADERS, &[]),
            Ok(ClientOption::ExtendedHeaders)
        );
        assert!(parse_option(OPT_EXTENDED_HEADERS, &[0]).is_err());
        assert_eq!(parse_option(12, &[]), Ok(ClientOption::Unsupported(12)));
        // name "x", two queries.
        let mut m = opt_go(b"x", &[]);
        m.truncate(5);
        m.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:a"] {
            m.extend_from_slice(&(q.len() as u32).to_be_bytes());
            m.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &m),
            Ok(ClientOption::MetaContext {
                set: true,
                name: "x".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:a".into()]
            })
        );
        // A huge query count is refused before allocating.
        let mut huge = vec![0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_LIST_META_CONTEXT, &huge).is_err());
        assert_eq!(query_matches_base_allocation("base:", true), Ok(true));
        assert_eq!(query_matches_base_allocation("base:", false), Ok(false));
        assert_eq!(query_matches_base_allocation("qemu:x", true), Ok(false));
        assert!(query_matches_base_allocation("nocolon", true).is_err());
    }

    #[test]
    fn meta_queries_and_changed_triples() {
        use MetaContext::*;
        let q = |s| parse_meta_query(s);
        assert_eq!(q("base:allocation"), Ok(MetaQuery::Exact(BaseAllocation)));
        assert_eq!(
            q("qemu:allocation-depth"),
            Ok(MetaQuery::Exact(AllocationDepth))
        );
        assert_eq!(
            q("snapmv:changed-since:0"),
            Ok(MetaQuery::Exact(ChangedSince(Some(0))))
        );
        assert_eq!(
            q("snapmv:changed-since:18446744073709551615"),
            Ok(MetaQuery::Exact(ChangedSince(Some(u64::MAX))))
        );
        assert_eq!(
            q("snapmv:changed-since:origin"),
            Ok(MetaQuery::Exact(ChangedSince(None)))
        );
        assert_eq!(q("snapmv:changed-since:"), Ok(MetaQuery::AnyChangedSince));
        assert_eq!(q("snapmv:"), Ok(MetaQuery::Namespace(Namespace::Snapmv)));
        assert_eq!(q("qemu:"), Ok(MetaQuery::Namespace(Namespace::Qemu)));
        assert_eq!(q("base:"), Ok(MetaQuery::Namespace(Namespace::Base)));
        for unknown in [
            "snapmv:changed-since:01",
            "snapmv:changed-since:+1",
            "snapmv:changed-since:18446744073709551616",
            "snapmv:changed-since:1:2",
            "snapmv:changed",
            "qemu:dirty-bitmap:a",
            "base:allocation:",
            "x-a:b",
            ":",
        ] {
            assert_eq!(q(unknown), Ok(MetaQuery::Unknown), "{unknown}");
        }
        assert!(q("nocolon").is_err());
        for c in [
            BaseAllocation,
            AllocationDepth,
            ChangedSince(None),
            ChangedSince(Some(7)),
        ] {
            assert_eq!(parse_meta_query(&c.name()), Ok(MetaQuery::Exact(c)));
        }
        // Gaps are 0, changes 1, clipped to [offset, end).
        assert_eq!(
            changed_triples(100, 1000, &[(0, 200), (500, 100), (900, 500)]),
            vec![
                (100, 100, 1),
                (200, 300, 0),
                (500, 100, 1),
                (600, 300, 0),
                (900, 100, 1)
            ]
        );
        assert_eq!(changed_triples(0, 10, &[]), vec![(0, 10, 0)]);
        assert_eq!(
            changed_triples(0, 10, &[(5, 2), (3, 4), (u64::MAX, 9)]),
            vec![(0, 5, 0), (5, 2, 1), (7, 3, 0)]
        );
    }

    fn ext_hdr(flags: u16, cmd: u16, offset: u64, len: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn extended_request_header_parsing() {
        let b = ext_hdr(CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, CMD_WRITE, 4096, 512);
        assert_eq!(b.len(), EXTENDED_REQUEST_HEADER_LEN);
        assert_eq!(
            parse_extended_request_header(&b),
            Ok(RequestHeader {
                flags: CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA,
                cmd: CMD_WRITE,
                handle: 0x1122_3344_5566_7788,
                offset: 4096,
                len: 512,
                payload: 512,
            })
        );
        // Without the flag the length is an effect length, whatever the
        // command: nothing follows the header.
        let trim = parse_extended_request_header(&ext_hdr(0, CMD_TRIM, 0, 1 << 40)).unwrap();
        assert_eq!((trim.len, trim.payload), (1 << 40, 0));
        // Except a WRITE, which carries its data even without the flag
        // (as qemu's client sends it).
        let write = parse_extended_request_header(&ext_hdr(0, CMD_WRITE, 0, 512)).unwrap();
        assert_eq!(write.payload, 512);
        assert_eq!(
            parse_extended_request_header(&ext_hdr(0, CMD_WRITE, 0, 1 << 32)),
            Err(ProtoError::PayloadTooLong(1 << 32))
        );
        // A payload on another command is still framed by the flag.
        let odd = ext_hdr(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, 24);
        assert_eq!(parse_extended_request_header(&odd).unwrap().payload, 24);
        // Payloads over 32 bits are refused outright.
        let huge = ext_hdr(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 1 << 32);
        assert_eq!(
            parse_extended_request_header(&huge),
            Err(ProtoError::PayloadTooLong(1 << 32))
        );
        let max = ext_hdr(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, u32::MAX.into());
        assert_eq!(
            parse_extended_request_header(&max).unwrap().payload,
            u32::MAX
        );
        assert_eq!(
            parse_extended_request_header(&b[..31]),
            Err(ProtoError::Truncated { need: 32, have: 31 })
        );
        assert!(parse_extended_request_header(&[]).is_err());
        // Each parser wants its own magic.
        let compact = hdr(0, CMD_READ, 0, 512);
        let mut padded = compact.clone();
        padded.extend_from_slice(&[0; 4]);
        assert_eq!(
            parse_extended_request_header(&padded),
            Err(ProtoError::BadMagic(REQUEST_MAGIC.into()))
        );
        assert_eq!(
            parse_request_header(&b),
            Err(ProtoError::BadMagic(EXTENDED_REQUEST_MAGIC.into()))
        );
    }

    #[test]
    fn extended_request_checks() {
        let c = TransmissionContext {
            size: 1 << 44,
            replies: ReplyStyle::Extended,
            ..cx()
        };
        let chk = |flags, cmd, off, len, c: &TransmissionContext| {
            check_request(
                &parse_extended_request_header(&ext_hdr(flags, cmd, off, len)).unwrap(),
                c,
            )
        };
        let pl = CMD_FLAG_PAYLOAD_LEN;
        // 64-bit effect lengths for the commands without payload.
        assert_eq!(
            chk(0, CMD_TRIM, 0, 1 << 40, &c),
            Ok(Command::Trim {
                offset: 0,
                len: 1 << 40,
                fua: false
            })
        );
        assert_eq!(
            chk(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4096, 1 << 36, &c),
            Ok(Command::WriteZeroes {
                offset: 4096,
                len: 1 << 36,
                fua: false
            })
        );
        assert_eq!(
            chk(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1 << 44, &c),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 1 << 44,
                req_one: true
            })
        );
        let past = chk(0, CMD_BLOCK_STATUS, 1, 1 << 44, &c).unwrap_err();
        assert_eq!((past.errno, past.drain), (EINVAL, 0));
        assert_eq!(chk(0, CMD_TRIM, 1, u64::MAX, &c).unwrap_err().errno, EINVAL);
        // READ and WRITE stay within max_request, however wide the field.
        assert_eq!(
            chk(0, CMD_READ, 0, (1 << 32) + 512, &c).unwrap_err().errno,
            EINVAL
        );
        assert_eq!(
            chk(CMD_FLAG_DF, CMD_READ, 0, 1 << 40, &c)
                .unwrap_err()
                .errno,
            EOVERFLOW
        );
        assert_eq!(
            chk(pl | CMD_FLAG_FUA, CMD_WRITE, 8, 512, &c),
            Ok(Command::Write {
                offset: 8,
                len: 512,
                fua: true
            })
        );
        // Over the limit: refused, and its payload drained.
        let big = chk(pl, CMD_WRITE, 0, (64 << 20) + 1, &c).unwrap_err();
        assert_eq!((big.errno, big.drain), (EINVAL, (64 << 20) + 1));
        // A WRITE without the flag is served the same (qemu sends those).
        assert_eq!(
            chk(0, CMD_WRITE, 0, 512, &c),
            Ok(Command::Write {
                offset: 0,
                len: 512,
                fua: false
            })
        );
        // A hand-made header whose payload disagrees is refused, drained.
        let odd = RequestHeader {
            flags: 0,
            cmd: CMD_WRITE,
            handle: 1,
            offset: 0,
            len: 512,
            payload: 12,
        };
        let r = check_request(&odd, &c).unwrap_err();
        assert_eq!((r.errno, r.drain), (EINVAL, 12));
        // A payload on any other command: EINVAL, and drained.
        for cmd in [CMD_READ, CMD_TRIM, CMD_BLOCK_STATUS, CMD_FLUSH, 42] {
            let r = chk(pl, cmd, 0, 24, &c).unwrap_err();
            assert_eq!((r.errno, r.drain), (EINVAL, 24), "cmd {cmd}");
        }
        assert_eq!(chk(pl, CMD_DISC, 0, 24, &c), Ok(Command::Disconnect));
        // The flag means nothing in compact mode: refused like any other.
        let compact = TransmissionContext {
            replies: ReplyStyle::Structured,
            ..c
        };
        let h = parse_request_header(&hdr(pl, CMD_WRITE, 0, 16)).unwrap();
        let r = check_request(&h, &compact).unwrap_err();
        assert_eq!((r.errno, r.drain), (EINVAL, 16));
    }

    fn to() -> ReplyTo {
        ReplyTo {
            handle: 0x0102_0304_0506_0708,
            offset: 0x1000,
        }
    }

    /// Split an extended reply header: (flags, type, handle, offset, len).
    fn ext_reply(b: &[u8]) -> (u16, u16, u64, u64, u64) {
        assert_eq!(b[..4], EXTENDED_REPLY_MAGIC.to_be_bytes());
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        (u16_at(4), u16_at(6), u64_at(8), u64_at(16), u64_at(24))
    }

    #[test]
    fn reply_encodings_per_style() {
        let (h, o) = (to().handle, to().offset);
        let mut v = Vec::new();
        encode_done(&mut v, ReplyStyle::Structured, to());
        assert_eq!(v, simple_reply_header(0, h));
        v.clear();
        encode_done(&mut v, ReplyStyle::Extended, to());
        assert_eq!(v.len(), EXTENDED_REPLY_HEADER_LEN);
        assert_eq!(ext_reply(&v), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, h, o, 0));

        v.clear();
        encode_error(&mut v, ReplyStyle::Simple, to(), EIO, "lost");
        assert_eq!(v, simple_reply_header(EIO, h));
        v.clear();
        encode_error(&mut v, ReplyStyle::Structured, to(), EIO, "lost");
        assert_eq!(
            v[..20],
            structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h, 10)
        );
        assert_eq!(v[20..], [0, 0, 0, 5, 0, 4, b'l', b'o', b's', b't']);
        v.clear();
        encode_error(&mut v, ReplyStyle::Extended, to(), EIO, "lost");
        assert_eq!(ext_reply(&v), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h, o, 10));
        assert_eq!(v[32..], [0, 0, 0, 5, 0, 4, b'l', b'o', b's', b't']);
        // Messages are cut at 4096 bytes (on a character boundary).
        v.clear();
        encode_error(&mut v, ReplyStyle::Extended, to(), EIO, &"é".repeat(3000));
        assert_eq!(ext_reply(&v).4, 6 + 4096);
        assert_eq!(v.len(), 32 + 6 + 4096);

        v.clear();
        encode_read_head(&mut v, ReplyStyle::Extended, to(), 512);
        assert_eq!(
            ext_reply(&v),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, o, 520)
        );
        assert_eq!(v[32..], o.to_be_bytes());
        v.clear();
        encode_read_head(&mut v, ReplyStyle::Extended, to(), 0);
        assert_eq!(ext_reply(&v), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, h, o, 0));
        v.clear();
        encode_read_head(&mut v, ReplyStyle::Structured, to(), 512);
        assert_eq!(
            v[..20],
            structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, 520)
        );
        assert_eq!(v[20..], o.to_be_bytes());
        v.clear();
        encode_read_head(&mut v, ReplyStyle::Structured, to(), u32::MAX);
        assert_eq!(v[16..20], u32::MAX.to_be_bytes(), "saturates");
        v.clear();
        encode_read_head(&mut v, ReplyStyle::Simple, to(), 512);
        assert_eq!(v, simple_reply_header(0, h));
    }

    #[test]
    fn block_status_encodings() {
        let (h, o) = (to().handle, to().offset);
        let descs = [(1u64 << 33, STATE_HOLE), (4096, 0)];
        let mut v = Vec::new();
        encode_block_status(&mut v, ReplyStyle::Extended, to(), 1, &descs);
        assert_eq!(
            ext_reply(&v),
            (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, h, o, 8 + 32)
        );
        let body = &v[32..];
        assert_eq!(body[..8], [0, 0, 0, 1, 0, 0, 0, 2], "context id, count");
        assert_eq!(body[8..16], (1u64 << 33).to_be_bytes());
        assert_eq!(body[16..24], [0, 0, 0, 0, 0, 0, 0, 1], "padding, flags");
        assert_eq!(body[24..32], 4096u64.to_be_bytes());
        assert_eq!(body[32..40], [0; 8]);
        // Compact: a descriptor over 32 bits is cut and ends the list.
        v.clear();
        encode_block_status(&mut v, ReplyStyle::Structured, to(), 1, &descs);
        assert_eq!(
            v[..20],
            structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, 12)
        );
        assert_eq!(v[20..], [0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
        v.clear();
        encode_block_status(&mut v, ReplyStyle::Structured, to(), 1, &[(10, 3), (20, 0)]);
        assert_eq!(v[16..20], 20u32.to_be_bytes());
        assert_eq!(v[24..], [0, 0, 0, 10, 0, 0, 0, 3, 0, 0, 0, 20, 0, 0, 0, 0]);
    }

    #[test]
    fn parsers_never_panic_on_random_bytes() {
        use rand::{Rng, SeedableRng};
        let seed = 0x5eed_u64;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let c = cx();
        let ext = TransmissionContext {
            replies: ReplyStyle::Extended,
            ..c
        };
        for _ in 0..50_000 {
            let n = rng.gen_range(0..64);
            let mut b = vec![0u8; n];
            rng.fill(&mut b[..]);
            if rng.gen_bool(0.5) && n >= 4 {
                b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            if let Ok(h) = parse_request_header(&b) {
                let _ = check_request(&h, &c);
            }
            if rng.gen_bool(0.5) && n >= 4 {
                b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            }
            if let Ok(h) = parse_extended_request_header(&b) {
                let _ = check_request(&h, &ext);
            }
            let _ = parse_option_header(&b);
            let opt = rng.gen_range(0..13);
            let _ = parse_option(opt, &b);
        }
    }

    #[test]
    fn descriptors_clip_merge_and_fill() {
        // Request [100, 1100).
        let ex = [
            (0, 600, STATE_HOLE),
            (600, 100, STATE_HOLE),
            (800, 10_000, 0),
        ];
        assert_eq!(
            extents_to_descriptors(100, 1000, &ex, false),
            vec![(600, STATE_HOLE), (400, 0)]
        );
        assert_eq!(
            extents_to_descriptors(100, 1000, &ex, true),
            vec![(600, STATE_HOLE)]
        );
        assert_eq!(extents_to_descriptors(0, 10, &[], false), vec![(10, 0)]);
        assert_eq!(
            extents_to_descriptors(0, 10, &[(5, 0, 3), (20, 5, 3)], false),
            vec![(10, 0)]
        );
        let sum: u64 = extents_to_descriptors(0, u32::MAX.into(), &[(0, u64::MAX, 3)], false)
            .iter()
            .map(|d| d.0)
            .sum();
        assert_eq!(sum, u64::from(u32::MAX));
        // 64-bit lengths (extended headers): one descriptor past 4 GiB.
        assert_eq!(
            extents_to_descriptors(1, 1 << 40, &[(0, u64::MAX, 0)], true),
            vec![(1 << 40, 0)]
        );
        // A request ending at u64::MAX saturates instead of wrapping.
        assert_eq!(
            extents_to_descriptors(u64::MAX - 1, 5, &[], false),
            vec![(1, 0)]
        );
    }
}
