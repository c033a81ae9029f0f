//! The `snapmv` binary: the admin CLI and `snapmv serve`. This is the edge
//! where errors become messages and exit codes (anyhow lives here only).

mod admin;
mod cli;
mod control;
mod diff;
mod driver;
mod lock;
mod operations;
mod repair;
mod route;
mod serve;
mod status;

use clap::Parser;
use cli::{Cli, Cmd};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.cmd, Cmd::Serve { .. }));
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line:
            // "cannot delete snapshot 9 of origin orig: no snapshot with tag 9 ...".
            eprintln!("snapmv: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by RUST_LOG; the server logs at info by
/// default, the one-shot admin commands only warnings.
fn init_tracing(serving: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // No colour codes in log files and journald.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Format {
            cow,
            chunk_size,
            force,
        } => admin::format(&cow, chunk_size, force),
        Cmd::Bind {
            cow,
            origin_path,
            id,
        } => admin::bind(&cow, &origin_path, id),
        Cmd::Unbind { cow, id } => admin::unbind(&cow, &id),
        Cmd::Snapshot { cow, id, of, memo } => admin::snapshot(&cow, &id, of, &memo),
        Cmd::Delete { cow, id, tag } => admin::delete(&cow, &id, tag),
        Cmd::Rollback { cow, id, tag, wait } => admin::rollback(&cow, &id, tag, wait),
        Cmd::List { cow, json } => admin::list(&cow, json),
        Cmd::Diff {
            cow,
            id,
            from,
            to,
            json,
        } => admin::diff(&cow, &id, (from.0, to.and_then(|t| t.0)), json),
        Cmd::Check { cow, json, repair } => match repair {
            true => repair::run(&cow, json),
            false => admin::check(&cow, json),
        },
        Cmd::Serve {
            cow,
            cows,
            origins,
            listen,
            unix,
            read_only,
            allow,
            read_only_exports,
            cache_budget,
            staging_budget,
            commit_delay,
            tls,
        } => serve::serve(serve::ServeArgs {
            cows: cow.into_iter().chain(cows).collect(),
            origins,
            listen,
            unix,
            read_only,
            access: snapmv_nbd::nbd::AccessPolicy::new(allow, read_only_exports),
            cache_budget,
            staging_budget,
            commit_delay,
            tls: *tls,
        }),
    }
}
