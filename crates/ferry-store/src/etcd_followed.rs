//! What the fleet-wide readers that run on every change read (every machine's summary, every
//! bridge mapping), kept in memory by the store's own etcd watch ([`super::watch_loop`]): the
//! [`Store::followed_machine_summaries`](crate::Store::followed_machine_summaries) and
//! [`Store::followed_bridge_mappings`](crate::Store::followed_bridge_mappings) of an
//! [`EtcdStore`](super::EtcdStore).
//!
//! Why: those readers (the DNS snapshot, each agent's bridge state, the bridge push after a
//! switch) each ranged over every machine record on etcd, several times per change, and under a
//! drain those ranges were most of the cluster's work: every migration waited behind them. The
//! watch already receives every key's new value; applying it here costs one decode per change
//! instead of one per change per reader.
//!
//! Why it is right: the view is exactly etcd's state at `rev` (a snapshot loaded at one
//! revision, then every event after it, in order), and a read is served only when
//! - the watch is live (not broken, not behind a compaction), and
//! - `rev` has reached the last revision this store committed, so a server always sees its own
//!   writes (the bridge push right after a switch must map the switched machine);
//!
//! and other servers' changes are seen as soon as the subscribers are told about them: the view
//! is updated before the change feed moves. Otherwise (the watch is down, or does not catch up
//! within [`CATCH_UP`]) the read goes to etcd, as before.

use super::{Kv, SummaryRecord};
use crate::BridgeMapping;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long a read waits for the watch to deliver this store's last commit before it reads
/// etcd instead. The watch normally delivers within a millisecond or two.
const CATCH_UP: Duration = Duration::from_millis(500);

/// The key prefixes (relative to the store's) the view holds.
pub(super) const MACHINES: &str = "machines/";
pub(super) const MAPPINGS: &str = "bridge/map/";

/// Shared between the store's readers and its watch task.
#[derive(Default)]
pub(super) struct Followed {
    view: Mutex<View>,
    moved: Condvar,
}

#[derive(Default)]
pub(super) struct View {
    /// Whether the watch is following etcd now (false before the first load and while the watch
    /// is broken).
    live: bool,
    /// Every change up to this revision is applied.
    rev: i64,
    /// Relative key -> the machine's summary and its key's creation revision (the order of
    /// [`super::summaries`]).
    pub(super) machines: BTreeMap<String, (SummaryRecord, i64)>,
    /// Relative key -> mapping.
    pub(super) mappings: BTreeMap<String, BridgeMapping>,
    /// Keys whose value did not decode: while any is left, reads go to etcd (which reports it).
    corrupt: BTreeSet<String>,
}

/// One change the watch saw, relative to the store's prefix.
pub(super) enum Change {
    Put(Kv),
    Delete(String),
}

impl View {
    fn put(&mut self, kv: Kv) {
        self.corrupt.remove(&kv.key);
        let ok = if kv.key.starts_with(MACHINES) {
            match super::decode::<SummaryRecord>(&kv) {
                Ok(s) => {
                    self.machines
                        .insert(kv.key.clone(), (s, kv.create_revision));
                    true
                }
                Err(_) => false,
            }
        } else if kv.key.starts_with(MAPPINGS) {
            match super::decode::<BridgeMapping>(&kv) {
                Ok(m) => {
                    self.mappings.insert(kv.key.clone(), m);
                    true
                }
                Err(_) => false,
            }
        } else {
            true
        };
        if !ok {
            self.machines.remove(&kv.key);
            self.mappings.remove(&kv.key);
            self.corrupt.insert(kv.key);
        }
    }

    fn delete(&mut self, key: &str) {
        self.machines.remove(key);
        self.mappings.remove(key);
        self.corrupt.remove(key);
    }
}

impl Followed {
    /// Starts over from a snapshot of both prefixes taken at `rev`.
    pub(super) fn load(&self, rev: i64, kvs: Vec<Kv>) {
        let mut v = View {
            live: true,
            rev,
            ..View::default()
        };
        for kv in kvs {
            v.put(kv);
        }
        *self.view.lock().unwrap() = v;
        self.moved.notify_all();
    }

    /// Applies one watch response's changes, in order; `rev` is its last event's revision.
    ///
    /// Only events move `rev`, never a response's header: while a watch catches up, etcd sends
    /// batches whose header is the current revision with older events still to come. This
    /// store's own commits always come back as events (the watch covers its whole prefix).
    pub(super) fn apply(&self, rev: i64, changes: Vec<Change>) {
        let mut v = self.view.lock().unwrap();
        for c in changes {
            match c {
                Change::Put(kv) => v.put(kv),
                Change::Delete(k) => v.delete(&k),
            }
        }
        v.rev = v.rev.max(rev);
        drop(v);
        self.moved.notify_all();
    }

    /// The watch broke: until it follows again, reads go to etcd.
    pub(super) fn broken(&self) {
        self.view.lock().unwrap().live = false;
    }

    /// The watch follows again from the revision after the view's (no change was lost).
    pub(super) fn resumed(&self) {
        let mut v = self.view.lock().unwrap();
        v.live = v.rev > 0;
        drop(v);
        self.moved.notify_all();
    }

    /// `f` of the view once it holds every change up to `at_least`, or `None` (read etcd) if it
    /// is not live or does not get there within [`CATCH_UP`].
    pub(super) fn read<T>(&self, at_least: i64, f: impl FnOnce(&View) -> T) -> Option<T> {
        let v = self.view.lock().unwrap();
        if !v.live {
            return None;
        }
        let (v, _) = self
            .moved
            .wait_timeout_while(v, CATCH_UP, |v| v.live && v.rev < at_least)
            .unwrap();
        if !v.live || v.rev < at_least || !v.corrupt.is_empty() {
            return None;
        }
        Some(f(&v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn machine(id: &str, state: &str, create_revision: i64) -> Kv {
        Kv {
            key: format!("{MACHINES}{id}"),
            value: serde_json::to_vec(&serde_json::json!({
                "id": id, "app": "web", "org": "acme", "network_id": 1, "host": null,
                "region": "ord", "private_ip": null, "state": state, "created_at_ms": 5,
                "config": {"metadata": {"process_group": "worker"}}
            }))
            .unwrap(),
            create_revision,
        }
    }

    fn ids(f: &Followed) -> Option<Vec<String>> {
        f.read(0, |v| {
            v.machines.values().map(|(m, _)| m.id.clone()).collect()
        })
    }

    #[test]
    fn nothing_is_served_before_a_load_or_while_broken() {
        let f = Followed::default();
        assert_eq!(ids(&f), None, "not loaded");
        f.load(7, vec![machine("a", "started", 3)]);
        assert_eq!(ids(&f), Some(vec!["a".into()]));
        f.broken();
        assert_eq!(ids(&f), None, "broken");
        f.resumed();
        assert_eq!(ids(&f), Some(vec!["a".into()]), "resumed from where it was");
    }

    #[test]
    fn changes_apply_in_order_and_a_corrupt_value_sends_reads_to_etcd() {
        let f = Followed::default();
        f.load(
            7,
            vec![machine("a", "started", 3), machine("b", "created", 4)],
        );
        f.apply(
            9,
            vec![
                Change::Put(machine("c", "created", 8)),
                Change::Delete(format!("{MACHINES}a")),
                Change::Put(Kv {
                    key: format!("{MAPPINGS}1/fdaa::a"),
                    value: b"not json".to_vec(),
                    create_revision: 9,
                }),
            ],
        );
        assert_eq!(ids(&f), None, "a corrupt mapping: etcd reports it");
        f.apply(10, vec![Change::Delete(format!("{MAPPINGS}1/fdaa::a"))]);
        assert_eq!(ids(&f), Some(vec!["b".into(), "c".into()]));
        // A later good value replaces a corrupt one.
        f.apply(11, vec![Change::Put(machine("b", "garbage-state", 4))]);
        assert_eq!(ids(&f), None);
        f.apply(12, vec![Change::Put(machine("b", "stopped", 4))]);
        assert_eq!(ids(&f), Some(vec!["b".into(), "c".into()]));
    }

    #[test]
    fn a_read_waits_for_its_revision_and_gives_up_after_the_bound() {
        let f = Arc::new(Followed::default());
        f.load(7, vec![]);
        // Behind, and nothing comes: read etcd instead, after the bound (not forever).
        let t = std::time::Instant::now();
        assert_eq!(f.read(8, |_| ()), None);
        assert!(t.elapsed() >= CATCH_UP, "{:?}", t.elapsed());
        // Behind, and the change comes while it waits: served.
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let f = f.clone();
            std::thread::spawn(move || {
                tx.send(()).unwrap();
                f.read(9, |v| v.machines.len())
            })
        };
        rx.recv().unwrap();
        f.apply(9, vec![Change::Put(machine("a", "created", 9))]);
        assert_eq!(reader.join().unwrap(), Some(1));
    }
}
