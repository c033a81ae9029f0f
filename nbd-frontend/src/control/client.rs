//! A client of a control socket: one connection, requests answered in
//! order.

use super::wire::{self, Line, Reply, Request, MAX_REPLY_LINE};
use super::{peer_uid, short_addr};
use crate::status::RollbackWire;
use anyhow::{anyhow, bail, Context, Result};
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a client waits for a reply (a snapshot flushes the device,
/// which can take a while under heavy write load).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// A connected client.
pub struct Client {
    reader: BufReader<UnixStream>,
    path: PathBuf,
    /// Request and reply lines, reused from call to call.
    request: Vec<u8>,
    reply: Vec<u8>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let (addr, _dirfd) = short_addr(path)?;
        let s = UnixStream::connect(&addr)
            .with_context(|| format!("cannot connect to control socket {}", path.display()))?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Client {
            reader: BufReader::new(s),
            path: path.to_path_buf(),
            request: Vec::new(),
            reply: Vec::new(),
        })
    }

    /// Wait at most `d` for each reply from now on (`None`: the default,
    /// long enough for a snapshot under heavy write load).
    pub fn set_timeout(&mut self, d: Option<Duration>) -> Result<()> {
        let d = d.unwrap_or(CLIENT_TIMEOUT);
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(d))?;
        s.set_write_timeout(Some(d))?;
        Ok(())
    }

    /// The uid of the process serving this socket, if the kernel says.
    pub fn peer_uid(&self) -> Option<u32> {
        peer_uid(self.reader.get_ref())
    }

    /// Send one request and wait for its reply. An `error` reply becomes an
    /// `Err` carrying the server's message.
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        let p = self.path.display();
        wire::write_line(self.reader.get_mut(), req, &mut self.request)
            .with_context(|| format!("cannot send to server at {p}"))?;
        let line = wire::read_line(&mut self.reader, MAX_REPLY_LINE, &mut self.reply)
            .with_context(|| format!("cannot read reply from server at {p}"))?;
        match line {
            Line::Text => {}
            Line::Eof => bail!("server at {p} closed the connection without replying"),
            Line::TooLong => bail!("server at {p} sent an oversized reply"),
        }
        let reply: Reply = serde_json::from_slice(&self.reply)
            .with_context(|| format!("malformed reply from server at {p}"))?;
        match reply {
            Reply::Error { message } => Err(anyhow!(message)),
            r => Ok(r),
        }
    }

    /// The rollback in progress. With `seen`, the server answers once the
    /// rollback is no longer `seen` or after `wait`, whichever is first.
    pub fn rollback_progress(
        &mut self,
        seen: Option<RollbackWire>,
        wait: Duration,
    ) -> Result<Option<RollbackWire>> {
        let req = Request::RollbackProgress {
            seen,
            wait_ms: wait.as_millis().try_into().unwrap_or(u64::MAX),
        };
        match self.call(&req)? {
            Reply::RollbackProgress { rollback } => Ok(rollback),
            other => bail!("unexpected reply to rollback_progress: {other:?}"),
        }
    }
}
