//! Who reaches what: every operation of `openapi.json` x {no token, org A, org B, admin}.
//!
//! The targets are org A's (its app, machines, volume, mapping, migration); org B is the
//! stranger. For every call the table says the status; on every refusal the fleet's whole state
//! (read from the store before and after) must be unchanged. Org B's refusals must be word for
//! word what a name that does not exist gets (its "twin" request, with the names swapped), and
//! nothing org B is answered may name anything of org A's.
//!
//! The server is the real router over a real (in-memory SQLite) store; the hosts' agents are
//! the core's recording double.

use ferry_api::server::router;
use ferry_core::auth::{issue, CreateToken};
use ferry_core::testing::{Double, NoWebhooks};
use ferry_core::Core;
use ferry_store::{ManualClock, MigrationFilter, SqliteStore, Store};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    A,
    B,
    Admin,
    /// A join token (a host's agent).
    Host,
}
use Who::*;

struct Fx {
    api: String,
    http: reqwest::Client,
    store: Arc<SqliteStore>,
    clock: Arc<ManualClock>,
    tokens: Vec<(Who, String, String)>,
    /// Org A's names and IDs: none may appear in anything answered to org B.
    secrets_of_a: Vec<String>,
    /// Org A's app.
    app: String,
    /// A started machine of A's app, kept for reads.
    machine: String,
    net_a: u32,
    /// A host with nothing on it (cordon, drain).
    empty_host: String,
    migration: String,
    n: std::sync::atomic::AtomicU32,
}

/// One call.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

fn req(method: &'static str, path: impl Into<String>, body: Option<Value>) -> Req {
    Req {
        method,
        path: path.into(),
        body,
        headers: Vec::new(),
    }
}

impl Fx {
    async fn new() -> Fx {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = Arc::new(SqliteStore::in_memory_with_clock(clock.clone()).unwrap());
        for i in 0..3 {
            store
                .register_host("ord", &format!("agent://h{i}"))
                .unwrap();
        }
        // The third host takes no machines: cordon, uncordon and drain act on it.
        let empty = store.list_hosts().unwrap()[2].id;
        store.set_cordoned(empty, true).unwrap();
        let dir = std::env::temp_dir().join(format!("ferry-authz-{}", std::process::id()));
        let ctx = Core::new(
            store.clone(),
            dir,
            Arc::new(Double::default()),
            Arc::new(NoWebhooks),
        );
        let mut tokens = Vec::new();
        for (who, kind, org) in [
            (A, "org", Some("a")),
            (B, "org", Some("b")),
            (Admin, "admin", None),
            (Host, "join", None),
        ] {
            let t = issue(
                &ctx,
                CreateToken {
                    kind: kind.into(),
                    org: org.map(Into::into),
                    ..Default::default()
                },
            )
            .unwrap();
            tokens.push((who, t.view.id, t.token));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(ctx)).await });
        let mut fx = Fx {
            api,
            http: reqwest::Client::new(),
            store,
            clock,
            tokens,
            secrets_of_a: Vec::new(),
            app: "a-app".into(),
            machine: String::new(),
            net_a: 0,
            empty_host: format!("{:x}", empty.get()),
            migration: String::new(),
            n: Default::default(),
        };

        // Each org's app, machines and volume, made by the orgs themselves.
        for (who, app) in [(A, "a-app"), (B, "b-app")] {
            fx.ok(who, req("POST", "/v1/apps", Some(json!({"app_name": app}))))
                .await;
        }
        fx.machine = fx.new_machine("a-app").await;
        let moved = fx.new_machine("a-app").await;
        fx.new_machine("b-app").await;
        let va = fx
            .ok(A, req("POST", "/v1/volumes", Some(json!({"size_mb": 16}))))
            .await;
        fx.ok(B, req("POST", "/v1/volumes", Some(json!({"size_mb": 16}))))
            .await;
        fx.net_a = fx.store.get_org("a").unwrap().network_id.get();
        // A mapping in A's network.
        let (old, new) = (fx.addr_a(1), fx.addr_a(2));
        fx.ok(
            A,
            req("POST", "/v1/bridge", Some(json!({"old": old, "new": new}))),
        )
        .await;
        // A finished migration of A's, so it exists to be asked about.
        fx.ok(
            A,
            req(
                "POST",
                "/v1/apps/a-app/policy",
                Some(json!({"min_healthy_time": "1s"})),
            ),
        )
        .await;
        let mig = fx
            .ok(
                A,
                req(
                    "POST",
                    format!("/v1/apps/a-app/machines/{moved}/migrate"),
                    None,
                ),
            )
            .await;
        fx.migration = mig["id"].as_str().unwrap().to_owned();
        fx.finish_migrations().await;
        fx.secrets_of_a = vec![
            "a-app".into(),
            fx.machine.clone(),
            moved,
            va["id"].as_str().unwrap().to_owned(),
            fx.migration.clone(),
            old,
            new,
        ];
        fx
    }

    fn token(&self, who: Who) -> Option<&str> {
        self.tokens
            .iter()
            .find(|t| t.0 == who)
            .map(|t| t.2.as_str())
    }

    fn token_id(&self, who: Who) -> &str {
        &self.tokens.iter().find(|t| t.0 == who).unwrap().1
    }

    /// An address of machine field `m` on host 80000000 in A's network.
    fn addr_a(&self, m: u32) -> String {
        ferry_addr::FleetAddr::new(
            ferry_addr::NetworkId::new(self.net_a).unwrap(),
            ferry_addr::HostId::new(0x8000_0000).unwrap(),
            ferry_addr::MachineField(m),
            2,
        )
        .to_string()
    }

    fn unique(&self, prefix: &str) -> String {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{prefix}{n}")
    }

    async fn call(&self, who: Who, r: &Req) -> (u16, String) {
        let url = format!("{}{}", self.api, r.path);
        let mut b = match r.method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "PUT" => self.http.put(url),
            "DELETE" => self.http.delete(url),
            m => panic!("method {m}"),
        };
        if let Some(t) = self.token(who) {
            b = b.bearer_auth(t);
        }
        if let Some(body) = &r.body {
            b = b.json(body);
        }
        for (k, v) in &r.headers {
            b = b.header(*k, v);
        }
        let mut resp = b.send().await.unwrap();
        let status = resp.status().as_u16();
        let streaming = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v == "text/event-stream");
        if streaming {
            // A stream that never ends by design (the dashboard's events): its first event,
            // sent at once, is what there is to check.
            let first = resp.chunk().await.unwrap().unwrap_or_default();
            return (status, String::from_utf8_lossy(&first).into_owned());
        }
        (status, resp.text().await.unwrap())
    }

    async fn ok(&self, who: Who, r: Req) -> Value {
        let (s, body) = self.call(who, &r).await;
        assert!((200..300).contains(&s), "{who:?} {r:?} -> {s} {body}");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    async fn new_machine(&self, app: &str) -> String {
        let m = self
            .ok(
                Admin,
                req(
                    "POST",
                    format!("/v1/apps/{app}/machines"),
                    Some(json!({"config": {"init": {"cmd": ["sleep", "inf"]}}})),
                ),
            )
            .await;
        m["id"].as_str().unwrap().to_owned()
    }

    /// Waits until no migration is unfinished, moving the store's clock (health is measured on
    /// it) 1 s per round; bounded.
    async fn finish_migrations(&self) {
        for _ in 0..400 {
            let open = self
                .store
                .list_migrations(MigrationFilter::Unfinished)
                .unwrap();
            if open.is_empty() {
                return;
            }
            self.clock.advance(1000);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("migrations did not finish");
    }

    /// Everything a call could change, read from the store.
    fn state(&self) -> Value {
        let s = &self.store;
        let machines = s.list_machines_all(None).unwrap();
        let apps = s.list_apps(None).unwrap();
        json!({
            "apps": apps.iter().map(|a| (&a.name, &a.org)).collect::<Vec<_>>(),
            "policies": apps.iter().map(|a| s.get_policy(&a.name).unwrap()).collect::<Vec<_>>(),
            "machines": machines.iter().map(|m| json!([
                m.id, m.state.as_str(), m.instance_id, m.config, m.host.map(|h| h.get()),
                s.events(&m.id).unwrap().len(),
                s.current_lease(&m.id).unwrap().map(|l| l.nonce),
            ])).collect::<Vec<_>>(),
            "volumes": s.list_volumes(None).unwrap(),
            "migrations": s.list_migrations(MigrationFilter::All).unwrap(),
            "bridge": s.list_bridge_mappings(None).unwrap(),
            "gates": s.bridge_gates_off().unwrap().iter().map(|(k, n)| (k.as_str(), n.clone())).collect::<Vec<_>>(),
            "hosts": s.list_hosts().unwrap(),
            "tokens": s.list_tokens().unwrap().iter().map(|t| (t.id.clone(), t.revoked)).collect::<Vec<_>>(),
            "registries": s.kv_get("registries").unwrap(),
        })
    }
}

/// A call on names that do not exist, and the swaps that turn the real call's answer into it.
type Twin = Option<(Req, Vec<(String, String)>)>;

/// What each caller gets.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Org A's thing: A and the admin get `ok`, B what a missing name gets (`twin`: 404).
    OrgA { ok: u16 },
    /// A listing: everyone with a user token gets `ok` (B sees none of A's things in it).
    List { ok: u16 },
    /// Fleet-wide: only the admin (`ok`); org tokens 403.
    AdminOnly { ok: u16 },
    /// Making something in A's org: A and the admin `ok`; B refused 403 whether or not the org
    /// exists (so the refusal says nothing).
    CreateInA { ok: u16 },
}

/// A row: the operation, the rule, and how to build the call for a caller (it may make a fresh
/// target first, as the admin, so that every caller's call meets one) and, for B's refusals,
/// the same call on names that do not exist.
struct Row {
    op: &'static str,
    rule: Rule,
    build: fn(&Fx) -> futures::future::BoxFuture<'_, (Req, Twin)>,
}

macro_rules! row {
    ($op:literal, $rule:expr, |$fx:ident| $body:expr) => {
        Row {
            op: $op,
            rule: $rule,
            build: |$fx| {
                let _ = $fx; // some rows need no fixture to build their call
                Box::pin(async move { $body })
            },
        }
    };
}

/// The same call on app `nope-app` instead of A's app (and `swap` for the answer).
fn on_missing_app(r: &Req, app: &str) -> Twin {
    let path = r.path.replace(&format!("/apps/{app}"), "/apps/nope-app");
    Some((
        Req { path, ..r.clone() },
        vec![(app.to_owned(), "nope-app".to_owned())],
    ))
}

/// A call on machine `id` of A's app, with its twin on a missing app.
fn on_machine(
    fx: &Fx,
    id: &str,
    tail: &str,
    method: &'static str,
    body: Option<Value>,
) -> (Req, Twin) {
    let r = req(
        method,
        format!("/v1/apps/{}/machines/{id}{tail}", fx.app),
        body,
    );
    let twin = on_missing_app(&r, &fx.app);
    (r, twin)
}

fn rows() -> Vec<Row> {
    vec![
        row!("list_apps", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/apps", None),
            None
        )),
        row!("create_app", Rule::CreateInA { ok: 201 }, |fx| {
            let name = fx.unique("new-app-");
            (
                req(
                    "POST",
                    "/v1/apps",
                    Some(json!({"app_name": name, "org_slug": "a"})),
                ),
                None,
            )
        }),
        row!("delete_app", Rule::OrgA { ok: 200 }, |fx| {
            let name = fx.unique("del-app-");
            fx.ok(A, req("POST", "/v1/apps", Some(json!({"app_name": name}))))
                .await;
            let r = req("DELETE", format!("/v1/apps/{name}"), None);
            let twin = on_missing_app(&r, &name);
            (r, twin)
        }),
        row!("get_app", Rule::OrgA { ok: 200 }, |fx| {
            let r = req("GET", format!("/v1/apps/{}", fx.app), None);
            let twin = on_missing_app(&r, &fx.app);
            (r, twin)
        }),
        row!("list_machines", Rule::OrgA { ok: 200 }, |fx| {
            let r = req("GET", format!("/v1/apps/{}/machines", fx.app), None);
            let twin = on_missing_app(&r, &fx.app);
            (r, twin)
        }),
        row!("create_machine", Rule::OrgA { ok: 200 }, |fx| {
            let r = req(
                "POST",
                format!("/v1/apps/{}/machines", fx.app),
                Some(json!({"config": {"init": {"cmd": ["sleep", "inf"]}}})),
            );
            let twin = on_missing_app(&r, &fx.app);
            (r, twin)
        }),
        row!("destroy_machine", Rule::OrgA { ok: 200 }, |fx| {
            let id = fx.new_machine("a-app").await;
            on_machine(fx, &id, "?force=true", "DELETE", None)
        }),
        row!("get_machine", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "",
            "GET",
            None
        )),
        row!("update_machine", Rule::OrgA { ok: 200 }, |fx| {
            let id = fx.new_machine("a-app").await;
            on_machine(
                fx,
                &id,
                "",
                "POST",
                Some(json!({"config": {"init": {"cmd": ["sleep", "1000"]}}})),
            )
        }),
        row!("machine_logs", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/logs",
            "GET",
            None
        )),
        row!("dashboard", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/dashboard", None),
            None
        )),
        row!("dashboard_events", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/dashboard/events", None),
            None
        )),
        row!("machine_events", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/events",
            "GET",
            None
        )),
        row!("exec_machine", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/exec",
            "POST",
            Some(json!({"cmd": ["true"]}))
        )),
        row!("release_lease", Rule::OrgA { ok: 200 }, |fx| {
            let id = fx.new_machine("a-app").await;
            let l = fx
                .ok(
                    Admin,
                    req(
                        "POST",
                        format!("/v1/apps/a-app/machines/{id}/lease"),
                        Some(json!({})),
                    ),
                )
                .await;
            let nonce = l["nonce"].as_str().unwrap().to_owned();
            let (mut r, twin) = on_machine(fx, &id, "/lease", "DELETE", None);
            r.headers.push((ferry_api::LEASE_HEADER, nonce.clone()));
            (
                r,
                twin.map(|(mut t, s)| {
                    t.headers.push((ferry_api::LEASE_HEADER, nonce));
                    (t, s)
                }),
            )
        }),
        row!("get_lease", Rule::OrgA { ok: 200 }, |fx| {
            let id = fx.new_machine("a-app").await;
            fx.ok(
                Admin,
                req(
                    "POST",
                    format!("/v1/apps/a-app/machines/{id}/lease"),
                    Some(json!({})),
                ),
            )
            .await;
            on_machine(fx, &id, "/lease", "GET", None)
        }),
        row!("acquire_lease", Rule::OrgA { ok: 201 }, |fx| {
            let id = fx.new_machine("a-app").await;
            on_machine(fx, &id, "/lease", "POST", Some(json!({})))
        }),
        row!("get_metadata", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/metadata",
            "GET",
            None
        )),
        row!("delete_metadata", Rule::OrgA { ok: 200 }, |fx| {
            let m = fx.machine.clone();
            fx.ok(
                Admin,
                req(
                    "POST",
                    format!("/v1/apps/a-app/machines/{m}/metadata/gone"),
                    Some(json!({"value": "x"})),
                ),
            )
            .await;
            on_machine(fx, &m, "/metadata/gone", "DELETE", None)
        }),
        row!("set_metadata", Rule::OrgA { ok: 200 }, |fx| {
            let v = fx.unique("v");
            on_machine(
                fx,
                &fx.machine,
                "/metadata/role",
                "POST",
                Some(json!({"value": v})),
            )
        }),
        row!("migrate_machine", Rule::OrgA { ok: 202 }, |fx| {
            let id = fx.new_machine("a-app").await;
            on_machine(fx, &id, "/migrate", "POST", Some(json!({})))
        }),
        row!("migrate_plan", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/migrate/plan",
            "GET",
            None
        )),
        row!("restart_machine", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/restart",
            "POST",
            None
        )),
        row!("signal_machine", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/signal",
            "POST",
            Some(json!({"signal": "SIGUSR1"}))
        )),
        row!("start_machine", Rule::OrgA { ok: 200 }, |fx| {
            let id = fx.new_machine("a-app").await;
            fx.ok(
                Admin,
                req("POST", format!("/v1/apps/a-app/machines/{id}/stop"), None),
            )
            .await;
            on_machine(fx, &id, "/start", "POST", None)
        }),
        row!("stop_machine", Rule::OrgA { ok: 200 }, |fx| {
            let id = fx.new_machine("a-app").await;
            on_machine(fx, &id, "/stop", "POST", None)
        }),
        row!("wait_machine", Rule::OrgA { ok: 200 }, |fx| on_machine(
            fx,
            &fx.machine,
            "/wait?state=started&timeout=1",
            "GET",
            None
        )),
        row!("get_policy", Rule::OrgA { ok: 200 }, |fx| {
            let r = req("GET", format!("/v1/apps/{}/policy", fx.app), None);
            let twin = on_missing_app(&r, &fx.app);
            (r, twin)
        }),
        row!("set_policy", Rule::OrgA { ok: 200 }, |fx| {
            let n = fx.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let r = req(
                "POST",
                format!("/v1/apps/{}/policy", fx.app),
                Some(json!({"max_unavailable": n})),
            );
            let twin = on_missing_app(&r, &fx.app);
            (r, twin)
        }),
        row!("list_bridge_mappings", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/bridge", None),
            None
        )),
        row!("map_address", Rule::OrgA { ok: 201 }, |fx| {
            let n = fx.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (old, new) = (fx.addr_a(100 + 2 * n), fx.addr_a(101 + 2 * n));
            let r = req("POST", "/v1/bridge", Some(json!({"old": old, "new": new})));
            // A network no org has (network IDs are allocated upwards from 1).
            let none = |m: u32| {
                ferry_addr::FleetAddr::new(
                    ferry_addr::NetworkId::new(0x7fff_0000).unwrap(),
                    ferry_addr::HostId::new(0x8000_0000).unwrap(),
                    ferry_addr::MachineField(m),
                    2,
                )
                .to_string()
            };
            let (o2, n2) = (none(100 + 2 * n), none(101 + 2 * n));
            let twin = req("POST", "/v1/bridge", Some(json!({"old": o2, "new": n2})));
            let shown = |n: u32| ferry_addr::NetworkId::new(n).unwrap().to_string();
            let nets = vec![(old, o2), (new, n2), (shown(fx.net_a), shown(0x7fff_0000))];
            (r, Some((twin, nets)))
        }),
        row!("set_bridge_gate", Rule::OrgA { ok: 200 }, |fx| {
            let r = req(
                "POST",
                "/v1/bridge/gate",
                Some(json!({"app": fx.app, "enabled": true})),
            );
            let twin = req(
                "POST",
                "/v1/bridge/gate",
                Some(json!({"app": "nope-app", "enabled": true})),
            );
            (r, Some((twin, vec![(fx.app.clone(), "nope-app".into())])))
        }),
        row!("bridge_report", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/bridge/report", None),
            None
        )),
        row!("retire_bridge_mappings", Rule::OrgA { ok: 200 }, |fx| {
            let n = fx.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (old, new) = (fx.addr_a(5000 + 2 * n), fx.addr_a(5001 + 2 * n));
            fx.ok(
                Admin,
                req("POST", "/v1/bridge", Some(json!({"old": old, "new": new}))),
            )
            .await;
            let r = req("POST", "/v1/bridge/retire", Some(json!({"old": old})));
            // An address of A's network that was never mapped: "no mapping", as B must see.
            let never = fx.addr_a(900_000 + n);
            let twin = req("POST", "/v1/bridge/retire", Some(json!({"old": never})));
            (r, Some((twin, vec![(old, never)])))
        }),
        row!("list_hosts", Rule::AdminOnly { ok: 200 }, |fx| (
            req("GET", "/v1/hosts", None),
            None
        )),
        // No such host: the admin's answer is a 404 (removing a real one would end the fleet
        // the rows after use), the others' a refusal before that.
        row!("remove_host", Rule::AdminOnly { ok: 404 }, |fx| (
            req("DELETE", "/v1/hosts/fffffff0", None),
            None
        )),
        row!("cordon", Rule::AdminOnly { ok: 200 }, |fx| (
            req("POST", format!("/v1/hosts/{}/cordon", fx.empty_host), None),
            None
        )),
        row!("drain", Rule::AdminOnly { ok: 202 }, |fx| (
            req("POST", format!("/v1/hosts/{}/drain", fx.empty_host), None),
            None
        )),
        row!("drain_plan", Rule::AdminOnly { ok: 200 }, |fx| (
            req(
                "GET",
                format!("/v1/hosts/{}/drain/plan", fx.empty_host),
                None
            ),
            None
        )),
        // Uncordoned at once by the next row's admin... and cordoned again, so the empty host
        // stays empty for the rows after.
        row!("uncordon", Rule::AdminOnly { ok: 200 }, |fx| (
            req(
                "POST",
                format!("/v1/hosts/{}/uncordon", fx.empty_host),
                None
            ),
            None
        )),
        row!("list_images", Rule::AdminOnly { ok: 200 }, |fx| (
            req("GET", "/v1/images", None),
            None
        )),
        row!("pull_image", Rule::AdminOnly { ok: 200 }, |fx| (
            req(
                "POST",
                "/v1/images/pull",
                Some(json!({"image": "127.0.0.1:1/x:1"}))
            ),
            None
        )),
        // No host holds it: the admin's answer is a 404, the others' a refusal before that.
        row!("remove_image", Rule::AdminOnly { ok: 404 }, |fx| (
            req(
                "POST",
                "/v1/images/remove",
                Some(json!({"image": "127.0.0.1:1/x:1"}))
            ),
            None
        )),
        row!("list_migrations", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/migrations", None),
            None
        )),
        row!("get_migration", Rule::OrgA { ok: 200 }, |fx| {
            let r = req("GET", format!("/v1/migrations/{}", fx.migration), None);
            let twin = req("GET", "/v1/migrations/mig_ffffffffffffffff", None);
            (
                r,
                Some((
                    twin,
                    vec![(fx.migration.clone(), "mig_ffffffffffffffff".into())],
                )),
            )
        }),
        row!("list_registries", Rule::AdminOnly { ok: 200 }, |fx| (
            req("GET", "/v1/registries", None),
            None
        )),
        row!("delete_registry", Rule::AdminOnly { ok: 200 }, |fx| {
            let r = fx.unique("reg.example:");
            fx.ok(
                Admin,
                req(
                    "PUT",
                    format!("/v1/registries/{r}"),
                    Some(json!({"insecure": true})),
                ),
            )
            .await;
            (req("DELETE", format!("/v1/registries/{r}"), None), None)
        }),
        row!("put_registry", Rule::AdminOnly { ok: 200 }, |fx| {
            let r = fx.unique("put.example:");
            (
                req(
                    "PUT",
                    format!("/v1/registries/{r}"),
                    Some(json!({"insecure": true})),
                ),
                None,
            )
        }),
        row!("list_tokens", Rule::AdminOnly { ok: 200 }, |fx| (
            req("GET", "/v1/tokens", None),
            None
        )),
        row!("create_token", Rule::AdminOnly { ok: 201 }, |fx| (
            req(
                "POST",
                "/v1/tokens",
                Some(json!({"kind": "org", "org": "a"}))
            ),
            None
        )),
        row!("revoke_token", Rule::AdminOnly { ok: 200 }, |fx| {
            let t = fx
                .ok(
                    Admin,
                    req("POST", "/v1/tokens", Some(json!({"kind": "join"}))),
                )
                .await;
            (
                req(
                    "DELETE",
                    format!("/v1/tokens/{}", t["id"].as_str().unwrap()),
                    None,
                ),
                None,
            )
        }),
        row!("list_volumes", Rule::List { ok: 200 }, |fx| (
            req("GET", "/v1/volumes", None),
            None
        )),
        row!("create_volume", Rule::CreateInA { ok: 201 }, |fx| (
            req(
                "POST",
                "/v1/volumes",
                Some(json!({"size_mb": 16, "org_slug": "a"}))
            ),
            None
        )),
    ]
}

/// What `who` must get under `rule`.
fn expected(rule: Rule, who: Who) -> u16 {
    match (rule, who) {
        (_, Nobody) => 401,
        // A join token reaches the agents' routes only.
        (_, Host) => 403,
        (Rule::OrgA { ok } | Rule::CreateInA { ok } | Rule::List { ok }, A | Admin) => ok,
        (Rule::AdminOnly { ok }, Admin) => ok,
        (Rule::AdminOnly { .. }, A | B) => 403,
        (Rule::OrgA { .. }, B) => 404,
        (Rule::CreateInA { .. }, B) => 403,
        (Rule::List { ok }, B) => ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_for_every_caller() {
    let fx = Fx::new().await;

    // The table covers the document exactly: a new route without a row fails here.
    let doc: Value =
        serde_json::from_str(include_str!("../../../openapi.json")).expect("openapi.json");
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ops| ops.as_object().unwrap().values())
        .map(|o| o["operationId"].as_str().unwrap().to_owned())
        .collect();
    let rows = rows();
    let covered: BTreeSet<String> = rows.iter().map(|r| r.op.to_owned()).collect();
    assert_eq!(covered, documented, "the table and openapi.json differ");

    let mut failures = Vec::new();
    for row in &rows {
        // The stranger and the anonymous first: their calls must change nothing, so the
        // target is still there for A and the admin.
        for who in [Nobody, Host, B, A, Admin] {
            let (r, twin) = (row.build)(&fx).await;
            let before = fx.state();
            let (status, body) = fx.call(who, &r).await;
            let want = expected(row.rule, who);
            if status != want {
                failures.push(format!(
                    "{} as {who:?}: {status}, want {want}: {body}",
                    row.op
                ));
                continue;
            }
            let refused = matches!(status, 401 | 403) || (who == B && status == 404);
            if refused {
                let after = fx.state();
                if after != before {
                    failures.push(format!(
                        "{} as {who:?}: refused ({status}) but the state changed",
                        row.op
                    ));
                }
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let code = v["code"].as_str().unwrap_or("");
                let want_code = match status {
                    401 => "unauthenticated",
                    403 => "forbidden",
                    _ => "not_found",
                };
                if code != want_code {
                    failures.push(format!(
                        "{} as {who:?}: code {code:?}, want {want_code}",
                        row.op
                    ));
                }
            }
            if who == B {
                // Nothing answered to B names anything of A's...
                for s in &fx.secrets_of_a {
                    if body.contains(s.as_str())
                        && !(status == 404 && r.path.contains(s.as_str()))
                        && !r
                            .body
                            .as_ref()
                            .is_some_and(|b| b.to_string().contains(s.as_str()))
                    {
                        failures.push(format!("{} as B: the answer names A's {s}: {body}", row.op));
                    }
                }
                // ...and a refusal is exactly what a missing name gets.
                if status == 404 {
                    let (t, swaps) = twin
                        .clone()
                        .unwrap_or_else(|| panic!("{}: no twin", row.op));
                    let (ts, tbody) = fx.call(B, &t).await;
                    let mut mine = body.clone();
                    for (from, to) in &swaps {
                        mine = mine.replace(from.as_str(), to.as_str());
                    }
                    if (ts, tbody.as_str()) != (status, mine.as_str()) {
                        failures.push(format!(
                            "{} as B: another org's answer {status} {mine} differs from a missing one's {ts} {tbody}",
                            row.op
                        ));
                    }
                }
            }
            if (200..300).contains(&status) {
                // A started migration (or drain) settles before the next call reads the state.
                fx.finish_migrations().await;
                if row.op == "uncordon" {
                    let h = ferry_core::hosts::parse_host(&fx.empty_host).unwrap();
                    fx.store.set_cordoned(h, true).unwrap();
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // B naming A's machine under B's own app, or mounting A's volume: the answers of an ID
    // that does not exist.
    let missing_machine = "00000000000000";
    let pairs = [
        (
            req(
                "GET",
                format!("/v1/apps/b-app/machines/{}", fx.machine),
                None,
            ),
            req(
                "GET",
                format!("/v1/apps/b-app/machines/{missing_machine}"),
                None,
            ),
            (fx.machine.clone(), missing_machine.to_owned()),
        ),
        (
            req(
                "POST",
                "/v1/apps/b-app/machines",
                Some(
                    json!({"config": {"init": {"cmd": ["true"]}, "mounts": [{"volume": fx.secrets_of_a[3], "path": "/data"}]}}),
                ),
            ),
            req(
                "POST",
                "/v1/apps/b-app/machines",
                Some(
                    json!({"config": {"init": {"cmd": ["true"]}, "mounts": [{"volume": "vol_ffffffffffffffff", "path": "/data"}]}}),
                ),
            ),
            (
                fx.secrets_of_a[3].clone(),
                "vol_ffffffffffffffff".to_owned(),
            ),
        ),
    ];
    for (theirs, missing, (from, to)) in pairs {
        let before = fx.state();
        let (s1, b1) = fx.call(B, &theirs).await;
        assert_eq!(fx.state(), before, "{theirs:?} changed the state");
        let (s2, b2) = fx.call(B, &missing).await;
        assert_eq!(s1, 404, "{b1}");
        assert_eq!((s1, b1.replace(&from, &to)), (s2, b2), "{theirs:?}");
    }

    // Outside the document: the agents' routes are not on the operator API at all (they are on
    // the agent listener, behind hosts' certificates: ferry/tests/mtls.rs), whatever the
    // token; the metrics (every org's) take an admin's.
    // A report about an instance the machine no longer has: the server records it and changes
    // nothing else.
    let report = json!({"machine_id": fx.machine, "instance_id": "01AAAAAAAAAAAAAAAAAAAAAAAA",
        "kind": "check", "state": "started", "exit": null, "detail": {}, "report_id": "r1"});
    let internal = [
        req("POST", "/internal/v1/reports", Some(report)),
        req("GET", "/internal/v1/hosts/80000000/watch", None),
        req("GET", "/metrics", None),
    ];
    // What each of A, B, a host's join token and the admin gets.
    let answers = [
        [404, 404, 404, 404],
        [404, 404, 404, 404],
        [403, 403, 403, 200],
    ];
    for (r, answers) in internal.iter().zip(answers) {
        for (who, answer) in [A, B, Host, Admin].into_iter().zip(answers) {
            let before = fx.state();
            // Only the status is read: the watch is a stream that does not end.
            let mut b = match r.method {
                "POST" => fx.http.post(format!("{}{}", fx.api, r.path)),
                _ => fx.http.get(format!("{}{}", fx.api, r.path)),
            };
            if let Some(t) = fx.token(who) {
                b = b.bearer_auth(t);
            }
            if let Some(body) = &r.body {
                b = b.json(body);
            }
            let status = b.send().await.unwrap().status().as_u16();
            assert_eq!(status, answer, "{who:?} {r:?}");
            if answer != 200 {
                assert_eq!(
                    fx.state(),
                    before,
                    "{who:?} {r:?} refused but changed the state"
                );
            }
        }
    }
    let (status, _) = fx.call(Nobody, &internal[0]).await;
    assert_eq!(status, 401);

    // Events name the token that acted: A's stop of a machine, and the admin's start of it.
    let id = fx.new_machine("a-app").await;
    fx.ok(
        A,
        req("POST", format!("/v1/apps/a-app/machines/{id}/stop"), None),
    )
    .await;
    fx.ok(
        Admin,
        req("POST", format!("/v1/apps/a-app/machines/{id}/start"), None),
    )
    .await;
    let events = fx.store.events(&id).unwrap();
    let by = |t: &str| events.iter().filter(|e| e.request["token_id"] == t).count();
    assert!(by(fx.token_id(A)) >= 1, "{events:#?}");
    assert!(by(fx.token_id(Admin)) >= 2, "{events:#?}");
    // Never a secret.
    for (_, _, secret) in &fx.tokens {
        let s = secret.split_once('.').unwrap().1;
        assert!(!format!("{events:?}").contains(s));
    }
}
