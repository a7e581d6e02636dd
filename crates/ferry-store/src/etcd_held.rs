//! The etcd leases an [`EtcdStore`](super::EtcdStore) holds: every named lock (a migration's
//! claim, a network's migration lock) and every machine lease it writes is attached to one of
//! them, and a task on the store's runtime keeps them alive while the store lives.
//!
//! Why: a record with an expiry is only half of a lock. Its `expires_at_ms` says when the holder
//! stops holding it, judged on the store's clock, which the whole [`crate::Store`] contract (and
//! the conformance suite's [`crate::ManualClock`]) is written in. The etcd lease makes the key's
//! life the holder's: when the server that wrote it dies (kill -9, a lost host, a partition that
//! outlasts the TTL), etcd itself deletes the key once the keep-alives stop, the watch announces
//! the delete to every other server, and nothing has to read and judge a stale record first.
//! A record is held while *both* hold: its key exists (its etcd lease is alive) and its
//! `expires_at_ms` is in the future.
//!
//! How: one etcd lease per TTL *bucket* (a second count; see [`bucket`]), granted at the first
//! write that needs it and shared by every record of that bucket this store writes, like etcd's
//! own `concurrency.Session`. The lease's own TTL is the bucket plus one keep-alive interval
//! plus a second ([`grant_ttl`]), so between two keep-alives its remaining life never drops
//! below the bucket: etcd never deletes a record before its `expires_at_ms`, and deletes a dead
//! holder's records within about a third of their TTL (plus a second) after it. A record written
//! again by another server (a takeover, a machine lease refreshed through another server) moves
//! to that server's lease with the write. When a lease is lost anyway (etcd revoked it, or it
//! expired while this process was stalled), the keep-alive task forgets it, a write that named it
//! fails with etcd's "requested lease not found", and the write runs again on a new lease
//! ([`lease_gone`]); the records it held were deleted with it, and their holders find out at
//! their next refresh, as when a lock expires.

use super::{from_etcd, refused_before_proposal, retry_read, REFUSED_BACKOFF, REQUEST_TIMEOUT};
use crate::error::{Result, StoreError};
use etcd_client::LeaseClient;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// TTLs up to this many seconds get a lease of exactly their length; longer ones (machine leases
/// an API user asks for) share one lease per power of two, so that a server holds a few dozen
/// leases at most, whatever TTLs its users pick.
const EXACT_UP_TO: u64 = 64;
/// The longest bucket (about 136 years; etcd's own limit is 9e9 s).
const MAX_BUCKET: u64 = 1 << 32;
/// Keep-alives are sent at least this far apart.
const MIN_INTERVAL: Duration = Duration::from_millis(300);

/// The bucket, in whole seconds, of a record that lives `ttl_ms`.
pub(super) fn bucket(ttl_ms: i64) -> u64 {
    let secs = u64::try_from(ttl_ms.max(1)).unwrap_or(1).div_ceil(1000);
    if secs <= EXACT_UP_TO {
        secs
    } else {
        secs.next_power_of_two().min(MAX_BUCKET)
    }
}

/// How often a bucket's lease is kept alive: three times per bucket.
fn interval(bucket: u64) -> Duration {
    Duration::from_millis(bucket.saturating_mul(1000) / 3).max(MIN_INTERVAL)
}

/// The TTL a bucket's lease is granted with (and renewed to): the bucket, plus one keep-alive
/// interval (the most it decays before the next keep-alive), plus a second for the rounding of
/// etcd's whole-second TTLs and the leader's clock.
pub(super) fn grant_ttl(bucket: u64) -> i64 {
    i64::try_from(bucket + bucket.div_ceil(3) + 1).unwrap_or(i64::MAX)
}

/// Whether a write failed because an etcd lease it attached a key to no longer exists
/// (etcd's `rpctypes.ErrGRPCLeaseNotFound`, matched by its stable description as etcd's own
/// client does).
pub(super) fn lease_gone(e: &StoreError) -> bool {
    matches!(e, StoreError::Etcd { what } if what.contains("requested lease not found"))
}

/// The leases this store holds, by bucket.
#[derive(Default)]
pub(super) struct Held {
    leases: Mutex<BTreeMap<u64, i64>>,
}

impl Held {
    /// The ID of this store's lease for `bucket`, granted now (one round trip, and a keep-alive
    /// task on `rt`) if it holds none.
    pub(super) fn lease(
        self: &Arc<Self>,
        rt: &tokio::runtime::Runtime,
        client: &LeaseClient,
        bucket: u64,
    ) -> Result<i64> {
        // Held across the grant so that two writers never grant two leases for one bucket; only
        // the first write of each bucket waits here.
        let mut leases = self.leases.lock().unwrap();
        if let Some(id) = leases.get(&bucket) {
            return Ok(*id);
        }
        let mut c = client.clone();
        let ttl = grant_ttl(bucket);
        let id = super::block_on(rt, async move {
            loop {
                // Granting again after a lost answer is harmless: a lease with no key attached
                // expires by itself.
                match c.grant(ttl, None).await {
                    Err(e) if retry_read(&e) || refused_before_proposal(&e) => {
                        tokio::time::sleep(REFUSED_BACKOFF).await
                    }
                    r => return r.map(|r| r.id()).map_err(from_etcd),
                }
            }
        })?;
        leases.insert(bucket, id);
        rt.spawn(keep_alive(Arc::downgrade(self), client.clone(), bucket, id));
        Ok(id)
    }

    /// Stops using lease `id` (etcd no longer has it): the next write of its bucket grants a new
    /// one.
    pub(super) fn forget(&self, id: i64) {
        self.leases.lock().unwrap().retain(|_, l| *l != id);
    }
}

/// Keeps lease `id` alive every [`interval`] until the store is dropped (its runtime stops this
/// task) or etcd says the lease is gone. A broken stream (a member died) is opened again, on
/// whichever member answers, well within the lease's slack.
async fn keep_alive(held: Weak<Held>, mut client: LeaseClient, bucket: u64, id: i64) {
    let every = interval(bucket);
    let gone = || {
        if let Some(h) = held.upgrade() {
            h.forget(id);
        }
    };
    loop {
        if held.strong_count() == 0 {
            return;
        }
        // Opening the stream sends one keep-alive and reads its answer.
        match client.keep_alive(id).await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::time::sleep(every).await;
                if held.strong_count() == 0 {
                    return;
                }
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    // A TTL of 0: the lease expired or was revoked.
                    Ok(Ok(Some(_))) => return gone(),
                    _ => break,
                }
            },
            // The client's words for an answer with a TTL of 0.
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                return gone()
            }
            Err(_) => tokio::time::sleep(REFUSED_BACKOFF * 5).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_seconds_then_powers_of_two() {
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(1000), 1);
        assert_eq!(bucket(1001), 2);
        assert_eq!(bucket(5_000), 5);
        assert_eq!(bucket(64_000), 64);
        assert_eq!(bucket(64_001), 128);
        assert_eq!(bucket(3_600_000), 4096);
        assert_eq!(bucket(i64::MAX), MAX_BUCKET);
    }

    #[test]
    fn a_lease_never_decays_below_its_bucket_between_keep_alives() {
        for b in [1, 2, 5, 15, 64, 128, 4096, MAX_BUCKET] {
            let least = grant_ttl(b) as f64 - interval(b).as_secs_f64();
            assert!(least >= b as f64 + 0.5, "bucket {b}: {least}");
            // And it still fits etcd's limit.
            assert!(grant_ttl(b) <= 9_000_000_000, "bucket {b}");
        }
    }
}
