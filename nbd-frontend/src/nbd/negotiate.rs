//! Fixed newstyle negotiation: the server's greeting, then option haggling
//! until the client picks an export (OPT_GO / OPT_EXPORT_NAME) or leaves.
//!
//! Reply framing is chosen here. OPT_STRUCTURED_REPLY gives structured
//! replies; OPT_EXTENDED_HEADERS gives extended headers, which imply
//! everything structured replies allow and take precedence over them: it
//! is acknowledged with or without structured replies first, but a later
//! OPT_STRUCTURED_REPLY cannot downgrade it (ERR_EXT_HEADER_REQD), a second
//! one is ERR_INVALID, and OPT_EXPORT_NAME, which the spec forbids after
//! it and which cannot carry an error, ends the connection.
//!
//! TLS (`NBD_OPT_STARTTLS`, the spec's "TLS support" section): with TLS
//! off, STARTTLS gets ERR_POLICY. With TLS on or required, the first
//! STARTTLS is acknowledged in plain text and the connection upgraded (a
//! [`Starttls`] hook runs the handshake and swaps the reader and writer
//! onto the plain side of the TLS pump); a second is ERR_INVALID, as is
//! one with data. After the upgrade, everything negotiated before it is
//! forgotten (reply style, selected meta contexts), as the spec asks
//! (nbdkit's CVE-2021-3716 was keeping structured replies across it).
//! With TLS required, every option before the upgrade but ABORT and
//! STARTTLS gets ERR_TLS_REQD, so no export name, size or description is
//! sent in plain text, and OPT_EXPORT_NAME (which cannot carry an error)
//! ends the connection.

use std::io::{self, Write};

use tracing::{debug, info};

use super::access::AccessPolicy;
use super::backend::{Backend, Catalog, ExportOf};
use super::io::{MsgReader, ReadError};
use super::proto::*;
use super::tls::{HandshakeError, TlsMode};

/// What transmission needs from negotiation.
pub struct Negotiated<B> {
    pub name: String,
    pub export: ExportOf<B>,
    pub size: u64,
    pub flags: u16,
    /// Request and reply framing (extended headers, structured, simple).
    pub replies: ReplyStyle,
    /// The metadata contexts selected for this export, with their ids (in
    /// the order BLOCK_STATUS replies send their chunks); empty: none.
    pub contexts: Vec<(u32, MetaContext)>,
    /// The client TLS authenticated (certificate CN or PSK username).
    pub client: Option<String>,
}

/// The TLS side of negotiation: the server's mode, and how to upgrade.
pub trait Starttls<W> {
    fn mode(&self) -> TlsMode;
    /// Called once STARTTLS is acknowledged (the ACK flushed): run the TLS
    /// handshake on the socket under `rd`, then make `rd` and `w` read and
    /// write plain text through TLS. Returns the authenticated client
    /// identity, if any. An error ends the connection.
    fn start(&mut self, rd: &mut MsgReader, w: &mut W) -> Result<Option<String>, HandshakeError>;
}

pub enum Outcome<B> {
    Transmission(Box<Negotiated<B>>),
    /// The client aborted or hung up.
    Ended,
}

#[derive(Debug, thiserror::Error)]
pub enum NegError {
    #[error("reading from client: {0}")]
    Read(#[from] ReadError),
    #[error("writing to client: {0}")]
    Write(#[from] io::Error),
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("bad option header: {0}")]
    Proto(#[from] ProtoError),
    #[error("option {option} is {len} bytes, over the {MAX_OPTION_LEN}-byte limit")]
    OptionTooBig { option: u32, len: u32 },
    #[error("OPT_EXPORT_NAME for an unknown or invalid export {0:?}")]
    UnknownExport(String),
    #[error("OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameAfterExtendedHeaders,
    #[error("OPT_EXPORT_NAME before TLS, which this server requires")]
    ExportNameBeforeTls,
    #[error("{0}")]
    Tls(#[from] HandshakeError),
}

pub fn transmission_flags(read_only: bool, chunked: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if chunked {
        // Every read is answered with one data chunk, so "don't fragment"
        // costs nothing to honour.
        f |= TFLAG_SEND_DF;
    }
    f
}

struct State<'a, B> {
    catalog: &'a dyn Catalog<B>,
    server_read_only: bool,
    access: &'a AccessPolicy,
    no_zeroes: bool,
    replies: ReplyStyle,
    /// The export the last OPT_SET_META_CONTEXT named, and what it
    /// selected there (maybe nothing).
    meta_for: Option<(String, Vec<(u32, MetaContext)>)>,
    tls_mode: TlsMode,
    /// STARTTLS succeeded: this connection is encrypted from here on.
    tls_active: bool,
    /// Who the client is, as TLS authenticated it (certificate subject
    /// CN, or PSK username); `None` before TLS or without client
    /// authentication. Every export name the client sees passes `access`
    /// with it.
    client_identity: Option<String>,
}

fn send<W: Write>(w: &mut W, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&option_reply(option, reply, data))
}

fn send_err<W: Write>(w: &mut W, option: u32, reply: u32, msg: &str) -> io::Result<()> {
    send(w, option, reply, truncate_str(msg, MAX_STRING).as_bytes())?;
    w.flush()
}

fn send_ack<W: Write>(w: &mut W, option: u32) -> io::Result<()> {
    send(w, option, REP_ACK, &[])?;
    w.flush()
}

/// What one option did to the negotiation.
type Step<B> = Result<Option<Outcome<B>>, NegError>;

impl<B: Backend> State<'_, B> {
    /// Resolve a client-given name ("" = the default export) to the
    /// canonical name and a live export that this client may open, made
    /// read-only if `--read-only-export` says so.
    ///
    /// An export the client may not open is unknown to it: INFO, GO and
    /// the meta-context options answer ERR_UNKNOWN and EXPORT_NAME closes
    /// the connection, exactly as for a name that exists nowhere. The
    /// spec's ERR_POLICY ("known and valid, but policy forbids") would
    /// fit too, but it tells the client that the name exists, so a
    /// client could probe for snapshot names; ERR_UNKNOWN ("the requested
    /// export is not available") is true for this client and leaks nothing.
    fn resolve(&self, name: &str) -> Option<(String, ExportOf<B>)> {
        let canonical = if name.is_empty() {
            self.catalog.default_name()?
        } else {
            name.to_string()
        };
        if !self.may_open(&canonical) {
            info!(export = %canonical, client = ?self.client_identity, "refused by --allow");
            return None;
        }
        let mut export = self.catalog.open(&canonical)?;
        export.read_only |= self.access.read_only(&canonical);
        export.backend.is_live().then_some((canonical, export))
    }

    fn may_open(&self, export: &str) -> bool {
        self.access
            .may_open(export, self.client_identity.as_deref())
    }

    fn negotiated(&self, name: String, export: ExportOf<B>, client_name: &str) -> Negotiated<B> {
        let read_only = export.read_only || self.server_read_only;
        let chunked = self.replies.chunked();
        Negotiated {
            size: export.backend.size(),
            flags: transmission_flags(read_only, chunked),
            replies: self.replies,
            contexts: match &self.meta_for {
                Some((n, c)) if chunked && n == client_name => c.clone(),
                _ => Vec::new(),
            },
            client: self.client_identity.clone(),
            name,
            export,
        }
    }

    /// Before TLS, with TLS required, options other than ABORT and
    /// STARTTLS are refused.
    fn tls_required(&self) -> bool {
        self.tls_mode == TlsMode::Require && !self.tls_active
    }

    fn starttls<W: Write>(
        &mut self,
        rd: &mut MsgReader,
        w: &mut W,
        option: u32,
        tls: &mut dyn Starttls<W>,
    ) -> Result<(), NegError> {
        if self.tls_mode == TlsMode::Off {
            send_err(
                w,
                option,
                REP_ERR_POLICY,
                "TLS is not enabled on this server",
            )?;
            return Ok(());
        }
        if self.tls_active {
            send_err(w, option, REP_ERR_INVALID, "TLS is already active")?;
            return Ok(());
        }
        send_ack(w, option)?;
        let identity = tls.start(rd, w)?;
        // The spec: state negotiated before TLS does not carry over.
        self.replies = ReplyStyle::Simple;
        self.meta_for = None;
        self.tls_active = true;
        info!(client = ?identity, "TLS established");
        self.client_identity = identity;
        Ok(())
    }

    /// Answer one parsed option; `Some` ends negotiation.
    fn answer<W: Write>(&mut self, w: &mut W, option: u32, parsed: ClientOption) -> Step<B> {
        match parsed {
            ClientOption::Abort => {
                // The client may already be gone; a failed ACK is fine.
                let _ = send_ack(w, option);
                return Ok(Some(Outcome::Ended));
            }
            ClientOption::List => self.list(w, option)?,
            // Handled by `negotiate`, which holds the reader.
            ClientOption::StartTls => {}
            ClientOption::StructuredReply => self.structured_reply(w, option)?,
            ClientOption::ExtendedHeaders => self.extended_headers(w, option)?,
            ClientOption::ExportName(name) => return self.export_name(w, &name).map(Some),
            ClientOption::Info { go, name, requests } => {
                return self.info(w, option, go, &name, &requests);
            }
            ClientOption::MetaContext { set, name, queries } => {
                self.meta_context(w, option, set, name, &queries)?;
            }
            ClientOption::Unsupported(o) => {
                send_err(w, o, REP_ERR_UNSUP, "option not supported")?;
            }
        }
        Ok(None)
    }

    fn list<W: Write>(&self, w: &mut W, option: u32) -> io::Result<()> {
        // Each client sees only what it may open (the others are unknown
        // to it; see `resolve`).
        for name in self.catalog.list().into_iter().filter(|n| self.may_open(n)) {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            // The text after the name is the export's description
            // (nbdinfo --list shows it): the snapshot memo.
            if let Some(e) = self.catalog.open(&name) {
                d.extend_from_slice(truncate_str(&e.description, MAX_STRING).as_bytes());
            }
            send(w, option, REP_SERVER, &d)?;
        }
        send_ack(w, option)
    }

    fn structured_reply<W: Write>(&mut self, w: &mut W, option: u32) -> io::Result<()> {
        if self.replies == ReplyStyle::Extended {
            let why = "extended headers were negotiated and take precedence";
            return send_err(w, option, REP_ERR_EXT_HEADER_REQD, why);
        }
        // A repeat is acknowledged again, as it always was.
        self.replies = ReplyStyle::Structured;
        send_ack(w, option)
    }

    fn extended_headers<W: Write>(&mut self, w: &mut W, option: u32) -> io::Result<()> {
        if self.replies == ReplyStyle::Extended {
            let why = "extended headers were already negotiated";
            return send_err(w, option, REP_ERR_INVALID, why);
        }
        // Structured replies before are fine (the spec lets clients try
        // them first); a selected meta context stays valid.
        self.replies = ReplyStyle::Extended;
        send_ack(w, option)
    }

    fn export_name<W: Write>(&self, w: &mut W, name: &str) -> Result<Outcome<B>, NegError> {
        if self.replies == ReplyStyle::Extended {
            return Err(NegError::ExportNameAfterExtendedHeaders);
        }
        let Some((canonical, export)) = self.resolve(name) else {
            return Err(NegError::UnknownExport(name.to_string()));
        };
        let n = self.negotiated(canonical, export, name);
        w.write_all(&n.size.to_be_bytes())?;
        w.write_all(&n.flags.to_be_bytes())?;
        if !self.no_zeroes {
            w.write_all(&[0u8; 124])?;
        }
        w.flush()?;
        info!(export = %n.name, tls = self.tls_active, client = ?n.client,
              "client attached (OPT_EXPORT_NAME)");
        Ok(Outcome::Transmission(Box::new(n)))
    }

    fn info<W: Write>(
        &self,
        w: &mut W,
        option: u32,
        go: bool,
        name: &str,
        requests: &[u16],
    ) -> Step<B> {
        let Some((canonical, export)) = self.resolve(name) else {
            let why = format!("no export named {name:?}");
            send_err(w, option, REP_ERR_UNKNOWN, &why)?;
            return Ok(None);
        };
        let description = export.description.clone();
        let n = self.negotiated(canonical, export, name);
        send(w, option, REP_INFO, &info_export(n.size, n.flags))?;
        if requests.contains(&INFO_NAME) {
            send(w, option, REP_INFO, &info_string(INFO_NAME, &n.name))?;
        }
        // A memo is sent even unasked (clients must ignore info they
        // do not understand), so e.g. `nbdinfo --list` shows it.
        if requests.contains(&INFO_DESCRIPTION) || !description.is_empty() {
            let info = info_string(INFO_DESCRIPTION, &description);
            send(w, option, REP_INFO, &info)?;
        }
        // Sent even unasked: it tells clients the preferred size. Its
        // maximum payload stays 32-bit with extended headers; only
        // payload-free requests grow to 64 bits.
        send(w, option, REP_INFO, &info_block_size())?;
        send_ack(w, option)?;
        if !go {
            return Ok(None);
        }
        info!(export = %n.name, replies = ?n.replies, contexts = n.contexts.len(),
              tls = self.tls_active, client = ?n.client, "client attached (OPT_GO)");
        Ok(Some(Outcome::Transmission(Box::new(n))))
    }

    fn meta_context<W: Write>(
        &mut self,
        w: &mut W,
        option: u32,
        set: bool,
        name: String,
        queries: &[String],
    ) -> io::Result<()> {
        if set {
            self.meta_for = None;
        }
        if !self.replies.chunked() {
            let why = "structured replies or extended headers must be negotiated first";
            return send_err(w, option, REP_ERR_INVALID, why);
        }
        let Some((canonical, _)) = self.resolve(&name) else {
            let why = format!("no export named {name:?}");
            return send_err(w, option, REP_ERR_UNKNOWN, &why);
        };
        let mut parsed = Vec::with_capacity(queries.len());
        for q in queries {
            match parse_meta_query(q) {
                Ok(m) => parsed.push(m),
                Err(OptInvalid(why)) => return send_err(w, option, REP_ERR_INVALID, why),
            }
        }
        let origin = canonical.split_once('@').map_or(&canonical[..], |(o, _)| o);
        if !set {
            // LIST: an empty query list means every context we serve.
            if parsed.is_empty() {
                parsed = vec![
                    MetaQuery::Namespace(Namespace::Base),
                    MetaQuery::Namespace(Namespace::Qemu),
                    MetaQuery::Namespace(Namespace::Snapmv),
                ];
            }
            let mut listed = Vec::new();
            for q in parsed {
                for c in self.expand(origin, q) {
                    if !listed.contains(&c) {
                        listed.push(c);
                    }
                }
            }
            for c in listed {
                // The id in a LIST reply is reserved: zero.
                send(w, option, REP_META_CONTEXT, &meta_context_reply(0, &c))?;
            }
            return send_ack(w, option);
        }
        // SET: only full names select; wildcards and unknown names are
        // ignored, as is a changed-since tag that names no live snapshot
        // of this origin.
        let mut chosen: Vec<MetaContext> = Vec::new();
        for q in parsed {
            let MetaQuery::Exact(c) = q else { continue };
            if !chosen.contains(&c) && self.servable(origin, c) {
                chosen.push(c);
            }
        }
        if chosen.len() > MAX_SELECTED_CONTEXTS {
            let why = format!("at most {MAX_SELECTED_CONTEXTS} metadata contexts at once");
            return send_err(w, option, REP_ERR_TOO_BIG, &why);
        }
        let mut next = CHANGED_SINCE_FIRST_ID;
        let mut selected = Vec::with_capacity(chosen.len());
        for c in chosen {
            let id = match c {
                MetaContext::BaseAllocation => BASE_ALLOCATION_ID,
                MetaContext::AllocationDepth => ALLOCATION_DEPTH_ID,
                MetaContext::ChangedSince(_) => {
                    next += 1;
                    next - 1
                }
            };
            send(w, option, REP_META_CONTEXT, &meta_context_reply(id, &c))?;
            selected.push((id, c));
        }
        self.meta_for = Some((name, selected));
        send_ack(w, option)
    }

    /// Whether `c` can be served on an export of `origin`: a changed-since
    /// tag must name a live snapshot of it (checked again, by the engine,
    /// at every BLOCK_STATUS) that this client may open: a diff against
    /// a snapshot hidden from it would reveal the snapshot's name and
    /// where it differs.
    fn servable(&self, origin: &str, c: MetaContext) -> bool {
        match c {
            MetaContext::ChangedSince(Some(t)) => {
                let snapshot = format!("{origin}@{t}");
                self.may_open(&snapshot)
                    && self
                        .catalog
                        .open(&snapshot)
                        .is_some_and(|e| e.backend.is_live())
            }
            _ => true,
        }
    }

    /// The contexts a LIST query names on an export of `origin`. A
    /// changed-since wildcard lists the newest `MAX_LISTED_TAGS` snapshots
    /// of the origin and `origin` itself; older tags stay selectable.
    fn expand(&self, origin: &str, q: MetaQuery) -> Vec<MetaContext> {
        let changed = || {
            let prefix = format!("{origin}@");
            let mut tags: Vec<u64> = self
                .catalog
                .list()
                .iter()
                .filter(|n| self.may_open(n))
                .filter_map(|n| n.strip_prefix(&prefix)?.parse().ok())
                .collect();
            tags.sort_unstable_by(|a, b| b.cmp(a));
            tags.truncate(MAX_LISTED_TAGS);
            let mut v = vec![MetaContext::ChangedSince(None)];
            v.extend(tags.into_iter().map(|t| MetaContext::ChangedSince(Some(t))));
            v
        };
        match q {
            MetaQuery::Exact(c) if self.servable(origin, c) => vec![c],
            MetaQuery::Exact(_) | MetaQuery::Unknown => Vec::new(),
            MetaQuery::Namespace(Namespace::Base) => vec![MetaContext::BaseAllocation],
            MetaQuery::Namespace(Namespace::Qemu) => vec![MetaContext::AllocationDepth],
            MetaQuery::Namespace(Namespace::Snapmv) | MetaQuery::AnyChangedSince => changed(),
        }
    }
}

fn meta_context_reply(id: u32, c: &MetaContext) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(c.name().as_bytes());
    d
}

/// Read one option's header and payload; `None` when the client hung up.
fn read_option<W: Write>(
    rd: &mut MsgReader,
    w: &mut W,
) -> Result<Option<(u32, Vec<u8>)>, NegError> {
    let mut hb = [0u8; 16];
    match rd.read_msg(&mut hb, true) {
        Ok(()) => {}
        Err(ReadError::Closed | ReadError::Stopped) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let OptionHeader { option, len } = parse_option_header(&hb)?;
    if len > MAX_OPTION_LEN {
        // Refuse without reading (or allocating) the payload; since
        // we cannot skip it cheaply, the connection ends here.
        if option != OPT_EXPORT_NAME {
            send_err(w, option, REP_ERR_TOO_BIG, "option payload too large")?;
        }
        return Err(NegError::OptionTooBig { option, len });
    }
    let mut data = vec![0u8; len as usize];
    rd.read_msg(&mut data, false)?;
    Ok(Some((option, data)))
}

/// Run negotiation on one connection. `tls` upgrades it on STARTTLS,
/// which gives the client's identity (`None` until then) that `access`
/// decides with.
pub fn negotiate<B: Backend, W: Write>(
    rd: &mut MsgReader,
    w: &mut W,
    catalog: &dyn Catalog<B>,
    server_read_only: bool,
    access: &AccessPolicy,
    tls: &mut dyn Starttls<W>,
) -> Result<Outcome<B>, NegError> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;

    let mut cf = [0u8; 4];
    match rd.read_msg(&mut cf, true) {
        Ok(()) => {}
        Err(ReadError::Closed | ReadError::Stopped) => return Ok(Outcome::Ended),
        Err(e) => return Err(e.into()),
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The spec: the server MUST drop the connection on unknown flags.
        return Err(NegError::BadClientFlags(client_flags));
    }
    let mut st = State {
        catalog,
        server_read_only,
        access,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        replies: ReplyStyle::Simple,
        meta_for: None,
        tls_mode: tls.mode(),
        tls_active: false,
        client_identity: None,
    };

    loop {
        let Some((option, data)) = read_option(rd, w)? else {
            return Ok(Outcome::Ended);
        };
        if rd.stopping() && option != OPT_ABORT {
            send_err(w, option, REP_ERR_SHUTDOWN, "server is shutting down")?;
            continue;
        }
        if st.tls_required() {
            match option {
                OPT_ABORT | OPT_STARTTLS => {}
                // It cannot carry an error: the spec says hang up.
                OPT_EXPORT_NAME => return Err(NegError::ExportNameBeforeTls),
                _ => {
                    let why = "TLS is required: send NBD_OPT_STARTTLS first";
                    send_err(w, option, REP_ERR_TLS_REQD, why)?;
                    continue;
                }
            }
        }
        let parsed = match parse_option(option, &data) {
            Ok(p) => p,
            Err(OptInvalid(why)) => {
                debug!(option, why, "invalid option");
                if option == OPT_EXPORT_NAME {
                    return Err(NegError::UnknownExport(
                        String::from_utf8_lossy(&data).into(),
                    ));
                }
                if option == OPT_SET_META_CONTEXT {
                    // A failed SET still replaces the previous selection.
                    st.meta_for = None;
                }
                send_err(w, option, REP_ERR_INVALID, why)?;
                continue;
            }
        };
        debug!(?parsed, "option");
        if parsed == ClientOption::StartTls {
            st.starttls(rd, w, option, tls)?;
            continue;
        }
        if let Some(outcome) = st.answer(w, option, parsed)? {
            return Ok(outcome);
        }
    }
}
