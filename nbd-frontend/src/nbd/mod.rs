//! The NBD protocol server (fixed newstyle negotiation, simple and
//! structured replies, extended headers, metadata contexts
//! `base:allocation`, `qemu:allocation-depth` and
//! `snapmv:changed-since:<tag>`), after `doc/proto.md` of the
//! NetworkBlockDevice/nbd repository.
//!
//! # Public API (what the CLI wires up)
//!
//! - [`Exports`]: the catalogue the server asks at negotiation time. It is
//!   called afresh for every `OPT_LIST` / `OPT_GO`, so snapshots taken or
//!   deleted while the server runs appear and vanish at once.
//! - [`ServerConfig`] + [`Server::bind`]: bind TCP and/or Unix listeners.
//! - [`Server::run`]: blocks, serving, until a [`ShutdownHandle`] fires.
//! - [`ShutdownHandle::shutdown`]: stop accepting; each connection finishes
//!   the requests it has in flight, then closes; `run` then returns.
//!
//! # Design
//!
//! - One accept loop (`poll` over the listeners and a wake-up socket), one
//!   thread per connection for negotiation and then for reading requests.
//! - In transmission, per connection: the connection's thread parses and
//!   checks each request (`proto::check_request`, pure), takes a byte
//!   permit, and serves it inline, buffering the reply until it is about
//!   to wait for the client. FLUSH, FUA and (while the connection's
//!   requests are slow) all requests go to one worker pool shared by every
//!   connection, at most `parallel_per_conn` per connection; their replies
//!   are written by the pool thread. See `transmit` and ARCHITECTURE.md.
//! - Memory: every request holds `payload + 4 KiB` of both its
//!   connection's budget (`conn_buffer_bytes`) and the server's
//!   (`server_buffer_bytes`) until its reply is written. A client that
//!   stops reading replies stalls its own connection only; after 120 s
//!   without progress its writes time out and it is dropped.
//! - Requests up to `max_request` (64 MiB) are served; larger ones get an
//!   error without allocation (a WRITE's payload is read and discarded).
//! - Extended headers (`NBD_OPT_EXTENDED_HEADERS`, qemu 8.2+ asks first):
//!   32-byte requests with 64-bit lengths, and every reply an extended
//!   chunk (errors too; BLOCK_STATUS as BLOCK_STATUS_EXT). TRIM,
//!   WRITE_ZEROES and BLOCK_STATUS then take 64-bit lengths; READ and
//!   WRITE stay within `max_request`, and an announced payload over 32
//!   bits ends the connection. They imply structured replies; a later
//!   OPT_STRUCTURED_REPLY gets ERR_EXT_HEADER_REQD, and OPT_EXPORT_NAME
//!   after them ends the connection (it cannot carry an error). Clients
//!   that do not ask (libnbd before 1.18, the kernel) see no change.
//! - Metadata contexts (`negotiate`, `proto::parse_meta_query`): on an
//!   export of origin ID, `snapmv:changed-since:TAG` (TAG a live snapshot
//!   of ID, written as in export names, or `origin`) sets bit 0 where the
//!   export may differ from that version (`Volume::diff_from`: never
//!   misses a changed chunk; a rewrite with the same bytes may show);
//!   `qemu:allocation-depth` counts layers as an image chain does
//!   (`Volume::allocation_depth`): 0 for zeros, 1 for this version's own
//!   copy, 2 and more for data inherited from the snapshots it was taken
//!   of (a snapshot of a snapshot reads its parent's frozen state, as an
//!   overlay reads its backing file), the origin last (in place, or the
//!   copy of what it held when it moved on). LIST: no query lists
//!   everything; `base:`, `qemu:`, `snapmv:` and `snapmv:changed-since:`
//!   list their namespace (the last two: `origin` and the newest 256
//!   tags; any other tag is still selectable by name). SET selects up to
//!   16 contexts by full name, ids 1 (base), 2 (depth), then 3, 4, ... for
//!   changed-since in query order; unknown namespaces and names, and tags
//!   that are no live snapshot, are ignored; a query with no colon is
//!   ERR_INVALID. A BLOCK_STATUS sends one chunk per selected context, in
//!   that order, each from the engine's metadata as it is then (nothing
//!   is cached per connection, so a write shows in the next reply); a
//!   snapshot deleted after selection fails the request.
//! - Engine errors map through `Error::errno()` onto NBD errors; a deleted
//!   version answers ESHUTDOWN. Protocol violations (bad magic, truncated
//!   header, bad client flags, over-long options) end only that connection.
//! - The wire format lives in [`proto`] as pure functions that never panic
//!   on any input (fuzz targets: `parse_request_header`,
//!   `parse_extended_request_header`, `check_request`,
//!   `parse_option_header`, `parse_option`, `extents_to_descriptors`, the
//!   reply encoders).
//! - Per-export access ([`AccessPolicy`], `access`): exports matching an
//!   `--allow` pattern exist only for the clients it names (others get
//!   ERR_UNKNOWN and do not see them in OPT_LIST); `--read-only-export`
//!   patterns serve matching exports read-only. Applied where negotiation
//!   resolves a name, so every option that names an export obeys it.
//! - TLS (`tls`): STARTTLS upgrades a connection (X.509 with rustls, or
//!   PSK with OpenSSL); `ServerConfig::tls` says off, on or required. The
//!   connection's thread then reads and writes plain text over a socket
//!   pair whose other end a per-connection pump thread encrypts onto the
//!   client's socket, so the transmission path is the same with or
//!   without TLS. The client's identity (certificate CN, PSK username) is
//!   kept in negotiation.
//! - Not supported: NBD_CMD_CACHE (EINVAL),
//!   payloads on commands other than WRITE (EINVAL, the payload drained;
//!   `NBD_FLAG_BLOCK_STAT_PAYLOAD` is not advertised).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use snapmv_engine::store::Volume;

mod access;
mod backend;
mod budget;
mod io;
mod negotiate;
mod outbox;
mod pool;
pub mod proto;
mod server;
mod tls;
mod transmit;

#[cfg(test)]
mod tests;

pub use access::{AccessError, AccessPolicy, AllowRule, ExportPattern};
pub use server::MAX_CONNECTIONS;
pub use tls::{parse_psk, TlsConfig, TlsCredentials, TlsError, TlsMode};

/// One export as the server sees it at negotiation time.
pub struct Export {
    pub volume: snapmv_engine::store::Volume,
    /// Serve this export read-only (writes get EPERM) even if the server is not.
    pub read_only: bool,
    /// Sent as NBD_INFO_DESCRIPTION (the snapshot's memo).
    pub description: String,
}

/// The catalogue of exports. Implemented by the CLI over its open stores.
pub trait Exports: Send + Sync + 'static {
    /// Names of every export now (origin ids and "id@tag").
    fn list(&self) -> Vec<String>;
    /// Look up one export by name, at negotiation time. Only the name
    /// `list` gives an export may open it: the [`AccessPolicy`] is matched
    /// against the name asked for, so an alias would slip past it.
    fn open(&self, name: &str) -> Option<Export>;
    /// The default export for an empty name (OPT_EXPORT_NAME "" / OPT_GO ""), if any.
    fn default_name(&self) -> Option<String> {
        None
    }
}

/// Listener addresses and resource limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// TCP listen address (port 0 picks a free port; see [`Server::local_addr`]).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path; a stale socket file at this path is replaced.
    pub unix: Option<PathBuf>,
    /// Serve every export read-only.
    pub read_only: bool,
    /// Largest READ/WRITE/... payload served, in bytes (default 64 MiB).
    /// Larger requests get EINVAL/EOVERFLOW without allocation.
    pub max_request: u32,
    /// Payload bytes one connection may hold for requests in flight
    /// (default 128 MiB; always at least `max_request`).
    pub conn_buffer_bytes: usize,
    /// Payload bytes all connections together may hold (default 1 GiB).
    pub server_buffer_bytes: usize,
    /// Requests of one connection that may run in the shared pool at once
    /// (FLUSH, FUA, and requests of a connection that waits on the disk);
    /// the others run inline on the connection's thread (default 8).
    pub parallel_per_conn: usize,
    /// Threads of the pool shared by all connections, at most (default 64;
    /// started on demand).
    pub pool_threads: usize,
    /// Which clients may open which exports, and which are read-only
    /// (default: all open, none read-only beyond `read_only`).
    pub access: AccessPolicy,
    /// TLS: off (the default), on (clients may upgrade) or required, with
    /// its credentials. Applies to both listeners.
    pub tls: TlsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            unix: None,
            read_only: false,
            max_request: 64 << 20,
            conn_buffer_bytes: 128 << 20,
            server_buffer_bytes: 1 << 30,
            parallel_per_conn: 8,
            pool_threads: 64,
            access: AccessPolicy::default(),
            tls: TlsConfig::default(),
        }
    }
}

/// A bound server. `run` serves until shutdown.
pub struct Server {
    core: server::Core<Volume>,
}

/// Cloneable, `Send` handle that stops a running [`Server`].
#[derive(Clone)]
pub struct ShutdownHandle {
    stopper: server::Stopper,
}

/// Adapts the public catalogue to the generic one the server runs on.
struct VolumeCatalog(Arc<dyn Exports>);

impl backend::Catalog<Volume> for VolumeCatalog {
    fn list(&self) -> Vec<String> {
        self.0.list()
    }
    fn open(&self, name: &str) -> Option<backend::ExportOf<Volume>> {
        self.0.open(name).map(|e| backend::ExportOf {
            backend: e.volume,
            read_only: e.read_only,
            description: e.description,
        })
    }
    fn default_name(&self) -> Option<String> {
        self.0.default_name()
    }
}

impl Server {
    /// Bind the listeners named in `cfg`. Fails if none is given or a bind
    /// fails. A stale Unix socket file is replaced; a live one is refused.
    pub fn bind(cfg: ServerConfig, exports: Arc<dyn Exports>) -> anyhow::Result<Server> {
        let core = server::Core::bind(&cfg, Arc::new(VolumeCatalog(exports)))?;
        Ok(Server { core })
    }
    /// The bound TCP address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.core.local_addr()
    }
    /// Serve until [`ShutdownHandle::shutdown`]; returns once every
    /// connection has finished its in-flight requests and closed. Call once.
    pub fn run(&self) -> anyhow::Result<()> {
        Ok(self.core.run()?)
    }
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stopper: self.core.stopper(),
        }
    }
}

impl ShutdownHandle {
    /// Stop accepting, let in-flight requests finish, close connections,
    /// and make `run` return. Idempotent; callable from a signal thread.
    pub fn shutdown(&self) {
        self.stopper.stop();
    }
}
