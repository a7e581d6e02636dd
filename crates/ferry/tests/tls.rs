//! TLS: `ferry server init` makes a CA and the server's certificate; the server then speaks
//! TLS only, and a client trusts it through that CA alone.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client(ca: Option<&[u8]>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .use_rustls_tls();
    if let Some(pem) = ca {
        b = b
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
    }
    b.build().unwrap()
}

#[test]
fn an_initialized_server_speaks_tls_only_and_clients_trust_its_ca() {
    let state = tempfile::tempdir().unwrap();
    let d = state.path();
    let init = |extra: &[&str]| {
        Command::new(FERRY)
            .args(["server", "init", "--state-dir"])
            .arg(d)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = init(&["--san", "ferry.example"]);
    assert!(out.status.success(), "{out:?}");
    for (f, private) in [
        ("ca.pem", false),
        ("ca.key", true),
        ("server.pem", false),
        ("server.key", true),
    ] {
        let m = std::fs::metadata(d.join("tls").join(f)).unwrap();
        if private {
            assert_eq!(
                m.permissions().mode() & 0o077,
                0,
                "{f} is readable by others"
            );
        }
    }
    // A second init would replace the CA every client trusts: refused.
    assert!(!init(&[]).status.success());
    let ca = std::fs::read(d.join("tls/ca.pem")).unwrap();

    let port = free_port();
    let _server = Server(
        Command::new(FERRY)
            .args(["server", "--state-dir"])
            .arg(d)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--agent-listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let https = format!("https://127.0.0.1:{port}");
    let trusted = client(Some(&ca));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match trusted.get(format!("{https}/openapi.json")).send() {
            Ok(r) => {
                assert_eq!(r.status().as_u16(), 200);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no TLS answer: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The certificate names the extra name too (checked by connecting under that name).
    let by_name = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve(
            "ferry.example",
            format!("127.0.0.1:{port}").parse().unwrap(),
        )
        .build()
        .unwrap();
    let r = by_name
        .get(format!("https://ferry.example:{port}/openapi.json"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Plain HTTP gets no API, and a client that does not trust the CA gets no connection.
    let plain = client(None)
        .get(format!("http://127.0.0.1:{port}/openapi.json"))
        .send();
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP was answered"
    );
    let e = client(None)
        .get(format!("{https}/openapi.json"))
        .send()
        .unwrap_err();
    assert!(e.is_connect() || e.is_request(), "{e}");

    // The CLI over TLS: FERRY_CA and the server's admin token.
    let token = std::fs::read_to_string(d.join("admin.token")).unwrap();
    let cli = |ca: Option<&std::path::Path>, args: &[&str]| {
        let mut c = Command::new(FERRY);
        c.args(args)
            .env("FERRY_API", &https)
            .env("FERRY_TOKEN", token.trim())
            .env("FERRY_CONFIG_DIR", d.join("cli"))
            .env_remove("FERRY_CA");
        if let Some(ca) = ca {
            c.env("FERRY_CA", ca);
        }
        c.output().unwrap()
    };
    let ca_path = d.join("tls/ca.pem");
    let out = cli(Some(&ca_path), &["app", "create", "web"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(Some(&ca_path), &["app", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let apps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(apps[0]["name"], "web");
    let out = cli(None, &["app", "list"]);
    assert!(!out.status.success(), "trusted a CA it was not given");
}
