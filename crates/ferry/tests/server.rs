//! `ferry server` alone (no `ferry dev` around it) runs the whole control plane: the API and
//! `.internal` DNS from its store, so a fleet whose hosts run `ferry agent` has names.

use ferry_store::{Machine, MachineState, SqliteStore, Store};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

#[test]
fn ferry_server_alone_serves_the_api_and_dns_from_its_store() {
    let state = tempfile::tempdir().unwrap();
    // A store with one started machine, as agents would have left it.
    let ip = seed_machine(
        &SqliteStore::open(state.path().join("ferry.db")).unwrap(),
        "web",
        "0123456789abcd",
    );

    // No --store: the default, SQLite in the state directory.
    let dns = free_port();
    let (_server, api) = start_server(None, state.path(), Some(dns));
    let machines: serde_json::Value = authed_client(&admin_token(state.path()))
        .get(format!("{api}/v1/apps/web/machines"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(machines[0]["id"], "0123456789abcd", "{machines}");

    assert_eq!(dig(dns, "0123456789abcd.vm.web.internal"), ip.to_string());
}

/// A client that sends `token` as its bearer token.
fn authed_client(token: &str) -> reqwest::blocking::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(h)
        .build()
        .unwrap()
}

/// The admin token `ferry server` wrote to its state directory.
fn admin_token(state: &std::path::Path) -> String {
    std::fs::read_to_string(state.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// `ferry server` on `store` (None: its default) with its state in `state`, once it answers.
fn start_server(
    store: Option<&str>,
    state: &std::path::Path,
    dns: Option<u16>,
) -> (Server, String) {
    let api = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("server")
        .args(store.map(|s| format!("--store={s}")))
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--agent-listen", "127.0.0.1:0"])
        .args(dns.map(|d| format!("--dns-listen=127.0.0.1:{d}")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{api}");
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/v1/hosts")).send().is_err() {
        assert!(
            Instant::now() < deadline,
            "ferry server on {store:?} did not answer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Server(child), url)
}

/// A started machine in the store, as agents would have left it; its address.
fn seed_machine(store: &dyn Store, app: &str, id: &str) -> ferry_addr::FleetAddr {
    let app = store.create_app(app, "acme").unwrap();
    let host = store.register_host("ord", "").unwrap();
    let field = store.allocate_machine_field(host.id).unwrap();
    let ip = ferry_addr::FleetAddr::new(app.network_id, host.id, field, 2);
    let m = store
        .create_machine(&Machine {
            id: id.into(),
            name: format!("{}-1", app.name),
            app: app.name.clone(),
            org: app.org.clone(),
            network_id: app.network_id,
            host: Some(host.id),
            region: "ord".into(),
            machine_field: Some(field),
            private_ip: Some(ip.to_string()),
            instance_id: ferry_store::new_instance_id(),
            state: MachineState::Created,
            config: serde_json::json!({"init": {"cmd": ["sleep", "inf"]}}),
            created_at_ms: 0,
            updated_at_ms: 0,
        })
        .unwrap();
    store
        .transition(&m.id, &[MachineState::Created], MachineState::Started)
        .unwrap();
    ip
}

fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+short",
            "+time=2",
            "+tries=3",
        ])
        .args(["AAAA", name])
        .output()
        .expect("dig (scripts/setup.sh installs dnsutils)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Two servers on one 3-member etcd cluster serve one fleet: what one records the other
/// answers. One member down: everything goes on. Every member down: the API answers 503 with a
/// clear error and changes nothing, and DNS keeps answering; etcd back: service resumes with no
/// manual step.
#[test]
fn two_servers_share_one_etcd_fleet_and_ride_out_its_failures() {
    let mut etcd = ferry_store::testing::EtcdCluster::start(3).unwrap();
    let url = etcd.url("ferry-server-test");
    let ip = seed_machine(
        ferry_store::open(&url).unwrap().as_ref(),
        "seed",
        "00aa11bb22cc33",
    );
    let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dns = free_port();
    let (_a, a) = start_server(Some(&url), sa.path(), Some(dns));
    let (_b, b) = start_server(Some(&url), sb.path(), None);
    let name = "00aa11bb22cc33.vm.seed.internal";
    assert_eq!(dig(dns, name), ip.to_string());
    // Both servers share one store: an admin token either one made works on both.
    let http = authed_client(&admin_token(sa.path()));
    let create = |api: &str, name: &str| {
        let r = http
            .post(format!("{api}/v1/apps"))
            .json(&serde_json::json!({"app_name": name}))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().unwrap())
    };
    let names = |api: &str| -> Vec<String> {
        let v: serde_json::Value = http
            .get(format!("{api}/v1/apps"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect()
    };

    assert_eq!(create(&a, "web").0, 201);
    assert_eq!(
        names(&b),
        ["seed", "web"],
        "server B sees what server A recorded"
    );
    // The name is the fleet's: B refuses it too.
    assert_eq!(create(&b, "web").0, 409);

    etcd.kill(1);
    assert_eq!(create(&b, "db").0, 201, "one member down: B goes on");
    assert_eq!(names(&a), ["db", "seed", "web"]);

    etcd.kill(0);
    etcd.kill(2);
    let (s, e) = create(&a, "cache");
    assert_eq!((s, e["code"].as_str()), (503, Some("unavailable")), "{e}");
    let r = http.get(format!("{b}/v1/apps")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(dig(dns, name), ip.to_string(), "DNS answers with etcd down");

    etcd.restart_all().unwrap();
    // Back without a manual step (bounded: the clients reconnect on their own).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{a}/v1/apps")).send() {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "service did not resume after etcd came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        names(&b),
        ["db", "seed", "web"],
        "the refused create changed nothing"
    );
    assert_eq!(create(&b, "cache").0, 201);
}
