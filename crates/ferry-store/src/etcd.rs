//! [`EtcdStore`]: the [`Store`] over etcd v3, for several servers sharing one state.
//!
//! Its job: the same contract as [`crate::SqliteStore`] (the conformance suite runs against both)
//! on an etcd cluster, with every operation one etcd transaction. It must never write two keys in
//! two requests (a crash in between would leave half a change), never hand out an allocator value
//! twice, and never answer "not found" or "conflict" for what is really "etcd is unreachable".
//!
//! # How an operation runs: optimistic transactions
//! Each operation is a closure over a [`Tx`]: its reads go to etcd at one revision (the first
//! read's), so they see one consistent snapshot; its writes are buffered. At the end, one etcd
//! `Txn` commits the writes *if* every key read still has the `mod_revision` it had (or is still
//! absent), and every prefix read (an index scan) has no key modified or created since the
//! snapshot (a range compare `mod_revision < snapshot + 1`). If anything changed, the closure runs
//! again on a fresh snapshot. This is etcd's software-transactional-memory pattern: serializable
//! like SQLite's `BEGIN IMMEDIATE`, without a lock. The index keys (`idx/...`), allocators
//! (`alloc/...`) and records change in the same `Txn`, so an index entry can never be lost or
//! dangle, and an allocator value read by two servers at once is committed by only one of them:
//! the other retries and takes the next value (a CAS loop), so values are never reused.
//!
//! # How a synchronous call drives the async client
//! `etcd-client` is async (tonic). The store owns a small tokio runtime (one worker thread,
//! `ferry-etcd`); each request is spawned onto it and the calling thread waits on a channel for
//! the answer, with a deadline ([`OP_TIMEOUT`]) after which the call fails with
//! [`StoreError::Unavailable`]. When the caller is itself a worker of a multi-threaded tokio
//! runtime (the API's handlers), the wait is wrapped in `tokio::task::block_in_place`, so the
//! caller's runtime moves its other tasks off this thread meanwhile; the store never calls
//! `block_on` on the caller's runtime (which panics there) and never needs the caller's runtime
//! at all (a handler on a current-thread runtime just blocks, as it does on SQLite today).
//!
//! # Leases and locks: records on the store's clock, attached to etcd leases
//! Machine leases and named locks (a migration's claim, a network's migration lock) are
//! records with `expires_at_ms`, judged against the store's [`Clock`] and changed by the same
//! optimistic transactions as every other record, *and* their keys are attached to etcd leases
//! that this store keeps alive ([`held`]: one per TTL, like etcd's `concurrency.Session`). The
//! record says when its holder stops holding it, in the trait's milliseconds on an injectable
//! clock (the conformance suite steps a [`crate::ManualClock`] through expiry); the etcd lease
//! ties the key to its holder's life: when a server dies, etcd deletes what it held once its
//! keep-alives stop, never before the record's own expiry. A record is held while its key exists
//! and `expires_at_ms` is in the future; an expired one is replaced by the next acquire, on the
//! new holder's lease. The price of judging expiry on the record: servers' clocks must agree to
//! well within a TTL (NTP does that; TTLs are seconds).
//!
//! # Key layout (under the store's prefix, `/ferry/` by default)
//! Records are JSON; names inside keys are escaped (`%` and `/`), host IDs zero-padded so that
//! key order is ID order. Index keys are empty values whose last segment is the record's ID.
//!
//! | keys | what |
//! |---|---|
//! | `alloc/network`, `alloc/host`, `alloc/machine/<host>` | allocator states (`{"next":N}`) |
//! | `orgs/<org>`, `apps/<app>`, `idx/app_org/<org>/<app>` | orgs, apps, apps by org |
//! | `hosts/<host>` | hosts |
//! | `machines/<id>`, `idx/machine_app/<app>/<id>`, `idx/machine_host/<host>/<id>` | machines and their indexes |
//! | `idx/machine_live/<host>/<id>`, `meta/machine_live` | the host's non-terminal machines (placement counts these keys); the mark that a store older than this index got it |
//! | `idx/machine_field/<host>/<field>` | the machine holding a field (unique per host) |
//! | `events/<machine>/<nonce>` | events; ID = the revision that created the key |
//! | `leases/<machine>`, `locks/<name>`, `kv/<key>` | leases, named locks, settings |
//! | `volumes/<id>`, `idx/volume_state/<state>/<id>` | volumes, by state |
//! | `migrations/<id>`, `idx/mig_{machine,app,network,drain}/<v>/<id>`, `idx/mig_unfinished/<id>` | migrations and their indexes |
//! | `idx/mig_active/<machine>` | the machine's unfinished migration (its ID) |
//! | `policies/<app>`, `instances/<machine>/<instance>` | policies; instance histories (append order = create revision) |
//! | `tokens/<id>` | API tokens (a hash of each secret, never the secret) |
//! | `bridge/net/<network>`, `bridge/map/<network>/<old>`, `bridge/gate/<org\|app>/<name>` | a network's revision, its mappings, gates |
//!
//! # Limits
//! etcd refuses a transaction with more than `--max-txn-ops` operations (128 by default; compares
//! count too). The largest ones here are `delete_app` (about 6 operations per terminal machine of
//! the app) and index scans inside writes; run etcd with `--max-txn-ops 4096` (the test harness
//! does). Reads of many records by index are batched into read-only `Txn`s of 100 gets.

use crate::clock::{Clock, SystemClock};
use crate::error::{Result, StoreError};
use crate::model::{
    new_nonce, App, Event, Host, Lease, Lock, Machine, MachineState, MachineSummary, NewEvent, Org,
};
use crate::records::{
    BridgeMapping, BridgeNetwork, GateScope, InstanceRecord, MigrationFilter, MigrationRecord,
    PolicyRecord, TokenRecord, VolumeRecord,
};
use crate::sqlite::{check_machine, field_conflict, invalid, lock_ttls, ttl};
use crate::sqlite_records::{check_bridge_batch, check_migration_update};
use crate::Store;
#[path = "etcd_followed.rs"]
mod followed;
#[path = "etcd_held.rs"]
mod held;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KvClient, LeaseClient,
    PutOptions, Txn, TxnOp, TxnOpResponse,
};
use ferry_addr::{
    AllocatorState, FleetAddr, HostAllocator, HostId, MachineAllocator, MachineField,
    NetworkAllocator, NetworkId,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long one etcd request may take before the call fails with [`StoreError::Unavailable`].
/// Long enough for a leader election on a loaded cluster (1 to 2 s with etcd's defaults, during
/// which refused requests are retried), short enough that an API request without quorum answers
/// 503 in seconds.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One gRPC request's deadline, shorter than [`OP_TIMEOUT`] so that a read stuck on a member that
/// just died is sent again to another one within the call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Optimistic transactions retried this often before giving up: every round some writer commits,
/// so only a storm of writers on one key gets here.
const MAX_ATTEMPTS: usize = 500;
/// Gets per read-only `Txn` (below etcd's default `--max-txn-ops` of 128).
const GET_BATCH: usize = 100;
/// Locks per [`Store::refresh_locks`] commit (a compare and a put each).
const REFRESH_BATCH: usize = 50;

/// The etcd-backed store. Cheap to share (`Arc<dyn Store>`); every clone of the client shares one
/// gRPC channel balanced over all endpoints.
pub struct EtcdStore {
    /// Drives the client's futures; `None` only during `Drop`.
    rt: Option<tokio::runtime::Runtime>,
    kv: KvClient,
    lease: LeaseClient,
    /// The etcd leases locks and machine leases are attached to ([`held`]).
    held: Arc<held::Held>,
    /// Every key this store writes starts with it (e.g. `/ferry/`), so fleets or tests can share
    /// one etcd.
    prefix: String,
    clock: Arc<dyn Clock>,
    endpoints: Vec<String>,
    /// The etcd watch behind [`Store::subscribe`], started by the first subscriber.
    watcher: std::sync::OnceLock<Arc<crate::watch::Notifier>>,
    /// What this store last wrote to each key, and at which revision ([`Written`]).
    written: std::sync::Mutex<Written>,
    /// Machine summaries and bridge mappings as the watch last saw them ([`followed`]).
    followed: Arc<followed::Followed>,
    /// The revision of this store's last commit: what [`followed`] must have reached before it
    /// answers.
    last_commit: std::sync::atomic::AtomicI64,
}

/// The keys this store wrote last, with the revision of that write: a read-write transaction
/// takes its read of such a key from here instead of a round trip to etcd.
///
/// Why: most writes change what the same server wrote a moment before (a migration's record
/// at each phase, a lock's refresh, a machine's next state), and on etcd each read costs a
/// linearizable round trip (which a busy cluster answers in tens of milliseconds). Why it is
/// safe: a read served from here is checked by the commit like any other (its `mod_revision`
/// must still be the one recorded here), so a key another server changed since makes the commit
/// fail, and the transaction runs again, that time reading etcd. An error computed from such a
/// read is likewise returned only if [`Tx::still_current`] holds. Read-only transactions never
/// use it (they promise to see every write committed before them, by any server).
#[derive(Default)]
struct Written {
    /// Full key -> (mod_revision, value).
    keys: BTreeMap<String, (i64, Kv)>,
}

/// Keys remembered at most; past it the memory starts over (a fleet's hot keys come back at
/// their next write).
const WRITTEN_MAX: usize = 20_000;

impl Written {
    fn forget(&mut self, keys: &[String]) {
        for k in keys {
            self.keys.remove(k);
        }
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks on its workers, which panics inside another runtime (a
        // handler dropping the last Arc); shutting down in the background never blocks.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn unavailable(reason: impl Into<String>) -> StoreError {
    StoreError::Unavailable {
        reason: reason.into(),
    }
}

/// Availability problems become [`StoreError::Unavailable`]; the rest are etcd's refusals.
fn from_etcd(e: etcd_client::Error) -> StoreError {
    match from_etcd_ref(&e) {
        Kind::Unavailable => unavailable(e.to_string()),
        Kind::Other => StoreError::Etcd {
            what: e.to_string(),
        },
    }
}

/// Whether the request never left: the member it was routed to refused the connection (it is
/// down). Only then may a write be sent again as is: a request that was sent and whose answer was
/// lost may have committed, and is reported as [`StoreError::Unavailable`] instead.
fn never_sent(e: &etcd_client::Error) -> bool {
    // etcd_client::Error does not chain its sources: start from the status or transport error.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    };
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            );
        }
        cur = err.source();
    }
    false
}

/// Whether etcd refused the request before proposing it to raft (so it was not and will not be
/// applied): its member has no leader (we ask members to refuse rather than queue then, see
/// `with_require_leader`) or is overloaded. These are etcd's stable gRPC error descriptions
/// (`rpctypes` in etcd's own client, which matches them the same way).
fn refused_before_proposal(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.message(), "etcdserver: no leader" | "etcdserver: too many requests"))
}

/// Whether a read may simply be asked again: any availability failure (reads change nothing),
/// and a serializable read at the transaction's revision that reached a member which has not
/// applied that revision yet ("required revision is a future revision": the member lags the one
/// that answered the first read; asked again, it or another has caught up).
fn retry_read(e: &etcd_client::Error) -> bool {
    matches!(from_etcd_ref(e), Kind::Unavailable)
        || matches!(e, etcd_client::Error::GRpcStatus(s)
            if s.message() == "etcdserver: mvcc: required revision is a future revision")
}

enum Kind {
    Unavailable,
    Other,
}

fn from_etcd_ref(e: &etcd_client::Error) -> Kind {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => Kind::Unavailable,
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::ResourceExhausted
            ) =>
        {
            Kind::Unavailable
        }
        _ => Kind::Other,
    }
}

/// How long to wait before sending a refused request again (to another member, as the channel
/// balances over all of them).
const REFUSED_BACKOFF: Duration = Duration::from_millis(20);

/// Runs `fut` on `rt` and waits for it from this (synchronous) thread; see the module doc.
fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let out = match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(unavailable(format!(
                "no answer from etcd within {OP_TIMEOUT:?}"
            ))),
        };
        let _ = tx.send(out);
    });
    let wait = move || {
        rx.recv()
            .unwrap_or_else(|_| Err(unavailable("the etcd client's runtime stopped")))
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Escapes one name for use as one key segment: `/` would split it, `%` is the escape.
fn esc(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

fn unesc(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

/// Host IDs padded so that key order is ID order.
fn hk(h: HostId) -> String {
    format!("{:010}", h.get())
}

const NETWORK_ALLOC: &str = "alloc/network";
const HOST_ALLOC: &str = "alloc/host";
fn machine_alloc(h: HostId) -> String {
    format!("alloc/machine/{}", hk(h))
}

/// One value read: what a range or get returns, relative to the store's prefix.
#[derive(Clone)]
struct Kv {
    key: String,
    value: Vec<u8>,
    create_revision: i64,
}

/// One optimistic transaction (see the module doc): snapshot reads, buffered writes.
struct Tx<'s> {
    s: &'s EtcdStore,
    /// The snapshot's revision; 0 until the first read.
    rev: i64,
    /// Full key -> mod_revision seen (0: absent).
    reads: BTreeMap<String, i64>,
    /// Full prefixes scanned.
    ranges: Vec<String>,
    /// Full key -> new value (None: delete).
    writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Full key -> the etcd lease its new value is attached to ([`held`]).
    leased: BTreeMap<String, i64>,
    /// Full prefixes to delete whole.
    prefix_deletes: Vec<String>,
    /// Full key -> what the snapshot holds there (None: absent), for keys read or prefetched.
    cache: BTreeMap<String, Option<Kv>>,
    /// Reads after the first may be served by the member from its local state, without a round
    /// of the leader (etcd's "serializable" reads). Only for read-write transactions, whose
    /// reads are all checked by the commit's compares anyway (and, on an error path, by
    /// `Tx::still_current`).
    serializable: bool,
    /// Keys whose read came from the store's [`Written`] memory, not from etcd.
    from_written: Vec<String>,
    /// Whether a read was served by a member from its own, possibly lagging, state.
    served_locally: bool,
    now: i64,
}

impl<'s> Tx<'s> {
    fn new(s: &'s EtcdStore, serializable: bool) -> Self {
        Tx {
            s,
            rev: 0,
            reads: BTreeMap::new(),
            ranges: Vec::new(),
            writes: BTreeMap::new(),
            leased: BTreeMap::new(),
            prefix_deletes: Vec::new(),
            cache: BTreeMap::new(),
            serializable,
            from_written: Vec::new(),
            served_locally: false,
            now: s.clock.now_ms(),
        }
    }

    fn opts(&self) -> GetOptions {
        let o = if self.rev > 0 {
            GetOptions::new().with_revision(self.rev)
        } else {
            GetOptions::new()
        };
        // The first read stays linearizable: it waits out an election (and is retried) instead
        // of letting the commit run into a member that lost its leader a moment ago.
        if self.serializable && self.rev > 0 {
            o.with_serializable()
        } else {
            o
        }
    }

    fn pin(&mut self, header_rev: Option<i64>) {
        if self.rev == 0 {
            self.rev = header_rev.unwrap_or(0);
        } else if self.serializable {
            // A later read of a read-write transaction: served by its member (`opts`).
            self.served_locally = true;
        }
    }

    fn get(&mut self, key: &str) -> Result<Option<Kv>> {
        let full = self.s.key(key);
        if let Some(w) = self.writes.get(&full) {
            return Ok(w.clone().map(|value| Kv {
                key: key.to_owned(),
                value,
                create_revision: i64::MAX,
            }));
        }
        if self.prefix_deletes.iter().any(|p| full.starts_with(p)) {
            return Ok(None);
        }
        if let Some(hit) = self.cache.get(&full) {
            return Ok(hit.clone());
        }
        if self.remembered(&full) {
            return Ok(self.cache.get(&full).cloned().flatten());
        }
        let (k, o) = (full.clone(), self.opts());
        let mut resp = self.s.call(true, move |mut kv| {
            let (k, o) = (k.clone(), o.clone());
            async move { kv.get(k, Some(o)).await }
        })?;
        self.pin(resp.header().map(|h| h.revision()));
        let found = resp.take_kvs().into_iter().next();
        self.reads
            .entry(full.clone())
            .or_insert(found.as_ref().map_or(0, |kv| kv.mod_revision()));
        let found = found.map(|kv| Kv {
            key: key.to_owned(),
            create_revision: kv.create_revision(),
            value: kv.value().to_vec(),
        });
        self.cache.insert(full, found.clone());
        Ok(found)
    }

    /// Takes the read of `full` from what this store last wrote there, if it remembers it and
    /// this is a read-write transaction (see [`Written`]).
    fn remembered(&mut self, full: &str) -> bool {
        if !self.serializable {
            return false;
        }
        let Some((mod_rev, kv)) = self.s.written.lock().unwrap().keys.get(full).cloned() else {
            return false;
        };
        self.reads.entry(full.to_owned()).or_insert(mod_rev);
        self.cache.insert(full.to_owned(), Some(kv));
        self.from_written.push(full.to_owned());
        true
    }

    fn get_json<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        self.get(key)?.map(|kv| decode(&kv)).transpose()
    }

    /// Every key under `prefix` (relative), in key order, this transaction's writes included.
    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>> {
        let full = self.s.key(prefix);
        let (k, o) = (full.clone(), self.opts().with_prefix());
        let mut resp = self.s.call(true, move |mut kv| {
            let (k, o) = (k.clone(), o.clone());
            async move { kv.get(k, Some(o)).await }
        })?;
        self.pin(resp.header().map(|h| h.revision()));
        self.ranges.push(full.clone());
        let mut out: BTreeMap<String, Kv> = BTreeMap::new();
        for kv in resp.take_kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            self.reads.entry(key.clone()).or_insert(kv.mod_revision());
            let kv = Kv {
                key: key[self.s.prefix.len()..].to_owned(),
                create_revision: kv.create_revision(),
                value: kv.value().to_vec(),
            };
            // Same snapshot: a later `get` of one of these keys needs no round trip.
            self.cache.insert(key.clone(), Some(kv.clone()));
            out.insert(key, kv);
        }
        for (k, w) in self.writes.range(full.clone()..) {
            if !k.starts_with(&full) {
                break;
            }
            match w {
                Some(value) => {
                    let create_revision = out.get(k).map_or(i64::MAX, |kv| kv.create_revision);
                    out.insert(
                        k.clone(),
                        Kv {
                            key: k[self.s.prefix.len()..].to_owned(),
                            value: value.clone(),
                            create_revision,
                        },
                    );
                }
                None => {
                    out.remove(k);
                }
            }
        }
        out.retain(|k, _| !self.prefix_deletes.iter().any(|p| k.starts_with(p)));
        Ok(out.into_values().collect())
    }

    /// The values of `keys` (relative) at the snapshot, fetched in batches of read-only `Txn`s:
    /// one round trip per [`GET_BATCH`] keys instead of one per key (index scans, and the keys an
    /// operation is known to need, see [`Tx::prefetch`]).
    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Option<Kv>>> {
        for k in keys {
            let full = self.s.key(k);
            if !self.cache.contains_key(&full) && !self.writes.contains_key(&full) {
                self.remembered(&full);
            }
        }
        let missing: Vec<String> = keys
            .iter()
            .map(|k| self.s.key(k))
            .filter(|full| {
                !self.cache.contains_key(full)
                    && !self.writes.contains_key(full)
                    && !self.prefix_deletes.iter().any(|p| full.starts_with(p))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for chunk in missing.chunks(GET_BATCH) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::get(k.clone(), Some(self.opts())))
                .collect();
            let txn = Txn::new().and_then(ops);
            let resp = self.s.call(true, move |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })?;
            // A read-only Txn is one consistent read: its revision can be the snapshot's.
            self.pin(resp.header().map(|h| h.revision()));
            let answers = resp.op_responses();
            if answers.len() != chunk.len() {
                return Err(StoreError::Etcd {
                    what: format!("{} gets answered {} times", chunk.len(), answers.len()),
                });
            }
            for (full, r) in chunk.iter().zip(answers) {
                let TxnOpResponse::Get(mut g) = r else {
                    return Err(StoreError::Etcd {
                        what: "a read-only txn answered something other than a get".into(),
                    });
                };
                let found = g.take_kvs().into_iter().next();
                self.reads
                    .entry(full.clone())
                    .or_insert(found.as_ref().map_or(0, |kv| kv.mod_revision()));
                let found = found.map(|kv| Kv {
                    key: full[self.s.prefix.len()..].to_owned(),
                    create_revision: kv.create_revision(),
                    value: kv.value().to_vec(),
                });
                self.cache.insert(full.clone(), found);
            }
        }
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// Reads `keys` in one round trip now, so the operation's later `get`s of them are free.
    fn prefetch(&mut self, keys: &[String]) -> Result<()> {
        self.get_many(keys).map(drop)
    }

    /// Whether everything this transaction read is still what it read (a compare-only `Txn`):
    /// an error computed from serializable reads is returned only if it still holds.
    fn still_current(&self) -> Result<bool> {
        // Everything came from linearizable reads (one round, no memory): nothing to check. A
        // refused lock acquire, say, costs no second round trip.
        if !self.served_locally && self.from_written.is_empty() {
            return Ok(true);
        }
        let cmps = self.compares();
        if cmps.is_empty() {
            return Ok(true);
        }
        let txn = Txn::new().when(cmps);
        let resp = self.s.call(true, move |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })?;
        Ok(resp.succeeded())
    }

    fn compares(&self) -> Vec<Compare> {
        let mut cmps = Vec::with_capacity(self.reads.len() + self.ranges.len());
        for (k, mr) in &self.reads {
            cmps.push(if *mr == 0 {
                Compare::version(k.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(k.clone(), CompareOp::Equal, *mr)
            });
        }
        for p in &self.ranges {
            // No key under the prefix was created or changed since the snapshot (deleted ones
            // are caught by their own compare above).
            cmps.push(
                Compare::mod_revision(p.clone(), CompareOp::Less, self.rev + 1).with_prefix(),
            );
        }
        cmps
    }

    fn put_raw(&mut self, key: &str, value: Vec<u8>) {
        let full = self.s.key(key);
        self.leased.remove(&full);
        self.writes.insert(full, Some(value));
    }

    fn put<T: Serialize>(&mut self, key: &str, v: &T) -> Result<()> {
        self.put_raw(key, serde_json::to_vec(v)?);
        Ok(())
    }

    /// [`Tx::put`] of a key that lives only while etcd lease `lease` does ([`held`]).
    fn put_leased<T: Serialize>(&mut self, key: &str, v: &T, lease: i64) -> Result<()> {
        self.put(key, v)?;
        self.leased.insert(self.s.key(key), lease);
        Ok(())
    }

    fn delete(&mut self, key: &str) {
        let full = self.s.key(key);
        self.leased.remove(&full);
        self.writes.insert(full, None);
    }

    fn delete_prefix(&mut self, prefix: &str) {
        let full = self.s.key(prefix);
        // etcd refuses a txn whose puts or deletes overlap a deleted range.
        self.writes.retain(|k, _| !k.starts_with(&full));
        self.leased.retain(|k, _| !k.starts_with(&full));
        self.prefix_deletes.push(full);
    }

    /// Commits the buffered writes if nothing read has changed: `Some(revision)` when committed
    /// (or nothing to write), `None` when the transaction must run again.
    fn commit(self) -> Result<Option<i64>> {
        if self.writes.is_empty() && self.prefix_deletes.is_empty() {
            // Nothing to write, but an answer computed from remembered reads is only right if
            // they are still current.
            if !self.from_written.is_empty() && !self.still_current()? {
                return Ok(None);
            }
            return Ok(Some(self.rev));
        }
        let cmps = self.compares();
        let mut ops = Vec::new();
        for p in &self.prefix_deletes {
            ops.push(TxnOp::delete(
                p.clone(),
                Some(DeleteOptions::new().with_prefix()),
            ));
        }
        for (k, w) in &self.writes {
            ops.push(match w {
                Some(v) => TxnOp::put(
                    k.clone(),
                    v.clone(),
                    self.leased.get(k).map(|l| PutOptions::new().with_lease(*l)),
                ),
                None => TxnOp::delete(k.clone(), None),
            });
        }
        let txn = Txn::new().when(cmps).and_then(ops);
        // Sent again only if it never reached a member (see `never_sent`): a commit is never
        // applied twice.
        let resp = self.s.call(false, move |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        self.remember(rev);
        self.s
            .last_commit
            .fetch_max(rev, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(rev))
    }

    /// Notes what this commit wrote at `rev` in the store's [`Written`] memory.
    fn remember(&self, rev: i64) {
        let mut mem = self.s.written.lock().unwrap();
        if mem.keys.len() + self.writes.len() > WRITTEN_MAX {
            mem.keys.clear();
        }
        for p in &self.prefix_deletes {
            let under: Vec<String> = mem
                .keys
                .range(p.clone()..)
                .take_while(|(k, _)| k.starts_with(p.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            mem.forget(&under);
        }
        for (k, w) in &self.writes {
            let Some(value) = w else {
                mem.keys.remove(k);
                continue;
            };
            // The key's creation revision (events and instances are ordered by it): the
            // commit's own for a key that was absent, the one read for a key that existed. A
            // key written without being read is not remembered.
            let create_revision = match self.cache.get(k) {
                Some(None) => rev,
                Some(Some(kv)) if kv.create_revision != i64::MAX => kv.create_revision,
                _ => {
                    mem.keys.remove(k);
                    continue;
                }
            };
            let kv = Kv {
                key: k[self.s.prefix.len()..].to_owned(),
                value: value.clone(),
                create_revision,
            };
            mem.keys.insert(k.clone(), (rev, kv));
        }
    }
}

fn decode<T: DeserializeOwned>(kv: &Kv) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
        what: format!("etcd key {}: {e}", kv.key),
    })
}

/// The last segment of an index key: the record's ID.
fn last_segment(key: &str) -> String {
    unesc(key.rsplit('/').next().unwrap_or_default())
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`HOST:PORT` or URLs) and keeps every key under
    /// `prefix`. Fails with [`StoreError::Unavailable`] if no endpoint answers a read.
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        Self::connect_with_clock(endpoints, prefix, Arc::new(SystemClock))
    }

    /// [`EtcdStore::connect`] with an injected clock (tests of lease expiry).
    pub fn connect_with_clock(
        endpoints: &[String],
        prefix: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(invalid("etcd needs at least one endpoint"));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-etcd")
            .enable_all()
            .build()?;
        let eps = endpoints.to_vec();
        let client = block_on(&rt, async move {
            // require_leader: a member cut off from the leader refuses at once ("no leader", which
            // `call` retries on another member) instead of holding the request.
            let opts = ConnectOptions::new()
                .with_require_leader(true)
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT);
            Client::connect(eps, Some(opts)).await.map_err(from_etcd)
        })?;
        let store = EtcdStore {
            rt: Some(rt),
            kv: client.kv_client(),
            lease: client.lease_client(),
            held: Default::default(),
            prefix,
            clock,
            endpoints: endpoints.to_vec(),
            watcher: std::sync::OnceLock::new(),
            written: Default::default(),
            followed: Default::default(),
            last_commit: Default::default(),
        };
        // The channel connects lazily: a read now turns a wrong address into an error here,
        // not at the first API request.
        store.read(|tx| tx.get("probe").map(drop))?;
        store.backfill_live_index()?;
        Ok(store)
    }

    /// A store written before `idx/machine_live/` existed gets it, once.
    fn backfill_live_index(&self) -> Result<()> {
        const MARK: &str = "meta/machine_live";
        self.write(|tx| {
            if tx.get(MARK)?.is_some() {
                return Ok(());
            }
            for kv in tx.range("machines/")? {
                let m: Machine = decode(&kv)?;
                if let (Some(h), false) = (m.host, m.state.is_terminal()) {
                    tx.put_raw(&machine_live_idx(h, &m.id), Vec::new());
                }
            }
            tx.put_raw(MARK, b"1".to_vec());
            Ok(())
        })
    }

    /// Whether [`followed`] reads are served from the watch's memory now (tests).
    #[cfg(test)]
    pub(crate) fn followed_live(&self) -> bool {
        self.followed.read(0, |_| ()).is_some()
    }

    /// The endpoints it was given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix (ends with `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Sends one request built by `op` within [`OP_TIMEOUT`], and again while it is known not
    /// to have been applied: the member refused the connection (it is down; the channel
    /// balances the next try over the others) or refused before proposing (no leader during an
    /// election). A `read` is also sent again after any availability failure. A write whose
    /// fate is unknown (sent, then the answer was lost) is never sent again: it fails with
    /// [`StoreError::Unavailable`].
    fn call<T, F, Fut>(&self, read: bool, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(KvClient) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>> + Send,
    {
        let Some(rt) = &self.rt else {
            return Err(unavailable("the store is being dropped"));
        };
        let kv = self.kv.clone();
        block_on(rt, async move {
            loop {
                match op(kv.clone()).await {
                    Err(e)
                        if never_sent(&e)
                            || refused_before_proposal(&e)
                            || (read && retry_read(&e)) =>
                    {
                        tokio::time::sleep(REFUSED_BACKOFF).await
                    }
                    r => return r.map_err(from_etcd),
                }
            }
        })
    }

    /// One read-only snapshot.
    fn read<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        // Linearizable: a read sees every write committed before it began, by any server.
        f(&mut Tx::new(self, false))
    }

    /// One optimistic read-write transaction, run again until it commits on an unchanged
    /// snapshot. An `Err` from `f` commits nothing.
    fn write<T>(&self, f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.write_rev(f).map(|(t, _)| t)
    }

    /// [`EtcdStore::write`], also returning the revision the change was committed at.
    fn write_rev<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<(T, i64)> {
        for _ in 0..MAX_ATTEMPTS {
            let mut tx = Tx::new(self, true);
            let out = match f(&mut tx) {
                Ok(out) => out,
                // A refusal computed from a member's possibly lagging state (e.g. "app not
                // found" just after another server created it) or from this store's memory of
                // its own writes is only final if what it read is still current; otherwise run
                // again (reading etcd).
                Err(e)
                    if !matches!(e, StoreError::Unavailable { .. } | StoreError::Etcd { .. }) =>
                {
                    if tx.still_current()? {
                        return Err(e);
                    }
                    self.written.lock().unwrap().forget(&tx.from_written);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let used = tx.from_written.clone();
            if let Some(rev) = tx.commit()? {
                return Ok((out, rev));
            }
            self.written.lock().unwrap().forget(&used);
        }
        Err(StoreError::Conflict {
            what: format!("gave up after {MAX_ATTEMPTS} conflicting attempts"),
        })
    }

    /// [`EtcdStore::write`] of records that live `ttls` (ms) each: `f` gets, per TTL, the ID of
    /// this store's etcd lease to attach its record to ([`held`]). A write that named a lease
    /// etcd no longer has runs again on a new one.
    fn write_held<T>(
        &self,
        ttls: &[i64],
        mut f: impl FnMut(&mut Tx<'_>, &[i64]) -> Result<T>,
    ) -> Result<T> {
        let Some(rt) = &self.rt else {
            return Err(unavailable("the store is being dropped"));
        };
        let mut attempts = 0;
        loop {
            let ids = ttls
                .iter()
                .map(|t| self.held.lease(rt, &self.lease, held::bucket(*t)))
                .collect::<Result<Vec<_>>>()?;
            match self.write(|tx| f(tx, &ids)) {
                Err(e) if held::lease_gone(&e) && attempts < 3 => {
                    attempts += 1;
                    for id in ids {
                        self.held.forget(id);
                    }
                }
                r => return r,
            }
        }
    }

    /// Every key and value under the prefix, for tests that prove a failed call changed nothing.
    #[cfg(any(test, feature = "testing"))]
    pub fn dump(&self) -> Vec<String> {
        self.read(|tx| tx.range(""))
            .expect("dump")
            .into_iter()
            .map(|kv| format!("{} = {}", kv.key, String::from_utf8_lossy(&kv.value)))
            .collect()
    }
}

// ---- records as stored ------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct OrgRow {
    name: String,
    network_id: NetworkId,
    created_at_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct EventRow {
    r#type: String,
    status: String,
    source: String,
    timestamp_ms: i64,
    request: serde_json::Value,
}

// ---- helpers inside a transaction -------------------------------------------------------------

fn load_alloc(tx: &mut Tx<'_>, key: &str) -> Result<Option<AllocatorState>> {
    tx.get_json(key)
}

fn burn(tx: &mut Tx<'_>, key: &str, used: u32) -> Result<()> {
    let next = u64::from(used) + 1;
    match load_alloc(tx, key)? {
        Some(s) if s.next >= next => Ok(()),
        _ => tx.put(key, &AllocatorState { next }),
    }
}

fn allocate_network(tx: &mut Tx<'_>) -> Result<NetworkId> {
    let mut a = load_alloc(tx, NETWORK_ALLOC)?
        .map(NetworkAllocator::restore)
        .unwrap_or_default();
    let id = a.allocate()?;
    tx.put(NETWORK_ALLOC, &a.state())?;
    Ok(id)
}

fn allocate_host(tx: &mut Tx<'_>) -> Result<HostId> {
    let mut a = load_alloc(tx, HOST_ALLOC)?
        .map(HostAllocator::restore)
        .unwrap_or_default();
    let id = a.allocate()?;
    tx.put(HOST_ALLOC, &a.state())?;
    Ok(id)
}

fn org_key(name: &str) -> String {
    format!("orgs/{}", esc(name))
}
fn app_key(name: &str) -> String {
    format!("apps/{}", esc(name))
}
fn app_org_idx(org: &str, app: &str) -> String {
    format!("idx/app_org/{}/{}", esc(org), esc(app))
}
fn host_key(h: HostId) -> String {
    format!("hosts/{}", hk(h))
}
fn machine_key(id: &str) -> String {
    format!("machines/{}", esc(id))
}
fn machine_app_idx(app: &str, id: &str) -> String {
    format!("idx/machine_app/{}/{}", esc(app), esc(id))
}
fn machine_host_idx(h: HostId, id: &str) -> String {
    format!("idx/machine_host/{}/{}", hk(h), esc(id))
}
/// Present while the machine is placed on `h` and not terminal: what placement counts.
fn machine_live_idx(h: HostId, id: &str) -> String {
    format!("idx/machine_live/{}/{}", hk(h), esc(id))
}
fn field_idx(h: HostId, f: MachineField) -> String {
    format!("idx/machine_field/{}/{}", hk(h), f.0)
}
fn events_prefix(machine: &str) -> String {
    format!("events/{}/", esc(machine))
}
fn lease_key(machine: &str) -> String {
    format!("leases/{}", esc(machine))
}
fn lock_key(name: &str) -> String {
    format!("locks/{}", esc(name))
}
fn volume_key(id: &str) -> String {
    format!("volumes/{}", esc(id))
}
fn volume_state_idx(state: &str, id: &str) -> String {
    format!("idx/volume_state/{}/{}", esc(state), esc(id))
}
fn migration_key(id: &str) -> String {
    format!("migrations/{}", esc(id))
}
fn active_idx(machine: &str) -> String {
    format!("idx/mig_active/{}", esc(machine))
}
fn mapping_key(net: u32, old: &str) -> String {
    format!("bridge/map/{net}/{}", esc(old))
}
fn bridge_rev_key(net: u32) -> String {
    format!("bridge/net/{net}")
}

/// The index keys of a migration record (one per [`MigrationFilter`] but `All`).
fn migration_idx(m: &MigrationRecord) -> Vec<String> {
    let id = esc(&m.id);
    let mut v = vec![
        format!("idx/mig_machine/{}/{id}", esc(&m.machine_id)),
        format!("idx/mig_app/{}/{id}", esc(&m.app)),
        format!("idx/mig_network/{}/{id}", m.network_id),
    ];
    if let Some(d) = &m.drain {
        v.push(format!("idx/mig_drain/{}/{id}", esc(d)));
    }
    if !m.finished {
        v.push(format!("idx/mig_unfinished/{id}"));
    }
    v
}

fn load_app(tx: &mut Tx<'_>, name: &str) -> Result<App> {
    tx.get_json(&app_key(name))?
        .ok_or_else(|| StoreError::AppNotFound {
            name: name.to_owned(),
        })
}

fn load_host(tx: &mut Tx<'_>, id: HostId) -> Result<Host> {
    tx.get_json(&host_key(id))?
        .ok_or(StoreError::HostNotFound { id })
}

/// A machine with the create revision of its key (the tie-breaker of "oldest first").
fn load_machine_rev(tx: &mut Tx<'_>, id: &str) -> Result<(Machine, i64)> {
    match tx.get(&machine_key(id))? {
        Some(kv) => Ok((decode(&kv)?, kv.create_revision)),
        None => Err(StoreError::MachineNotFound { id: id.to_owned() }),
    }
}

fn load_machine(tx: &mut Tx<'_>, id: &str) -> Result<Machine> {
    load_machine_rev(tx, id).map(|(m, _)| m)
}

fn ensure_org_tx(tx: &mut Tx<'_>, name: &str) -> Result<Org> {
    if name.is_empty() {
        return Err(invalid("an org name must not be empty"));
    }
    if let Some(o) = tx.get_json::<OrgRow>(&org_key(name))? {
        return Ok(Org {
            name: o.name,
            network_id: o.network_id,
        });
    }
    let network_id = allocate_network(tx)?;
    let now = tx.now;
    tx.put(
        &org_key(name),
        &OrgRow {
            name: name.to_owned(),
            network_id,
            created_at_ms: now,
        },
    )?;
    Ok(Org {
        name: name.to_owned(),
        network_id,
    })
}

/// Machines by an index scan: the IDs under `idx_prefix`, then their records in batches.
fn machines_by_idx(tx: &mut Tx<'_>, idx_prefix: &str) -> Result<Vec<(Machine, i64)>> {
    let keys: Vec<String> = tx
        .range(idx_prefix)?
        .iter()
        .map(|kv| machine_key(&last_segment(&kv.key)))
        .collect();
    tx.get_many(&keys)?
        .into_iter()
        .flatten()
        .map(|kv| Ok((decode(&kv)?, kv.create_revision)))
        .collect()
}

/// A stored machine record read as a [`MachineSummary`]: serde skips the config's other fields
/// without building them (no `serde_json::Value` tree per machine).
#[derive(Clone, Deserialize)]
struct SummaryRecord {
    id: String,
    app: String,
    org: String,
    network_id: NetworkId,
    host: Option<HostId>,
    region: String,
    private_ip: Option<String>,
    state: MachineState,
    created_at_ms: i64,
    #[serde(default)]
    config: ProcessGroupOf,
}

/// `config.metadata.process_group` if it is a string; anything else (no metadata, a config or a
/// metadata that is not an object, a process group that is not a string) is none, as
/// `config["metadata"]["process_group"].as_str()` reads it.
#[derive(Clone, Default)]
struct ProcessGroupOf(Option<String>);

impl<'de> Deserialize<'de> for ProcessGroupOf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        /// Depth 0: the config, whose `metadata` is read at depth 1, whose `process_group` is it.
        struct V(u8);
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ProcessGroupOf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<ProcessGroupOf, A::Error> {
                let want = if self.0 == 0 {
                    "metadata"
                } else {
                    "process_group"
                };
                let mut out = ProcessGroupOf(None);
                while let Some(k) = map.next_key::<String>()? {
                    if k != want {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    } else if self.0 == 0 {
                        out = map.next_value_seed(Seed(1))?;
                    } else {
                        let v: serde_json::Value = map.next_value()?;
                        out = ProcessGroupOf(v.as_str().map(str::to_owned));
                    }
                }
                Ok(out)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<ProcessGroupOf, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(ProcessGroupOf(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<ProcessGroupOf, E> {
                Ok(ProcessGroupOf(None))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<ProcessGroupOf, E> {
                Ok(ProcessGroupOf(None))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<ProcessGroupOf, E> {
                Ok(ProcessGroupOf(None))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<ProcessGroupOf, E> {
                Ok(ProcessGroupOf(None))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<ProcessGroupOf, E> {
                Ok(ProcessGroupOf(None))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<ProcessGroupOf, E> {
                Ok(ProcessGroupOf(None))
            }
        }
        struct Seed(u8);
        impl<'de> serde::de::DeserializeSeed<'de> for Seed {
            type Value = ProcessGroupOf;
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<ProcessGroupOf, D::Error> {
                d.deserialize_any(V(self.0))
            }
        }
        d.deserialize_any(V(0))
    }
}

/// Machine summaries by an index scan, as [`machines_by_idx`] (non-terminal ones, oldest first).
fn summaries(kvs: &[Kv]) -> Result<Vec<MachineSummary>> {
    let v: Vec<(SummaryRecord, i64)> = kvs
        .iter()
        .map(|kv| Ok((decode(kv)?, kv.create_revision)))
        .collect::<Result<_>>()?;
    Ok(summaries_of(v))
}

/// The non-terminal ones of decoded summaries (with their keys' creation revisions), oldest
/// first.
fn summaries_of(mut v: Vec<(SummaryRecord, i64)>) -> Vec<MachineSummary> {
    v.sort_by_key(|(m, rev)| (m.created_at_ms, *rev));
    v.into_iter()
        .filter(|(m, _)| !m.state.is_terminal())
        .map(|(m, _)| MachineSummary {
            id: m.id,
            app: m.app,
            org: m.org,
            network_id: m.network_id,
            host: m.host,
            region: m.region,
            private_ip: m.private_ip,
            state: m.state,
            process_group: m.config.0,
        })
        .collect()
}

/// Oldest first, as SQLite's `ORDER BY created_at_ms, rowid`.
fn sorted_machines(mut v: Vec<(Machine, i64)>, live_only: bool) -> Vec<Machine> {
    v.sort_by_key(|(m, rev)| (m.created_at_ms, *rev));
    v.into_iter()
        .map(|(m, _)| m)
        .filter(|m| !live_only || !m.state.is_terminal())
        .collect()
}

fn check_etcd_machine(tx: &mut Tx<'_>, m: &Machine) -> Result<()> {
    check_machine(
        m,
        tx,
        |tx, name| load_app(tx, name),
        |tx, h| load_host(tx, h).map(drop),
    )
}

/// Writes `m` (validated) with its indexes, moving the host and field indexes from `old`.
fn write_machine(tx: &mut Tx<'_>, m: &Machine, old: Option<&Machine>) -> Result<()> {
    let old_place = old.map(|o| (o.host, o.machine_field));
    if old_place != Some((m.host, m.machine_field)) {
        if let Some(o) = old {
            if let Some(h) = o.host {
                tx.delete(&machine_host_idx(h, &o.id));
                if let Some(f) = o.machine_field {
                    tx.delete(&field_idx(h, f));
                }
            }
        }
        if let Some(h) = m.host {
            tx.put_raw(&machine_host_idx(h, &m.id), Vec::new());
            if let Some(f) = m.machine_field {
                // One machine per field on a host, ever (terminal machines keep theirs).
                let owner: Option<String> = tx.get_json(&field_idx(h, f))?;
                if owner.is_some_and(|o| o != m.id) {
                    return Err(StoreError::Conflict {
                        what: field_conflict(m),
                    });
                }
                tx.put(&field_idx(h, f), &m.id)?;
            }
        }
    }
    move_live_idx(tx, old, m);
    if let (Some(h), Some(f)) = (m.host, m.machine_field) {
        burn(tx, &machine_alloc(h), f.0)?;
    }
    tx.put(&machine_key(&m.id), m)
}

/// Keeps `idx/machine_live/` right as a machine goes from `old` (None: new) to `m`: present on
/// its host while it is not terminal.
fn move_live_idx(tx: &mut Tx<'_>, old: Option<&Machine>, m: &Machine) {
    let live = |x: &Machine| x.host.filter(|_| !x.state.is_terminal());
    let (was, now) = (old.and_then(live), live(m));
    if was != now {
        if let Some(h) = was {
            tx.delete(&machine_live_idx(h, &m.id));
        }
        if let Some(h) = now {
            tx.put_raw(&machine_live_idx(h, &m.id), Vec::new());
        }
    }
}

/// The keys creating or updating `m` reads, fetched in one round trip up front.
fn machine_keys(m: &Machine) -> Vec<String> {
    let mut keys = vec![machine_key(&m.id), app_key(&m.app)];
    if let Some(h) = m.host {
        keys.push(host_key(h));
        keys.push(machine_alloc(h));
        if let Some(f) = m.machine_field {
            keys.push(field_idx(h, f));
        }
    }
    keys
}

fn update_machine_tx(
    tx: &mut Tx<'_>,
    m: &Machine,
    allowed_from: Option<&[MachineState]>,
) -> Result<Machine> {
    tx.prefetch(&machine_keys(m))?;
    let cur = load_machine(tx, &m.id)?;
    if m.app != cur.app {
        return Err(invalid(format!(
            "machine {} belongs to app {:?}; it cannot move to {:?}",
            m.id, cur.app, m.app
        )));
    }
    if let Some(allowed) = allowed_from {
        if !allowed.contains(&cur.state) {
            return Err(StoreError::IllegalTransition {
                id: m.id.clone(),
                from: cur.state,
                to: m.state,
            });
        }
    }
    check_etcd_machine(tx, m)?;
    let next = Machine {
        org: cur.org.clone(),
        network_id: cur.network_id,
        created_at_ms: cur.created_at_ms,
        // Never let updated_at go backwards, even if the wall clock does.
        updated_at_ms: tx.now.max(cur.updated_at_ms),
        ..m.clone()
    };
    write_machine(tx, &next, Some(&cur))?;
    Ok(next)
}

/// A machine field never used on `host` (see [`Store::allocate_machine_field`]).
fn allocate_field_tx(tx: &mut Tx<'_>, host: HostId) -> Result<MachineField> {
    let key = machine_alloc(host);
    tx.prefetch(&[host_key(host), key.clone()])?;
    load_host(tx, host)?;
    let mut a = load_alloc(tx, &key)?
        .map(MachineAllocator::restore)
        .unwrap_or_default();
    let field = a.allocate()?;
    tx.put(&key, &a.state())?;
    Ok(field)
}

fn create_machine_tx(tx: &mut Tx<'_>, m: &Machine) -> Result<Machine> {
    tx.prefetch(&machine_keys(m))?;
    if tx.get(&machine_key(&m.id))?.is_some() {
        return Err(StoreError::MachineExists { id: m.id.clone() });
    }
    check_etcd_machine(tx, m)?;
    let stored = Machine {
        created_at_ms: tx.now,
        updated_at_ms: tx.now,
        ..m.clone()
    };
    tx.put_raw(&machine_app_idx(&m.app, &m.id), Vec::new());
    write_machine(tx, &stored, None)?;
    Ok(stored)
}

fn transition_tx(
    tx: &mut Tx<'_>,
    id: &str,
    allowed_from: &[MachineState],
    to: MachineState,
) -> Result<Machine> {
    let cur = load_machine(tx, id)?;
    if !allowed_from.contains(&cur.state) {
        return Err(StoreError::IllegalTransition {
            id: id.to_owned(),
            from: cur.state,
            to,
        });
    }
    let next = Machine {
        state: to,
        updated_at_ms: tx.now.max(cur.updated_at_ms),
        ..cur.clone()
    };
    move_live_idx(tx, Some(&cur), &next);
    tx.put(&machine_key(id), &next)?;
    Ok(next)
}

/// Appends `ev` to the machine's log in this transaction. Its ID is the revision the
/// transaction commits at: increasing fleet-wide in commit order, with no counter key for
/// every writer to fight over.
fn put_event(tx: &mut Tx<'_>, machine_id: &str, ev: &NewEvent) -> Result<EventRow> {
    let row = EventRow {
        r#type: ev.r#type.clone(),
        status: ev.status.clone(),
        source: ev.source.clone(),
        timestamp_ms: tx.now,
        request: ev.request.clone(),
    };
    tx.put(
        &format!("{}{}", events_prefix(machine_id), new_nonce()),
        &row,
    )?;
    Ok(row)
}

fn machine_exists(tx: &mut Tx<'_>, id: &str) -> Result<()> {
    load_machine(tx, id).map(drop)
}

fn live_lease(tx: &mut Tx<'_>, machine_id: &str) -> Result<Option<Lease>> {
    let now = tx.now;
    Ok(tx
        .get_json::<Lease>(&lease_key(machine_id))?
        .filter(|l| now < l.expires_at_ms))
}

fn live_lock(tx: &mut Tx<'_>, name: &str) -> Result<Option<Lock>> {
    let now = tx.now;
    Ok(tx
        .get_json::<Lock>(&lock_key(name))?
        .filter(|l| now < l.expires_at_ms))
}

/// Extends `name` by `ttl` ms if `nonce` holds it now; `None` (nothing written) if not.
fn refresh_lock_tx(
    tx: &mut Tx<'_>,
    name: &str,
    nonce: &str,
    ttl: i64,
    lease: i64,
) -> Result<Option<Lock>> {
    let Some(mut lock) = live_lock(tx, name)?.filter(|l| l.nonce == nonce) else {
        return Ok(None);
    };
    lock.expires_at_ms = tx.now.saturating_add(ttl);
    tx.put_leased(&lock_key(name), &lock, lease)?;
    Ok(Some(lock))
}

fn stale(kind: &'static str, id: &str, expected: u64, found: u64) -> StoreError {
    StoreError::StaleRevision {
        kind,
        id: id.to_owned(),
        expected,
        found,
    }
}

fn get_volume_tx(tx: &mut Tx<'_>, id: &str) -> Result<VolumeRecord> {
    tx.get_json(&volume_key(id))?
        .ok_or_else(|| StoreError::NotFound {
            kind: "volume",
            id: id.to_owned(),
        })
}

fn get_migration_tx(tx: &mut Tx<'_>, id: &str) -> Result<MigrationRecord> {
    tx.get_json(&migration_key(id))?
        .ok_or_else(|| StoreError::NotFound {
            kind: "migration",
            id: id.to_owned(),
        })
}

fn active_migration_tx(tx: &mut Tx<'_>, machine_id: &str) -> Result<Option<MigrationRecord>> {
    match tx.get_json::<String>(&active_idx(machine_id))? {
        Some(id) => get_migration_tx(tx, &id).map(Some),
        None => Ok(None),
    }
}

fn get_token_tx(tx: &mut Tx<'_>, id: &str) -> Result<TokenRecord> {
    tx.get_json(&format!("tokens/{}", esc(id)))?
        .ok_or_else(|| StoreError::NotFound {
            kind: "token",
            id: id.to_owned(),
        })
}

fn by_created<T>(mut v: Vec<T>, key: impl Fn(&T) -> (i64, String)) -> Vec<T> {
    v.sort_by_key(key);
    v
}

fn bridge_network_tx(tx: &mut Tx<'_>, net: u32) -> Result<BridgeNetwork> {
    let revision: u64 = tx.get_json(&bridge_rev_key(net))?.unwrap_or(0);
    let mut mappings: Vec<BridgeMapping> = tx
        .range(&format!("bridge/map/{net}/"))?
        .iter()
        .map(decode)
        .collect::<Result<_>>()?;
    mappings.sort_by(|a, b| a.old.cmp(&b.old));
    Ok(BridgeNetwork {
        network_id: net,
        revision,
        mappings,
    })
}

fn apply_bridge(
    tx: &mut Tx<'_>,
    net: u32,
    expected: Option<u64>,
    puts: &[BridgeMapping],
    removes: &[String],
) -> Result<BridgeNetwork> {
    check_bridge_batch(net, puts)?;
    let revision: u64 = tx.get_json(&bridge_rev_key(net))?.unwrap_or(0);
    if let Some(e) = expected {
        if e != revision {
            return Err(stale("bridge network", &net.to_string(), e, revision));
        }
    }
    for old in removes {
        tx.delete(&mapping_key(net, old));
    }
    for m in puts {
        tx.put(&mapping_key(net, &m.old), m)?;
    }
    tx.put(&bridge_rev_key(net), &(revision + 1))?;
    bridge_network_tx(tx, net)
}

impl Store for EtcdStore {
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    // ---- orgs -------------------------------------------------------------------------------

    fn ensure_org(&self, name: &str) -> Result<Org> {
        self.write(|tx| ensure_org_tx(tx, name))
    }

    fn get_org(&self, name: &str) -> Result<Org> {
        self.read(|tx| {
            let o: OrgRow =
                tx.get_json(&org_key(name))?
                    .ok_or_else(|| StoreError::OrgNotFound {
                        name: name.to_owned(),
                    })?;
            Ok(Org {
                name: o.name,
                network_id: o.network_id,
            })
        })
    }

    fn list_orgs(&self) -> Result<Vec<Org>> {
        self.read(|tx| {
            let mut v: Vec<Org> = tx
                .range("orgs/")?
                .iter()
                .map(|kv| {
                    decode::<OrgRow>(kv).map(|o| Org {
                        name: o.name,
                        network_id: o.network_id,
                    })
                })
                .collect::<Result<_>>()?;
            v.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(v)
        })
    }

    // ---- apps -------------------------------------------------------------------------------

    fn create_app(&self, name: &str, org: &str) -> Result<App> {
        self.write(|tx| {
            if name.is_empty() {
                return Err(invalid("an app name must not be empty"));
            }
            tx.prefetch(&[app_key(name), org_key(org), NETWORK_ALLOC.to_owned()])?;
            if tx.get(&app_key(name))?.is_some() {
                return Err(StoreError::AppExists {
                    name: name.to_owned(),
                });
            }
            let org = ensure_org_tx(tx, org)?;
            let app = App {
                name: name.to_owned(),
                org: org.name,
                network_id: org.network_id,
                created_at_ms: tx.now,
            };
            tx.put(&app_key(name), &app)?;
            tx.put_raw(&app_org_idx(&app.org, name), Vec::new());
            Ok(app)
        })
    }

    fn get_app(&self, name: &str) -> Result<App> {
        self.read(|tx| load_app(tx, name))
    }

    fn list_apps(&self, org: Option<&str>) -> Result<Vec<App>> {
        self.read(|tx| {
            let kvs = match org {
                None => tx.range("apps/")?,
                Some(o) => {
                    let keys: Vec<String> = tx
                        .range(&format!("idx/app_org/{}/", esc(o)))?
                        .iter()
                        .map(|kv| app_key(&last_segment(&kv.key)))
                        .collect();
                    tx.get_many(&keys)?.into_iter().flatten().collect()
                }
            };
            let mut v: Vec<App> = kvs.iter().map(decode).collect::<Result<_>>()?;
            v.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(v)
        })
    }

    fn delete_app(&self, name: &str) -> Result<()> {
        self.write(|tx| {
            let app = load_app(tx, name)?;
            // The index scan's range compare also catches a machine created meanwhile.
            let machines = machines_by_idx(tx, &format!("idx/machine_app/{}/", esc(name)))?;
            let live = machines
                .iter()
                .filter(|(m, _)| !m.state.is_terminal())
                .count();
            if live > 0 {
                return Err(StoreError::AppHasMachines {
                    name: name.to_owned(),
                    count: live as u64,
                });
            }
            for (m, _) in &machines {
                tx.delete(&machine_key(&m.id));
                tx.delete(&machine_app_idx(name, &m.id));
                if let Some(h) = m.host {
                    tx.delete(&machine_host_idx(h, &m.id));
                    tx.delete(&machine_live_idx(h, &m.id));
                    if let Some(f) = m.machine_field {
                        tx.delete(&field_idx(h, f));
                    }
                }
                tx.delete(&lease_key(&m.id));
                tx.delete_prefix(&events_prefix(&m.id));
            }
            // Machine fields stay burned in the per-host allocators.
            tx.delete(&app_key(name));
            tx.delete(&app_org_idx(&app.org, name));
            Ok(())
        })
    }

    // ---- hosts ------------------------------------------------------------------------------

    fn register_host(&self, region: &str, endpoint: &str) -> Result<Host> {
        self.write(|tx| {
            let id = allocate_host(tx)?;
            let host = Host {
                id,
                region: region.to_owned(),
                endpoint: endpoint.to_owned(),
                cordoned: false,
                created_at_ms: tx.now,
                underlay: String::new(),
            };
            tx.put(&host_key(id), &host)?;
            Ok(host)
        })
    }

    fn put_host(&self, host: &Host) -> Result<Host> {
        self.write(|tx| {
            let created_at_ms = match tx.get_json::<Host>(&host_key(host.id))? {
                Some(old) => old.created_at_ms,
                None => tx.now,
            };
            let h = Host {
                created_at_ms,
                ..host.clone()
            };
            tx.put(&host_key(host.id), &h)?;
            burn(tx, HOST_ALLOC, host.id.get())?;
            Ok(h)
        })
    }

    fn get_host(&self, id: HostId) -> Result<Host> {
        self.read(|tx| load_host(tx, id))
    }

    fn list_hosts(&self) -> Result<Vec<Host>> {
        // Keys are zero-padded IDs: key order is ID order.
        self.read(|tx| tx.range("hosts/")?.iter().map(decode).collect())
    }

    fn set_cordoned(&self, id: HostId, cordoned: bool) -> Result<Host> {
        self.write(|tx| {
            let h = Host {
                cordoned,
                ..load_host(tx, id)?
            };
            tx.put(&host_key(id), &h)?;
            Ok(h)
        })
    }

    fn remove_host(&self, id: HostId) -> Result<()> {
        self.write(|tx| {
            load_host(tx, id)?;
            let live = tx.range(&format!("idx/machine_live/{}/", hk(id)))?.len();
            if live > 0 {
                return Err(StoreError::Conflict {
                    what: format!(
                        "host {:x} still has {live} machine(s): drain it first",
                        id.get()
                    ),
                });
            }
            // Terminal machines keep their records and their (now dangling) host index: no
            // foreign key here, and readers of a host's machines only follow live ones.
            tx.delete(&host_key(id));
            Ok(())
        })
    }

    fn allocate_machine_field(&self, host: HostId) -> Result<MachineField> {
        self.write(|tx| allocate_field_tx(tx, host))
    }

    // ---- machines ---------------------------------------------------------------------------

    fn create_machine(&self, m: &Machine) -> Result<Machine> {
        self.write(|tx| create_machine_tx(tx, m))
    }

    fn create_machine_placed(&self, m: &Machine, event: &NewEvent) -> Result<Machine> {
        self.write(|tx| {
            let host = m
                .host
                .ok_or_else(|| invalid(format!("machine {} has no host to be placed on", m.id)))?;
            let key = machine_alloc(host);
            tx.prefetch(&[
                host_key(host),
                key.clone(),
                app_key(&m.app),
                machine_key(&m.id),
            ])?;
            let app = load_app(tx, &m.app)?;
            let field = allocate_field_tx(tx, host)?;
            let placed = Machine {
                machine_field: Some(field),
                private_ip: Some(FleetAddr::primary(app.network_id, host, field).to_string()),
                ..m.clone()
            };
            let stored = create_machine_tx(tx, &placed)?;
            put_event(tx, &m.id, event)?;
            Ok(stored)
        })
    }

    fn get_machine(&self, id: &str) -> Result<Machine> {
        self.read(|tx| load_machine(tx, id))
    }

    fn list_machines(&self, app: Option<&str>) -> Result<Vec<Machine>> {
        self.list_machines_filtered(app, true)
    }

    fn list_machines_all(&self, app: Option<&str>) -> Result<Vec<Machine>> {
        self.list_machines_filtered(app, false)
    }

    fn list_machines_on_host(&self, host: HostId) -> Result<Vec<Machine>> {
        self.read(|tx| {
            let v = machines_by_idx(tx, &format!("idx/machine_host/{}/", hk(host)))?;
            Ok(sorted_machines(v, true))
        })
    }

    fn list_machine_summaries(&self, host: Option<HostId>) -> Result<Vec<MachineSummary>> {
        self.read(|tx| match host {
            Some(h) => {
                let keys: Vec<String> = tx
                    .range(&format!("idx/machine_host/{}/", hk(h)))?
                    .iter()
                    .map(|kv| machine_key(&last_segment(&kv.key)))
                    .collect();
                let kvs: Vec<Kv> = tx.get_many(&keys)?.into_iter().flatten().collect();
                summaries(&kvs)
            }
            None => summaries(&tx.range("machines/")?),
        })
    }

    fn followed_machine_summaries(&self, host: Option<HostId>) -> Result<Vec<MachineSummary>> {
        let own = self.last_commit.load(std::sync::atomic::Ordering::SeqCst);
        let from_view = self.followed.read(own, |v| {
            summaries_of(
                v.machines
                    .values()
                    .filter(|(m, _)| host.is_none() || m.host == host)
                    .cloned()
                    .collect(),
            )
        });
        match from_view {
            Some(v) => Ok(v),
            None => self.list_machine_summaries(host),
        }
    }

    fn machines_per_host(&self) -> Result<BTreeMap<HostId, usize>> {
        self.read(|tx| {
            let mut out = BTreeMap::new();
            for kv in tx.range("idx/machine_live/")? {
                let host = kv.key.split('/').nth(2).unwrap_or_default();
                let id = host
                    .parse::<u32>()
                    .ok()
                    .and_then(|h| HostId::new(h).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        what: format!("etcd key {}: not a host ID", kv.key),
                    })?;
                *out.entry(id).or_insert(0) += 1;
            }
            Ok(out)
        })
    }

    fn update_machine(&self, m: &Machine) -> Result<Machine> {
        self.write(|tx| update_machine_tx(tx, m, None))
    }

    fn update_machine_if(&self, m: &Machine, allowed_from: &[MachineState]) -> Result<Machine> {
        self.write(|tx| update_machine_tx(tx, m, Some(allowed_from)))
    }

    fn transition(
        &self,
        id: &str,
        allowed_from: &[MachineState],
        to: MachineState,
    ) -> Result<Machine> {
        self.write(|tx| transition_tx(tx, id, allowed_from, to))
    }

    fn transition_recorded(
        &self,
        id: &str,
        allowed_from: &[MachineState],
        to: MachineState,
        event: &NewEvent,
    ) -> Result<Machine> {
        self.write(|tx| {
            let m = transition_tx(tx, id, allowed_from, to)?;
            put_event(tx, id, event)?;
            Ok(m)
        })
    }

    // ---- events -----------------------------------------------------------------------------

    fn add_event(
        &self,
        machine_id: &str,
        r#type: &str,
        status: &str,
        source: &str,
        request: serde_json::Value,
    ) -> Result<Event> {
        // The event's ID is the etcd revision that created it: increasing fleet-wide in commit
        // order, with no counter key for every writer to fight over.
        let new = NewEvent::new(r#type, status, source, request);
        let (ev, rev) = self.write_rev(|tx| {
            machine_exists(tx, machine_id)?;
            put_event(tx, machine_id, &new)
        })?;
        Ok(Event {
            id: rev,
            machine_id: machine_id.to_owned(),
            r#type: ev.r#type,
            status: ev.status,
            source: ev.source,
            timestamp_ms: ev.timestamp_ms,
            request: ev.request,
        })
    }

    fn events(&self, machine_id: &str) -> Result<Vec<Event>> {
        self.read(|tx| {
            machine_exists(tx, machine_id)?;
            let mut kvs = tx.range(&events_prefix(machine_id))?;
            kvs.sort_by_key(|kv| kv.create_revision);
            kvs.iter()
                .map(|kv| {
                    let e: EventRow = decode(kv)?;
                    Ok(Event {
                        id: kv.create_revision,
                        machine_id: machine_id.to_owned(),
                        r#type: e.r#type,
                        status: e.status,
                        source: e.source,
                        timestamp_ms: e.timestamp_ms,
                        request: e.request,
                    })
                })
                .collect()
        })
    }

    // ---- leases -----------------------------------------------------------------------------

    fn acquire_lease(
        &self,
        machine_id: &str,
        ttl_ms: u64,
        owner: &str,
        description: &str,
    ) -> Result<Lease> {
        let ttl = ttl(ttl_ms)?;
        self.write_held(&[ttl], |tx, held| {
            tx.prefetch(&[machine_key(machine_id), lease_key(machine_id)])?;
            machine_exists(tx, machine_id)?;
            if let Some(held) = live_lease(tx, machine_id)? {
                return Err(StoreError::LeaseHeld {
                    machine_id: machine_id.to_owned(),
                    expires_at_ms: held.expires_at_ms,
                });
            }
            let lease = Lease {
                machine_id: machine_id.to_owned(),
                nonce: new_nonce(),
                owner: owner.to_owned(),
                description: description.to_owned(),
                expires_at_ms: tx.now.saturating_add(ttl),
            };
            tx.put_leased(&lease_key(machine_id), &lease, held[0])?;
            Ok(lease)
        })
    }

    fn refresh_lease(&self, machine_id: &str, nonce: &str, ttl_ms: u64) -> Result<Lease> {
        let ttl = ttl(ttl_ms)?;
        self.write_held(&[ttl], |tx, held| {
            machine_exists(tx, machine_id)?;
            let mut lease = live_lease(tx, machine_id)?
                .filter(|l| l.nonce == nonce)
                .ok_or_else(|| StoreError::LeaseMismatch {
                    machine_id: machine_id.to_owned(),
                })?;
            lease.expires_at_ms = tx.now.saturating_add(ttl);
            tx.put_leased(&lease_key(machine_id), &lease, held[0])?;
            Ok(lease)
        })
    }

    fn release_lease(&self, machine_id: &str, nonce: &str) -> Result<()> {
        self.write(|tx| {
            if let Some(held) = live_lease(tx, machine_id)? {
                if held.nonce != nonce {
                    return Err(StoreError::LeaseMismatch {
                        machine_id: machine_id.to_owned(),
                    });
                }
            }
            if tx.get(&lease_key(machine_id))?.is_some() {
                tx.delete(&lease_key(machine_id));
            }
            Ok(())
        })
    }

    fn current_lease(&self, machine_id: &str) -> Result<Option<Lease>> {
        self.read(|tx| live_lease(tx, machine_id))
    }

    fn check_lease(&self, machine_id: &str, nonce: Option<&str>) -> Result<()> {
        self.read(|tx| match live_lease(tx, machine_id)? {
            Some(held) if Some(held.nonce.as_str()) != nonce => Err(StoreError::LeaseHeld {
                machine_id: machine_id.to_owned(),
                expires_at_ms: held.expires_at_ms,
            }),
            _ => Ok(()),
        })
    }

    // ---- named locks ------------------------------------------------------------------------

    fn acquire_lock(&self, name: &str, ttl_ms: u64, owner: &str) -> Result<Lock> {
        let ttl = ttl(ttl_ms)?;
        self.write_held(&[ttl], |tx, leases| {
            if let Some(held) = live_lock(tx, name)? {
                return Err(StoreError::LockHeld {
                    name: name.to_owned(),
                    expires_at_ms: held.expires_at_ms,
                    owner: held.owner,
                });
            }
            let lock = Lock {
                name: name.to_owned(),
                nonce: new_nonce(),
                owner: owner.to_owned(),
                expires_at_ms: tx.now.saturating_add(ttl),
            };
            tx.put_leased(&lock_key(name), &lock, leases[0])?;
            Ok(lock)
        })
    }

    fn refresh_lock(&self, name: &str, nonce: &str, ttl_ms: u64) -> Result<Lock> {
        let ttl = ttl(ttl_ms)?;
        self.write_held(&[ttl], |tx, held| {
            refresh_lock_tx(tx, name, nonce, ttl, held[0])?.ok_or_else(|| {
                StoreError::LockMismatch {
                    name: name.to_owned(),
                }
            })
        })
    }

    fn refresh_locks(&self, locks: &[(&str, &str, u64)]) -> Result<Vec<Option<Lock>>> {
        let ttls = lock_ttls(locks)?;
        let mut out = Vec::with_capacity(locks.len());
        // A commit compares and puts every lock it read: two operations per lock, under etcd's
        // default --max-txn-ops of 128.
        for (chunk, ttls) in locks.chunks(REFRESH_BATCH).zip(ttls.chunks(REFRESH_BATCH)) {
            out.extend(self.write_held(ttls, |tx, held| {
                let keys: Vec<String> = chunk.iter().map(|(n, _, _)| lock_key(n)).collect();
                tx.prefetch(&keys)?;
                let mut got = Vec::with_capacity(chunk.len());
                for (((name, nonce, _), ttl), lease) in chunk.iter().zip(ttls).zip(held) {
                    got.push(refresh_lock_tx(tx, name, nonce, *ttl, *lease)?);
                }
                Ok(got)
            })?);
        }
        Ok(out)
    }

    fn release_lock(&self, name: &str, nonce: &str) -> Result<()> {
        self.write(|tx| {
            if let Some(held) = live_lock(tx, name)? {
                if held.nonce != nonce {
                    return Err(StoreError::LockMismatch {
                        name: name.to_owned(),
                    });
                }
            }
            if tx.get(&lock_key(name))?.is_some() {
                tx.delete(&lock_key(name));
            }
            Ok(())
        })
    }

    fn current_lock(&self, name: &str) -> Result<Option<Lock>> {
        self.read(|tx| live_lock(tx, name))
    }

    // ---- volumes ----------------------------------------------------------------------------

    fn create_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord> {
        self.write(|tx| {
            if v.id.is_empty() {
                return Err(invalid("a volume ID must not be empty"));
            }
            if tx.get(&volume_key(&v.id))?.is_some() {
                return Err(StoreError::Exists {
                    kind: "volume",
                    id: v.id.clone(),
                });
            }
            let rec = VolumeRecord {
                revision: 1,
                created_at_ms: tx.now,
                updated_at_ms: tx.now,
                ..v.clone()
            };
            tx.put(&volume_key(&v.id), &rec)?;
            tx.put_raw(&volume_state_idx(&v.state, &v.id), Vec::new());
            Ok(rec)
        })
    }

    fn get_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.read(|tx| get_volume_tx(tx, id))
    }

    fn list_volumes(&self, state: Option<&str>) -> Result<Vec<VolumeRecord>> {
        self.read(|tx| {
            let kvs = match state {
                None => tx.range("volumes/")?,
                Some(st) => {
                    let keys: Vec<String> = tx
                        .range(&format!("idx/volume_state/{}/", esc(st)))?
                        .iter()
                        .map(|kv| volume_key(&last_segment(&kv.key)))
                        .collect();
                    tx.get_many(&keys)?.into_iter().flatten().collect()
                }
            };
            let v: Vec<VolumeRecord> = kvs.iter().map(decode).collect::<Result<_>>()?;
            Ok(by_created(v, |r| (r.created_at_ms, r.id.clone())))
        })
    }

    fn update_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord> {
        self.write(|tx| {
            let cur = get_volume_tx(tx, &v.id)?;
            if cur.revision != v.revision {
                return Err(stale("volume", &v.id, v.revision, cur.revision));
            }
            if cur.state != v.state {
                tx.delete(&volume_state_idx(&cur.state, &v.id));
                tx.put_raw(&volume_state_idx(&v.state, &v.id), Vec::new());
            }
            let rec = VolumeRecord {
                revision: cur.revision + 1,
                created_at_ms: cur.created_at_ms,
                updated_at_ms: tx.now.max(cur.updated_at_ms),
                ..v.clone()
            };
            tx.put(&volume_key(&v.id), &rec)?;
            Ok(rec)
        })
    }

    fn delete_volume(&self, id: &str, revision: u64) -> Result<()> {
        self.write(|tx| {
            let cur = get_volume_tx(tx, id)?;
            if cur.revision != revision {
                return Err(stale("volume", id, revision, cur.revision));
            }
            tx.delete(&volume_key(id));
            tx.delete(&volume_state_idx(&cur.state, id));
            Ok(())
        })
    }

    // ---- migrations -------------------------------------------------------------------------

    fn create_migration(&self, m: &MigrationRecord) -> Result<MigrationRecord> {
        self.write(|tx| {
            if m.id.is_empty() || m.machine_id.is_empty() {
                return Err(invalid("a migration needs an ID and a machine"));
            }
            tx.prefetch(&[migration_key(&m.id), active_idx(&m.machine_id)])?;
            if tx.get(&migration_key(&m.id))?.is_some() {
                return Err(StoreError::Exists {
                    kind: "migration",
                    id: m.id.clone(),
                });
            }
            if !m.finished {
                // Read in this transaction: a concurrent create for the same machine changes
                // this key, so only one of the two commits.
                if let Some(active) = tx.get_json::<String>(&active_idx(&m.machine_id))? {
                    return Err(StoreError::MigrationActive {
                        machine_id: m.machine_id.clone(),
                        migration_id: active,
                    });
                }
                tx.put(&active_idx(&m.machine_id), &m.id)?;
            }
            let rec = MigrationRecord {
                revision: 1,
                created_at_ms: tx.now,
                updated_at_ms: tx.now,
                ..m.clone()
            };
            tx.put(&migration_key(&m.id), &rec)?;
            for k in migration_idx(&rec) {
                tx.put_raw(&k, Vec::new());
            }
            Ok(rec)
        })
    }

    fn get_migration(&self, id: &str) -> Result<MigrationRecord> {
        self.read(|tx| get_migration_tx(tx, id))
    }

    fn list_migrations(&self, filter: MigrationFilter<'_>) -> Result<Vec<MigrationRecord>> {
        self.read(|tx| {
            let idx = match filter {
                MigrationFilter::All => None,
                MigrationFilter::Machine(m) => Some(format!("idx/mig_machine/{}/", esc(m))),
                MigrationFilter::App(a) => Some(format!("idx/mig_app/{}/", esc(a))),
                MigrationFilter::Network(n) => Some(format!("idx/mig_network/{n}/")),
                MigrationFilter::Drain(d) => Some(format!("idx/mig_drain/{}/", esc(d))),
                MigrationFilter::Unfinished => Some("idx/mig_unfinished/".to_owned()),
            };
            let kvs = match idx {
                None => tx.range("migrations/")?,
                Some(p) => {
                    let keys: Vec<String> = tx
                        .range(&p)?
                        .iter()
                        .map(|kv| migration_key(&last_segment(&kv.key)))
                        .collect();
                    tx.get_many(&keys)?.into_iter().flatten().collect()
                }
            };
            let v: Vec<MigrationRecord> = kvs.iter().map(decode).collect::<Result<_>>()?;
            Ok(by_created(v, |r| (r.created_at_ms, r.id.clone())))
        })
    }

    fn active_migration(&self, machine_id: &str) -> Result<Option<MigrationRecord>> {
        self.read(|tx| active_migration_tx(tx, machine_id))
    }

    fn update_migration_recorded(
        &self,
        m: &MigrationRecord,
        event: Option<&NewEvent>,
    ) -> Result<MigrationRecord> {
        self.write(|tx| {
            if let Some(ev) = event {
                machine_exists(tx, &m.machine_id)?;
                put_event(tx, &m.machine_id, ev)?;
            }
            let cur = get_migration_tx(tx, &m.id)?;
            if cur.revision != m.revision {
                return Err(stale("migration", &m.id, m.revision, cur.revision));
            }
            check_migration_update(&cur, m)?;
            let rec = MigrationRecord {
                revision: cur.revision + 1,
                created_at_ms: cur.created_at_ms,
                updated_at_ms: tx.now.max(cur.updated_at_ms),
                ..m.clone()
            };
            let (old_idx, new_idx) = (migration_idx(&cur), migration_idx(&rec));
            for k in old_idx.iter().filter(|k| !new_idx.contains(k)) {
                tx.delete(k);
            }
            for k in new_idx.iter().filter(|k| !old_idx.contains(k)) {
                tx.put_raw(k, Vec::new());
            }
            if rec.finished && !cur.finished {
                // Frees the machine for its next migration in the same commit.
                tx.delete(&active_idx(&rec.machine_id));
            }
            tx.put(&migration_key(&m.id), &rec)?;
            Ok(rec)
        })
    }

    // ---- tokens -----------------------------------------------------------------------------

    fn create_token(&self, t: &TokenRecord) -> Result<TokenRecord> {
        self.write(|tx| {
            crate::records::check_token(t)?;
            let key = format!("tokens/{}", esc(&t.id));
            if tx.get(&key)?.is_some() {
                return Err(StoreError::Exists {
                    kind: "token",
                    id: t.id.clone(),
                });
            }
            let rec = TokenRecord {
                created_at_ms: tx.now,
                revoked: false,
                ..t.clone()
            };
            tx.put(&key, &rec)?;
            Ok(rec)
        })
    }

    fn get_token(&self, id: &str) -> Result<TokenRecord> {
        self.read(|tx| get_token_tx(tx, id))
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|tx| {
            let v: Vec<TokenRecord> = tx
                .range("tokens/")?
                .iter()
                .map(decode)
                .collect::<Result<_>>()?;
            Ok(by_created(v, |t| (t.created_at_ms, t.id.clone())))
        })
    }

    fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        self.write(|tx| {
            let mut t = get_token_tx(tx, id)?;
            if !t.revoked {
                t.revoked = true;
                tx.put(&format!("tokens/{}", esc(id)), &t)?;
            }
            Ok(t)
        })
    }

    // ---- policies ---------------------------------------------------------------------------

    fn get_policy(&self, app: &str) -> Result<Option<PolicyRecord>> {
        self.read(|tx| tx.get_json(&format!("policies/{}", esc(app))))
    }

    fn put_policy(&self, p: &PolicyRecord) -> Result<PolicyRecord> {
        self.write(|tx| {
            let key = format!("policies/{}", esc(&p.app));
            let found = tx.get_json::<PolicyRecord>(&key)?.map_or(0, |c| c.revision);
            if found != p.revision {
                return Err(if p.revision == 0 {
                    StoreError::Exists {
                        kind: "policy",
                        id: p.app.clone(),
                    }
                } else {
                    stale("policy", &p.app, p.revision, found)
                });
            }
            let rec = PolicyRecord {
                revision: found + 1,
                ..p.clone()
            };
            tx.put(&key, &rec)?;
            Ok(rec)
        })
    }

    // ---- instances --------------------------------------------------------------------------

    fn append_instance(&self, r: &InstanceRecord) -> Result<bool> {
        self.write(|tx| {
            let key = format!("instances/{}/{}", esc(&r.machine_id), esc(&r.instance_id));
            if tx.get(&key)?.is_some() {
                return Ok(false);
            }
            tx.put(&key, r)?;
            Ok(true)
        })
    }

    fn list_instances(&self, machine_id: &str) -> Result<Vec<InstanceRecord>> {
        self.read(|tx| {
            // Append order is the order in which their keys were created.
            let mut kvs = tx.range(&format!("instances/{}/", esc(machine_id)))?;
            kvs.sort_by_key(|kv| kv.create_revision);
            kvs.iter().map(decode).collect()
        })
    }

    // ---- bridge -----------------------------------------------------------------------------

    fn list_bridge_mappings(&self, network_id: Option<u32>) -> Result<Vec<BridgeMapping>> {
        self.read(|tx| {
            let prefix = match network_id {
                Some(n) => format!("bridge/map/{n}/"),
                None => "bridge/map/".to_owned(),
            };
            let mut v: Vec<BridgeMapping> = tx
                .range(&prefix)?
                .iter()
                .map(decode)
                .collect::<Result<_>>()?;
            v.sort_by(|a, b| (a.network_id, &a.old).cmp(&(b.network_id, &b.old)));
            Ok(v)
        })
    }

    fn followed_bridge_mappings(&self) -> Result<Vec<BridgeMapping>> {
        let own = self.last_commit.load(std::sync::atomic::Ordering::SeqCst);
        let from_view = self.followed.read(own, |v| {
            let mut out: Vec<BridgeMapping> = v.mappings.values().cloned().collect();
            out.sort_by(|a, b| (a.network_id, &a.old).cmp(&(b.network_id, &b.old)));
            out
        });
        match from_view {
            Some(v) => Ok(v),
            None => self.list_bridge_mappings(None),
        }
    }

    fn bridge_network(&self, network_id: u32) -> Result<BridgeNetwork> {
        self.read(|tx| bridge_network_tx(tx, network_id))
    }

    fn put_bridge_mapping(&self, m: &BridgeMapping) -> Result<BridgeNetwork> {
        self.write(|tx| apply_bridge(tx, m.network_id, None, std::slice::from_ref(m), &[]))
    }

    fn remove_bridge_mapping(&self, network_id: u32, old: &str) -> Result<BridgeNetwork> {
        self.write(|tx| apply_bridge(tx, network_id, None, &[], &[old.to_owned()]))
    }

    fn update_bridge_network(
        &self,
        network_id: u32,
        expected_revision: u64,
        puts: &[BridgeMapping],
        removes: &[String],
    ) -> Result<BridgeNetwork> {
        self.write(|tx| apply_bridge(tx, network_id, Some(expected_revision), puts, removes))
    }

    fn set_bridge_gate(&self, scope: GateScope, name: &str, off: bool) -> Result<()> {
        if name.is_empty() {
            return Err(invalid("a gate needs an org or app name"));
        }
        self.write(|tx| {
            let key = format!("bridge/gate/{}/{}", scope.as_str(), esc(name));
            if off {
                tx.put_raw(&key, Vec::new());
            } else {
                tx.delete(&key);
            }
            Ok(())
        })
    }

    fn bridge_gates_off(&self) -> Result<Vec<(GateScope, String)>> {
        self.read(|tx| {
            tx.range("bridge/gate/")?
                .iter()
                .map(|kv| {
                    let rest = &kv.key["bridge/gate/".len()..];
                    let (scope, name) = rest.split_once('/').unwrap_or((rest, ""));
                    let scope = GateScope::parse(scope).ok_or_else(|| StoreError::Corrupt {
                        what: format!("etcd key {}", kv.key),
                    })?;
                    Ok((scope, unesc(name)))
                })
                .collect()
        })
    }

    // ---- settings ---------------------------------------------------------------------------

    fn kv_get(&self, key: &str) -> Result<Option<String>> {
        self.read(|tx| {
            tx.get(&format!("kv/{}", esc(key)))?
                .map(|kv| {
                    String::from_utf8(kv.value).map_err(|_| StoreError::Corrupt {
                        what: format!("setting {key:?} is not UTF-8"),
                    })
                })
                .transpose()
        })
    }

    fn kv_put(&self, key: &str, value: &str) -> Result<()> {
        self.write(|tx| {
            tx.put_raw(&format!("kv/{}", esc(key)), value.as_bytes().to_vec());
            Ok(())
        })
    }

    fn subscribe(&self) -> Result<crate::Subscription> {
        let n = self.watcher.get_or_init(|| {
            let n = Arc::new(crate::watch::Notifier::default());
            let rt = self.rt.as_ref().expect("the runtime lives until drop");
            rt.spawn(watch_loop(
                self.endpoints.clone(),
                self.prefix.clone(),
                n.clone(),
                self.followed.clone(),
            ));
            n
        });
        Ok(n.subscribe())
    }
}

/// The longest pause between two attempts to (re)open the store's etcd watch.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Follows every key under `prefix` for as long as the store lives (see [`crate::watch`]): one
/// etcd watch, opened again from the next revision it has not seen when it breaks (a member
/// died, quorum was lost, etcd was down), with a bounded backoff. Each reopening tells the
/// subscribers that everything changed, because changes may have happened while it was broken
/// and the watch may not be able to resume (a compacted revision starts over from "now").
async fn watch_loop(
    endpoints: Vec<String>,
    prefix: String,
    notifier: Arc<crate::watch::Notifier>,
    followed: Arc<followed::Followed>,
) {
    let mut next = 0i64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let w = Watch {
            endpoints: &endpoints,
            prefix: &prefix,
            notifier: &notifier,
            followed: &followed,
        };
        let _ = w.once(&mut next, &mut backoff).await;
        followed.broken();
        notifier.bump_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

/// What one watch stream feeds.
struct Watch<'a> {
    endpoints: &'a [String],
    prefix: &'a str,
    notifier: &'a crate::watch::Notifier,
    followed: &'a followed::Followed,
}

impl Watch<'_> {
    /// One watch stream until it breaks. A connection of its own: the store's client has a
    /// per-request deadline ([`REQUEST_TIMEOUT`]) that a stream meant to last must not get.
    async fn once(
        &self,
        next: &mut i64,
        backoff: &mut Duration,
    ) -> std::result::Result<(), etcd_client::Error> {
        // require_leader: a member cut off from the leader ends the stream (then another member
        // is tried) instead of keeping it open with nothing to say; keep-alive: a member that
        // stopped answering is noticed within seconds.
        let opts = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let mut client = Client::connect(self.endpoints.to_vec(), Some(opts)).await?;
        if *next == 0 {
            // Starting over (first start, or compacted past where it stopped): the followed
            // prefixes at one revision, then every change after it.
            *next = self.load(&mut client).await? + 1;
        }
        let wopts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(*next);
        let mut stream = client.watch(self.prefix, Some(wopts)).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                // Compacted past `next`, or refused: start over (the caller bumps all).
                *next = 0;
                return Ok(());
            }
            if resp.created() {
                *backoff = Duration::from_millis(100);
                // Resumes from `next`: the view misses nothing (the events since come next).
                self.followed.resumed();
                // Whatever happened while the stream was down is unknown to subscribers.
                self.notifier.bump_all();
            }
            let mut changes = Vec::new();
            let mut topics = [false; 3];
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                *next = (*next).max(kv.mod_revision() + 1);
                let Some(kv) = self.relative(kv) else {
                    continue;
                };
                if kv.key.starts_with(followed::MACHINES) || kv.key.starts_with(followed::MAPPINGS)
                {
                    changes.push(match ev.event_type() {
                        etcd_client::EventType::Put => followed::Change::Put(kv.clone()),
                        etcd_client::EventType::Delete => followed::Change::Delete(kv.key.clone()),
                    });
                }
                if let Some(t) = crate::watch::topic_of(&kv.key) {
                    topics[t as usize] = true;
                }
            }
            // The view first: a subscriber woken below reads it.
            if !resp.events().is_empty() {
                self.followed.apply(*next - 1, changes);
            }
            for t in [
                crate::watch::Topic::Machines,
                crate::watch::Topic::Hosts,
                crate::watch::Topic::Bridge,
            ] {
                if topics[t as usize] {
                    self.notifier.bump(t);
                }
            }
        }
        Ok(())
    }

    /// `kv` with its key relative to the store's prefix (`None` outside it).
    fn relative(&self, kv: &etcd_client::KeyValue) -> Option<Kv> {
        let key = String::from_utf8_lossy(kv.key());
        Some(Kv {
            key: key.strip_prefix(self.prefix)?.to_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
        })
    }

    /// Loads the followed prefixes as they are now; answers the revision read.
    async fn load(&self, client: &mut Client) -> std::result::Result<i64, etcd_client::Error> {
        let ops = [followed::MACHINES, followed::MAPPINGS]
            .into_iter()
            .map(|p| {
                TxnOp::get(
                    format!("{}{p}", self.prefix),
                    Some(GetOptions::new().with_prefix()),
                )
            })
            .collect::<Vec<_>>();
        let resp = client.txn(Txn::new().and_then(ops)).await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut kvs = Vec::new();
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(g) = r {
                kvs.extend(g.kvs().iter().filter_map(|kv| self.relative(kv)));
            }
        }
        self.followed.load(rev, kvs);
        Ok(rev)
    }
}

impl EtcdStore {
    fn list_machines_filtered(&self, app: Option<&str>, live_only: bool) -> Result<Vec<Machine>> {
        self.read(|tx| {
            let v = match app {
                Some(a) => machines_by_idx(tx, &format!("idx/machine_app/{}/", esc(a)))?,
                None => tx
                    .range("machines/")?
                    .iter()
                    .map(|kv| Ok((decode(kv)?, kv.create_revision)))
                    .collect::<Result<_>>()?,
            };
            Ok(sorted_machines(v, live_only))
        })
    }
}
