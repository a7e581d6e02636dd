//! Conformance tests of the typed records (volumes, migrations, policies, instances, bridge),
//! run against both backends by `conformance!` in `tests.rs`, and the concurrency tests: many
//! threads on separate handles (as separate servers) doing compare-and-swap loops, then a check
//! that no update, record or index entry was lost.

use super::{fails_cleanly, new_machine, Fx};
use crate::*;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Barrier};

fn volume(id: &str, state: &str) -> VolumeRecord {
    VolumeRecord {
        id: id.into(),
        state: state.into(),
        host: None,
        destroy_after_ms: None,
        detail: json!({"size_mb": 64, "counter": 0}),
        revision: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn migration(id: &str, machine: &str, network_id: u32) -> MigrationRecord {
    MigrationRecord {
        id: id.into(),
        machine_id: machine.into(),
        app: "web".into(),
        network_id,
        phase: "pending".into(),
        finished: false,
        drain: None,
        detail: json!({"from_host": "80000001"}),
        revision: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn ids<T>(v: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    v.iter().map(|r| id(r).to_owned()).collect()
}

pub(super) fn volumes_are_created_listed_and_compare_and_swapped(fx: &Fx) {
    let clock = ManualClock::new(1_000);
    let s = fx.open_clock(&clock);
    let a = s.create_volume(&volume("vol_a", "active")).unwrap();
    assert_eq!(
        (a.revision, a.created_at_ms, a.updated_at_ms),
        (1, 1_000, 1_000)
    );
    clock.advance(1);
    s.create_volume(&volume("vol_b", "active")).unwrap();
    clock.advance(1);
    s.create_volume(&volume("vol_c", "pending_destroy"))
        .unwrap();
    let err = fails_cleanly(fx, "conflict", || s.create_volume(&volume("vol_a", "x")));
    assert!(
        matches!(err, StoreError::Exists { kind: "volume", .. }),
        "{err}"
    );
    fails_cleanly(fx, "invalid", || s.create_volume(&volume("", "active")));
    assert_eq!(s.get_volume("vol_a").unwrap(), a);
    fails_cleanly(fx, "not_found", || s.get_volume("vol_zz"));

    let by = |st: Option<&str>| ids(&s.list_volumes(st).unwrap(), |v| &v.id);
    assert_eq!(by(None), ["vol_a", "vol_b", "vol_c"]);
    assert_eq!(by(Some("active")), ["vol_a", "vol_b"]);
    assert_eq!(by(Some("pending_destroy")), ["vol_c"]);

    // A CAS update moves the state index with the record.
    clock.advance(10);
    let mut next = a.clone();
    next.state = "pending_destroy".into();
    next.destroy_after_ms = Some(99);
    next.host = Some("80000001".into());
    next.detail["counter"] = json!(1);
    let a2 = s.update_volume(&next).unwrap();
    assert_eq!(
        (a2.revision, a2.created_at_ms, a2.updated_at_ms),
        (2, 1_000, 1_012)
    );
    assert_eq!(a2.detail["counter"], 1);
    assert_eq!(by(Some("active")), ["vol_b"]);
    assert_eq!(by(Some("pending_destroy")), ["vol_a", "vol_c"]);
    // The same update again names revision 1: stale, and nothing changes.
    let err = fails_cleanly(fx, "stale_revision", || s.update_volume(&next));
    assert!(
        matches!(
            err,
            StoreError::StaleRevision {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
    fails_cleanly(fx, "not_found", || s.update_volume(&volume("vol_zz", "x")));
    fails_cleanly(fx, "stale_revision", || s.delete_volume("vol_a", 1));
    s.delete_volume("vol_a", 2).unwrap();
    fails_cleanly(fx, "not_found", || s.get_volume("vol_a"));
    assert_eq!(by(Some("pending_destroy")), ["vol_c"]);
    // Survives a reopen, like everything else.
    assert_eq!(
        ids(&fx.open().list_volumes(None).unwrap(), |v| &v.id),
        ["vol_b", "vol_c"]
    );
}

pub(super) fn migrations_keep_one_active_per_machine(fx: &Fx) {
    let clock = ManualClock::new(5_000);
    let s = fx.open_clock(&clock);
    let m1 = s.create_migration(&migration("mig_1", "m-a", 7)).unwrap();
    assert_eq!((m1.revision, m1.created_at_ms), (1, 5_000));
    assert_eq!(s.active_migration("m-a").unwrap(), Some(m1.clone()));
    assert_eq!(s.active_migration("m-b").unwrap(), None);
    clock.advance(1);
    // A second one for the same machine: refused, naming the active one, nothing recorded.
    let err = fails_cleanly(fx, "migration_in_progress", || {
        s.create_migration(&migration("mig_2", "m-a", 7))
    });
    assert!(
        matches!(&err, StoreError::MigrationActive { migration_id, .. } if migration_id == "mig_1"),
        "{err}"
    );
    fails_cleanly(fx, "conflict", || {
        s.create_migration(&migration("mig_1", "m-c", 7))
    });
    fails_cleanly(fx, "invalid", || {
        s.create_migration(&migration("", "m-c", 7))
    });
    let mut drained = migration("mig_3", "m-b", 8);
    drained.drain = Some("80000002".into());
    drained.app = "api".into();
    s.create_migration(&drained).unwrap();

    let list = |f| ids(&s.list_migrations(f).unwrap(), |m| &m.id);
    assert_eq!(list(MigrationFilter::All), ["mig_1", "mig_3"]);
    assert_eq!(list(MigrationFilter::Machine("m-a")), ["mig_1"]);
    assert_eq!(list(MigrationFilter::App("api")), ["mig_3"]);
    assert_eq!(list(MigrationFilter::Network(7)), ["mig_1"]);
    assert_eq!(list(MigrationFilter::Drain("80000002")), ["mig_3"]);
    assert_eq!(list(MigrationFilter::Unfinished), ["mig_1", "mig_3"]);
    assert!(list(MigrationFilter::Drain("nope")).is_empty());

    // Advance the phase (CAS), then finish: the active slot is freed in the same step.
    let mut next = m1.clone();
    next.phase = "locked".into();
    next.detail["new_field"] = json!(3);
    let m1b = s.update_migration(&next).unwrap();
    assert_eq!((m1b.revision, m1b.phase.as_str()), (2, "locked"));
    fails_cleanly(fx, "stale_revision", || s.update_migration(&next));
    // Machine, app and network never change.
    fails_cleanly(fx, "invalid", || {
        s.update_migration(&MigrationRecord {
            machine_id: "m-z".into(),
            ..m1b.clone()
        })
    });
    let done = s
        .update_migration(&MigrationRecord {
            phase: "done".into(),
            finished: true,
            ..m1b.clone()
        })
        .unwrap();
    assert_eq!(s.active_migration("m-a").unwrap(), None);
    assert_eq!(list(MigrationFilter::Unfinished), ["mig_3"]);
    // Finished stays finished.
    fails_cleanly(fx, "invalid", || {
        s.update_migration(&MigrationRecord {
            finished: false,
            ..done.clone()
        })
    });
    // The machine may migrate again.
    clock.advance(1);
    let m4 = s.create_migration(&migration("mig_4", "m-a", 7)).unwrap();
    assert_eq!(s.active_migration("m-a").unwrap(), Some(m4));
    assert_eq!(list(MigrationFilter::Machine("m-a")), ["mig_1", "mig_4"]);
    // A record created finished (an import, a test) takes no slot.
    let mut old = migration("mig_0", "m-b", 8);
    old.finished = true;
    s.create_migration(&old).unwrap();
    assert_eq!(
        s.active_migration("m-b").unwrap().map(|m| m.id),
        Some("mig_3".to_owned())
    );
}

pub(super) fn policies_are_created_once_then_compare_and_swapped(fx: &Fx) {
    let s = fx.open();
    assert_eq!(s.get_policy("web").unwrap(), None);
    let p = PolicyRecord {
        app: "web".into(),
        detail: json!({"max_unavailable": 1}),
        revision: 0,
    };
    let p1 = s.put_policy(&p).unwrap();
    assert_eq!(p1.revision, 1);
    let err = fails_cleanly(fx, "conflict", || s.put_policy(&p));
    assert!(matches!(err, StoreError::Exists { kind: "policy", .. }));
    let p2 = s
        .put_policy(&PolicyRecord {
            detail: json!({"max_unavailable": 2}),
            ..p1.clone()
        })
        .unwrap();
    assert_eq!(p2.revision, 2);
    fails_cleanly(fx, "stale_revision", || s.put_policy(&p1));
    assert_eq!(s.get_policy("web").unwrap(), Some(p2));
    assert_eq!(s.get_policy("api").unwrap(), None);
}

pub(super) fn instance_histories_append_once_in_order(fx: &Fx) {
    let s = fx.open();
    let rec = |iid: &str, mig: &str| InstanceRecord {
        machine_id: "m-a".into(),
        instance_id: iid.into(),
        host: "80000001".into(),
        private_ip: "fdaa:0:1:8000:1:0:1:2".into(),
        state: "migrated".into(),
        ended_at: "2026-12-02T00:00:00Z".into(),
        migration: mig.into(),
    };
    // Appended out of ID order: the history keeps append order.
    assert!(s.append_instance(&rec("01J2", "mig_1")).unwrap());
    assert!(s.append_instance(&rec("01J1", "mig_2")).unwrap());
    let before = fx.dump();
    // A resumed migration appends the same instance again: nothing changes.
    assert!(!s.append_instance(&rec("01J2", "mig_1")).unwrap());
    assert_eq!(fx.dump(), before);
    let got = s.list_instances("m-a").unwrap();
    assert_eq!(ids(&got, |r| &r.instance_id), ["01J2", "01J1"]);
    assert_eq!(got[1], rec("01J1", "mig_2"));
    assert!(s.list_instances("m-b").unwrap().is_empty());
}

pub(super) fn mapping(net: u32, old: &str, new: &str) -> BridgeMapping {
    BridgeMapping {
        network_id: net,
        old: old.into(),
        new: new.into(),
        retired: false,
        created_at_ms: 7,
    }
}

pub(super) fn bridge_mappings_change_one_at_a_time_or_by_network_revision(fx: &Fx) {
    let s = fx.open();
    assert_eq!(
        s.bridge_network(1).unwrap(),
        BridgeNetwork {
            network_id: 1,
            revision: 0,
            mappings: vec![]
        }
    );
    let n = s
        .put_bridge_mapping(&mapping(1, "fdaa::b", "fdaa::c"))
        .unwrap();
    assert_eq!(n.revision, 1);
    s.put_bridge_mapping(&mapping(1, "fdaa::a", "fdaa::c"))
        .unwrap();
    s.put_bridge_mapping(&mapping(2, "fdaa::a", "fdaa::d"))
        .unwrap();
    // Replacing one mapping leaves the others alone.
    let n = s
        .put_bridge_mapping(&mapping(1, "fdaa::b", "fdaa::e"))
        .unwrap();
    assert_eq!(n.revision, 3);
    assert_eq!(
        n.mappings,
        [
            mapping(1, "fdaa::a", "fdaa::c"),
            mapping(1, "fdaa::b", "fdaa::e")
        ]
    );
    let all = s.list_bridge_mappings(None).unwrap();
    assert_eq!(
        all.iter()
            .map(|m| (m.network_id, m.old.as_str()))
            .collect::<Vec<_>>(),
        [(1, "fdaa::a"), (1, "fdaa::b"), (2, "fdaa::a")]
    );
    assert_eq!(
        s.list_bridge_mappings(Some(2)).unwrap(),
        [mapping(2, "fdaa::a", "fdaa::d")]
    );

    // A batch planned on revision 3: re-point a chain and retire one, atomically.
    let mut retired = mapping(1, "fdaa::a", "fdaa::e");
    retired.retired = true;
    let n = s
        .update_bridge_network(1, 3, &[retired.clone()], &["fdaa::b".into()])
        .unwrap();
    assert_eq!((n.revision, n.mappings.clone()), (4, vec![retired.clone()]));
    // The same plan again is stale; a batch for another network is refused; nothing changes.
    let err = fails_cleanly(fx, "stale_revision", || {
        s.update_bridge_network(1, 3, &[mapping(1, "fdaa::x", "fdaa::y")], &[])
    });
    assert!(matches!(
        err,
        StoreError::StaleRevision {
            expected: 3,
            found: 4,
            ..
        }
    ));
    fails_cleanly(fx, "invalid", || {
        s.update_bridge_network(1, 4, &[mapping(2, "fdaa::x", "fdaa::y")], &[])
    });
    fails_cleanly(fx, "invalid", || {
        s.put_bridge_mapping(&mapping(1, "fdaa::x", "fdaa::x"))
    });
    // Removing is per mapping too, and bumps only its network.
    let n = s.remove_bridge_mapping(1, "fdaa::a").unwrap();
    assert_eq!((n.revision, n.mappings.len()), (5, 0));
    assert_eq!(s.bridge_network(2).unwrap().revision, 1);

    // Gates: per org or app, switched independently.
    s.set_bridge_gate(GateScope::Org, "acme", true).unwrap();
    s.set_bridge_gate(GateScope::App, "web/1", true).unwrap();
    s.set_bridge_gate(GateScope::App, "db", true).unwrap();
    s.set_bridge_gate(GateScope::App, "db", true).unwrap();
    s.set_bridge_gate(GateScope::App, "ghost", false).unwrap();
    assert_eq!(
        s.bridge_gates_off().unwrap(),
        [
            (GateScope::App, "db".to_owned()),
            (GateScope::App, "web/1".to_owned()),
            (GateScope::Org, "acme".to_owned())
        ]
    );
    s.set_bridge_gate(GateScope::App, "db", false).unwrap();
    assert_eq!(s.bridge_gates_off().unwrap().len(), 2);
    fails_cleanly(fx, "invalid", || {
        s.set_bridge_gate(GateScope::Org, "", true)
    });
}

const THREADS: usize = 8;

/// Runs `f(thread index, own store handle)` on [`THREADS`] threads started together, each with
/// a handle of its own (a server of its own), and returns their results.
fn race<T: Send + 'static>(
    fx: &Fx,
    f: impl Fn(usize, Arc<dyn Store>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (f, barrier, store) = (f.clone(), barrier.clone(), fx.open());
            std::thread::spawn(move || {
                barrier.wait();
                f(i, store)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

pub(super) fn concurrent_cas_updates_lose_nothing(fx: &Fx) {
    let s = fx.open();
    s.create_volume(&volume("vol_hot", "active")).unwrap();
    let rounds = 10;
    // Every thread adds 1 to the same counter `rounds` times by read-modify-CAS.
    let stale: Vec<usize> = race(fx, move |_, s| {
        let mut stale = 0;
        for _ in 0..rounds {
            loop {
                let mut v = s.get_volume("vol_hot").unwrap();
                v.detail["counter"] = json!(v.detail["counter"].as_u64().unwrap() + 1);
                match s.update_volume(&v) {
                    Ok(_) => break,
                    Err(StoreError::StaleRevision { .. }) => stale += 1,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        stale
    });
    let v = s.get_volume("vol_hot").unwrap();
    let total = (THREADS * rounds) as u64;
    assert_eq!(v.detail["counter"], total, "an update was lost");
    assert_eq!(v.revision, total + 1);
    eprintln!(
        "CAS retries on stale revisions: {}",
        stale.iter().sum::<usize>()
    );
}

pub(super) fn concurrent_migrations_keep_every_record_and_index(fx: &Fx) {
    let s = fx.open();
    let machines = ["m-0", "m-1", "m-2", "m-3"];
    let rounds = 3;
    for round in 0..rounds {
        // Every thread tries to start a migration of every machine: one wins per machine.
        let won: Vec<Vec<MigrationRecord>> = race(fx, move |t, s| {
            let mut won = Vec::new();
            for (i, m) in machines.iter().enumerate() {
                let id = format!("mig_r{round}_t{t}_{m}");
                match s.create_migration(&migration(&id, m, i as u32 % 2)) {
                    Ok(rec) => won.push(rec),
                    Err(StoreError::MigrationActive { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            won
        });
        let won: Vec<MigrationRecord> = won.into_iter().flatten().collect();
        assert_eq!(
            won.len(),
            machines.len(),
            "one winner per machine: {won:#?}"
        );
        for w in &won {
            assert_eq!(s.active_migration(&w.machine_id).unwrap().as_ref(), Some(w));
        }
        // Finish them concurrently (different machines, different threads).
        let won = Arc::new(won);
        race(fx, {
            let won = won.clone();
            move |t, s| {
                if let Some(w) = won.get(t) {
                    s.update_migration(&MigrationRecord {
                        phase: "done".into(),
                        finished: true,
                        ..w.clone()
                    })
                    .unwrap();
                }
            }
        });
        assert!(s
            .list_migrations(MigrationFilter::Unfinished)
            .unwrap()
            .is_empty());
    }
    let all = s.list_migrations(MigrationFilter::All).unwrap();
    assert_eq!(all.len(), machines.len() * rounds);
    for m in machines {
        assert_eq!(
            s.list_migrations(MigrationFilter::Machine(m))
                .unwrap()
                .len(),
            rounds
        );
        assert_eq!(s.active_migration(m).unwrap(), None);
    }
    let by_net: usize = [0, 1]
        .iter()
        .map(|n| {
            s.list_migrations(MigrationFilter::Network(*n))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(by_net, all.len(), "a network index entry is missing");
}

pub(super) fn concurrent_bridge_changes_lose_no_mapping(fx: &Fx) {
    let per_thread = 12;
    // Two threads per network: one puts single mappings, the other plans batches on the
    // network's revision (retrying when stale), as `bridge map` and a migration's switch would.
    race(fx, move |t, s| {
        let net = (t % 4) as u32 + 1;
        for i in 0..per_thread {
            let m = mapping(
                net,
                &format!("fdaa::{t}:{i}"),
                &format!("fdaa::ffff:{t}:{i}"),
            );
            if t < 4 {
                s.put_bridge_mapping(&m).unwrap();
                continue;
            }
            loop {
                let n = s.bridge_network(net).unwrap();
                match s.update_bridge_network(net, n.revision, std::slice::from_ref(&m), &[]) {
                    Ok(_) => break,
                    Err(StoreError::StaleRevision { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    let s = fx.open();
    let all = s.list_bridge_mappings(None).unwrap();
    assert_eq!(all.len(), THREADS * per_thread, "a mapping was lost");
    let mut per_net: BTreeMap<u32, usize> = BTreeMap::new();
    for m in &all {
        *per_net.entry(m.network_id).or_default() += 1;
    }
    for net in 1..=4 {
        assert_eq!(per_net[&net], 2 * per_thread);
        // Every change bumped its network's revision exactly once.
        assert_eq!(
            s.bridge_network(net).unwrap().revision,
            2 * per_thread as u64
        );
    }
}

pub(super) fn concurrent_allocations_never_repeat(fx: &Fx) {
    let s = fx.open();
    let host = s.register_host("ord", "/h0").unwrap().id;
    let got = race(fx, move |t, s| {
        let mut out = Vec::new();
        for i in 0..5 {
            let org = s.ensure_org(&format!("org-{t}-{i}")).unwrap();
            let h = s.register_host("ord", &format!("/h{t}-{i}")).unwrap();
            let f = s.allocate_machine_field(host).unwrap();
            out.push((org.network_id.get(), h.id.get(), f.0));
        }
        out
    });
    let got: Vec<_> = got.into_iter().flatten().collect();
    let nets: HashSet<_> = got.iter().map(|g| g.0).collect();
    let hosts: HashSet<_> = got.iter().map(|g| g.1).collect();
    let fields: HashSet<_> = got.iter().map(|g| g.2).collect();
    assert_eq!(nets.len(), got.len(), "a network ID was handed out twice");
    assert_eq!(hosts.len(), got.len(), "a host ID was handed out twice");
    assert_eq!(
        fields.len(),
        got.len(),
        "a machine field was handed out twice"
    );
    assert_eq!(s.list_hosts().unwrap().len(), got.len() + 1);
}

/// Machines created by several servers at once for one app: all recorded, all indexed.
pub(super) fn concurrent_machine_creates_are_all_indexed(fx: &Fx) {
    let s = fx.open();
    s.create_app("web", "acme").unwrap();
    let host = s.register_host("ord", "/h1").unwrap().id;
    let made = race(fx, move |_, s| {
        (0..4)
            .map(|_| new_machine(&*s, "web", host).id)
            .collect::<Vec<_>>()
    });
    let made: HashSet<String> = made.into_iter().flatten().collect();
    let listed = |v: Vec<Machine>| v.into_iter().map(|m| m.id).collect::<HashSet<_>>();
    assert_eq!(made.len(), THREADS * 4);
    assert_eq!(listed(s.list_machines(Some("web")).unwrap()), made);
    assert_eq!(listed(s.list_machines_on_host(host).unwrap()), made);
    assert_eq!(listed(s.list_machines(None).unwrap()), made);
}

/// Servers creating machines in an app while others delete it: the app is either gone with no
/// machine left of it, or still there with every machine created.
pub(super) fn concurrent_delete_app_never_orphans_a_machine(fx: &Fx) {
    let s = fx.open();
    let app = s.create_app("tmp", "acme").unwrap();
    let host = s.register_host("ord", "/h1").unwrap().id;
    let made = race(fx, move |t, s| {
        if t % 2 == 0 {
            let _ = s.delete_app("tmp");
            return None;
        }
        let field = s.allocate_machine_field(host).unwrap();
        let m = Machine {
            id: new_machine_id(),
            name: "x".into(),
            app: app.name.clone(),
            org: app.org.clone(),
            network_id: app.network_id,
            host: Some(host),
            region: "ord".into(),
            machine_field: Some(field),
            private_ip: None,
            instance_id: new_instance_id(),
            state: MachineState::Created,
            config: json!({}),
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        match s.create_machine(&m) {
            Ok(m) => Some(m.id),
            Err(StoreError::AppNotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    });
    let made: HashSet<String> = made.into_iter().flatten().collect();
    let left: HashSet<String> = s
        .list_machines_all(None)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        left, made,
        "a created machine is missing or an extra one exists"
    );
    match s.get_app("tmp") {
        Ok(_) => {}
        Err(StoreError::AppNotFound { .. }) => assert!(made.is_empty(), "orphans: {made:?}"),
        Err(e) => panic!("{e}"),
    }
}

/// Issue 14's scenario at the store's level: 50 migrations of 50 machines across 10 networks,
/// driven by 8 threads (each its own handle, as several servers), each migration advancing its
/// record phase by phase with compare-and-swap, mapping its old address in its network's bridge
/// and appending the old instance to the machine's history, while `bridge map` calls on the same
/// networks run alongside. Afterwards no record, index entry, mapping or instance is missing.
pub(super) fn fifty_migrations_across_ten_networks_lose_nothing(fx: &Fx) {
    const MIGRATIONS: usize = 50;
    const NETWORKS: u32 = 10;
    let phases = [
        "locked",
        "noticed",
        "precopied",
        "stopped",
        "synced",
        "switched",
        "mapped",
    ];
    race(fx, move |t, s| {
        for n in (t..MIGRATIONS).step_by(THREADS) {
            let net = n as u32 % NETWORKS + 1;
            let machine = format!("m-{n:02}");
            if t % 4 == 3 {
                // A `bridge map` caller on the same network, between migrations.
                s.put_bridge_mapping(&mapping(net, &format!("fdaa::{n}:99"), "fdaa::1"))
                    .unwrap();
            }
            let mut rec = s
                .create_migration(&migration(&format!("mig_{n:02}"), &machine, net))
                .unwrap();
            for phase in phases {
                rec.phase = phase.into();
                rec.detail[phase] = json!(true);
                rec = s.update_migration(&rec).unwrap();
                if phase == "switched" {
                    // The switch maps old -> new in its own network only.
                    let m = mapping(net, &format!("fdaa::{n}:1"), &format!("fdaa::{n}:2"));
                    s.put_bridge_mapping(&m).unwrap();
                    s.append_instance(&InstanceRecord {
                        machine_id: machine.clone(),
                        instance_id: format!("inst-{n}"),
                        host: "80000001".into(),
                        private_ip: format!("fdaa::{n}:1"),
                        state: "migrated".into(),
                        ended_at: "2026-12-02T00:00:00Z".into(),
                        migration: rec.id.clone(),
                    })
                    .unwrap();
                }
            }
            rec.phase = "done".into();
            rec.finished = true;
            s.update_migration(&rec).unwrap();
        }
    });
    let s = fx.open();
    let all = s.list_migrations(MigrationFilter::All).unwrap();
    assert_eq!(all.len(), MIGRATIONS);
    for m in &all {
        assert!(m.finished && m.phase == "done", "{m:?}");
        // Every phase's update is there: none overwrote another.
        for p in phases {
            assert_eq!(m.detail[p], true, "{} lost phase {p}", m.id);
        }
        assert_eq!(m.revision, phases.len() as u64 + 2);
        assert_eq!(s.active_migration(&m.machine_id).unwrap(), None);
        assert_eq!(s.list_instances(&m.machine_id).unwrap().len(), 1);
    }
    assert!(s
        .list_migrations(MigrationFilter::Unfinished)
        .unwrap()
        .is_empty());
    let per_net: usize = (1..=NETWORKS)
        .map(|n| {
            s.list_migrations(MigrationFilter::Network(n))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(per_net, MIGRATIONS, "a network index entry was lost");
    let maps = s.list_bridge_mappings(None).unwrap();
    let switched = maps.iter().filter(|m| m.old.ends_with(":1")).count();
    let by_hand = maps.iter().filter(|m| m.old.ends_with(":99")).count();
    assert_eq!(switched, MIGRATIONS, "a migration's mapping was lost");
    assert_eq!(
        by_hand,
        (0..MIGRATIONS).filter(|n| n % THREADS % 4 == 3).count()
    );
    for m in &maps {
        let n: usize = m.old["fdaa::".len()..]
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            m.network_id,
            n as u32 % NETWORKS + 1,
            "mapping in the wrong network"
        );
    }
}

fn token(id: &str, kind: TokenKind, org: Option<&str>) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        kind,
        org: org.map(str::to_owned),
        secret_hash: format!("hash-of-{id}"),
        description: format!("{id} for tests"),
        created_at_ms: 0,
        expires_at_ms: Some(50_000),
        revoked: true, // the store ignores it: a new token is never revoked
    }
}

pub(super) fn tokens_are_created_once_listed_and_revoked(fx: &Fx) {
    let clock = ManualClock::new(1_000);
    let s = fx.open_clock(&clock);
    let a = s
        .create_token(&token("tok_a", TokenKind::Org, Some("acme")))
        .unwrap();
    assert_eq!((a.created_at_ms, a.revoked), (1_000, false));
    assert_eq!(a.secret_hash, "hash-of-tok_a");
    assert_eq!(a.expires_at_ms, Some(50_000));
    clock.advance(1);
    s.create_token(&token("tok_b", TokenKind::Admin, None))
        .unwrap();
    clock.advance(1);
    s.create_token(&token("tok_c", TokenKind::Join, None))
        .unwrap();

    let err = fails_cleanly(fx, "conflict", || {
        s.create_token(&token("tok_a", TokenKind::Admin, None))
    });
    assert!(
        matches!(err, StoreError::Exists { kind: "token", .. }),
        "{err}"
    );
    // An org token names its org; the others name none.
    fails_cleanly(fx, "invalid", || {
        s.create_token(&token("tok_d", TokenKind::Org, None))
    });
    fails_cleanly(fx, "invalid", || {
        s.create_token(&token("tok_e", TokenKind::Admin, Some("acme")))
    });
    fails_cleanly(fx, "invalid", || {
        s.create_token(&token("", TokenKind::Admin, None))
    });
    fails_cleanly(fx, "not_found", || s.get_token("tok_zz"));
    fails_cleanly(fx, "not_found", || s.revoke_token("tok_zz"));

    assert_eq!(s.get_token("tok_a").unwrap(), a);
    assert_eq!(
        ids(&s.list_tokens().unwrap(), |t| &t.id),
        ["tok_a", "tok_b", "tok_c"]
    );

    // Revoking is for good, and idempotent; the record stays (events name it).
    let r = s.revoke_token("tok_a").unwrap();
    assert!(r.revoked);
    assert_eq!(s.revoke_token("tok_a").unwrap(), r);
    assert!(s.get_token("tok_a").unwrap().revoked);
    assert!(!s.get_token("tok_b").unwrap().revoked);

    // Survives a reopen.
    drop(s);
    let s = fx.open_clock(&clock);
    let all = s.list_tokens().unwrap();
    assert_eq!(all.len(), 3);
    assert!(all[0].revoked && !all[1].revoked && !all[2].revoked);
    assert_eq!(all[2].kind, TokenKind::Join);
}
