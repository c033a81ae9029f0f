//! Command-line syntax. The subcommands and their arguments are a contract
//! with scripts and the benchmark peers: change them only additively.

use clap::{Parser, Subcommand};
use snapmv_nbd::nbd::{AllowRule, ExportPattern};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "snapmv",
    version,
    about = "Multi-version snapshots of block devices, served over NBD",
    long_about = "Multi-version snapshots of block devices, served over NBD.\n\n\
        Every origin device keeps its data in place; snapshots live on a separate \
        COW device. While `snapmv serve` holds a COW device, `snapshot`, `delete`, \
        `rollback`, `list` and `diff` reach it through its control socket: <COW>.snapmv.sock \
        next to a COW file or, for a block device or where that cannot be created \
        (read-only or FUSE directory), <runtime dir>/<escaped path>.sock, the runtime \
        dir being /run/snapmv for root, else $XDG_RUNTIME_DIR/snapmv, else \
        $TMPDIR/snapmv-<uid>. Without any control socket `serve` still serves NBD."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write an empty store onto a COW device (a file or a block device).
    Format {
        cow: PathBuf,
        /// Chunk size: a power of two from 4096 to 1048576 bytes (suffixes
        /// K/KiB/M/MiB accepted).
        #[arg(long, value_parser = parse_chunk_size, default_value = "65536")]
        chunk_size: u32,
        /// Format even if the device already holds a snapmv store.
        #[arg(long)]
        force: bool,
    },
    /// Bind an origin device to the COW device.
    Bind {
        cow: PathBuf,
        origin_path: PathBuf,
        /// Origin id (default: the file name of ORIGIN_PATH).
        #[arg(long)]
        id: Option<String>,
    },
    /// Unbind an origin (refused while it has snapshots).
    Unbind { cow: PathBuf, id: String },
    /// Take a snapshot of an origin, or of a snapshot with --of; prints the new tag.
    Snapshot {
        cow: PathBuf,
        id: String,
        /// Snapshot this snapshot instead of the origin.
        #[arg(long, value_parser = parse_tag)]
        of: Option<u64>,
        /// Memo stored with the snapshot.
        #[arg(short = 'm', long = "memo", default_value = "")]
        memo: String,
    },
    /// Delete a snapshot (instant; its space is freed in the background).
    Delete {
        cow: PathBuf,
        id: String,
        #[arg(value_parser = parse_tag)]
        tag: u64,
    },
    /// Roll a snapshot back onto its origin.
    Rollback {
        cow: PathBuf,
        id: String,
        #[arg(value_parser = parse_tag)]
        tag: u64,
        /// Wait until the background copy is done, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Show the COW device, its origins and their snapshots.
    ///
    /// Offline it needs only the COW device: an origin whose file is missing
    /// (moved or deleted since bind) is listed with its snapshots all the
    /// same, marked `device : missing (PATH: reason)` (JSON:
    /// `"device_missing": true` and `"device_error"`), with a note on stderr,
    /// and the exit status is still 0.
    List {
        cow: PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the byte ranges where two versions of an origin may differ.
    ///
    /// For incremental backup and replication: it reads no data, only the
    /// version tree and the exception index, and takes time with the
    /// chunks holding exceptions, not the device size. Exact at chunk
    /// granularity: a changed chunk is never missed; a chunk may be listed
    /// whose bytes are equal all the same (rewritten with the same data,
    /// or the origin after a rollback). FROM and TO are snapshot tags or
    /// `origin`, any two versions of the origin (ancestor and descendant,
    /// siblings, snapshot and origin); TO defaults to the origin. Offline
    /// it needs only the COW device; while `snapmv serve` runs it asks the
    /// server, and writes go on meanwhile.
    Diff {
        cow: PathBuf,
        id: String,
        #[arg(value_parser = parse_version)]
        from: Version,
        #[arg(value_parser = parse_version)]
        to: Option<Version>,
        /// Print one JSON object: `origin`, `from` and `to` (tags, or
        /// "origin"), `chunk_size`, `extents` (each `offset` and `length`,
        /// in bytes) and `bytes` (their total).
        #[arg(long)]
        json: bool,
    },
    /// Verify all metadata (exit 0 clean, 1 damage found, 2 could not read).
    ///
    /// It needs only the COW device. An origin whose file is missing is
    /// reported as a note (JSON: `missing_origins`, `notes`), not as damage:
    /// the exit status says only whether the metadata is clean.
    Check {
        cow: PathBuf,
        /// Print one JSON object. Its `damage` lists each damage found as
        /// `tree`, `path` (blocks from the root to the damaged page),
        /// `keys` (`from`, `to`), `kind` and `detail`.
        #[arg(long)]
        json: bool,
        /// Offline: reclaim leaked space and fix counters from what the
        /// trees reference (exit 0 if clean afterwards). Refuses, writing
        /// nothing, any damage it cannot repair safely; never drops a
        /// mapping or changes a version's content.
        #[arg(long)]
        repair: bool,
    },
    /// Serve every version over NBD: origin ID as `ID`, snapshot TAG as `ID@TAG`.
    ///
    /// With no COW device given, uses ./snapmv-data/cow.img (4 GiB sparse)
    /// and ./snapmv-data/origin.img (1 GiB sparse, id `origin`), created,
    /// formatted and bound on first run.
    Serve {
        /// COW device to serve.
        cow: Option<PathBuf>,
        /// Another COW device to serve (repeatable; origin ids must be
        /// unique across all served devices).
        #[arg(long = "cow", value_name = "PATH")]
        cows: Vec<PathBuf>,
        /// Open origin ID from PATH instead of the path recorded at bind time.
        #[arg(long = "origin", value_name = "ID=PATH", value_parser = parse_origin_override)]
        origins: Vec<(String, PathBuf)>,
        /// TCP address to listen on [default: 127.0.0.1:10809, unless only
        /// --unix is given].
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<SocketAddr>,
        /// Also (or, without --listen, only) serve on this Unix socket.
        #[arg(long, value_name = "PATH")]
        unix: Option<PathBuf>,
        /// Export every version read-only.
        #[arg(long)]
        read_only: bool,
        /// Let only the named clients open the exports matching
        /// EXPORT_PATTERN (repeatable).
        ///
        /// A client's name is its TLS identity: the CN of its certificate
        /// or its PSK user name, matched exactly; a client without TLS has
        /// none, so it can open no export any --allow matches. EXPORT_PATTERN is
        /// a glob over the whole export name (`ORIGIN` or `ORIGIN@TAG`):
        /// `*` matches any run of characters, `@` included, `?` exactly one,
        /// and nothing is escaped; `sdb1@*` is every snapshot of sdb1,
        /// `sdb1` the origin alone, `*` everything. An export matched by
        /// several patterns is open to every client any of them names;
        /// one matched by none stays open to every client. To other clients
        /// a matched export does not exist: the list leaves it out and
        /// opening it fails as for an unknown name.
        #[arg(long = "allow", value_name = "EXPORT_PATTERN=NAME[,NAME...]", value_parser = parse_allow)]
        allow: Vec<AllowRule>,
        /// Serve the exports matching PATTERN read-only (repeatable; the
        /// same globs as --allow): writes, trims and zeroing get EPERM.
        #[arg(long = "read-only-export", value_name = "PATTERN", value_parser = parse_export_pattern)]
        read_only_exports: Vec<ExportPattern>,
        /// Byte budget of each COW device's metadata page cache (suffixes
        /// K, KiB, M, MiB, G, GiB). Clean pages beyond it are evicted and
        /// read again when needed; pages changed and not yet checkpointed
        /// are kept whatever the budget.
        #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "32MiB")]
        cache_budget: u64,
        /// Byte budget of each COW device's staged first writes: the new
        /// data of origin writes whose old chunk was just copied for a
        /// snapshot, held in memory (and read from there) until the commit
        /// that makes the copy durable, then written in place. Writers
        /// wait for a commit when it is used up.
        #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64MiB")]
        staging_budget: u64,
        /// How long staged first writes wait for others to share their
        /// commit (suffixes us, ms, s; default unit ms). FLUSH, FUA and
        /// snapshots commit at once.
        #[arg(long, value_name = "TIME", value_parser = parse_duration, default_value = "5ms")]
        commit_delay: std::time::Duration,
        #[command(flatten)]
        tls: Box<TlsArgs>,
    },
}

/// TLS on `snapmv serve` (NBD_OPT_STARTTLS), as qemu-nbd and nbdkit take it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// TLS: `off`; `on` (clients may upgrade with STARTTLS, plain-text
    /// clients are still served); or `require` (before STARTTLS every
    /// option is refused, so no export is named, sized or described in
    /// plain text). `on` and `require` need credentials: --tls-cert and
    /// --tls-key (and --tls-ca), --tls-dir, or --tls-psk.
    #[arg(long = "tls", value_enum, value_name = "MODE", default_value = "off")]
    pub mode: TlsModeArg,
    /// Server certificate (PEM; the chain, leaf first).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM). With it, every client must present a
    /// certificate signed by this CA and valid now; its subject CN names
    /// the client.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// A directory in qemu's and nbdkit's layout: server-cert.pem,
    /// server-key.pem, and optionally ca-cert.pem (then client
    /// certificates are required, as with --tls-ca).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Pre-shared keys instead of certificates: `username:hexkey` lines
    /// (nbdkit's psktool format, `psktool -u NAME -p FILE`); the username
    /// names the client. Not with certificates: a server takes one kind.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsModeArg {
    #[default]
    Off,
    On,
    Require,
}

/// A version of an origin on the command line: a snapshot tag, or the
/// origin itself (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub Option<u64>);

/// `origin`, or a snapshot tag.
fn parse_version(s: &str) -> Result<Version, String> {
    match s {
        "origin" => Ok(Version(None)),
        _ => parse_tag(s)
            .map(|t| Version(Some(t)))
            .map_err(|e| format!("{e}; or 'origin' for the origin itself")),
    }
}

/// Tags are positive integers (0 would be the origin itself).
fn parse_tag(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("tags start at 1 (tag 0 is the origin itself)".into()),
        Ok(t) => Ok(t),
        Err(_) => Err(format!("'{s}' is not a snapshot tag (a positive integer)")),
    }
}

pub fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    if !(4096..=1 << 20).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!(
            "chunk size {bytes} must be a power of two from 4096 to 1048576 bytes"
        ));
    }
    Ok(bytes as u32)
}

/// A size in bytes, with an optional binary suffix (K/KiB, M/MiB, G/GiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = [
        ("KiB", 1024u64),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("K", 1024),
        ("k", 1024),
        ("M", 1 << 20),
        ("G", 1 << 30),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((t, 1));
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size in bytes"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A duration: `250us`, `5ms`, `1s`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let t = s.trim();
    let (num, unit): (&str, fn(u64) -> Duration) = if let Some(n) = t.strip_suffix("us") {
        (n, Duration::from_micros)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, Duration::from_millis)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, Duration::from_secs)
    } else {
        (t, Duration::from_millis)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 500us, 5ms, 1s)"))?;
    let d = unit(n);
    if d > Duration::from_secs(60) {
        return Err(format!("'{s}' is longer than a minute"));
    }
    Ok(d)
}

fn parse_allow(s: &str) -> Result<AllowRule, String> {
    s.parse()
        .map_err(|e: snapmv_nbd::nbd::AccessError| e.to_string())
}

fn parse_export_pattern(s: &str) -> Result<ExportPattern, String> {
    s.parse()
        .map_err(|e: snapmv_nbd::nbd::AccessError| e.to_string())
}

fn parse_origin_override(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            snapmv_engine::store::validate_id(id).map_err(|e| e.to_string())?;
            Ok((id.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("'{s}' is not of the form ID=PATH")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("65536"), Ok(65536));
        assert_eq!(parse_chunk_size("4K"), Ok(4096));
        assert_eq!(parse_chunk_size("1MiB"), Ok(1 << 20));
        assert!(parse_chunk_size("3000").is_err());
        assert!(parse_chunk_size("2M").is_err());
        assert!(parse_chunk_size("x").is_err());
        assert!(parse_chunk_size("99999999999999999999K").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("32 MB").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn cache_budget_default() {
        let cli = Cli::try_parse_from(["snapmv", "serve", "cow.img"]).unwrap();
        match cli.cmd {
            Cmd::Serve { cache_budget, .. } => {
                assert_eq!(cache_budget, snapmv_engine::store::DEFAULT_CACHE_BUDGET)
            }
            _ => panic!("not serve"),
        }
        let cli =
            Cli::try_parse_from(["snapmv", "serve", "--cache-budget", "1MiB", "c.img"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Serve { cache_budget, .. } if cache_budget == 1 << 20));
    }

    #[test]
    fn staging_options() {
        use std::time::Duration;
        let cli = Cli::try_parse_from(["snapmv", "serve", "cow.img"]).unwrap();
        match cli.cmd {
            Cmd::Serve {
                staging_budget,
                commit_delay,
                ..
            } => {
                assert_eq!(staging_budget, snapmv_engine::store::DEFAULT_STAGING_BUDGET);
                assert_eq!(commit_delay, Duration::from_millis(5));
            }
            _ => panic!("not serve"),
        }
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("61s").is_err());
        let bad = Cli::try_parse_from(["snapmv", "serve", "--commit-delay", "x", "c.img"]);
        assert!(bad.is_err());
    }

    #[test]
    fn tls_options() {
        let cli = Cli::try_parse_from(["snapmv", "serve", "c.img"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Serve { tls, .. } if tls.mode == TlsModeArg::Off));
        let cli = Cli::try_parse_from([
            "snapmv",
            "serve",
            "--tls",
            "require",
            "--tls-dir",
            "/d",
            "c.img",
        ])
        .unwrap();
        match cli.cmd {
            Cmd::Serve { tls, .. } => {
                assert_eq!(tls.mode, TlsModeArg::Require);
                assert_eq!(tls.tls_dir, Some(PathBuf::from("/d")));
            }
            _ => panic!("not serve"),
        }
        assert!(Cli::try_parse_from(["snapmv", "serve", "--tls", "maybe", "c.img"]).is_err());
    }

    #[test]
    fn tags() {
        assert_eq!(parse_tag("7"), Ok(7));
        assert!(parse_tag("0").is_err());
        assert!(parse_tag("-1").is_err());
        assert!(parse_tag("x").is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("origin"), Ok(Version(None)));
        assert_eq!(parse_version("3"), Ok(Version(Some(3))));
        assert!(parse_version("0").unwrap_err().contains("'origin'"));
        assert!(parse_version("x").is_err());
        let cli = Cli::try_parse_from(["snapmv", "diff", "c", "o", "2"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Diff {
                from: Version(Some(2)),
                to: None,
                json: false,
                ..
            }
        ));
        let cli =
            Cli::try_parse_from(["snapmv", "diff", "c", "o", "origin", "4", "--json"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Diff {
                from: Version(None),
                to: Some(Version(Some(4))),
                json: true,
                ..
            }
        ));
    }

    /// The access flags parse into rules, and every bad value fails at
    /// parse time with a message naming the problem.
    #[test]
    fn access_flags() {
        let serve = |extra: &[&str]| {
            let args = ["snapmv", "serve", "c.img"].iter().chain(extra);
            Cli::try_parse_from(args).map_err(|e| e.to_string())
        };
        let cli = serve(&[
            "--allow",
            "sdb1@*=alice,bob",
            "--allow=*=carol",
            "--read-only-export",
            "sdb1@?",
        ])
        .unwrap();
        let Cmd::Serve {
            allow,
            read_only_exports,
            ..
        } = cli.cmd
        else {
            panic!("not serve")
        };
        let allow: Vec<String> = allow.iter().map(|r| r.to_string()).collect();
        assert_eq!(allow, ["sdb1@*=alice,bob", "*=carol"]);
        assert_eq!(read_only_exports.len(), 1);
        assert!(read_only_exports[0].matches("sdb1@7"));
        assert!(!read_only_exports[0].matches("sdb1@17"));
        let cases: [(&[&str], &str); 6] = [
            (&["--allow", "sdb1"], "not of the form EXPORT_PATTERN=NAME"),
            (&["--allow", "sdb1="], "names no client"),
            (&["--allow", "=alice"], "the export pattern is empty"),
            (&["--allow", "sdb1=alice,"], "stray ','"),
            (&["--read-only-export", ""], "the export pattern is empty"),
            (
                &["--read-only-export", "a/b"],
                "can never match an export name",
            ),
        ];
        for (args, needle) in cases {
            let err = serve(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn origin_override() {
        assert_eq!(
            parse_origin_override("a=/dev/sdb"),
            Ok(("a".into(), PathBuf::from("/dev/sdb")))
        );
        assert!(parse_origin_override("a").is_err());
        assert!(parse_origin_override("=x").is_err());
        assert!(parse_origin_override("a@1=x").is_err());
    }
}
