//! `snapmv serve --tls ...`: the errors for bad TLS options (before any
//! device is opened), the warning for serving beyond loopback without
//! TLS, and a TLS session through the binary.

mod cli_support;

use cli_support::*;
use std::path::Path;

/// Credentials from scripts/tls-certs.sh, or `None` (skip) without certtool.
fn certs(dir: &Path) -> Option<std::path::PathBuf> {
    if !have_tool("certtool") || !have_tool("psktool") {
        return None;
    }
    let out = dir.join("tls");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tls-certs.sh");
    let st = std::process::Command::new(script)
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tls-certs.sh");
    assert!(st.success());
    Some(out)
}

#[test]
fn bad_tls_options_are_refused_with_a_clear_error() {
    let f = Fixture::new();
    let cow = s(&f.cow);
    let serve = |args: &[&str], needles: &[&str]| {
        let mut a = vec!["serve", cow];
        a.extend_from_slice(args);
        snapmv(&a).fails_with(1, needles);
    };
    serve(
        &["--tls", "require"],
        &["--tls require needs credentials", "--tls-cert"],
    );
    serve(&["--tls", "on"], &["--tls on needs credentials"]);
    serve(&["--tls-psk", "k.psk"], &["--tls is off"]);
    serve(
        &["--tls", "require", "--tls-psk", "k", "--tls-dir", "d"],
        &["--tls-psk cannot be combined", "one kind"],
    );
    serve(
        &["--tls", "require", "--tls-cert", "c.pem"],
        &["--tls-cert and --tls-key go together"],
    );
    serve(
        &["--tls", "require", "--tls-dir", "d", "--tls-ca", "ca.pem"],
        &["--tls-dir cannot be combined"],
    );

    let Some(c) = certs(f.dir.path()) else {
        return;
    };
    let p = |rel: &str| c.join(rel).display().to_string();
    // A malformed PEM certificate, and a file with no certificate.
    let garbage = f.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let g = s(&garbage);
    let key = p("server/server-key.pem");
    serve(
        &["--tls", "require", "--tls-cert", g, "--tls-key", &key],
        &[
            "cannot load the TLS credentials",
            "garbage.pem: malformed PEM",
        ],
    );
    let empty = f.path("empty.pem");
    std::fs::write(&empty, "nothing\n").unwrap();
    serve(
        &[
            "--tls",
            "require",
            "--tls-cert",
            s(&empty),
            "--tls-key",
            &key,
        ],
        &["empty.pem: no PEM certificate"],
    );
    // An unreadable file.
    serve(
        &[
            "--tls",
            "require",
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            &key,
        ],
        &["cannot read /nonexistent/c.pem"],
    );
    // A key that belongs to another certificate.
    serve(
        &[
            "--tls",
            "require",
            "--tls-cert",
            &p("server/server-cert.pem"),
            "--tls-key",
            &p("alice/client-key.pem"),
        ],
        &["client-key.pem does not match the certificate"],
    );
    // A key file with no key.
    serve(
        &[
            "--tls",
            "require",
            "--tls-cert",
            &p("server/server-cert.pem"),
            "--tls-key",
            &p("server/server-cert.pem"),
        ],
        &["no PEM private key"],
    );
    // A CA file that is not one.
    serve(
        &[
            "--tls",
            "require",
            "--tls-cert",
            &p("server/server-cert.pem"),
            "--tls-key",
            &key,
            "--tls-ca",
            s(&empty),
        ],
        &["CA certificates", "no PEM certificate"],
    );
    // A TLS directory without its key.
    let half = f.path("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::copy(
        c.join("server/server-cert.pem"),
        half.join("server-cert.pem"),
    )
    .unwrap();
    serve(
        &["--tls", "require", "--tls-dir", s(&half)],
        &["no server-key.pem"],
    );
    // A malformed PSK file names the line.
    let psk = f.path("bad.psk");
    std::fs::write(&psk, "alice:0011\nbob:zz\n").unwrap();
    serve(
        &["--tls", "require", "--tls-psk", s(&psk)],
        &["bad.psk line 2", "not hexadecimal"],
    );
}

/// Beyond loopback without TLS, `serve` warns at start (bound on all
/// interfaces at an ephemeral port for a moment; no traffic is sent).
#[test]
fn serving_beyond_loopback_without_tls_warns() {
    let f = Fixture::bound();
    let log = f.path("serve.log");
    let mut srv = Server::spawn(
        f.dir.path(),
        &[],
        &[s(&f.cow), "--listen", "0.0.0.0:0"],
        &log,
    );
    srv.wait_log("WITHOUT TLS");
    assert_eq!(srv.stop(), 0);
    // On loopback: no warning.
    let log = f.path("serve2.log");
    let mut srv = Server::spawn(
        f.dir.path(),
        &[],
        &[s(&f.cow), "--listen", "127.0.0.1:0"],
        &log,
    );
    srv.wait_ready(&f.sock());
    assert_eq!(srv.stop(), 0);
    assert!(!std::fs::read_to_string(&log)
        .unwrap()
        .contains("WITHOUT TLS"));
    // --allow names clients by their TLS identity: without TLS, a warning.
    let log = f.path("serve3.log");
    let args = [
        s(&f.cow),
        "--listen",
        "127.0.0.1:0",
        "--allow",
        "vol@*=alice",
    ];
    let mut srv = Server::spawn(f.dir.path(), &[], &args, &log);
    srv.wait_log("--allow without TLS");
    assert_eq!(srv.stop(), 0);
}

/// The binary end to end: `--tls require --tls-psk` on a Unix socket,
/// nbdinfo with the key (nbds+unix), and without it.
#[test]
fn serve_with_psk_on_a_unix_socket() {
    let f = Fixture::bound();
    if !have_tool("nbdinfo") {
        return;
    }
    let Some(c) = certs(f.dir.path()) else {
        return;
    };
    let keys = c.join("psk/keys.psk");
    let nbd_sock = f.path("nbd.sock");
    let log = f.path("serve.log");
    let srv = Server::start(
        f.dir.path(),
        &[
            s(&f.cow),
            "--unix",
            s(&nbd_sock),
            "--tls",
            "require",
            "--tls-psk",
            s(&keys),
        ],
        &f.sock(),
        &log,
    );
    let uri = format!(
        "nbds+unix://alice@/sdb1?socket={}&tls-psk-file={}",
        nbd_sock.display(),
        keys.display()
    );
    assert_eq!(
        sh("nbdinfo", &["--size", &uri]).trim(),
        ORIGIN_SIZE.to_string()
    );
    let plain = std::process::Command::new("nbdinfo")
        .args(["--size", &nbd_unix(&nbd_sock, "sdb1")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain text got in");
    assert_eq!(srv.stop(), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("client=Some(\"alice\")"), "{text}");
}

/// `--allow` with TLS identities: `sdb1@*` for alice only. Alice (her
/// certificate's CN, or her PSK username) lists and opens the snapshots;
/// bob sees only the origin, and the snapshot fails for him as a missing
/// name does.
#[test]
fn allow_list_by_tls_identity() {
    if !have_tool("nbdinfo") {
        return;
    }
    let f = Fixture::bound();
    let Some(c) = certs(f.dir.path()) else {
        return;
    };
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    let nbd_sock = f.path("nbd.sock");
    let keys = c.join("psk/keys.psk");
    let x509 = ["--tls-dir", &c.join("server").display().to_string()].map(String::from);
    let psk = ["--tls-psk", &keys.display().to_string()].map(String::from);
    for creds in [x509, psk] {
        let mut args = vec![s(&f.cow), "--unix", s(&nbd_sock), "--tls", "require"];
        args.extend(creds.iter().map(String::as_str));
        args.extend(["--allow", "sdb1@*=alice"]);
        let log = f.path("serve.log");
        let srv = Server::start(f.dir.path(), &args, &f.sock(), &log);
        let uri = |who: &str, export: &str| {
            let sock = nbd_sock.display();
            if creds[0] == "--tls-psk" {
                let keys = keys.display();
                format!("nbds+unix://{who}@/{export}?socket={sock}&tls-psk-file={keys}")
            } else {
                let dir = c.join(who).display().to_string();
                format!("nbds+unix:///{export}?socket={sock}&tls-certificates={dir}")
            }
        };
        assert_eq!(nbd_list(&uri("alice", "")), ["sdb1", "sdb1@1"]);
        assert_eq!(nbd_list(&uri("bob", "")), ["sdb1"]);
        let size = sh("nbdinfo", &["--size", &uri("alice", "sdb1@1")]);
        assert_eq!(size.trim(), ORIGIN_SIZE.to_string());
        let bob = std::process::Command::new("nbdinfo")
            .args(["--size", &uri("bob", "sdb1@1")])
            .output()
            .unwrap();
        assert!(!bob.status.success(), "bob opened alice's snapshot");
        assert_eq!(srv.stop(), 0);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("refused by --allow"), "{text}");
    }
}
