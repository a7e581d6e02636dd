//! Placement and the migration driver against a recording double of the agents and a manual
//! clock: no kernel, no processes. The double keeps what a fleet of agents would (which host
//! runs which machine) and records every call, so the tests check the invariants directly:
//! never two running copies, a failed start leaves the machine where it was, a move counts only
//! after `min_healthy_time` on the store's clock.
//!
//! The API is the real router over a real (in-memory SQLite) store, called over HTTP.

use ferry_api::server::router;
use ferry_core::testing::Double;
use ferry_core::Core;
use ferry_store::{ManualClock, SqliteStore, Store};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Notices go out over HTTP as in production (a test that wants them runs a receiver).
fn webhooks() -> Arc<dyn ferry_core::agents::Webhooks> {
    Arc::new(ferry_api::agents::HttpWebhooks::new(reqwest::Client::new()))
}

/// An HTTP client that sends a fresh admin token of `ctx`'s store with every request.
fn authed(ctx: &ferry_core::Core) -> reqwest::Client {
    let token = ferry_core::testing::admin_token(ctx);
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

struct Harness {
    api: String,
    http: reqwest::Client,
    agents: Arc<Double>,
    clock: Arc<ManualClock>,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(hosts: usize) -> Harness {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = Arc::new(SqliteStore::in_memory_with_clock(clock.clone()).unwrap());
        for i in 0..hosts {
            store
                .register_host("ord", &format!("agent://h{i}"))
                .unwrap();
        }
        let agents = Arc::new(Double::default());
        let dir = tempfile::tempdir().unwrap();
        let ctx = Core::new(store.clone(), dir.path().into(), agents.clone(), webhooks());
        let http = authed(&ctx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(ctx)).await });
        Harness {
            api,
            http,
            agents,
            clock,
            store,
            _dir: dir,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.api);
        let req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url).json(&body),
            _ => unreachable!(),
        };
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn machine(&self, app: &str) -> Value {
        let (s, m) = self
            .call(
                "POST",
                &format!("/v1/apps/{app}/machines"),
                json!({"config": {"init": {"cmd": ["sleep", "inf"]}}}),
            )
            .await;
        assert_eq!(s, 200, "{m}");
        m
    }

    /// Starts a migration of `id` (202 expected); its ID.
    async fn migrate(&self, app: &str, id: &str) -> String {
        let (s, mig) = self
            .call(
                "POST",
                &format!("/v1/apps/{app}/machines/{id}/migrate"),
                json!({}),
            )
            .await;
        assert_eq!(s, 202, "{mig}");
        mig["id"].as_str().unwrap().to_owned()
    }

    /// Polls the migration until it ends, advancing the manual clock 1 s per poll (the driver
    /// measures health on the store's clock); bounded.
    async fn finish(&self, id: &str) -> Value {
        for _ in 0..400 {
            let (_, m) = self
                .call("GET", &format!("/v1/migrations/{id}"), json!(null))
                .await;
            if ["done", "rolled_back", "failed"].contains(&m["phase"].as_str().unwrap_or("")) {
                return m;
            }
            self.clock.advance(1000);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("migration {id} did not end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_machines_go_to_the_least_loaded_host() {
    let h = Harness::new(2).await;
    h.call("POST", "/v1/apps", json!({"app_name": "web"})).await;
    for _ in 0..4 {
        h.machine("web").await;
    }
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for ep in h.agents.running().values() {
        *per_host.entry(ep.clone()).or_default() += 1;
    }
    assert_eq!(
        per_host.values().copied().collect::<Vec<_>>(),
        vec![2, 2],
        "{per_host:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_agent_refuses_leaves_the_machine_failed_with_the_reason() {
    let h = Harness::new(1).await;
    h.agents.fail_starts_on("agent://h0");
    h.call("POST", "/v1/apps", json!({"app_name": "web"})).await;
    let (s, e) = h
        .call(
            "POST",
            "/v1/apps/web/machines",
            json!({"config": {"init": {"cmd": ["true"]}}}),
        )
        .await;
    assert_eq!((s, e["code"].as_str()), (502, Some("agent_error")), "{e}");
    let m = &h.store.list_machines(Some("web")).unwrap()[0];
    assert_eq!(m.state.as_str(), "failed");
    let events = h.store.events(&m.id).unwrap();
    assert!(
        events.iter().any(|e| e.request["error"]
            .as_str()
            .unwrap_or("")
            .contains("cannot start")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_moves_the_machine_and_counts_once_it_stayed_up() {
    let h = Harness::new(2).await;
    h.call("POST", "/v1/apps", json!({"app_name": "web"})).await;
    let m = h.machine("web").await;
    let id = m["id"].as_str().unwrap();
    let from = h.agents.running()[id].clone();
    let mig = h.finish(&h.migrate("web", id).await).await;
    assert_eq!(mig["phase"], "done", "{mig}");
    let to = h.agents.running()[id].clone();
    assert_ne!(from, to);
    assert!(h.agents.violations().is_empty());
    // The source stopped and fenced the machine (the switch) before the destination started,
    // and forgot it (namespace, cgroup) only once the destination ran it.
    let calls = h.agents.calls();
    let pos = |c: &str| {
        calls
            .iter()
            .position(|x| x == c)
            .unwrap_or_else(|| panic!("{c} in {calls:?}"))
    };
    assert!(pos(&format!("stop {id} {from}")) < pos(&format!("fence {id} {from}")));
    assert!(pos(&format!("fence {id} {from}")) < pos(&format!("start {id} {to}")));
    assert!(pos(&format!("start {id} {to}")) < pos(&format!("destroy {id} {from}")));
    // The destination built the machine's namespace while it still ran on its source.
    assert!(pos(&format!("prepare {id} {to}")) < pos(&format!("stop {id} {from}")));
    // Same ID, new address and instance.
    let (_, now) = h
        .call("GET", &format!("/v1/apps/web/machines/{id}"), json!(null))
        .await;
    assert_ne!(now["private_ip"], m["private_ip"]);
    assert_ne!(now["instance_id"], m["instance_id"]);
    assert_eq!(now["state"], "started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_cannot_start_the_machine_rolls_it_back_to_its_source() {
    let h = Harness::new(2).await;
    h.call("POST", "/v1/apps", json!({"app_name": "web"})).await;
    let m = h.machine("web").await;
    let id = m["id"].as_str().unwrap();
    let from = h.agents.running()[id].clone();
    let other = if from == "agent://h0" {
        "agent://h1"
    } else {
        "agent://h0"
    };
    h.agents.fail_starts_on(other);
    let mig = h.finish(&h.migrate("web", id).await).await;
    assert_eq!(mig["phase"], "rolled_back", "{mig}");
    assert_eq!(
        h.agents.running().get(id),
        Some(&from),
        "runs on its source again"
    );
    assert!(h.agents.violations().is_empty());
    let (_, now) = h
        .call("GET", &format!("/v1/apps/web/machines/{id}"), json!(null))
        .await;
    assert_eq!(
        now["private_ip"], m["private_ip"],
        "the old address is current again"
    );
    assert_eq!(now["state"], "started");
}

/// The scenario end to end through the API: 50 migrations across 10 networks at once,
/// with bridge map calls in the same networks alongside; afterwards no migration record, no
/// active-migration index entry, no instance and no mapping is missing or left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_migrations_in_ten_networks_lose_nothing() {
    let h = Arc::new(Harness::new(2).await);
    let mut machines = Vec::new(); // (app, id, private_ip)
    for n in 0..10 {
        let app = format!("app{n}");
        let (s, a) = h
            .call(
                "POST",
                "/v1/apps",
                json!({"app_name": app, "org_slug": format!("org{n}")}),
            )
            .await;
        assert_eq!(s, 201, "{a}");
        let (s, p) = h
            .call(
                "POST",
                &format!("/v1/apps/{app}/policy"),
                json!({"min_healthy_time": "1s", "healthy_deadline": "10m", "max_unavailable": 5}),
            )
            .await;
        assert_eq!(s, 200, "{p}");
        for _ in 0..5 {
            let m = h.machine(&app).await;
            let ip = m["private_ip"].as_str().unwrap().to_owned();
            machines.push((app.clone(), m["id"].as_str().unwrap().to_owned(), ip));
        }
    }
    let before = h.agents.running();

    // Every migration and every map call at once.
    let mut tasks = Vec::new();
    for (app, id, _) in &machines {
        let (h, app, id) = (h.clone(), app.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            format!("mig {}", h.migrate(&app, &id).await)
        }));
    }
    let mut manual = Vec::new(); // (old, new) of the map calls
    for (k, (_, _, ip)) in machines.iter().enumerate() {
        // Addresses in the machine's network on hosts that do not exist: old -> new.
        let net: ferry_addr::FleetAddr = ip.parse().unwrap();
        let fake = |host: u32| {
            ferry_addr::FleetAddr::new(
                net.network(),
                ferry_addr::HostId::new(host).unwrap(),
                ferry_addr::MachineField(1000 + k as u32),
                2,
            )
            .to_string()
        };
        let (old, new) = (fake(0x8000_0100), fake(0x8000_0101));
        manual.push((old.clone(), new.clone()));
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let (s, m) = h
                .call("POST", "/v1/bridge", json!({"old": old, "new": new}))
                .await;
            assert_eq!(s, 201, "{m}");
            "map".to_string()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if let Some(id) = r.strip_prefix("mig ") {
            ids.push(id.to_owned());
        }
    }
    assert_eq!(ids.len(), 50);

    // Let them run: the manual clock moves 250 ms per round (health is measured on it).
    let mut done = false;
    for _ in 0..2400 {
        let all = h
            .store
            .list_migrations(ferry_store::MigrationFilter::All)
            .unwrap();
        if all.len() == 50 && all.iter().all(|m| m.finished) {
            done = true;
            break;
        }
        h.clock.advance(250);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(done, "the 50 migrations did not all finish");

    let all = h
        .store
        .list_migrations(ferry_store::MigrationFilter::All)
        .unwrap();
    let recorded: BTreeSet<String> = all.iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        recorded,
        ids.iter().cloned().collect(),
        "every migration is recorded once"
    );
    assert!(
        all.iter().all(|m| m.phase == "done"),
        "{:?}",
        all.iter().map(|m| &m.phase).collect::<Vec<_>>()
    );
    let mappings = h.store.list_bridge_mappings(None).unwrap();
    for (app, id, old_ip) in &machines {
        assert!(
            h.store.active_migration(id).unwrap().is_none(),
            "{id} still has an active migration"
        );
        assert_eq!(
            h.store
                .list_migrations(ferry_store::MigrationFilter::Machine(id))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            h.store.list_instances(id).unwrap().len(),
            1,
            "{id}'s instance history"
        );
        assert_ne!(h.agents.running().get(id), before.get(id), "{id} moved");
        let (_, now) = h
            .call("GET", &format!("/v1/apps/{app}/machines/{id}"), json!(null))
            .await;
        let new_ip = now["private_ip"].as_str().unwrap();
        assert!(
            mappings.iter().any(|m| &m.old == old_ip && m.new == new_ip),
            "the bridge mapping of {id}'s move"
        );
    }
    for (old, new) in &manual {
        assert!(
            mappings.iter().any(|m| &m.old == old && &m.new == new),
            "map {old} -> {new}"
        );
    }
    assert_eq!(mappings.len(), 100, "nothing lost, nothing extra");
    assert!(h.agents.violations().is_empty());
}

/// Two servers on one store: the one driving a migration dies (its runtime, with every task of
/// it, is gone); the other takes the migration over once the dead one's claim expires and
/// finishes it from the recorded phase, with never two running copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_server_takes_over_a_migration_whose_server_died() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let store = Arc::new(SqliteStore::in_memory_with_clock(clock.clone()).unwrap());
    for i in 0..2 {
        store
            .register_host("ord", &format!("agent://h{i}"))
            .unwrap();
    }
    let agents = Arc::new(Double::default());
    let dir = tempfile::tempdir().unwrap();

    // Server A, on a runtime of its own: shutting that runtime down is A dying.
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ctx_a = Core::new(store.clone(), dir.path().into(), agents.clone(), webhooks());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let a = format!("http://{}", listener.local_addr().unwrap());
    let app_a = router(ctx_a.clone());
    rt_a.spawn(async move {
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(l, app_a).await
    });

    let http = authed(&ctx_a);
    let post = |url: String, body: Value| {
        let http = http.clone();
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    post(format!("{a}/v1/apps"), json!({"app_name": "web"})).await;
    // Healthy for half an hour of the store's clock: the migration waits at `started` until the test
    // moves the clock, so A dies in the middle of it.
    let (s, p) = post(
        format!("{a}/v1/apps/web/policy"),
        json!({"min_healthy_time": "30m", "healthy_deadline": "1h"}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    let (_, m) = post(
        format!("{a}/v1/apps/web/machines"),
        json!({"config": {"init": {"cmd": ["sleep", "inf"]}}}),
    )
    .await;
    let id = m["id"].as_str().unwrap().to_owned();
    let from = agents.running()[&id].clone();
    let (s, mig) = post(format!("{a}/v1/apps/web/machines/{id}/migrate"), json!({})).await;
    assert_eq!(s, 202, "{mig}");
    let mig_id = mig["id"].as_str().unwrap().to_owned();
    let phase = || store.get_migration(&mig_id).unwrap().phase;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while phase() != "started" {
        assert!(
            std::time::Instant::now() < deadline,
            "A never got to started: {}",
            phase()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let claim = format!("migration-driver/{mig_id}");
    let holder = || store.current_lock(&claim).unwrap().map(|l| l.owner);
    assert_eq!(holder(), Some(ctx_a.server_id.clone()));
    // A dies.
    tokio::task::spawn_blocking(move || rt_a.shutdown_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    drop(ctx_a);

    // Server B starts (resuming and scanning for migrations nobody drives).
    let ctx_b = Core::new(store.clone(), dir.path().into(), agents.clone(), webhooks());
    ferry_core::migrate::resume_unfinished(&ctx_b);
    // A's claim holds until its TTL runs out on the store's clock; B must not drive it before.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(phase(), "started");
    assert_ne!(
        holder(),
        Some(ctx_b.server_id.clone()),
        "B took a claim that had not expired"
    );
    clock.advance(ferry_core::migrate::CLAIM_TTL_MS as i64 + 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while holder() != Some(ctx_b.server_id.clone()) {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not take the migration over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B carries on from `started`: done once the machine has been healthy for half an hour of
    // the store's clock (a minute per round here).
    while phase() != "done" {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not finish it: {:?}",
            store.get_migration(&mig_id).unwrap()
        );
        clock.advance(60_000);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let to = agents.running()[&id].clone();
    assert_ne!(from, to);
    assert!(agents.violations().is_empty());
    assert!(store.active_migration(&id).unwrap().is_none());
}
