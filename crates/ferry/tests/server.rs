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
    let ip = {
        let store = SqliteStore::open(state.path().join("ferry.db")).unwrap();
        let app = store.create_app("web", "acme").unwrap();
        let host = store.register_host("ord", "").unwrap();
        let field = store.allocate_machine_field(host.id).unwrap();
        let ip = ferry_addr::FleetAddr::new(app.network_id, host.id, field, 2);
        let m = store
            .create_machine(&Machine {
                id: "0123456789abcd".into(),
                name: "web-1".into(),
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
    };

    let (api, dns) = (free_port(), free_port());
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["server", "--state-dir"])
            .arg(state.path())
            .args(["--listen", &format!("127.0.0.1:{api}")])
            .args(["--dns-listen", &format!("127.0.0.1:{dns}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let machines = loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{api}/v1/apps/web/machines"))
            .send()
        {
            break r.json::<serde_json::Value>().unwrap();
        }
        assert!(Instant::now() < deadline, "ferry server did not answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(machines[0]["id"], "0123456789abcd", "{machines}");

    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns.to_string(),
            "+short",
            "+time=2",
            "+tries=3",
        ])
        .args(["AAAA", "0123456789abcd.vm.web.internal"])
        .output()
        .expect("dig (scripts/setup.sh installs dnsutils)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ip.to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
