//! The core called directly, with no HTTP anywhere: a real (in-memory SQLite) store, the
//! recording double of the agents ([`ferry_core::testing::Double`]) and a manual clock.
//! Placement, the errors' kinds and codes, and what a refused start leaves behind.

use ferry_core::agents::Webhooks;
use ferry_core::testing::Double;
use ferry_core::views::{CreateApp, CreateMachine};
use ferry_core::{hosts, machines, Core, Kind};
use ferry_store::{Host, MachineState, ManualClock, SqliteStore, Store};
use futures::future::BoxFuture;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Webhooks that only record what would have been sent.
#[derive(Default)]
struct Posted(Mutex<Vec<String>>);

impl Webhooks for Posted {
    fn post<'a>(
        &'a self,
        url: &'a str,
        _: &'a [(&'static str, String)],
        body: String,
    ) -> BoxFuture<'a, serde_json::Value> {
        self.0.lock().unwrap().push(format!("{url} {body}"));
        Box::pin(async move { json!({"url": url, "status": 200}) })
    }
}

struct Fleet {
    core: Arc<Core>,
    agents: Arc<Double>,
    store: Arc<SqliteStore>,
    /// Host ID (hex) -> its agent's endpoint.
    hosts: BTreeMap<String, String>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn new(hosts: u32) -> Fleet {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = Arc::new(SqliteStore::in_memory_with_clock(clock).unwrap());
        let agents = Arc::new(Double::default());
        let dir = tempfile::tempdir().unwrap();
        let core = Core::new(
            store.clone(),
            dir.path().into(),
            agents.clone(),
            Arc::new(Posted::default()),
        );
        let mut map = BTreeMap::new();
        for i in 0..hosts {
            let id = ferry_addr::HostId::new(0x8000_0000 + i).unwrap();
            let endpoint = format!("agent://h{i}");
            store
                .put_host(&Host {
                    id,
                    region: "dev".into(),
                    endpoint: endpoint.clone(),
                    cordoned: false,
                    created_at_ms: 0,
                    underlay: String::new(),
                })
                .unwrap();
            map.insert(hosts::host_hex(id), endpoint);
        }
        machines::create_app(
            &core,
            &ferry_core::auth::Caller::admin("test"),
            CreateApp {
                app_name: "web".into(),
                org_slug: None,
            },
        )
        .unwrap();
        Fleet {
            core,
            agents,
            store,
            hosts: map,
            _dir: dir,
        }
    }

    fn request(host: Option<&str>) -> CreateMachine {
        serde_json::from_value(json!({
            "config": {"init": {"cmd": ["sleep", "inf"]}},
            "host": host,
        }))
        .unwrap()
    }

    async fn create(
        &self,
        host: Option<&str>,
    ) -> ferry_core::Result<ferry_core::views::MachineView> {
        machines::create_machine(&self.core, "web", Self::request(host)).await
    }
}

#[tokio::test]
async fn placement_fills_the_least_loaded_uncordoned_host() {
    let f = Fleet::new(3);
    let cordoned = f.hosts.keys().next().unwrap().clone();
    hosts::set_cordoned(&f.core, &cordoned, true).unwrap();
    for _ in 0..6 {
        let m = f.create(None).await.unwrap();
        assert_eq!(m.state, "started");
    }
    // Three per open host, none on the cordoned one; the agents ran exactly those.
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for ep in f.agents.running().values() {
        *per_host.entry(ep.clone()).or_default() += 1;
    }
    assert!(!per_host.contains_key(&f.hosts[&cordoned]), "{per_host:?}");
    assert_eq!(per_host.values().copied().collect::<Vec<_>>(), vec![3, 3]);
    // Asking for the cordoned host is a conflict with its own code, and creates nothing.
    let before = f.store.list_machines(None).unwrap().len();
    let e = f.create(Some(&cordoned)).await.unwrap_err();
    assert_eq!((e.kind, e.code), (Kind::Conflict, "host_cordoned"));
    assert_eq!(f.store.list_machines(None).unwrap().len(), before);
    // A host that does not exist is not found; a malformed one is invalid.
    let e = f.create(Some("8000ffff")).await.unwrap_err();
    assert_eq!(e.kind, Kind::NotFound);
    let e = f.create(Some("not-a-host")).await.unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    assert_eq!(f.store.list_machines(None).unwrap().len(), before);
}

#[tokio::test]
async fn no_open_host_is_unavailable() {
    let f = Fleet::new(1);
    let only = f.hosts.keys().next().unwrap().clone();
    hosts::set_cordoned(&f.core, &only, true).unwrap();
    let e = f.create(None).await.unwrap_err();
    assert_eq!(e.kind, Kind::Unavailable);
    assert!(f.store.list_machines(None).unwrap().is_empty());
    assert!(f.agents.calls().is_empty());
}

#[tokio::test]
async fn a_refused_start_keeps_the_agents_code_and_leaves_the_machine_failed() {
    let f = Fleet::new(1);
    let (host, ep) = f.hosts.iter().next().unwrap();
    f.agents.fail_starts_on(ep);
    let e = f.create(Some(host)).await.unwrap_err();
    assert_eq!((e.kind, e.code), (Kind::Agent, "agent_error"));
    assert_eq!(e.agent_code.as_deref(), Some("internal"));
    assert!(
        e.kind.is_transient(),
        "an agent's failure may pass: retried"
    );
    let ms = f.store.list_machines(None).unwrap();
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].state, MachineState::Failed);
    let events = f.store.events(&ms[0].id).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.status == "failed" && e.request["error"].as_str().is_some()),
        "{events:?}"
    );
    assert!(f.agents.running().is_empty());
}

#[tokio::test]
async fn an_exit_reported_before_the_start_is_answered_is_kept() {
    let f = Fleet::new(1);
    let (host, _) = f.hosts.iter().next().unwrap();
    let release = f.agents.hold_next_start();
    let core = f.core.clone();
    let host = host.clone();
    let create = tokio::spawn(async move {
        machines::create_machine(&core, "web", Fleet::request(Some(&host))).await
    });
    // The machine runs and exits while the server waits for the agent's answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let ms = f.store.list_machines(None).unwrap();
        if let Some(m) = ms.into_iter().find(|m| m.state == MachineState::Starting) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the machine never became starting"
        );
        tokio::task::yield_now().await;
    };
    let report = ferry_core::proto::AgentReport {
        machine_id: m.id.clone(),
        instance_id: m.instance_id.clone(),
        kind: "exit".into(),
        state: "stopped".into(),
        exit: Some(ferry_core::proto::ExitInfo {
            exit_code: Some(3),
            ..Default::default()
        }),
        detail: json!(null),
        report_id: "r1".into(),
    };
    machines::agent_report(&f.core, report).unwrap();
    release.send(()).unwrap();
    let view = create.await.unwrap().unwrap();
    assert_eq!(view.state, "stopped", "the create answers what is true");
    let now = f.store.get_machine(&m.id).unwrap();
    assert_eq!(
        now.state,
        MachineState::Stopped,
        "not started with nothing running"
    );
    let events = f.store.events(&m.id).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.r#type == "exit" && e.request["exit_event"]["exit_code"] == 3),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_wait_that_runs_out_is_a_timeout_and_bad_input_changes_nothing() {
    let f = Fleet::new(1);
    let m = f.create(None).await.unwrap();
    let e = machines::wait_machine(&f.core, "web", &m.id, Some("stopped"), Some(0))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (Kind::Timeout, "timeout"));
    let e = machines::wait_machine(&f.core, "web", &m.id, Some("asleep"), Some(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    // Another app's name for the machine is "not found", as a machine that does not exist.
    let e = machines::get_machine(&f.core, "other", &m.id).unwrap_err();
    assert_eq!(e.kind, Kind::NotFound);
    let calls = f.agents.calls().len();
    let e = machines::stop_machine(
        &f.core,
        "web",
        &m.id,
        None,
        serde_json::from_value(json!({"signal": "SIGNOPE"})).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    assert_eq!(f.agents.calls().len(), calls, "no agent was called");
    assert_eq!(
        f.store.get_machine(&m.id).unwrap().state,
        MachineState::Started
    );
}

#[tokio::test]
async fn signal_restart_update_and_metadata_follow_the_rules() {
    use ferry_core::views::{SignalRequest, StopRequest, UpdateMachine};
    let f = Fleet::new(1);
    let m = f.create(None).await.unwrap();
    let id = m.id.clone();
    let ep = f.hosts.values().next().unwrap().clone();

    // signal: validated first, only to a started machine, and the agent is asked.
    let sig = |s: &str| SignalRequest { signal: s.into() };
    let e = machines::signal_machine(&f.core, "web", &id, None, sig("SIGHUPX"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    machines::signal_machine(&f.core, "web", &id, None, sig("usr1"))
        .await
        .unwrap();
    assert!(f
        .agents
        .calls()
        .contains(&format!("signal {id} {ep} SIGUSR1")));

    // restart: stop, then start, same instance.
    let before = f.agents.calls().len();
    let r = machines::restart_machine(&f.core, "web", &id, None, StopRequest::default())
        .await
        .unwrap();
    assert_eq!(
        (r.state.as_str(), &r.instance_id),
        ("started", &m.instance_id)
    );
    let calls = f.agents.calls()[before..].to_vec();
    assert_eq!(
        calls,
        vec![format!("stop {id} {ep}"), format!("start {id} {ep}")]
    );

    // update: a new instance with the new config, started again; under a lease someone
    // else holds it is refused and nothing changes.
    let mut config: ferry_core::config::MachineConfig =
        serde_json::from_value(f.store.get_machine(&id).unwrap().config).unwrap();
    config.env.insert("LOG".into(), "debug".into());
    let held = f.store.acquire_lease(&id, 60_000, "other", "").unwrap();
    let req = UpdateMachine {
        config: config.clone(),
        skip_launch: false,
    };
    let e = machines::update_machine(&f.core, "web", &id, None, req.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code, "lease_held");
    assert_eq!(f.store.get_machine(&id).unwrap().instance_id, m.instance_id);
    let u = machines::update_machine(&f.core, "web", &id, Some(&held.nonce), req.clone())
        .await
        .unwrap();
    f.store.release_lease(&id, &held.nonce).unwrap();
    assert_eq!(u.state, "started");
    assert_ne!(u.instance_id, m.instance_id);
    assert_eq!(u.config["env"]["LOG"], "debug");
    // Mounts cannot change; an invalid config changes nothing.
    let mut bad = config.clone();
    bad.mounts.push(
        serde_json::from_value(json!({"volume": "vol_0000000000000000", "path": "/d"})).unwrap(),
    );
    let e = machines::update_machine(
        &f.core,
        "web",
        &id,
        None,
        UpdateMachine {
            config: bad,
            skip_launch: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    let mut bad = config.clone();
    bad.init.cmd.clear();
    let e = machines::update_machine(
        &f.core,
        "web",
        &id,
        None,
        UpdateMachine {
            config: bad,
            skip_launch: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    assert_eq!(f.store.get_machine(&id).unwrap().instance_id, u.instance_id);
    // skip_launch leaves it stopped with the new config.
    let s = machines::update_machine(
        &f.core,
        "web",
        &id,
        None,
        UpdateMachine {
            config,
            skip_launch: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(s.state, "stopped");
    // A stopped machine takes no signal.
    let e = machines::signal_machine(&f.core, "web", &id, None, sig("TERM"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "machine_not_started");

    // metadata: set, list, remove; bad keys and missing keys refused.
    let md = machines::set_metadata(
        &f.core,
        "web",
        &id,
        None,
        "process_group",
        Some("worker".into()),
    )
    .unwrap();
    assert_eq!(md.get("process_group").map(String::as_str), Some("worker"));
    assert_eq!(machines::get_metadata(&f.core, "web", &id).unwrap(), md);
    let e =
        machines::set_metadata(&f.core, "web", &id, None, "bad key", Some("x".into())).unwrap_err();
    assert_eq!(e.kind, Kind::Invalid);
    let e = machines::set_metadata(&f.core, "web", &id, None, "nope", None).unwrap_err();
    assert_eq!(e.kind, Kind::NotFound);
    let md = machines::set_metadata(&f.core, "web", &id, None, "process_group", None).unwrap();
    assert!(md.is_empty());
    assert_eq!(f.store.get_machine(&id).unwrap().instance_id, s.instance_id);
}

#[tokio::test]
async fn a_drain_plan_names_destinations_and_who_holds_the_moving_addresses() {
    use ferry_core::migrate::preview;
    let f = Fleet::new(3);
    let hosts: Vec<String> = f.hosts.keys().cloned().collect();
    let a = f.create(Some(&hosts[0])).await.unwrap();
    let b = f.create(Some(&hosts[0])).await.unwrap();
    let ip_a = a.private_ip.clone().unwrap();
    // A machine of the same org whose env holds a's address (upper case, in a URL); one of
    // another org holding it too (it could never reach it: not reported).
    let holder: CreateMachine = serde_json::from_value(json!({
        "config": {"init": {"cmd": ["sleep", "inf"]},
                   "env": {"PEER": format!("http://[{}]:80/", ip_a.to_uppercase())}},
        "host": hosts[1],
    }))
    .unwrap();
    let holder = machines::create_machine(&f.core, "web", holder)
        .await
        .unwrap();
    machines::create_app(
        &f.core,
        &ferry_core::auth::Caller::admin("test"),
        CreateApp {
            app_name: "other".into(),
            org_slug: Some("acme".into()),
        },
    )
    .unwrap();
    let stranger: CreateMachine = serde_json::from_value(json!({
        "config": {"init": {"cmd": ["sleep", "inf"]}, "env": {"PEER": ip_a.clone()}},
        "host": hosts[1],
    }))
    .unwrap();
    machines::create_machine(&f.core, "other", stranger)
        .await
        .unwrap();
    // b is stopped: it moves too (stopped machines migrate), without a health gate.
    machines::stop_machine(
        &f.core,
        "web",
        &b.id,
        None,
        ferry_core::views::StopRequest::default(),
    )
    .await
    .unwrap();
    let calls = f.agents.calls().len();
    let before = f
        .store
        .list_migrations(ferry_store::MigrationFilter::All)
        .unwrap()
        .len();

    let plan = preview::drain_plan(&f.core, &hosts[0]).await.unwrap();
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    let pa = plan.moves.iter().find(|m| m.machine_id == a.id).unwrap();
    let pb = plan.moves.iter().find(|m| m.machine_id == b.id).unwrap();
    // Spread over the two other hosts (host 2 was empty, host 1 had two machines).
    assert_ne!(pa.to_host, hosts[0]);
    assert_eq!((pa.position_in_network, pb.position_in_network), (1, 2));
    assert!(
        pa.gates.iter().any(|g| g.starts_with("healthy for")),
        "{pa:?}"
    );
    assert!(
        !pb.gates.iter().any(|g| g.starts_with("healthy for")),
        "{pb:?}"
    );
    assert_eq!(pa.impact.len(), 1, "{:?}", pa.impact);
    assert_eq!(pa.impact[0].machine_id, holder.id);
    assert_eq!(pa.impact[0].via, "config");
    assert!(pb.impact.is_empty());
    // Nothing changed: not cordoned, no migration, no agent asked.
    assert!(!f.store.list_hosts().unwrap()[0].cordoned);
    assert_eq!(
        f.store
            .list_migrations(ferry_store::MigrationFilter::All)
            .unwrap()
            .len(),
        before
    );
    assert_eq!(f.agents.calls().len(), calls);
    // One machine's plan, to a chosen host; bad destinations refused.
    let one = preview::migrate_plan(&f.core, "web", &a.id, Some(&hosts[2]))
        .await
        .unwrap();
    assert_eq!(one.moves[0].to_host, hosts[2]);
    let e = preview::migrate_plan(&f.core, "web", &a.id, Some(&hosts[0]))
        .await
        .unwrap_err();
    assert_eq!(e.code, "same_host");
}

/// The create path's reads come from memory while the store's change feed says they hold: a
/// host whose agent moved (written by someone else) is reached at its new endpoint, and an app
/// deleted meanwhile refuses the create without leaving a record.
#[tokio::test]
async fn cached_reads_follow_the_stores_changes() {
    let f = Fleet::new(1);
    let (hex, old_ep) = f
        .hosts
        .iter()
        .next()
        .map(|(h, e)| (h.clone(), e.clone()))
        .unwrap();
    f.create(None).await.unwrap(); // the cache now holds the host
    let mut h = f.store.list_hosts().unwrap().remove(0);
    h.endpoint = "agent://moved".into();
    f.store.put_host(&h).unwrap();
    let m = f.create(Some(&hex)).await.unwrap();
    assert!(
        f.agents
            .calls()
            .contains(&format!("start {} agent://moved", m.id)),
        "{:?}",
        f.agents.calls()
    );
    assert!(!f
        .agents
        .calls()
        .contains(&format!("start {} {old_ep}", m.id)));
    // Gone app: the store's create refuses it; nothing is left behind.
    machines::create_app(
        &f.core,
        &ferry_core::auth::Caller::admin("test"),
        CreateApp {
            app_name: "brief".into(),
            org_slug: None,
        },
    )
    .unwrap();
    let req = || Fleet::request(None);
    machines::create_machine(&f.core, "brief", req())
        .await
        .unwrap();
    let id = f.store.list_machines(Some("brief")).unwrap()[0].id.clone();
    machines::destroy_machine(&f.core, "brief", &id, true, None)
        .await
        .unwrap();
    machines::delete_app(&f.core, "brief").unwrap();
    let before = f.store.list_machines_all(None).unwrap().len();
    let e = machines::create_machine(&f.core, "brief", req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, Kind::NotFound, "{e}");
    assert_eq!(f.store.list_machines_all(None).unwrap().len(), before);
}

/// The dashboard's snapshot: an admin sees the whole fleet or the org it asks for; an org
/// token sees its own org whatever it asks, and only the hosts that run its machines, without
/// the fleet's routes. A join token sees nothing.
#[tokio::test]
async fn the_dashboard_shows_each_caller_its_own() {
    use ferry_core::auth::Caller;
    use ferry_core::dashboard::snapshot;
    let f = Fleet::new(3);
    let admin = Caller::admin("test");
    machines::create_app(
        &f.core,
        &admin,
        CreateApp {
            app_name: "acme-web".into(),
            org_slug: Some("acme".into()),
        },
    )
    .unwrap();
    let first = f.hosts.keys().next().unwrap().clone();
    let mine = machines::create_machine(&f.core, "acme-web", Fleet::request(Some(&first)))
        .await
        .unwrap();
    let theirs = f.create(None).await.unwrap();

    let all = snapshot(&f.core, &admin, None).await.unwrap();
    assert_eq!(all.machines.len(), 2);
    assert_eq!(all.hosts.len(), 3);
    assert!(
        all.hosts.iter().all(|h| h.routes.len() == 2),
        "one per other host"
    );

    let acme = Caller::org("t-acme", "acme");
    for asked in [None, Some("personal")] {
        let v = snapshot(&f.core, &acme, asked).await.unwrap();
        assert_eq!(v.org.as_deref(), Some("acme"));
        let ids: Vec<&str> = v.machines.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, [mine.id.as_str()]);
        assert!(v.apps.iter().all(|a| a.org == "acme"));
        assert_eq!(v.hosts.len(), 1);
        assert_eq!(
            (v.hosts[0].id.as_str(), v.hosts[0].machines),
            (first.as_str(), 1)
        );
        assert!(v.hosts[0].routes.is_empty());
        let text = serde_json::to_string(&v).unwrap();
        assert!(
            !text.contains(&theirs.id),
            "another org's machine leaked: {text}"
        );
    }
    let scoped = snapshot(&f.core, &admin, Some("acme")).await.unwrap();
    assert_eq!(scoped.machines.len(), 1);
    let e = snapshot(&f.core, &Caller::join("t-join"), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, Kind::Forbidden);
}

#[tokio::test]
async fn hosts_register_their_underlay_peers_see_it_and_a_host_leaves_only_empty() {
    let f = Fleet::new(2);
    let register = |id: u32, underlay: &str| {
        hosts::register_host(
            &f.core,
            ferry_core::proto::RegisterHost {
                host_id: id,
                region: "ams".into(),
                endpoint: format!("agent://{id:x}"),
                running: Vec::new(),
                underlay: underlay.into(),
            },
        )
    };
    // Hosts without an underlay (a dev fleet's) are nobody's peers.
    assert!(hosts::peers(&f.core).unwrap().is_empty());
    register(0x8000_0100, "2001:db8::1").unwrap();
    register(0x8000_0101, "192.0.2.7").unwrap();
    let peers = hosts::peers(&f.core).unwrap();
    assert_eq!(
        peers
            .iter()
            .map(|p| (p.id, p.underlay.as_str()))
            .collect::<Vec<_>>(),
        vec![(0x8000_0100, "2001:db8::1"), (0x8000_0101, "192.0.2.7")]
    );
    // An underlay no other host could use: refused, nothing recorded.
    for bad in [
        "::1",
        "127.0.0.1",
        "::",
        "ff02::1",
        "fdaa:0:1::5",
        "host.example",
        "1.2.3",
    ] {
        let e = register(0x8000_0102, bad).unwrap_err();
        assert_eq!(e.kind, Kind::Invalid, "{bad}");
        assert!(f
            .store
            .get_host(ferry_addr::HostId::new(0x8000_0102).unwrap())
            .is_err());
    }
    // Re-registering with a new address moves the peer.
    register(0x8000_0101, "192.0.2.8").unwrap();
    assert_eq!(hosts::peers(&f.core).unwrap()[1].underlay, "192.0.2.8");

    // A host with a machine on it cannot leave; an empty one can, once.
    let m = f.create(None).await.unwrap();
    let busy = m.host.clone().unwrap();
    let e = hosts::remove_host(&f.core, &busy).unwrap_err();
    assert_eq!(e.kind, Kind::Conflict);
    assert!(hosts::list_hosts(&f.core)
        .unwrap()
        .iter()
        .any(|h| h.id == busy));
    let gone = hosts::remove_host(&f.core, "80000101").unwrap();
    assert_eq!(gone.underlay, "192.0.2.8");
    assert_eq!(
        hosts::peers(&f.core)
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        vec![0x8000_0100]
    );
    assert_eq!(
        hosts::remove_host(&f.core, "80000101").unwrap_err().kind,
        Kind::NotFound
    );
}
