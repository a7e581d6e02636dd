//! The conformance suite: every test here runs against [`SqliteStore`] (a file in a temporary
//! directory) and against [`EtcdStore`] (a real etcd started by [`crate::testing`], each test
//! under its own key prefix), through the `conformance!` list at the bottom.
//!
//! They check the promises the rest of ferry relies on: data survive a reopen, IDs are never
//! handed out twice (also across reopen and after destroy), compare-and-set transitions have
//! exactly one winner, leases expire on the injected clock, and a failed call changes nothing
//! (compared as a full dump of every table or key, not just counts).

#[path = "tests_etcd.rs"]
mod etcd_only;
#[path = "tests_records.rs"]
mod records;
use records::*;

use crate::testing::{shared_etcd, EtcdCluster};
use crate::*;
use ferry_addr::{FleetAddr, HostId, MachineField};
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use MachineState::*;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Etcd,
}

/// One test's backend: its data (a SQLite file, or a key prefix on a shared etcd) and ways to
/// open new handles on it, as another server or a restarted one would.
pub(crate) struct Fx {
    dir: tempfile::TempDir,
    etcd: Option<(Arc<EtcdCluster>, String)>,
}

impl Fx {
    pub(crate) fn new(b: Backend) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let etcd = match b {
            Backend::Sqlite => None,
            Backend::Etcd => Some((shared_etcd(), format!("/t-{}/", new_machine_id()))),
        };
        Fx { dir, etcd }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("state").join("ferry.db")
    }

    /// Two handles that see each other's changes only through the store: another server's on
    /// etcd, the same one on SQLite (its single process).
    fn writer_and_reader(&self) -> (Arc<dyn Store>, Arc<dyn Store>) {
        let writer = self.open();
        let reader = match self.etcd {
            Some(_) => self.open(),
            None => writer.clone(),
        };
        (writer, reader)
    }

    /// A new handle on this test's data.
    pub(crate) fn open(&self) -> Arc<dyn Store> {
        self.open_with(Arc::new(SystemClock))
    }

    pub(crate) fn open_clock(&self, clock: &ManualClock) -> Arc<dyn Store> {
        self.open_with(Arc::new(clock.clone()))
    }

    fn open_with(&self, clock: Arc<dyn Clock>) -> Arc<dyn Store> {
        match &self.etcd {
            None => Arc::new(SqliteStore::open_with_clock(self.db(), clock).unwrap()),
            Some((c, prefix)) => {
                Arc::new(EtcdStore::connect_with_clock(&c.endpoints(), prefix, clock).unwrap())
            }
        }
    }

    /// Everything stored, as text.
    pub(crate) fn dump(&self) -> Vec<String> {
        match &self.etcd {
            None => SqliteStore::open(self.db()).unwrap().dump(),
            Some((c, prefix)) => EtcdStore::connect(&c.endpoints(), prefix).unwrap().dump(),
        }
    }
}

/// A machine of `app` placed on `host` with a freshly allocated field and its primary address.
fn new_machine(s: &dyn Store, app: &str, host: HostId) -> Machine {
    let app = s.get_app(app).unwrap();
    let field = s.allocate_machine_field(host).unwrap();
    let m = Machine {
        id: new_machine_id(),
        name: format!("m-{}", field.0),
        app: app.name.clone(),
        org: app.org.clone(),
        network_id: app.network_id,
        host: Some(host),
        region: "ord".into(),
        machine_field: Some(field),
        private_ip: Some(FleetAddr::primary(app.network_id, host, field).to_string()),
        instance_id: new_instance_id(),
        state: Created,
        config: json!({"init": {"cmd": ["sleep", "inf"]}, "guest": {"memory_mb": 256}}),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    s.create_machine(&m).unwrap()
}

/// Runs `f`, which must fail with `code`, and proves the store is unchanged, record for record.
#[track_caller]
fn fails_cleanly<T: std::fmt::Debug>(
    fx: &Fx,
    code: &str,
    f: impl FnOnce() -> Result<T>,
) -> StoreError {
    let before = fx.dump();
    let err = f().expect_err("the operation should have failed");
    assert_eq!(err.code(), code, "{err}");
    assert_eq!(fx.dump(), before, "a failed operation changed the store");
    err
}

fn data_survive_reopen(fx: &Fx) {
    let (app, host, m, ev, lease, lock);
    {
        let s = fx.open();
        app = s.create_app("web", "acme").unwrap();
        host = s.register_host("ord", "/run/ferry/h1.sock").unwrap();
        m = new_machine(&*s, "web", host.id);
        ev = s
            .add_event(&m.id, "launch", "created", "user", json!({"a": 1}))
            .unwrap();
        lease = s.acquire_lease(&m.id, 3_600_000, "me", "deploy").unwrap();
        lock = s.acquire_lock("migrate/net-1", 3_600_000, "coord").unwrap();
        s.kv_put("fleet.name", "dev").unwrap();
    }
    let s = fx.open();
    assert_eq!(s.get_app("web").unwrap(), app);
    assert_eq!(
        s.get_org("acme").unwrap(),
        Org {
            name: "acme".into(),
            network_id: app.network_id
        }
    );
    assert_eq!(s.get_host(host.id).unwrap(), host);
    assert_eq!(s.get_machine(&m.id).unwrap(), m);
    assert_eq!(s.events(&m.id).unwrap(), vec![ev]);
    assert_eq!(s.current_lease(&m.id).unwrap(), Some(lease));
    assert_eq!(s.current_lock("migrate/net-1").unwrap(), Some(lock));
    assert_eq!(s.kv_get("fleet.name").unwrap().as_deref(), Some("dev"));
    assert_eq!(s.kv_get("nope").unwrap(), None);
    assert_eq!(s.list_machines_on_host(host.id).unwrap(), vec![m]);
    assert_eq!(
        s.machines_per_host().unwrap(),
        [(host.id, 1)].into_iter().collect()
    );
}

#[test]
fn sqlite_file_is_wal_with_current_schema() {
    let fx = Fx::new(Backend::Sqlite);
    let s = SqliteStore::open(fx.db()).unwrap();
    assert_eq!(
        s.path().unwrap().file_name().unwrap().to_str(),
        Some("ferry.db")
    );
    drop(s);
    let conn = rusqlite::Connection::open(fx.db()).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, crate::schema::SCHEMA_VERSION);
    // A database from a newer ferry is refused rather than misread.
    conn.execute_batch("PRAGMA user_version = 999").unwrap();
    drop(conn);
    let err = SqliteStore::open(fx.db()).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
}

fn network_ids_never_repeat_across_reopen(fx: &Fx) {
    let mut seen = HashSet::new();
    for round in 0..3 {
        let s = fx.open();
        for i in 0..4 {
            let org = s.ensure_org(&format!("org-{round}-{i}")).unwrap();
            assert!(seen.insert(org.network_id), "network ID reused: {org:?}");
            // ensure_org is idempotent: same org, same network.
            assert_eq!(s.ensure_org(&org.name).unwrap(), org);
        }
        // Deleting an app does not free its org's network.
        s.create_app(&format!("app-{round}"), &format!("org-{round}-0"))
            .unwrap();
        s.delete_app(&format!("app-{round}")).unwrap();
    }
    assert_eq!(fx.open().list_orgs().unwrap().len(), 12);
}

fn host_ids_never_repeat_across_reopen_and_put_host_burns_its_id(fx: &Fx) {
    let mut seen = HashSet::new();
    {
        let s = fx.open();
        for i in 0..3 {
            let h = s.register_host("ord", &format!("/run/h{i}.sock")).unwrap();
            assert!(h.id.get() >= HostId::MIN);
            assert!(seen.insert(h.id));
        }
        // A host re-registering with an ID the allocator has not reached yet...
        let future = HostId::new(HostId::MIN + 10).unwrap();
        let h = s
            .put_host(&Host {
                id: future,
                region: "ams".into(),
                endpoint: "/run/h10.sock".into(),
                cordoned: false,
                created_at_ms: 0,
                underlay: "2001:db8::10".into(),
            })
            .unwrap();
        assert_eq!(h.id, future);
        seen.insert(future);
        // ...and again, with a new endpoint: an update, created_at kept.
        let again = s
            .put_host(&Host {
                endpoint: "/run/h10b.sock".into(),
                ..h.clone()
            })
            .unwrap();
        assert_eq!(again.endpoint, "/run/h10b.sock");
        assert_eq!(again.created_at_ms, h.created_at_ms);
        assert_eq!(s.get_host(future).unwrap().underlay, "2001:db8::10");
    }
    let s = fx.open();
    for i in 0..3 {
        let h = s.register_host("ord", &format!("/run/n{i}.sock")).unwrap();
        assert!(seen.insert(h.id), "host ID reused: {h:?}");
        assert!(h.id.get() > HostId::MIN + 10);
    }
    assert_eq!(s.list_hosts().unwrap().len(), 7);
    let cordoned = s
        .set_cordoned(HostId::new(HostId::MIN).unwrap(), true)
        .unwrap();
    assert!(cordoned.cordoned);
    fails_cleanly(fx, "not_found", || {
        s.set_cordoned(HostId::new(u32::MAX).unwrap(), true)
    });
}

fn machine_fields_never_repeat_across_reopen_and_destroy(fx: &Fx) {
    let (h1, h2);
    let mut seen = HashSet::new();
    {
        let s = fx.open();
        s.create_app("web", "acme").unwrap();
        h1 = s.register_host("ord", "/h1").unwrap().id;
        h2 = s.register_host("ord", "/h2").unwrap().id;
        for i in 0..3 {
            let m = new_machine(&*s, "web", h1);
            seen.insert((h1, m.machine_field.unwrap()));
            assert_eq!(s.machines_per_host().unwrap().get(&h1), Some(&1), "{i}");
            s.transition(&m.id, &[Created], Destroyed).unwrap();
            // A terminal machine no longer counts for placement.
            assert_eq!(s.machines_per_host().unwrap().get(&h1), None, "{i}");
        }
        // Per host: the other host starts at its own beginning.
        assert_eq!(s.allocate_machine_field(h2).unwrap(), MachineField(1));
        // All machines destroyed, app deleted: the fields stay burned.
        s.delete_app("web").unwrap();
        assert!(s.list_machines_all(None).unwrap().is_empty());
    }
    let s = fx.open();
    for _ in 0..3 {
        let f = s.allocate_machine_field(h1).unwrap();
        assert!(seen.insert((h1, f)), "machine field {f} reused on {h1}");
    }
    assert_eq!(s.allocate_machine_field(h2).unwrap(), MachineField(2));
    fails_cleanly(fx, "not_found", || {
        s.allocate_machine_field(HostId::new(u32::MAX).unwrap())
    });
}

fn app_names_are_unique_fleet_wide(fx: &Fx) {
    let s = fx.open();
    let web = s.create_app("web", "acme").unwrap();
    assert_eq!(web.org, "acme");
    s.create_app("db", "acme").unwrap();
    s.create_app("api", "other").unwrap();
    // Same name in another org (which does not exist yet): refused, and no org or network ID
    // is created or burned on the way.
    let err = fails_cleanly(fx, "app_exists", || s.create_app("web", "newcomer"));
    assert!(matches!(err, StoreError::AppExists { ref name } if name == "web"));
    assert!(s.get_org("newcomer").unwrap_err().is_not_found());
    fails_cleanly(fx, "invalid", || s.create_app("", "acme"));

    let names = |org| -> Vec<String> {
        s.list_apps(org)
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect()
    };
    assert_eq!(names(Some("acme")), ["db", "web"]);
    assert_eq!(names(None), ["api", "db", "web"]);
    assert!(names(Some("ghost")).is_empty());
    // Apps of one org share its network; other orgs have their own.
    let acme = s.get_org("acme").unwrap().network_id;
    assert_eq!(s.get_app("db").unwrap().network_id, acme);
    assert_ne!(s.get_app("api").unwrap().network_id, acme);
    fails_cleanly(fx, "not_found", || s.get_app("ghost"));
}

fn delete_app_is_refused_while_machines_live(fx: &Fx) {
    let s = fx.open();
    s.create_app("web", "acme").unwrap();
    let h = s.register_host("ord", "/h1").unwrap().id;
    let a = new_machine(&*s, "web", h);
    let b = new_machine(&*s, "web", h);
    s.add_event(&a.id, "launch", "created", "user", json!({}))
        .unwrap();
    s.acquire_lease(&a.id, 60_000, "me", "").unwrap();

    let err = fails_cleanly(fx, "app_has_machines", || s.delete_app("web"));
    assert!(matches!(err, StoreError::AppHasMachines { count: 2, .. }));
    s.transition(&a.id, &[Created], Destroyed).unwrap();
    let err = fails_cleanly(fx, "app_has_machines", || s.delete_app("web"));
    assert!(matches!(err, StoreError::AppHasMachines { count: 1, .. }));
    // Migrated counts as gone too.
    s.transition(&b.id, &[Created], Migrated).unwrap();
    s.delete_app("web").unwrap();

    assert!(s.get_app("web").unwrap_err().is_not_found());
    assert!(s.get_machine(&a.id).unwrap_err().is_not_found());
    // Nothing of the app's machines is left behind.
    // (SQLite rows read "machines: ...", etcd keys "machines/...", "idx/machine_app/...".)
    let rows = fx.dump();
    assert!(
        !rows.iter().any(|r| r.starts_with("machines")
            || r.starts_with("events")
            || r.starts_with("leases")
            || r.starts_with("idx/machine")),
        "{rows:#?}"
    );
    // The org (and so its network) survives, and the name is free again.
    s.get_org("acme").unwrap();
    s.create_app("web", "acme").unwrap();
    fails_cleanly(fx, "not_found", || s.delete_app("ghost"));
}

fn transition_is_compare_and_set(fx: &Fx) {
    let clock = ManualClock::new(1_000);
    let s = fx.open_clock(&clock);
    s.create_app("web", "acme").unwrap();
    let h = s.register_host("ord", "/h1").unwrap().id;
    let m = new_machine(&*s, "web", h);
    assert_eq!((m.created_at_ms, m.updated_at_ms), (1_000, 1_000));

    clock.advance(5);
    let m2 = s.transition(&m.id, &[Created, Stopped], Starting).unwrap();
    assert_eq!(m2.state, Starting);
    assert_eq!(m2.updated_at_ms, 1_005);
    assert_eq!(s.get_machine(&m.id).unwrap(), m2);

    let err = fails_cleanly(fx, "illegal_transition", || {
        s.transition(&m.id, &[Created, Stopped], Starting)
    });
    match err {
        StoreError::IllegalTransition { id, from, to } => {
            assert_eq!((id, from, to), (m.id.clone(), Starting, Starting))
        }
        other => panic!("{other}"),
    }
    assert!(err_text(&s.transition(&m.id, &[], Started)).contains("is starting"));
    fails_cleanly(fx, "not_found", || {
        s.transition("00000000000000", &[Created], Starting)
    });
    // A clock that steps back never makes updated_at go backwards.
    clock.set(10);
    let m3 = s.transition(&m.id, &[Starting], Started).unwrap();
    assert_eq!(m3.updated_at_ms, 1_005);
}

fn err_text<T>(r: &Result<T>) -> String {
    match r {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

fn concurrent_transitions_have_exactly_one_winner(fx: &Fx) {
    let shared = fx.open();
    shared.create_app("web", "acme").unwrap();
    let h = shared.register_host("ord", "/h1").unwrap().id;
    let ids: Vec<String> = (0..5).map(|_| new_machine(&*shared, "web", h).id).collect();

    for id in &ids {
        // Half the threads share one store (one connection or client); the other half open
        // their own, as separate servers would: the CAS must be atomic either way.
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let barrier = barrier.clone();
                let id = id.clone();
                let store: Arc<dyn Store> = if i % 2 == 0 {
                    shared.clone()
                } else {
                    fx.open()
                };
                std::thread::spawn(move || {
                    barrier.wait();
                    store.transition(&id, &[Created], Starting)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(r, StoreError::IllegalTransition { from: Starting, .. }),
                "{r}"
            );
        }
        assert_eq!(shared.get_machine(id).unwrap().state, Starting);
    }
}

fn events_come_back_oldest_first(fx: &Fx) {
    let clock = ManualClock::new(50);
    let s = fx.open_clock(&clock);
    s.create_app("web", "acme").unwrap();
    let h = s.register_host("ord", "/h1").unwrap().id;
    let a = new_machine(&*s, "web", h);
    let b = new_machine(&*s, "web", h);
    let steps = [
        ("launch", "created"),
        ("start", "starting"),
        ("start", "started"),
        ("exit", "stopped"),
    ];
    for (i, (t, st)) in steps.iter().enumerate() {
        // Two events in the same millisecond still keep their order.
        if i % 2 == 0 {
            clock.advance(1);
        }
        s.add_event(&a.id, t, st, "ferry", json!({"step": i}))
            .unwrap();
        s.add_event(&b.id, "noise", "x", "ferry", json!(null))
            .unwrap();
    }
    let evs = s.events(&a.id).unwrap();
    let got: Vec<_> = evs
        .iter()
        .map(|e| (e.r#type.as_str(), e.status.as_str()))
        .collect();
    assert_eq!(got, steps);
    assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        evs.iter().map(|e| e.timestamp_ms).collect::<Vec<_>>(),
        [51, 51, 52, 52]
    );
    assert_eq!(evs[3].request, json!({"step": 3}));
    // The JSON shape the API serves: "type", not "r#type".
    let v = serde_json::to_value(&evs[0]).unwrap();
    assert_eq!(v["type"], "launch");
    fails_cleanly(fx, "not_found", || {
        s.add_event("00000000000000", "launch", "created", "user", json!({}))
    });
}

fn leases_hold_expire_and_check_nonces(fx: &Fx) {
    let clock = ManualClock::new(1_000_000);
    let s = fx.open_clock(&clock);
    s.create_app("web", "acme").unwrap();
    let h = s.register_host("ord", "/h1").unwrap().id;
    let m = new_machine(&*s, "web", h).id;

    let lease = s.acquire_lease(&m, 30_000, "alice", "deploy").unwrap();
    assert_eq!(lease.expires_at_ms, 1_030_000);
    assert_eq!(lease.nonce.len(), 32);
    assert_eq!(s.current_lease(&m).unwrap().as_ref(), Some(&lease));

    let err = fails_cleanly(fx, "lease_held", || s.acquire_lease(&m, 1, "bob", ""));
    assert!(matches!(
        err,
        StoreError::LeaseHeld {
            expires_at_ms: 1_030_000,
            ..
        }
    ));
    s.check_lease(&m, Some(&lease.nonce)).unwrap();
    assert_eq!(s.check_lease(&m, None).unwrap_err().code(), "lease_held");
    assert_eq!(
        s.check_lease(&m, Some("wrong")).unwrap_err().code(),
        "lease_held"
    );
    fails_cleanly(fx, "lease_mismatch", || s.release_lease(&m, "wrong"));
    fails_cleanly(fx, "lease_mismatch", || s.refresh_lease(&m, "wrong", 10));
    fails_cleanly(fx, "invalid", || s.refresh_lease(&m, &lease.nonce, 0));
    fails_cleanly(fx, "not_found", || {
        s.acquire_lease("00000000000000", 10, "x", "")
    });

    // Refresh extends from now.
    clock.advance(20_000);
    let refreshed = s.refresh_lease(&m, &lease.nonce, 30_000).unwrap();
    assert_eq!(refreshed.expires_at_ms, 1_050_000);

    // At the expiry instant the lease is over: nobody holds the machine.
    clock.set(1_050_000);
    assert_eq!(s.current_lease(&m).unwrap(), None);
    s.check_lease(&m, None).unwrap();
    // An expired lease cannot be refreshed (it may already belong to someone else)...
    fails_cleanly(fx, "lease_mismatch", || {
        s.refresh_lease(&m, &lease.nonce, 1_000)
    });
    // ...and is replaced by the next acquire.
    let bob = s.acquire_lease(&m, 1_000, "bob", "").unwrap();
    assert_ne!(bob.nonce, lease.nonce);
    assert_eq!(s.current_lease(&m).unwrap().unwrap().owner, "bob");
    // Alice's old nonce no longer works for anything.
    fails_cleanly(fx, "lease_mismatch", || s.release_lease(&m, &lease.nonce));
    s.release_lease(&m, &bob.nonce).unwrap();
    assert_eq!(s.current_lease(&m).unwrap(), None);
    // Releasing what is already gone is fine (retries after a lost reply).
    s.release_lease(&m, &bob.nonce).unwrap();
}

fn named_locks_hold_and_expire(fx: &Fx) {
    let clock = ManualClock::new(0);
    let s = fx.open_clock(&clock);
    let a = s.acquire_lock("migrate/net-7", 10_000, "coord-a").unwrap();
    let err = fails_cleanly(fx, "lock_held", || {
        s.acquire_lock("migrate/net-7", 10_000, "coord-b")
    });
    assert!(matches!(
        err,
        StoreError::LockHeld {
            expires_at_ms: 10_000,
            ref owner,
            ..
        } if owner == "coord-a"
    ));
    // Other names are independent.
    s.acquire_lock("migrate/net-8", 10_000, "coord-b").unwrap();
    fails_cleanly(fx, "lock_mismatch", || s.release_lock("migrate/net-7", "x"));
    clock.set(5_000);
    assert_eq!(
        s.refresh_lock("migrate/net-7", &a.nonce, 10_000)
            .unwrap()
            .expires_at_ms,
        15_000
    );
    // A dead coordinator's lock expires and someone else takes it.
    clock.set(15_000);
    assert_eq!(s.current_lock("migrate/net-7").unwrap(), None);
    let b = s.acquire_lock("migrate/net-7", 10_000, "coord-b").unwrap();
    fails_cleanly(fx, "lock_mismatch", || {
        s.refresh_lock("migrate/net-7", &a.nonce, 1)
    });
    fails_cleanly(fx, "lock_mismatch", || {
        s.release_lock("migrate/net-7", &a.nonce)
    });
    s.release_lock("migrate/net-7", &b.nonce).unwrap();
    assert_eq!(s.current_lock("migrate/net-7").unwrap(), None);
}

/// A heartbeat's batch refresh extends exactly the locks whose nonce still holds, leaves the
/// others as they are, and refuses a zero TTL before writing anything; batches larger than one
/// etcd commit hold too.
fn locks_refresh_in_one_batch(fx: &Fx) {
    let clock = ManualClock::new(0);
    let s = fx.open_clock(&clock);
    let a = s.acquire_lock("claim/a", 10_000, "srv").unwrap();
    let b = s.acquire_lock("claim/b", 1_000, "srv").unwrap();
    let c = s.acquire_lock("claim/c", 10_000, "srv").unwrap();
    s.release_lock("claim/c", &c.nonce).unwrap();
    clock.set(500);
    fails_cleanly(fx, "invalid", || {
        s.refresh_locks(&[("claim/a", &a.nonce, 5_000), ("claim/b", &b.nonce, 0)])
    });
    // b expires and someone else takes it.
    clock.set(2_000);
    let b2 = s.acquire_lock("claim/b", 60_000, "other").unwrap();
    let got = s
        .refresh_locks(&[
            ("claim/a", &a.nonce, 5_000),
            ("claim/b", &b.nonce, 5_000),
            ("claim/c", &c.nonce, 5_000),
            ("claim/none", "x", 5_000),
        ])
        .unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(got[0].as_ref().unwrap().expires_at_ms, 7_000);
    assert_eq!(got[1..], [None, None, None]);
    assert_eq!(
        s.current_lock("claim/a").unwrap().unwrap().expires_at_ms,
        7_000
    );
    assert_eq!(
        s.current_lock("claim/b").unwrap().unwrap(),
        b2,
        "b is the other's"
    );
    assert_eq!(s.current_lock("claim/c").unwrap(), None, "c stays released");
    // More than one etcd commit's worth.
    let many: Vec<(String, String)> = (0..120)
        .map(|i| {
            let name = format!("claim/many-{i}");
            let l = s.acquire_lock(&name, 1_000, "srv").unwrap();
            (name, l.nonce)
        })
        .collect();
    let req: Vec<(&str, &str, u64)> = many
        .iter()
        .map(|(n, nonce)| (n.as_str(), nonce.as_str(), 9_000))
        .collect();
    let got = s.refresh_locks(&req).unwrap();
    assert!(got
        .iter()
        .all(|l| l.as_ref().unwrap().expires_at_ms == 11_000));
    assert_eq!(
        s.current_lock("claim/many-119")
            .unwrap()
            .unwrap()
            .expires_at_ms,
        11_000
    );
}

fn machine_records_are_validated_and_failures_change_nothing(fx: &Fx) {
    let s = fx.open();
    s.create_app("web", "acme").unwrap();
    s.create_app("api", "other").unwrap();
    let h = s.register_host("ord", "/h1").unwrap().id;
    let good = new_machine(&*s, "web", h);

    let variant = |f: &dyn Fn(&mut Machine)| {
        let mut m = good.clone();
        m.id = new_machine_id();
        m.machine_field = Some(s.allocate_machine_field(h).unwrap());
        m.private_ip =
            Some(FleetAddr::primary(m.network_id, h, m.machine_field.unwrap()).to_string());
        f(&mut m);
        m
    };
    let cases: Vec<(&str, Machine)> = vec![
        ("invalid", variant(&|m| m.id = "D8DD625FED5568".into())),
        ("invalid", variant(&|m| m.id = "abc".into())),
        ("invalid", variant(&|m| m.instance_id = "not-a-ulid".into())),
        ("invalid", variant(&|m| m.org = "other".into())),
        ("not_found", variant(&|m| m.app = "ghost".into())),
        (
            "not_found",
            variant(&|m| m.host = Some(HostId::new(u32::MAX).unwrap())),
        ),
        ("invalid", variant(&|m| m.host = None)),
        (
            "invalid",
            variant(&|m| m.private_ip = Some("fdaa:0:1:8000:0:0:63:2".into())),
        ),
        (
            "invalid",
            variant(&|m| m.private_ip = Some("10.0.0.1".into())),
        ),
        ("conflict", good.clone()),
        // Another machine may not take a field that is already in use on the host.
        (
            "conflict",
            variant(&|m| {
                m.machine_field = good.machine_field;
                m.private_ip = good.private_ip.clone();
            }),
        ),
    ];
    for (code, m) in cases {
        let err = fails_cleanly(fx, code, || s.create_machine(&m));
        if code == "conflict" && m.id == good.id {
            assert!(matches!(err, StoreError::MachineExists { .. }));
        }
    }
    // A record without a placement yet is fine.
    let unplaced = variant(&|m| {
        m.host = None;
        m.machine_field = None;
        m.private_ip = None;
    });
    let stored = s.create_machine(&unplaced).unwrap();
    assert_eq!(stored.host, None);
    assert_eq!(s.list_machines(Some("web")).unwrap().len(), 2);
    assert!(s.list_machines(Some("api")).unwrap().is_empty());
}

fn update_machine_and_its_compare_and_set_variant(fx: &Fx) {
    let clock = ManualClock::new(100);
    let s = fx.open_clock(&clock);
    s.create_app("web", "acme").unwrap();
    s.create_app("api", "acme").unwrap();
    let h1 = s.register_host("ord", "/h1").unwrap().id;
    let h2 = s.register_host("ams", "/h2").unwrap().id;
    let m = new_machine(&*s, "web", h1);

    clock.advance(10);
    let mut next = m.clone();
    next.config = json!({"init": {"cmd": ["true"]}});
    next.state = Stopped;
    let upd = s.update_machine(&next).unwrap();
    assert_eq!(upd.updated_at_ms, 110);
    assert_eq!(upd.created_at_ms, m.created_at_ms);
    assert_eq!(upd.config, next.config);
    assert_eq!(upd.state, Stopped);

    // Move to another host with a new instance and address, only from `stopped`.
    let field = s.allocate_machine_field(h2).unwrap();
    let moved = Machine {
        host: Some(h2),
        region: "ams".into(),
        machine_field: Some(field),
        private_ip: Some(FleetAddr::primary(m.network_id, h2, field).to_string()),
        instance_id: new_instance_id(),
        state: Starting,
        ..upd.clone()
    };
    fails_cleanly(fx, "illegal_transition", || {
        s.update_machine_if(&moved, &[Started])
    });
    let got = s.update_machine_if(&moved, &[Stopped]).unwrap();
    assert_eq!((got.host, got.state), (Some(h2), Starting));
    assert_eq!(s.list_machines_on_host(h2).unwrap(), vec![got.clone()]);
    assert!(s.list_machines_on_host(h1).unwrap().is_empty());
    assert_eq!(
        s.machines_per_host().unwrap(),
        [(h2, 1)].into_iter().collect()
    );

    // The app, and so org and network, cannot change.
    fails_cleanly(fx, "invalid", || {
        s.update_machine(&Machine {
            app: "api".into(),
            ..got.clone()
        })
    });
    fails_cleanly(fx, "not_found", || {
        s.update_machine(&Machine {
            id: new_machine_id(),
            ..got.clone()
        })
    });
    // Destroyed machines leave the listings but not the full history.
    s.transition(&m.id, &[Starting], Destroyed).unwrap();
    assert!(s.list_machines(None).unwrap().is_empty());
    assert!(s.list_machines_on_host(h2).unwrap().is_empty());
    assert_eq!(s.list_machines_all(Some("web")).unwrap().len(), 1);
}

/// A machine placed and created with its first event, and a transition with its event: each
/// one step, both parts or neither.
fn placed_creates_and_recorded_transitions_are_one_step(fx: &Fx) {
    let s = fx.open();
    let app = s.create_app("web", "acme").unwrap();
    let host = s.register_host("ord", "/h1").unwrap().id;
    let template = |id: &str| Machine {
        id: id.to_owned(),
        name: "m".into(),
        app: "web".into(),
        org: app.org.clone(),
        network_id: app.network_id,
        host: Some(host),
        region: "ord".into(),
        machine_field: None,
        private_ip: None,
        instance_id: new_instance_id(),
        state: Created,
        config: json!({"init": {"cmd": ["sleep", "inf"]}}),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    let created = NewEvent::new("launch", "created", "user", json!({"n": 1}));
    let a = s
        .create_machine_placed(&template(&new_machine_id()), &created)
        .unwrap();
    let b = s
        .create_machine_placed(&template(&new_machine_id()), &created)
        .unwrap();
    let (fa, fb) = (a.machine_field.unwrap(), b.machine_field.unwrap());
    assert_ne!(fa, fb, "a field is handed out once");
    assert_ne!(s.allocate_machine_field(host).unwrap(), fb);
    assert_eq!(
        a.private_ip.as_deref(),
        Some(
            FleetAddr::primary(app.network_id, host, fa)
                .to_string()
                .as_str()
        )
    );
    assert_eq!(s.get_machine(&a.id).unwrap(), a);
    let evs = s.events(&a.id).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].r#type.as_str(), evs[0].status.as_str()),
        ("launch", "created")
    );
    assert_eq!(evs[0].request, json!({"n": 1}));

    // Refused: nothing placed, no field burned, no event.
    fails_cleanly(fx, "conflict", || {
        s.create_machine_placed(&template(&a.id), &created)
    });
    fails_cleanly(fx, "not_found", || {
        let mut m = template(&new_machine_id());
        m.host = Some(HostId::new(u32::MAX).unwrap());
        s.create_machine_placed(&m, &created)
    });

    let started = NewEvent::new("start", "started", "flyd", json!({}));
    let m = s
        .transition_recorded(&a.id, &[Created], Started, &started)
        .unwrap();
    assert_eq!(m.state, Started);
    let evs = s.events(&a.id).unwrap();
    assert_eq!(evs.len(), 2);
    assert!(evs[0].id < evs[1].id, "{evs:?}");
    assert_eq!(evs[1].status, "started");
    // An illegal transition records no event either.
    fails_cleanly(fx, "illegal_transition", || {
        s.transition_recorded(&a.id, &[Created], Stopped, &started)
    });
    assert_eq!(s.events(&a.id).unwrap().len(), 2);

    // A migration's phase and the event of what its step did: one write, both or neither.
    let mig = s
        .create_migration(&MigrationRecord {
            id: "mig_rec".into(),
            machine_id: a.id.clone(),
            app: "web".into(),
            network_id: app.network_id.get(),
            phase: "pending".into(),
            finished: false,
            drain: None,
            detail: json!({}),
            revision: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        })
        .unwrap();
    let synced = NewEvent::new(
        "migrate",
        "synced",
        "ferry",
        json!({"migration": "mig_rec"}),
    );
    let next = MigrationRecord {
        phase: "synced".into(),
        ..mig.clone()
    };
    let saved = s.update_migration_recorded(&next, Some(&synced)).unwrap();
    assert_eq!((saved.revision, saved.phase.as_str()), (2, "synced"));
    let evs = s.events(&a.id).unwrap();
    assert_eq!(evs.len(), 3);
    assert!(evs[1].id < evs[2].id, "{evs:?}");
    assert_eq!(
        (evs[2].r#type.as_str(), evs[2].status.as_str()),
        ("migrate", "synced")
    );
    assert_eq!(evs[2].request, json!({"migration": "mig_rec"}));
    // A stale revision: no phase change, no event.
    fails_cleanly(fx, "stale_revision", || {
        s.update_migration_recorded(&next, Some(&synced))
    });
    assert_eq!(s.events(&a.id).unwrap().len(), 3);
    assert_eq!(s.get_migration("mig_rec").unwrap().revision, 2);
    // No event: a plain update.
    let plain = s.update_migration_recorded(&saved, None).unwrap();
    assert_eq!(plain.revision, 3);
    assert_eq!(s.events(&a.id).unwrap().len(), 3);
}

#[test]
fn in_memory_store_works_and_ids_have_their_shapes() {
    let s = SqliteStore::in_memory().unwrap();
    assert!(s.path().is_none());
    let org = s.ensure_org("personal").unwrap();
    assert_eq!(org.network_id.get(), 1);
    for _ in 0..100 {
        let id = new_machine_id();
        assert!(is_machine_id(&id), "{id}");
    }
    let a = new_instance_id();
    assert_eq!(a.len(), 26);
    assert!(ulid::Ulid::from_string(&a).is_ok());
    s.kv_put("k", "1").unwrap();
    s.kv_put("k", "2").unwrap();
    assert_eq!(s.kv_get("k").unwrap().as_deref(), Some("2"));
}

#[test]
fn machine_state_names() {
    for st in MachineState::ALL {
        assert_eq!(st.to_string().parse::<MachineState>().unwrap(), st);
        assert_eq!(
            serde_json::to_value(st).unwrap(),
            json!(st.as_str()),
            "serde and Display agree"
        );
    }
    assert_eq!("started".parse::<MachineState>().unwrap(), Started);
    assert!("Started".parse::<MachineState>().is_err());
    let terminal: Vec<_> = MachineState::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect();
    assert_eq!(terminal, [Destroyed, Migrated]);
}

/// A subscriber hears of every change of machines, hosts and the bridge, made through another
/// handle on etcd (another server), or through its own on SQLite (its one process); a change
/// elsewhere (a setting) wakes nobody.
fn subscribers_hear_of_changes(fx: &Fx) {
    let (writer, reader) = fx.writer_and_reader();
    let rx = reader.subscribe().unwrap();
    let wait = |what: &str, moved: &dyn Fn(&Changes) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !moved(&rx.borrow()) {
            assert!(std::time::Instant::now() < deadline, "no notice of {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    if fx.etcd.is_some() {
        // The watch is open once it said "everything may have changed".
        wait("the watch opening", &|c| c.bridge > 0);
    }
    let base = *rx.borrow();
    writer.kv_put("fleet", "x").unwrap();
    writer
        .put_bridge_mapping(&records::mapping(1, "fdaa::a", "fdaa::b"))
        .unwrap();
    wait("a mapping", &|c| c.bridge > base.bridge);
    let host = writer.register_host("ord", "").unwrap();
    wait("a host", &|c| c.hosts > base.hosts);
    writer.create_app("web", "acme").unwrap();
    let m = new_machine(writer.as_ref(), "web", host.id);
    let now = *rx.borrow();
    writer.transition(&m.id, &[Created], Starting).unwrap();
    wait("a transition", &|c| c.machines > now.machines);
}

fn hosts_leave_only_when_empty_and_their_ids_stay_burned(fx: &Fx) {
    let s = fx.open();
    s.create_app("web", "acme").unwrap();
    let h = s.register_host("ord", "https://h").unwrap();
    let m = new_machine(s.as_ref(), "web", h.id);
    // A machine still lives there: refused, nothing changed.
    let e = fails_cleanly(fx, "conflict", || s.remove_host(h.id));
    assert!(e.to_string().contains("drain"), "{e}");
    s.transition(&m.id, &[Created], Destroyed).unwrap();
    s.remove_host(h.id).unwrap();
    fails_cleanly(fx, "not_found", || s.get_host(h.id));
    fails_cleanly(fx, "not_found", || s.remove_host(h.id));
    assert!(s.list_hosts().unwrap().iter().all(|x| x.id != h.id));
    // The destroyed machine's record stays; the host ID is never handed out again.
    assert_eq!(s.get_machine(&m.id).unwrap().state, Destroyed);
    let next = fx.open().register_host("ord", "https://h2").unwrap();
    assert!(
        next.id.get() > h.id.get(),
        "{next:?} reuses or precedes {h:?}"
    );
}

/// The summaries (what DNS and the bridge gates read on every change) are exactly the whole
/// records cut down: same machines, same order, same host filter, terminal ones left out, and
/// the process group read as `config.metadata.process_group.as_str()` reads it.
fn machine_summaries_are_the_records_cut_down(fx: &Fx) {
    let clock = ManualClock::new(100);
    let s = fx.open_clock(&clock);
    s.create_app("web", "acme").unwrap();
    s.create_app("api", "other").unwrap();
    let h1 = s.register_host("ord", "/h1").unwrap().id;
    let h2 = s.register_host("ams", "/h2").unwrap().id;
    assert!(s.list_machine_summaries(None).unwrap().is_empty());
    let configs = [
        json!({"init": {"cmd": ["true"]}, "metadata": {"process_group": "worker", "a": [1, {"b": 2}]}}),
        json!({"metadata": {"a": "x", "process_group": "esc\"aped\u{e9}"}}),
        json!({"metadata": {"process_group": 7}}),
        json!({"metadata": {"process_group": {"nested": "no"}}}),
        json!({"metadata": "not an object"}),
        json!({"guest": {"memory_mb": 256}}),
        json!({}),
    ];
    let mut ids = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        // Same clock for some: "oldest first" must break ties as list_machines does.
        clock.advance((i % 2) as i64);
        let (app, host) = if i % 3 == 0 { ("api", h2) } else { ("web", h1) };
        let mut m = new_machine(&*s, app, host);
        m.config = config.clone();
        let m = s.update_machine(&m).unwrap();
        ids.push(m.id);
    }
    s.transition(&ids[1], &[Created], Started).unwrap();
    s.transition(&ids[2], &[Created], Destroyed).unwrap();
    s.transition(&ids[3], &[Created], Failed).unwrap();
    let cut = |ms: Vec<Machine>| ms.iter().map(MachineSummary::of).collect::<Vec<_>>();
    let all = s.list_machine_summaries(None).unwrap();
    assert_eq!(all, cut(s.list_machines(None).unwrap()));
    assert_eq!(
        all.len(),
        configs.len() - 1,
        "the destroyed one is left out"
    );
    for h in [h1, h2] {
        assert_eq!(
            s.list_machine_summaries(Some(h)).unwrap(),
            cut(s.list_machines_on_host(h).unwrap())
        );
    }
    let groups: Vec<_> = all.iter().map(|m| m.process_group.as_deref()).collect();
    assert_eq!(
        groups,
        [
            Some("worker"),
            Some("esc\"aped\u{e9}"),
            None,
            None,
            None,
            None
        ]
    );
    assert_eq!(all[0].org, "other");
    assert_eq!(all[1].state, Started);
}

/// The followed reads (what DNS and the bridge read when the change feed moves) equal the
/// linearizable ones: at once for the reader's own writes, and for another server's writes
/// (etcd) as soon as the reader's feed announced them; deletions and terminal machines too.
fn followed_reads_see_own_writes_at_once_and_others_once_announced(fx: &Fx) {
    let (writer, reader) = fx.writer_and_reader();
    let rx = reader.subscribe().unwrap();
    // Whatever the feed announced is in the followed reads.
    let same_once_announced = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let seen = *rx.borrow();
            let (all, maps) = (
                reader.followed_machine_summaries(None).unwrap(),
                reader.followed_bridge_mappings().unwrap(),
            );
            if all == reader.list_machine_summaries(None).unwrap()
                && maps == reader.list_bridge_mappings(None).unwrap()
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: the followed reads never caught up"
            );
            // Not yet equal: only because a notice is still to come.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while *rx.borrow() == seen {
                assert!(std::time::Instant::now() < deadline, "{what}: no notice");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    };
    writer.create_app("web", "acme").unwrap();
    writer.create_app("api", "other").unwrap();
    let h1 = writer.register_host("ord", "/h1").unwrap().id;
    let h2 = writer.register_host("ams", "/h2").unwrap().id;
    let mut ids = Vec::new();
    for i in 0..6 {
        let (app, host) = if i % 2 == 0 { ("web", h1) } else { ("api", h2) };
        ids.push(new_machine(writer.as_ref(), app, host).id);
    }
    writer
        .put_bridge_mapping(&records::mapping(1, "fdaa::a", "fdaa::b"))
        .unwrap();
    writer
        .put_bridge_mapping(&records::mapping(2, "fdaa::c", "fdaa::d"))
        .unwrap();
    same_once_announced("creates");
    writer.transition(&ids[0], &[Created], Started).unwrap();
    writer.transition(&ids[1], &[Created], Destroyed).unwrap();
    writer.remove_bridge_mapping(1, "fdaa::a").unwrap();
    same_once_announced("changes and removals");

    // The reader's own writes: in its followed reads at once, no notice needed.
    let mut m = reader.get_machine(&ids[2]).unwrap();
    m.host = Some(h2);
    let field = reader.allocate_machine_field(h2).unwrap();
    m.machine_field = Some(field);
    m.private_ip = Some(FleetAddr::primary(m.network_id, h2, field).to_string());
    reader.update_machine(&m).unwrap();
    reader.transition(&ids[3], &[Created], Failed).unwrap();
    reader
        .put_bridge_mapping(&records::mapping(3, "fdaa::e", "fdaa::f"))
        .unwrap();
    for h in [None, Some(h1), Some(h2)] {
        assert_eq!(
            reader.followed_machine_summaries(h).unwrap(),
            reader.list_machine_summaries(h).unwrap(),
            "host {h:?}"
        );
    }
    let on_h2: Vec<_> = reader
        .followed_machine_summaries(Some(h2))
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert!(on_h2.contains(&ids[2]), "the moved machine: {on_h2:?}");
    let maps = reader.followed_bridge_mappings().unwrap();
    assert_eq!(maps, reader.list_bridge_mappings(None).unwrap());
    assert_eq!(
        maps.iter().map(|m| m.network_id).collect::<Vec<_>>(),
        [2, 3]
    );
}

/// Instantiates every conformance test once per backend: `sqlite::NAME` and `etcd::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::Fx::new(super::Backend::Sqlite)); } )*
        }
        mod etcd {
            $( #[test] fn $name() { super::$name(&super::Fx::new(super::Backend::Etcd)); } )*
        }
    };
}

conformance!(
    data_survive_reopen,
    placed_creates_and_recorded_transitions_are_one_step,
    network_ids_never_repeat_across_reopen,
    host_ids_never_repeat_across_reopen_and_put_host_burns_its_id,
    machine_fields_never_repeat_across_reopen_and_destroy,
    app_names_are_unique_fleet_wide,
    delete_app_is_refused_while_machines_live,
    transition_is_compare_and_set,
    concurrent_transitions_have_exactly_one_winner,
    events_come_back_oldest_first,
    leases_hold_expire_and_check_nonces,
    named_locks_hold_and_expire,
    locks_refresh_in_one_batch,
    machine_records_are_validated_and_failures_change_nothing,
    update_machine_and_its_compare_and_set_variant,
    volumes_are_created_listed_and_compare_and_swapped,
    migrations_keep_one_active_per_machine,
    policies_are_created_once_then_compare_and_swapped,
    instance_histories_append_once_in_order,
    bridge_mappings_change_one_at_a_time_or_by_network_revision,
    concurrent_cas_updates_lose_nothing,
    concurrent_migrations_keep_every_record_and_index,
    concurrent_bridge_changes_lose_no_mapping,
    concurrent_allocations_never_repeat,
    concurrent_machine_creates_are_all_indexed,
    concurrent_delete_app_never_orphans_a_machine,
    fifty_migrations_across_ten_networks_lose_nothing,
    subscribers_hear_of_changes,
    tokens_are_created_once_listed_and_revoked,
    hosts_leave_only_when_empty_and_their_ids_stay_burned,
    machine_summaries_are_the_records_cut_down,
    followed_reads_see_own_writes_at_once_and_others_once_announced,
);
