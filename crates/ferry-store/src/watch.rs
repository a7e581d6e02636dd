//! Change notification: how a server learns that the part of the store agents care about
//! changed, whoever changed it (this process or, on etcd, another server).
//!
//! Its job: tell subscribers *that* something changed, per [`Topic`], never *what*: a
//! subscriber reads the state again, so a notification that arrives twice, late or coalesced
//! with others is harmless, and one that may have been missed (an etcd watch that broke) is
//! replaced by "everything changed". It must never stay silent after a change: a lost
//! notification would leave an agent on stale state until the next one.
//!
//! [`crate::SqliteStore`] notifies in process after each committed write (it is the
//! single-server store: another process writing the same file is not seen). [`crate::EtcdStore`]
//! runs one etcd watch over its prefix, from the revision it last saw, so a change committed by
//! any server reaches every server's subscribers.

/// What changed: each counter moves (never back) when its part of the store changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Machines (placement, state, addresses).
    pub machines: u64,
    /// Hosts (registration, endpoint, cordon).
    pub hosts: u64,
    /// Bridge mappings and gates.
    pub bridge: u64,
}

/// A part of the store that subscribers follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    Machines,
    Hosts,
    Bridge,
}

/// A subscriber's end: `changed().await` wakes after the next change (several changes in a row
/// may wake it once); `borrow()` is the latest [`Changes`].
pub type Subscription = tokio::sync::watch::Receiver<Changes>;

/// The sending side a backend keeps.
#[derive(Debug)]
pub(crate) struct Notifier {
    tx: tokio::sync::watch::Sender<Changes>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            tx: tokio::sync::watch::channel(Changes::default()).0,
        }
    }
}

impl Notifier {
    pub(crate) fn subscribe(&self) -> Subscription {
        self.tx.subscribe()
    }

    pub(crate) fn bump(&self, t: Topic) {
        self.tx.send_modify(|c| match t {
            Topic::Machines => c.machines += 1,
            Topic::Hosts => c.hosts += 1,
            Topic::Bridge => c.bridge += 1,
        });
    }

    /// Changes may have been missed (a broken watch): every subscriber reads everything again.
    pub(crate) fn bump_all(&self) {
        self.tx.send_modify(|c| {
            c.machines += 1;
            c.hosts += 1;
            c.bridge += 1;
        });
    }
}

/// The topic of a key (relative to the store's prefix), if subscribers follow it.
pub(crate) fn topic_of(key: &str) -> Option<Topic> {
    if key.starts_with("machines/") {
        Some(Topic::Machines)
    } else if key.starts_with("hosts/") {
        Some(Topic::Hosts)
    } else if key.starts_with("bridge/") {
        Some(Topic::Bridge)
    } else {
        None
    }
}
