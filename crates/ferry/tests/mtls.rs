//! Hosts' identities and mutual TLS, end to end on a real `ferry dev` fleet (real processes,
//! real sockets): an agent answers the fleet's servers only; on the servers' agent listener a
//! join takes a join token and gives a new host ID each time, and a host acts only as itself;
//! a restarted agent keeps its identity; the server's calls to agents still work.

mod support;

use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::Dev;

/// A client that trusts `ca_pem` alone and presents `id` (cert, key), if any.
fn client(ca_pem: &str, id: Option<(&str, &str)>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap());
    if let Some((cert, key)) = id {
        b = b.identity(reqwest::Identity::from_pem(format!("{key}\n{cert}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
        .trim()
        .to_owned()
}

fn host_dir(dev: &Dev, h: &str) -> PathBuf {
    dev.state.join("hosts").join(h)
}

/// Host `h`'s certificate and key.
fn host_id(dev: &Dev, h: &str) -> (String, String) {
    let d = host_dir(dev, h).join("identity");
    (read(d.join("host.pem")), read(d.join("host.key")))
}

/// The status of a GET, or `None` if no HTTP answer came (the handshake failed or the
/// connection was closed).
fn get_status(c: &reqwest::blocking::Client, url: &str) -> Option<u16> {
    c.get(url).send().ok().map(|r| r.status().as_u16())
}

fn endpoint_of(dev: &Dev, h: &str) -> String {
    let (_, hosts) = dev.call("GET", "/v1/hosts", None);
    hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == h)
        .map(|x| x["endpoint"].as_str().unwrap().to_owned())
        .unwrap()
}

#[test]
fn hosts_join_for_certificates_and_agents_answer_servers_only() {
    let dev = Dev::start("mtls", 2);
    let tls = dev.state.join("tls");
    let ca_pem = read(tls.join("ca.pem"));
    let ca = ferry_pki::Ca::load(&tls).unwrap();
    // The fleet CA exists without `ferry server init`, and the operator API stays plain HTTP.
    assert!(dev.api.starts_with("http://"), "{}", dev.api);
    assert!(!tls.join("server.pem").exists());
    for key in [
        tls.join("ca.key"),
        dev.state
            .join("hosts")
            .join(&dev.hosts()[0])
            .join("identity/host.key"),
    ] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is readable by others", key.display());
    }
    let hosts = dev.hosts();
    let (x, y) = (hosts[0].clone(), hosts[1].clone());

    // The server's calls to agents work end to end: a machine starts, exec answers.
    let m = dev.machine("web", &x, json!({"init": {"cmd": ["sleep", "600"]}}));
    assert_eq!(m["state"], "started", "{m}");
    let out = dev.exec(&m, &["echo", "over-mtls"]);
    assert_eq!(out["stdout"].as_str().unwrap().trim(), "over-mtls", "{out}");

    // An agent's listener: served under its host certificate, to the fleet's servers only.
    let agent = read(host_dir(&dev, &x).join("agent.addr"));
    assert!(agent.starts_with("https://"), "{agent}");
    let server_role = ca.issue_server_role(&["127.0.0.1".into()]).unwrap();
    let as_server = client(&ca_pem, Some((&server_role.cert_pem, &server_role.key_pem)));
    let machines = |c: &reqwest::blocking::Client| -> Option<Value> {
        c.get(format!("{agent}/v1/machines"))
            .send()
            .ok()
            .filter(|r| r.status().is_success())
            .and_then(|r| r.json().ok())
    };
    // The control: a server's certificate gets an answer (so the refusals below are refusals).
    let before = machines(&as_server).expect("a server's certificate is answered");
    assert_eq!(before.as_array().unwrap().len(), 1, "{before}");

    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = ferry_pki::Ca::load_or_create(other_dir.path()).unwrap();
    let foreign = other_ca.issue_server_role(&["127.0.0.1".into()]).unwrap();
    let (ycert, ykey) = host_id(&dev, &y);
    let refused = [
        ("no client certificate", client(&ca_pem, None)),
        (
            "another host's certificate",
            client(&ca_pem, Some((&ycert, &ykey))),
        ),
        (
            "a server certificate of another CA",
            client(&ca_pem, Some((&foreign.cert_pem, &foreign.key_pem))),
        ),
    ];
    let stop = format!("{agent}/v1/machines/{}/stop", m["id"].as_str().unwrap());
    for (who, c) in &refused {
        let s = get_status(c, &format!("{agent}/v1/machines"));
        assert!(matches!(s, None | Some(403)), "{who}: GET answered {s:?}");
        let r = c.post(&stop).json(&json!({"timeout_s": 1})).send();
        let s = r.ok().map(|r| r.status().as_u16());
        assert!(matches!(s, None | Some(403)), "{who}: stop answered {s:?}");
    }
    // Nothing changed on the host, nor in the server's view.
    assert_eq!(machines(&as_server).unwrap(), before);
    assert_eq!(dev.get_machine(&m)["state"], "started");

    // The servers' agent listener.
    let agents_api = read(dev.state.join("agent-api.url"));
    assert!(agents_api.starts_with("https://"), "{agents_api}");
    // A certificate of another CA gets no connection at all.
    let c = client(&ca_pem, Some((&foreign.cert_pem, &foreign.key_pem)));
    let s = c
        .post(format!("{agents_api}/internal/v1/hosts"))
        .json(&json!({"host_id": 0x8000_0000u32, "region": "x", "endpoint": "https://127.0.0.1:1", "running": []}))
        .send()
        .ok()
        .map(|r| r.status().as_u16());
    assert_eq!(s, None, "another CA's certificate was answered");

    // Host Y's certificate registering host X: refused, X's endpoint unchanged.
    let x_endpoint = endpoint_of(&dev, &x);
    let as_y = client(&ca_pem, Some((&ycert, &ykey)));
    let xid = u32::from_str_radix(&x, 16).unwrap();
    let r = as_y
        .post(format!("{agents_api}/internal/v1/hosts"))
        .json(&json!({"host_id": xid, "region": "dev", "endpoint": "https://127.0.0.1:1", "running": []}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "{}", r.text().unwrap());
    // Without a certificate: 401.
    let r = client(&ca_pem, None)
        .post(format!("{agents_api}/internal/v1/hosts"))
        .json(&json!({"host_id": xid, "region": "dev", "endpoint": "https://127.0.0.1:1", "running": []}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(endpoint_of(&dev, &x), x_endpoint);
    assert_eq!(dev.get_machine(&m)["state"], "started");
    // Y watches as itself, not as X.
    let watch = |h: &str| get_status(&as_y, &format!("{agents_api}/internal/v1/hosts/{h}/watch"));
    assert_eq!(watch(&y), Some(200));
    assert_eq!(watch(&x), Some(403));
    // A report takes a host's certificate.
    let report = json!({"machine_id": m["id"], "instance_id": m["instance_id"], "kind": "exit",
        "state": "stopped", "exit": null, "detail": {}, "report_id": "forged"});
    let r = client(&ca_pem, None)
        .post(format!("{agents_api}/internal/v1/reports"))
        .json(&report)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(dev.get_machine(&m)["state"], "started");

    // Joins: a join token is needed; each join gets a new host ID; the CA names the host.
    let join_token = read(dev.state.join("join.token"));
    let join = |token: Option<&str>| {
        let (_, csr) = ferry_pki::host_csr().unwrap();
        let mut b = client(&ca_pem, None)
            .post(format!("{agents_api}/internal/v1/join"))
            .json(&json!({"region": "dev", "csr": csr, "addresses": ["127.0.0.1"]}));
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        let r = b.send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let hosts_before = dev.hosts();
    assert_eq!(join(None).0, 401);
    assert_eq!(join(Some("tok_0000000000000000.nope")).0, 401);
    assert_eq!(dev.hosts(), hosts_before, "a refused join made a host");
    let (s1, j1) = join(Some(&join_token));
    let (s2, j2) = join(Some(&join_token));
    assert_eq!((s1, s2), (200, 200), "{j1} {j2}");
    let (h1, h2) = (
        j1["host_id"].as_str().unwrap(),
        j2["host_id"].as_str().unwrap(),
    );
    assert_ne!(h1, h2);
    assert!(
        !hosts_before.iter().any(|h| h == h1 || h == h2),
        "{hosts_before:?}"
    );
    let der = ferry_pki::first_cert_der(j1["certificate"].as_str().unwrap()).unwrap();
    assert_eq!(
        ferry_pki::host_of(&der),
        Some(u32::from_str_radix(h1, 16).unwrap())
    );
    assert_eq!(j1["ca"].as_str().unwrap().trim(), ca_pem);

    // A restarted agent keeps its host ID and certificate, and registers again.
    let pem_before = read(host_dir(&dev, &x).join("identity/host.pem"));
    let pid = support::agent_pid(&dev, &x).expect("host X's agent");
    let old_addr = read(host_dir(&dev, &x).join("agent.addr"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // ferry dev starts it again; it serves on a new port and registers that.
    assert!(
        support::eventually(Duration::from_secs(30), || {
            let addr =
                std::fs::read_to_string(host_dir(&dev, &x).join("agent.addr")).unwrap_or_default();
            addr != old_addr && endpoint_of(&dev, &x) == addr.trim()
        }),
        "the restarted agent did not register its new endpoint"
    );
    assert_eq!(
        read(host_dir(&dev, &x).join("identity/host.pem")),
        pem_before
    );
    assert!(support::agent_pid(&dev, &x).is_some_and(|p| p != pid));
    assert_eq!(dev.hosts(), {
        let mut h = hosts_before.clone();
        h.extend([h1.to_owned(), h2.to_owned()]);
        h.sort();
        h
    });
    // And the server still reaches it.
    let out = dev.exec(&m, &["echo", "again"]);
    assert_eq!(out["stdout"].as_str().unwrap().trim(), "again", "{out}");
}
