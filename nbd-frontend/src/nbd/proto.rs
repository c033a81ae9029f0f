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
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

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

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` in OPT_SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

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
    /// OPT_LIST_META_CONTEXT (`set == false`) or OPT_SET_META_CONTEXT.
    MetaContext {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
    /// Anything else, including OPT_EXTENDED_HEADERS: answered ERR_UNSUP.
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
        OPT_STARTTLS => Ok(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY if data.is_empty() => Ok(ClientOption::StructuredReply),
        OPT_STRUCTURED_REPLY => Err(OptInvalid("OPT_STRUCTURED_REPLY carries no data")),
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
    let Some((ns, leaf)) = query.split_once(':') else {
        return Err(OptInvalid("query has no namespace"));
    };
    if ns != "base" {
        // Unknown namespaces are ignored, as the spec requires.
        return Ok(false);
    }
    Ok(leaf == "allocation" || (list && leaf.is_empty()))
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

/// A request header as sent; not yet checked against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn parse_request_header(b: &[u8]) -> Result<RequestHeader, ProtoError> {
    if b.len() < REQUEST_HEADER_LEN {
        return Err(ProtoError::Truncated {
            need: REQUEST_HEADER_LEN,
            have: b.len(),
        });
    }
    let field = |v: Option<u64>| v.unwrap_or_default();
    let magic = field(be_u32(b, 0).map(u64::from));
    if magic != u64::from(REQUEST_MAGIC) {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: be_u16(b, 4).unwrap_or_default(),
        cmd: be_u16(b, 6).unwrap_or_default(),
        handle: field(be_u64(b, 8)),
        offset: field(be_u64(b, 16)),
        len: be_u32(b, 24).unwrap_or_default(),
    })
}

/// What the connection negotiated, as far as request checking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionContext {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub meta_context: bool,
    /// Largest READ/WRITE payload served.
    pub max_request: u32,
}

/// A request that passed every check and can run against the backend.
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
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
}

/// A request refused with an error reply. For a WRITE, `drain` bytes of
/// payload must still be read (and discarded) to stay in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub drain: u32,
    pub why: &'static str,
}

fn in_range(offset: u64, len: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size)
}

/// Check a request against what was negotiated, with the spec's errno for
/// each refusal. Pure; never panics.
pub fn check_request(h: &RequestHeader, cx: &TransmissionContext) -> Result<Command, Rejection> {
    let drain = if h.cmd == CMD_WRITE { h.len } else { 0 };
    let reject = |errno, why| Rejection { errno, drain, why };
    let allowed = match h.cmd {
        CMD_READ => CMD_FLAG_FUA | if cx.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        // Flags on DISC do not matter: the connection ends either way.
        CMD_DISC => return Ok(Command::Disconnect),
        _ => return Err(reject(EINVAL, "unknown command")),
    };
    if h.flags & !allowed != 0 {
        return Err(reject(EINVAL, "command flag not valid for this command"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    match h.cmd {
        CMD_READ => {
            if len > cx.max_request {
                let errno = if h.flags & CMD_FLAG_DF != 0 {
                    EOVERFLOW
                } else {
                    EINVAL
                };
                return Err(reject(errno, "read larger than the server's limit"));
            }
            if !in_range(offset, len, cx.size) {
                return Err(reject(EINVAL, "read beyond the end of the export"));
            }
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE => {
            if cx.read_only {
                return Err(reject(EPERM, "export is read-only"));
            }
            if len > cx.max_request {
                return Err(reject(EINVAL, "write larger than the server's limit"));
            }
            if !in_range(offset, len, cx.size) {
                return Err(reject(ENOSPC, "write beyond the end of the export"));
            }
            Ok(Command::Write { offset, len, fua })
        }
        CMD_FLUSH => {
            if offset != 0 || len != 0 {
                return Err(reject(EINVAL, "flush with nonzero offset or length"));
            }
            Ok(Command::Flush)
        }
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
            if !cx.structured || !cx.meta_context {
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

/// A complete NBD_REPLY_TYPE_ERROR chunk (final) with a human message.
pub fn structured_error(handle: u64, errno: u32, msg: &str) -> Vec<u8> {
    let msg = truncate_str(msg, MAX_STRING);
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// The header of a final OFFSET_DATA chunk carrying `len` bytes at
/// `offset`; the data follows it. `len + 8` fits in u32 because requests
/// are limited to `max_request` (at most 4 GiB - 8 by construction).
pub fn offset_data_header(handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut v = [0u8; 28];
    v[..20].copy_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        len.saturating_add(8),
    ));
    v[20..].copy_from_slice(&offset.to_be_bytes());
    v
}

pub fn structured_none(handle: u64) -> [u8; 20] {
    structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// A final BLOCK_STATUS chunk for one context with `(length, flags)`
/// descriptors.
pub fn block_status_chunk(handle: u64, context: u32, descs: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descs.len();
    let mut v = Vec::with_capacity(20 + len);
    v.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    ));
    v.extend_from_slice(&context.to_be_bytes());
    for &(l, f) in descs {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
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
    len: u32,
    extents: &[(u64, u64, u32)],
    req_one: bool,
) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len);
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    let push = |out: &mut Vec<(u32, u32)>, l: u64, f: u32| {
        // `l` is at most `len`, a u32, since everything is clipped to the request.
        let l = l as u32;
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
        out.push((len, 0));
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
            structured: true,
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
                len: 512
            }
        );
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
            structured: false,
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
            Ok(ClientOption::Unsupported(OPT_EXTENDED_HEADERS))
        );
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
    fn parsers_never_panic_on_random_bytes() {
        use rand::{Rng, SeedableRng};
        let seed = 0x5eed_u64;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let c = cx();
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
        let sum: u64 = extents_to_descriptors(0, u32::MAX, &[(0, u64::MAX, 3)], false)
            .iter()
            .map(|d| u64::from(d.0))
            .sum();
        assert_eq!(sum, u64::from(u32::MAX));
    }
}
