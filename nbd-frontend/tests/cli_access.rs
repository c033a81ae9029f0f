//! `snapmv serve --allow` and `--read-only-export` with real clients
//! (libnbd's nbdinfo, qemu-io) on the server's Unix socket. Plain NBD, so
//! every client here is anonymous: an export any `--allow` matches does
//! not exist for it. Named clients (TLS identities) are in cli_tls.rs.

mod cli_support;
use cli_support::*;
use std::process::{Command, Output};

fn serve(f: &Fixture, extra: &[&str]) -> Server {
    let nbd = f.path("nbd.sock");
    let mut args = vec![s(&f.cow), "--unix", s(&nbd)];
    args.extend_from_slice(extra);
    Server::start(f.dir.path(), &args, &f.sock(), &f.path("serve.log"))
}

/// Run a client that may fail; its whole output is in the assertion
/// messages of the callers.
fn client(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .env("PATH", "/usr/bin:/usr/sbin:/bin:/sbin")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `--allow 'sdb1@*=alice'`: an anonymous client lists only the origin,
/// cannot open a snapshot (it fails exactly as for a tag that does not
/// exist), and uses the origin as before; a snapshot taken while serving
/// is hidden at once too.
#[test]
fn allow_hides_snapshots_from_anonymous_clients() {
    if !have_tool("nbdinfo") {
        return;
    }
    let f = Fixture::bound();
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    let srv = serve(&f, &["--allow", "sdb1@*=alice"]);
    let nbd = f.path("nbd.sock");
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1"]);

    let hidden = client("nbdinfo", &[&nbd_unix(&nbd, "sdb1@1")]);
    assert!(
        !hidden.status.success(),
        "hidden snapshot opened: {}",
        text(&hidden)
    );
    let absent = client("nbdinfo", &[&nbd_unix(&nbd, "sdb1@9")]);
    assert!(!absent.status.success(), "{}", text(&absent));
    // Byte for byte the same failure, but for the name: nothing tells a
    // hidden export from a missing one.
    let stderr = |o: &Output, name: &str| String::from_utf8_lossy(&o.stderr).replace(name, "NAME");
    assert_eq!(stderr(&hidden, "sdb1@1"), stderr(&absent, "sdb1@9"));
    assert!(
        stderr(&hidden, "sdb1@1").contains("NAME"),
        "{}",
        text(&hidden)
    );

    let info = sh("nbdinfo", &["--json", &nbd_unix(&nbd, "sdb1")]);
    assert!(
        info.contains(&format!("\"export-size\": {ORIGIN_SIZE}")),
        "{info}"
    );

    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "2\n");
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1"]);
    let log = srv.log_text();
    assert!(log.contains("refused by --allow"), "{log}");
    assert!(
        log.contains("--allow sdb1@*=alice"),
        "policy not logged:\n{log}"
    );
    assert_eq!(srv.stop(), 0);
}

/// `--read-only-export 'sdb1@*'`: qemu-io cannot write a snapshot (the
/// export says read-only, so qemu refuses to open it for writing) but
/// reads it; a client that writes all the same (libnbd with strict mode
/// off) gets EPERM from the server; the origin stays writable, its old
/// data still in the snapshot.
#[test]
fn read_only_export_covers_only_the_matching_exports() {
    if !have_tool("qemu-io") || !have_tool("nbdsh") {
        return;
    }
    let f = Fixture::bound();
    write_file(&f.origin, &[0x11; 65536]);
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    let srv = serve(&f, &["--read-only-export", "sdb1@*"]);
    let nbd = f.path("nbd.sock");
    let qemu_io = |name: &str, open: &[&str], cmd: &str| {
        let uri = nbd_unix(&nbd, name);
        let mut args = vec!["-f", "raw"];
        args.extend_from_slice(open);
        args.extend_from_slice(&["-c", cmd, &uri]);
        let o = client("qemu-io", &args);
        (o.status.success(), text(&o))
    };
    let (ok, out) = qemu_io("sdb1@1", &[], "write -P 0xab 0 64k");
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, out) = qemu_io("sdb1@1", &["-r"], "read -P 0x11 0 64k");
    assert!(ok, "{out}");

    // Past the client's own check, the server refuses with EPERM.
    let code = format!(
        "h.set_strict_mode(0)\n\
         h.connect_uri({uri:?})\n\
         assert h.is_read_only()\n\
         try:\n    h.pwrite(b'\\xab' * 4096, 0)\n    print('written')\n\
         except nbd.Error as e:\n    print('errno', e.errno, e.string)\n",
        uri = nbd_unix(&nbd, "sdb1@1")
    );
    let out = sh("nbdsh", &["-c", &code]);
    // libnbd says "command failed" for an error the server replied.
    let refused = out.starts_with("errno EPERM ") && out.contains("command failed");
    assert!(refused, "{out}");

    let (ok, out) = qemu_io("sdb1", &[], "write -P 0xcd 0 64k");
    assert!(ok, "{out}");
    let (ok, out) = qemu_io("sdb1", &[], "read -P 0xcd 0 64k");
    assert!(ok, "{out}");
    let (ok, out) = qemu_io("sdb1@1", &["-r"], "read -P 0x11 0 64k");
    assert!(ok, "{out}");
    assert_eq!(srv.stop(), 0);
}
