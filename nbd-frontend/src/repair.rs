//! `snapmv check --repair`: offline repair of the space accounting (leaked
//! and missing space map bits, the state page's counters, the node records'
//! own-chunk counters), from what the trees reference. Structural damage is
//! refused with nothing written. Takes the COW device's lock exclusively.

use crate::lock::{self, LockMode};
use anyhow::{bail, Context, Result};
use snapmv_engine::dev::OpenOptions;
use snapmv_engine::FileDev;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

/// Exit codes: 0 clean after repair, 1 refused or still damaged.
const NOT_REPAIRED: u8 = 1;

pub fn run(cow: &Path, json: bool) -> Result<ExitCode> {
    let canon = lock::canonical(cow)?;
    let Some(_lock) = lock::try_lock(cow, LockMode::Exclusive)? else {
        bail!(
            "COW device {} is in use (a running server, or another command); repair needs it offline",
            canon.display()
        );
    };
    let dev = FileDev::open(cow, &OpenOptions::default())
        .with_context(|| format!("cannot open COW device {}", canon.display()))?;
    let r = snapmv_engine::store::repair(Arc::new(dev))
        .with_context(|| format!("cannot repair {}", canon.display()))?;
    let clean = r.refused.is_empty() && r.after.errors.is_empty();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "cow": canon.display().to_string(),
                "found": r.found,
                "refused": r.refused,
                "fixed": r.fixed,
                "clean_after": clean,
                "errors_after": r.after.errors,
            })
        );
    } else {
        print_text(&canon, &r, clean);
    }
    Ok(match clean {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(NOT_REPAIRED),
    })
}

fn print_text(canon: &Path, r: &snapmv_engine::store::RepairReport, clean: bool) {
    println!("{}: {} problem(s) found", canon.display(), r.found.len());
    for e in &r.found {
        println!("  {e}");
    }
    if !r.refused.is_empty() {
        println!("refused: repair only fixes space accounting; nothing was written. Damage it will not touch:");
        for e in &r.refused {
            println!("  {e}");
        }
        return;
    }
    for f in &r.fixed {
        println!("repaired: {f}");
    }
    match clean {
        true => println!("{}: clean", canon.display()),
        false => {
            println!("{}: still damaged after repair:", canon.display());
            for e in &r.after.errors {
                println!("  {e}");
            }
        }
    }
}
