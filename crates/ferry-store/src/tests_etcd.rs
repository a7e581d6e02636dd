//! Tests of what only the etcd backend has: members that die and come back, a 3-member cluster
//! losing one member, the synchronous calls made from inside tokio runtimes, and the latency of
//! `create_machine` on both backends (printed for the benchmark).

use super::{new_machine, Backend, Fx};
use crate::testing::EtcdCluster;
use crate::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Calls `f` until it succeeds, for at most `within` (a client reconnecting after a restart).
#[track_caller]
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), "unavailable", "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("still failing after {within:?}: {e}"),
        }
    }
}

#[test]
fn etcd_down_is_unavailable_changes_nothing_and_recovers() {
    let mut c = EtcdCluster::start(1).unwrap();
    let s = EtcdStore::connect(&c.endpoints(), "/down").unwrap();
    let org = s.ensure_org("acme").unwrap();
    c.kill(0);
    let t = Instant::now();
    for r in [s.ensure_org("other").map(drop), s.get_org("acme").map(drop)] {
        let e = r.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
        assert_eq!(e.code(), "unavailable");
    }
    // Bounded: the API must answer 503 promptly, not hang.
    assert!(t.elapsed() < 3 * etcd::OP_TIMEOUT);
    c.restart(0).unwrap();
    // The same handle recovers by itself.
    assert_eq!(
        eventually(Duration::from_secs(15), || s.get_org("acme")),
        org
    );
    assert!(s.get_org("other").unwrap_err().is_not_found());
    // A store cannot be opened on an endpoint nobody serves.
    c.kill(0);
    let e = EtcdStore::connect(&c.endpoints(), "/down").unwrap_err();
    assert_eq!(e.code(), "unavailable", "{e}");
}

#[test]
fn three_member_cluster_goes_on_without_one_member() {
    let mut c = EtcdCluster::start(3).unwrap();
    let s = open(&c.url("/trio")).unwrap();
    s.create_app("web", "acme").unwrap();
    let h = s.register_host("ord", "/h1").unwrap().id;
    for victim in 0..3 {
        c.kill(victim);
        // Quorum (2 of 3) holds: every call goes on, through whichever member answers (also
        // when the killed member was the leader: the election fits in a call's deadline).
        for _ in 0..5 {
            s.allocate_machine_field(h).unwrap();
        }
        new_machine(&*s, "web", h);
        c.restart(victim).unwrap();
    }
    assert_eq!(s.list_machines(Some("web")).unwrap().len(), 3);
    // Without quorum: unavailable, nothing changed; all back: service resumes with no step.
    c.kill(0);
    c.kill(1);
    let e = s.ensure_org("no-quorum").unwrap_err();
    assert_eq!(e.code(), "unavailable", "{e}");
    c.restart_all().unwrap();
    eventually(Duration::from_secs(20), || s.list_apps(None));
    assert!(s.get_org("no-quorum").unwrap_err().is_not_found());
    assert_eq!(s.list_machines(Some("web")).unwrap().len(), 3);
}

#[test]
fn sync_calls_work_from_inside_tokio_runtimes() {
    let fx = Fx::new(Backend::Etcd);
    let s = fx.open();
    // A multi-threaded runtime's worker (an axum handler): the wait is block_in_place'd.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s2 = s.clone();
    let org = rt
        .block_on(async move { tokio::spawn(async move { s2.ensure_org("acme") }).await })
        .unwrap()
        .unwrap();
    // A current-thread runtime: the call blocks its only thread, and still completes because
    // the client's futures run on the store's own runtime.
    let ct = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s3 = s.clone();
    assert_eq!(ct.block_on(async move { s3.get_org("acme") }).unwrap(), org);
    // The last handle dropped inside a runtime must not panic (the store's runtime is shut
    // down in the background).
    drop(s);
    let last = fx.open();
    rt.block_on(async move {
        tokio::spawn(async move {
            last.get_org("acme").unwrap();
            drop(last);
        })
        .await
        .unwrap()
    });
}

/// p50/p99 of `create_machine` (field allocation included, as the API does it) on each backend,
/// printed for BENCHMARKS.md; run with `--nocapture` to see them.
#[test]
fn create_machine_latency_is_measured_on_both_backends() {
    for b in [Backend::Sqlite, Backend::Etcd] {
        let fx = Fx::new(b);
        let s: Arc<dyn Store> = fx.open();
        s.create_app("web", "acme").unwrap();
        let h = s.register_host("ord", "/h1").unwrap().id;
        let mut ms: Vec<f64> = (0..60)
            .map(|_| {
                let t = Instant::now();
                new_machine(&*s, "web", h);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        eprintln!(
            "create_machine {b:?}: p50 {:.2} ms, p99 {:.2} ms ({} machines)",
            pct(0.5),
            pct(0.99),
            ms.len()
        );
        assert_eq!(s.list_machines(Some("web")).unwrap().len(), ms.len());
    }
}

/// Two servers on one etcd: each remembers what it wrote (and skips reading it again), so these
/// check that a server never acts on its memory once the other changed the key: a lock it held
/// and lost is not refreshed, a stale migration revision is refused, a machine's state moved by
/// the other is seen, and a refusal computed from memory is not given when etcd says otherwise.
#[test]
fn a_server_never_acts_on_what_it_wrote_once_another_server_changed_it() {
    let c = EtcdCluster::start(1).unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let a = EtcdStore::connect_with_clock(&c.endpoints(), "/two", clock.clone()).unwrap();
    let b = EtcdStore::connect_with_clock(&c.endpoints(), "/two", clock.clone()).unwrap();

    // A lock A holds, lets expire, and B takes: A's refresh with its old nonce is refused.
    let la = a.acquire_lock("net/1", 1_000, "a").unwrap();
    a.refresh_lock("net/1", &la.nonce, 1_000).unwrap();
    clock.advance(2_000);
    let lb = b.acquire_lock("net/1", 60_000, "b").unwrap();
    let e = a.refresh_lock("net/1", &la.nonce, 1_000).unwrap_err();
    assert!(matches!(e, StoreError::LockMismatch { .. }), "{e:?}");
    assert_eq!(
        b.refresh_lock("net/1", &lb.nonce, 60_000).unwrap().owner,
        "b"
    );
    // ...and A's acquire sees B's lock, not the expired one it remembers writing.
    let e = a.acquire_lock("net/1", 1_000, "a").unwrap_err();
    assert!(matches!(e, StoreError::LockHeld { .. }), "{e:?}");

    // A migration A wrote, then B updated: A's update from the old revision is refused, and
    // from B's revision it lands on top of B's change.
    a.create_app("web", "acme").unwrap();
    let h = a.register_host("ord", "/h1").unwrap().id;
    let m = new_machine(&a, "web", h);
    let rec = MigrationRecord {
        id: "mig_two".into(),
        machine_id: m.id.clone(),
        app: "web".into(),
        network_id: m.network_id.get(),
        phase: "pending".into(),
        finished: false,
        drain: None,
        detail: serde_json::json!({"step": "a"}),
        revision: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    let r1 = a.create_migration(&rec).unwrap();
    let r2 = a
        .update_migration(&MigrationRecord {
            phase: "locked".into(),
            ..r1.clone()
        })
        .unwrap();
    let r3 = b
        .update_migration(&MigrationRecord {
            phase: "noticed".into(),
            detail: serde_json::json!({"step": "b"}),
            ..r2.clone()
        })
        .unwrap();
    let e = a
        .update_migration(&MigrationRecord {
            phase: "precopied".into(),
            ..r2.clone()
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::StaleRevision { .. }), "{e:?}");
    let r4 = a
        .update_migration(&MigrationRecord {
            phase: "precopied".into(),
            ..r3.clone()
        })
        .unwrap();
    assert_eq!(r4.revision, r3.revision + 1);
    assert_eq!(b.get_migration("mig_two").unwrap().phase, "precopied");

    // A machine A moved to `starting`, B to `started`: A's move from `starting` is refused
    // (etcd says `started`), and A's move from `started` lands.
    a.transition(&m.id, &[MachineState::Created], MachineState::Starting)
        .unwrap();
    b.transition(&m.id, &[MachineState::Starting], MachineState::Started)
        .unwrap();
    let e = a
        .transition(&m.id, &[MachineState::Starting], MachineState::Failed)
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::IllegalTransition {
                from: MachineState::Started,
                ..
            }
        ),
        "{e:?}"
    );
    let now = a
        .transition(&m.id, &[MachineState::Started], MachineState::Stopping)
        .unwrap();
    assert_eq!(now.state, MachineState::Stopping);
    assert_eq!(b.get_machine(&m.id).unwrap().state, MachineState::Stopping);
}

/// The followed reads come from the watch's memory while the watch follows (not from a range
/// over etcd), go back to etcd while it is broken (etcd down), and follow again after: a change
/// made once etcd is back is in them as soon as it is announced.
#[test]
fn followed_reads_are_served_by_the_watch_and_survive_etcd_restarting() {
    let mut c = EtcdCluster::start(1).unwrap();
    let reader = EtcdStore::connect(&c.endpoints(), "/follow").unwrap();
    let writer = EtcdStore::connect(&c.endpoints(), "/follow").unwrap();
    let until = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert!(!reader.followed_live(), "no watch before a subscriber");
    writer.create_app("web", "acme").unwrap();
    let h = writer.register_host("ord", "/h1").unwrap().id;
    let first = new_machine(&writer, "web", h);
    let _rx = reader.subscribe().unwrap();
    until("the watch follows", &|| reader.followed_live());
    let ids = |s: &EtcdStore| -> Vec<String> {
        s.followed_machine_summaries(None)
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect()
    };
    assert_eq!(
        ids(&reader),
        std::slice::from_ref(&first.id),
        "loaded when the watch opened"
    );

    c.kill(0);
    until("the broken watch is noticed", &|| !reader.followed_live());
    let e = reader.followed_machine_summaries(None).unwrap_err();
    assert_eq!(e.code(), "unavailable", "{e}");
    c.restart(0).unwrap();
    let second = eventually(Duration::from_secs(15), || {
        writer.register_host("ams", "/h2").map(drop)?;
        Ok(new_machine(&writer, "web", h))
    });
    until("the watch follows again", &|| reader.followed_live());
    until("the change made after the restart", &|| {
        ids(&reader) == [first.id.clone(), second.id.clone()]
    });
}

/// A plain etcd client beside the store: what etcd itself holds.
struct Raw {
    rt: tokio::runtime::Runtime,
    client: etcd_client::Client,
}

impl Raw {
    fn connect(endpoints: &[String]) -> Raw {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(etcd_client::Client::connect(endpoints, None))
            .unwrap();
        Raw { rt, client }
    }

    /// The etcd lease `key` is attached to (`Some(0)`: none), `None` if the key is absent.
    fn lease_of(&mut self, key: &str) -> Option<i64> {
        let r = self.rt.block_on(self.client.get(key, None)).unwrap();
        r.kvs().first().map(|kv| kv.lease())
    }

    fn revoke(&mut self, lease: i64) {
        self.rt.block_on(self.client.lease_revoke(lease)).unwrap();
    }
}

#[test]
fn locks_and_leases_live_on_etcd_leases_their_holder_keeps_alive() {
    let c = EtcdCluster::start(1).unwrap();
    let mut raw = Raw::connect(&c.endpoints());
    let a = EtcdStore::connect(&c.endpoints(), "/held").unwrap();
    a.create_app("web", "acme").unwrap();
    let h = a.register_host("ord", "/h1").unwrap().id;
    let m = new_machine(&a, "web", h);
    let lock = a.acquire_lock("claim-x", 1_000, "server-a").unwrap();
    let lease = a.acquire_lease(&m.id, 1_000, "api", "").unwrap();
    let (lock_key, lease_key) = ("/held/locks/claim-x", format!("/held/leases/{}", m.id));
    let id = raw.lease_of(lock_key).unwrap();
    assert_ne!(id, 0, "the lock is attached to an etcd lease");
    assert_eq!(
        raw.lease_of(&lease_key),
        Some(id),
        "one lease per TTL bucket"
    );

    // Refreshed for longer than the etcd lease's own TTL (3 s for a 1 s record): the
    // keep-alives hold it, and each refresh keeps the key on it.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        a.refresh_lock("claim-x", &lock.nonce, 1_000).unwrap();
        a.refresh_lease(&m.id, &lease.nonce, 1_000).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(raw.lease_of(lock_key), Some(id));
    assert_eq!(raw.lease_of(&lease_key), Some(id));
    // A batched refresh keeps it there too (a put without the lease would detach the key).
    a.refresh_locks(&[("claim-x", &lock.nonce, 1_000)]).unwrap();
    assert_eq!(raw.lease_of(lock_key), Some(id));

    // The holder dies without releasing anything: etcd deletes both keys itself, within the
    // etcd lease's TTL (3 s) and a margin.
    drop(a);
    let t = Instant::now();
    while raw.lease_of(lock_key).is_some() || raw.lease_of(&lease_key).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "keys still there {:?} after the holder died",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Another server takes the lock, on its own lease.
    let b = EtcdStore::connect(&c.endpoints(), "/held").unwrap();
    assert_eq!(b.current_lock("claim-x").unwrap(), None);
    b.acquire_lock("claim-x", 1_000, "server-b").unwrap();
    let other = raw.lease_of(lock_key).unwrap();
    assert!(other != 0 && other != id);
}

#[test]
fn a_lost_etcd_lease_loses_its_locks_and_the_next_write_takes_a_new_one() {
    let c = EtcdCluster::start(1).unwrap();
    let mut raw = Raw::connect(&c.endpoints());
    let a = EtcdStore::connect(&c.endpoints(), "/lost").unwrap();
    let lock = a.acquire_lock("net-1", 5_000, "a").unwrap();
    let id = raw.lease_of("/lost/locks/net-1").unwrap();
    // etcd drops the lease (as it does when keep-alives stop for longer than its TTL).
    raw.revoke(id);
    assert_eq!(raw.lease_of("/lost/locks/net-1"), None);
    // The holder learns at its next refresh that it lost the lock...
    let e = a.refresh_lock("net-1", &lock.nonce, 5_000).unwrap_err();
    assert!(matches!(e, StoreError::LockMismatch { .. }), "{e:?}");
    assert_eq!(a.current_lock("net-1").unwrap(), None);
    // ...and its next acquire, which first names the revoked lease, runs again on a new one.
    let again = a.acquire_lock("net-1", 5_000, "a").unwrap();
    assert_ne!(again.nonce, lock.nonce);
    let new = raw.lease_of("/lost/locks/net-1").unwrap();
    assert!(new != 0 && new != id, "{new} vs {id}");
    a.refresh_lock("net-1", &again.nonce, 5_000).unwrap();
    assert_eq!(raw.lease_of("/lost/locks/net-1"), Some(new));
}
