//! The migration driver: one task per migration walks its record through the phases, each step
//! idempotent and recorded before the next begins (see the module above for the invariants).

use super::*;
use crate::proto::{VolumeExpect, VolumeExpected, VolumeRemove, VolumeRound, VolumeSend};
use crate::views::StopRequest;
use ferry_addr::{FleetAddr, MachineField};
use ferry_store::{new_instance_id, NewEvent};

enum StepError {
    /// Try the same step again (an agent restarting, a lock held by another migration).
    Retry(String),
    /// Give up and undo.
    RollBack(String),
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        // Conflicts and bad input will not fix themselves; unavailable agents and failures may.
        if e.kind.is_transient() {
            StepError::Retry(e.message)
        } else {
            StepError::RollBack(e.message)
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::from(Error::from(e))
    }
}

type Step<T> = std::result::Result<T, StepError>;

pub fn spawn_driver(core: Arc<Core>, id: String) {
    if !core.migrations.driving.lock().unwrap().insert(id.clone()) {
        return;
    }
    tokio::spawn(async move {
        drive(&core, &id).await;
        core.migrations.driving.lock().unwrap().remove(&id);
        core.migrations.progress.lock().unwrap().remove(&id);
    });
}

/// Holds (or takes again, if it expired and nobody else took it) this server's claim on
/// driving migration `id`. `Ok(false)`: another server drives it.
fn keep_claim(core: &Core, id: &str, nonce: &mut Option<String>) -> Result<bool> {
    let name = claim_name(id);
    if let Some(n) = nonce.as_deref() {
        if core.store.refresh_lock(&name, n, CLAIM_TTL_MS).is_ok() {
            return Ok(true);
        }
    }
    match core
        .store
        .acquire_lock(&name, CLAIM_TTL_MS, &core.server_id)
    {
        Ok(l) => {
            *nonce = Some(l.nonce);
            Ok(true)
        }
        Err(StoreError::LockHeld { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn claim_name(id: &str) -> String {
    format!("migration-driver/{id}")
}

async fn drive(core: &Arc<Core>, id: &str) {
    // Exactly one server drives a migration at a time: the one holding its claim, a store lock
    // with a short TTL that this driver's heartbeat refreshes. A server that dies stops
    // refreshing; every server's takeover scan ([`super::resume_unfinished`]) then claims it
    // and carries on from the recorded phase.
    let mut claim = None;
    match keep_claim(core, id, &mut claim) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!("migration {id}: claim: {e}");
            return;
        }
    }
    // Read once here; the loop below starts from it.
    let first = load(core, id).ok();
    if first.as_ref().is_some_and(|m| m.phase == Phase::Pending) {
        crate::crash_point("pending"); // test hook: claimed, nothing done yet
    }
    // The heartbeat ([`heartbeat`]) refreshes the claim and the network lock from here while
    // this driver lives, so only a dead server's expire.
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    core.migrations.held.lock().unwrap().insert(
        id.to_owned(),
        Held {
            claim,
            network: None,
            lost: lost.clone(),
        },
    );
    start_heartbeat(core);
    // When this driver last refreshed (or took) the network lock itself.
    let mut lock_held_at: Option<std::time::Instant> = None;
    // The migration as this driver last saved it: the next step starts from it without reading
    // it again (a save is a compare-and-swap on its revision, so a copy that someone else changed
    // meanwhile can never be written back). After a wait or a failed save it is read again.
    let mut saved: Option<Migration> = first;
    loop {
        if lost.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("migration {id}: another server took it over");
            break;
        }
        let mut mig = match saved.take().map_or_else(|| load(core, id), Ok) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("migration {id}: {e}");
                break;
            }
        };
        // The network lock the migration holds, as of the driver's last read or write of it:
        // the heartbeat refreshes it without reading the migration again.
        if let Some(h) = core.migrations.held.lock().unwrap().get_mut(id) {
            h.network = mig.lock_nonce.clone().map(|n| (lock_name(&mig), n));
        }
        if mig.phase.finished() {
            break;
        }
        // Every step after `pending` runs under the network's lock. A server that was down
        // longer than the TTL may have lost it to another migration: then wait for it again.
        // A lock this driver refreshed moments ago (the previous step) holds for most of its
        // TTL still: refreshing it again before every step would put a store write (an fsync
        // on SQLite) between each of the steps from the stop to the start, the downtime.
        let fresh = mig.lock_nonce.is_some()
            && lock_held_at.is_some_and(|t| t.elapsed() < Duration::from_millis(LOCK_TTL_MS / 5));
        if mig.phase != Phase::Pending && !fresh {
            match hold_lock(core, &mut mig) {
                Ok(true) => lock_held_at = Some(std::time::Instant::now()),
                Ok(false) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("migration {id}: lock: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let before = mig.phase;
        // An event an unsaved phase left (see `goes_on_unsaved`): the step after it keeps it
        // even if that step fails (it records what happened before that step).
        let carried = mig.pending_event.clone();
        match step(core, &mut mig).await {
            Ok(()) => {
                if mig.phase != before {
                    if before == Phase::Pending {
                        // `lock_and_plan` took or refreshed the network lock just now.
                        lock_held_at = Some(std::time::Instant::now());
                    }
                    mig.retries = 0;
                    if mig.phase != Phase::RolledBack {
                        mig.error = None; // a retried step succeeded; a rollback keeps its reason
                    }
                    if goes_on_unsaved(before, mig.phase) {
                        crate::crash_point(mig.phase.as_str());
                        saved = Some(mig);
                        continue;
                    }
                    if save(core, &mut mig).is_err() {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    core.changed();
                    crate::crash_point(mig.phase.as_str());
                    saved = Some(mig);
                } else {
                    // A step that waits (the network's lock, the notice period, the policy's
                    // max_unavailable): the copy is still what was last saved (only the driver
                    // holding the claim writes it, and a save is a compare-and-swap anyway), so
                    // each look does not read it again.
                    saved = Some(mig);
                }
            }
            Err(StepError::Retry(e)) => {
                // What the failed step would have recorded did not happen (it runs again). An
                // event it found pending is still pending, or was written when it recorded its own.
                if mig.pending_event != carried {
                    mig.pending_event = None;
                }
                mig.retries += 1;
                tracing::warn!("migration {id} at {}: {e} (retrying)", mig.phase.as_str());
                if mig.retries > MAX_RETRIES && mig.phase != Phase::RollingBack {
                    start_rollback(&mut mig, format!("gave up after {MAX_RETRIES} tries: {e}"));
                } else {
                    mig.error = Some(e);
                }
                let _ = save(core, &mut mig);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(StepError::RollBack(e)) => {
                if mig.pending_event != carried {
                    mig.pending_event = None;
                }
                if mig.phase == Phase::RollingBack {
                    // Undoing failed in a way retrying will not fix: stay here, say why, retry
                    // slowly (an operator may fix the host).
                    mig.error = Some(format!("rollback blocked: {e}"));
                    let _ = save(core, &mut mig);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                tracing::warn!("migration {id} rolls back from {}: {e}", mig.phase.as_str());
                start_rollback(&mut mig, e);
                let _ = save(core, &mut mig);
            }
        }
    }
    let held = core.migrations.held.lock().unwrap().remove(id);
    if let Some(n) = held.and_then(|h| h.claim) {
        let _ = core.store.release_lock(&claim_name(id), &n);
    }
}

/// What the heartbeat keeps alive for one migration driven here.
pub(crate) struct Held {
    /// The nonce of this server's claim on driving it.
    claim: Option<String>,
    /// The network lock it holds: name and nonce.
    network: Option<(String, String)>,
    /// Set when another server took the claim: the driver stops.
    lost: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts this server's heartbeat once.
fn start_heartbeat(core: &Arc<Core>) {
    core.migrations.heartbeat.get_or_init(|| {
        // Weak: the heartbeat must not keep a dropped core (a test's, a stopped server's) alive.
        let core = Arc::downgrade(core);
        tokio::spawn(heartbeat(core));
    });
}

/// Refreshes the claims and network locks of every migration driven here, in one store call per
/// beat: each refresh is a store write (on etcd a round of the cluster), and a drain has every
/// migration of a host in flight at once, most of them waiting for their network's lock, so a
/// write per migration per beat was a steady load on the store under every step of the drain.
/// Claims every third of their TTL (two beats in a row may fail before one lapses); network
/// locks, with their longer TTL, every other beat.
async fn heartbeat(core: std::sync::Weak<Core>) {
    for beat in 0u64.. {
        tokio::time::sleep(Duration::from_millis(CLAIM_TTL_MS / 3)).await;
        let Some(core) = core.upgrade() else { return };
        let empty = core.migrations.held.lock().unwrap().is_empty();
        if !empty {
            let _ = tokio::task::spawn_blocking(move || beat_once(&core, beat % 2 == 1)).await;
        }
    }
}

fn beat_once(core: &Core, with_network_locks: bool) {
    // (lock name, nonce, TTL, the migration whose claim it is)
    let mut req: Vec<(String, String, u64, Option<String>)> = Vec::new();
    for (id, h) in core.migrations.held.lock().unwrap().iter() {
        if let Some(n) = &h.claim {
            req.push((claim_name(id), n.clone(), CLAIM_TTL_MS, Some(id.clone())));
        }
        if let (true, Some((name, n))) = (with_network_locks, &h.network) {
            req.push((name.clone(), n.clone(), LOCK_TTL_MS, None));
        }
    }
    let refs: Vec<(&str, &str, u64)> = req
        .iter()
        .map(|(name, n, ttl, _)| (name.as_str(), n.as_str(), *ttl))
        .collect();
    // Store unreachable: the next beat tries again (the claims may still hold).
    let Ok(got) = core.store.refresh_locks(&refs) else {
        return;
    };
    for ((_, _, _, claim_of), got) in req.iter().zip(got) {
        let (Some(id), None) = (claim_of, got) else {
            continue;
        };
        // The claim lapsed: take it again unless another server did (or its driver ended
        // meanwhile: it needs no claim).
        if !core.migrations.held.lock().unwrap().contains_key(id) {
            continue;
        }
        let mut nonce = None;
        let ours = keep_claim(core, id, &mut nonce);
        if let Some(h) = core.migrations.held.lock().unwrap().get_mut(id) {
            match ours {
                Ok(true) => h.claim = nonce,
                Ok(false) => h.lost.store(true, std::sync::atomic::Ordering::SeqCst),
                Err(_) => {}
            }
        }
    }
}

/// Whether the phase a step reached may go unsaved until the next step's: the next step runs at
/// once, from the same record, and one save records both (and the one event they left, see
/// `record_event`).
///
/// Why: on etcd every save is a write through the cluster, and the steps from the stop to the
/// start are the downtime. Why it is safe: a crash before the next save resumes from the phase
/// before, and each of these steps is one that runs again to the same end: planning under the
/// network's lock (owned by the migration: a driver that finds it held by its own migration
/// adopts it; a field burned twice is only a gap), a stop (of a machine
/// already stopped: nothing; its `stopped_at_ms` was saved before it), a final sync (a round
/// again, verified again). The switch, the mapping and the start each end with their own save.
fn goes_on_unsaved(from: Phase, to: Phase) -> bool {
    matches!(
        (from, to),
        (Phase::Pending, Phase::Locked)
            | (Phase::Precopied, Phase::Stopped)
            | (Phase::Stopped, Phase::Synced)
    )
}

/// Refreshes the network lock this migration holds, or takes it again if it expired and is
/// free. `Ok(false)`: another migration holds it now.
fn hold_lock(core: &Core, mig: &mut Migration) -> Result<bool> {
    let name = lock_name(mig);
    if let Some(n) = &mig.lock_nonce {
        if core.store.refresh_lock(&name, n, LOCK_TTL_MS).is_ok() {
            return Ok(true);
        }
    }
    match core.store.acquire_lock(&name, LOCK_TTL_MS, &mig.id) {
        Ok(l) => {
            mig.lock_nonce = Some(l.nonce);
            save(core, mig)?;
            Ok(true)
        }
        Err(StoreError::LockHeld { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn start_rollback(mig: &mut Migration, reason: String) {
    mig.rollback_from = Some(mig.phase);
    mig.phase = Phase::RollingBack;
    mig.error = Some(reason);
    mig.retries = 0;
}

fn lock_name(m: &Migration) -> String {
    format!("migrate/network/{}", m.network_id)
}

/// One step: does the work of the next phase and sets `mig.phase` to it (the driver saves), or
/// leaves the phase as it is to be called again (waiting).
async fn step(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    match mig.phase {
        Phase::Pending => lock_and_plan(core, mig).await,
        Phase::Locked => notice(core, mig).await,
        Phase::Noticed => precopy(core, mig).await,
        Phase::Precopied => stop_source(core, mig).await,
        Phase::Stopped => final_sync(core, mig).await,
        Phase::Synced => switch(core, mig).await,
        Phase::Switched => map_old_address(core, mig).await,
        Phase::Mapped => start_destination(core, mig).await,
        Phase::Started => wait_healthy(core, mig).await,
        Phase::RollingBack => roll_back(core, mig).await,
        Phase::Done | Phase::RolledBack => Ok(()),
    }
}

async fn lock_and_plan(core: &Core, mig: &mut Migration) -> Step<()> {
    let name = lock_name(mig);
    let holds = match &mig.lock_nonce {
        Some(n) => core.store.refresh_lock(&name, n, LOCK_TTL_MS).is_ok(),
        None => false,
    };
    if !holds {
        // Registered before the attempt, so a release between the attempt and the wait still
        // wakes this one.
        let freed = core.migrations.network_notify(mig.network_id);
        let notified = freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The nonce is saved with the phase this step reaches (see `goes_on_unsaved`), not in
        // a save of its own: a driver that dies before that finds the lock held by this
        // migration, below.
        let acquired = match core.store.acquire_lock(&name, LOCK_TTL_MS, &mig.id) {
            // Held by this migration: taken by a driver of it that died before it saved the
            // nonce. This driver holds the migration's claim, so the lock is its own.
            Err(StoreError::LockHeld { owner, .. }) if owner == mig.id => {
                match core.store.current_lock(&name)? {
                    Some(l) if l.owner == mig.id => Ok(l),
                    _ => return Ok(()), // gone meanwhile: try again
                }
            }
            r => r,
        };
        match acquired {
            Ok(l) => mig.lock_nonce = Some(l.nonce),
            Err(StoreError::LockHeld { owner, .. }) => {
                // Wait: another migration of this network runs. A release by this server wakes
                // the waiters at once; one by another server (or a holder's expiry) is seen at
                // the next poll. Polling slowly keeps a big drain's waiters from flooding the
                // store (each poll is a read and a compare on it); a holder this server drives
                // wakes a waiter when it ends, so its waiters look only as often as its lock
                // could expire.
                let here = core.migrations.driving.lock().unwrap().contains(&owner);
                let poll = match here {
                    true => Duration::from_millis(LOCK_TTL_MS),
                    false => LOCK_POLL,
                };
                let _ = tokio::time::timeout(poll, notified).await;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    let m = core.store.get_machine(&mig.machine_id)?;
    if m.instance_id != mig.old_instance_id || !matches!(m.state, S::Started | S::Stopped) {
        return Err(StepError::RollBack(format!(
            "machine {} changed while the migration waited (now {}, instance {})",
            m.id,
            m.state.as_str(),
            m.instance_id
        )));
    }
    mig.was_running = m.state == S::Started;
    let from = parse_host(&mig.from_host)?;
    let to = if mig.to_host.is_empty() {
        pick_destination(core, from)?
    } else {
        let t = parse_host(&mig.to_host)?;
        if core.store.get_host(t)?.cordoned {
            return Err(StepError::RollBack(format!(
                "host {} was cordoned",
                mig.to_host
            )));
        }
        t
    };
    // A field never used on the destination: the new address is fresh, the old one is never
    // handed out again (allocators only move forward).
    let field = core.store.allocate_machine_field(to)?;
    mig.to_host = host_hex(to);
    mig.new_field = field.0;
    mig.new_ip = FleetAddr::primary(m.network_id, to, field).to_string();
    mig.new_instance_id = new_instance_id();
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
    mig.volumes = Vec::new();
    for (i, mount) in config.mounts.iter().enumerate() {
        let v = crate::volumes::volume(core, &mount.volume)?;
        mig.volumes.push(VolumeFork {
            mount_path: mount.path.clone(),
            src_volume: v.id.clone(),
            src_dir: v.host_dir.clone(),
            dst_volume: crate::volumes::new_volume_id(),
            dst_dir: None,
            session: format!("{}-{i}", mig.id),
            token: random_hex(16),
            root: None,
            verified: false,
        });
    }
    mig.phase = Phase::Locked;
    Ok(())
}

fn pick_destination(core: &Core, from: HostId) -> Result<HostId> {
    let loads = core.store.machines_per_host()?;
    let mut best: Option<(usize, HostId)> = None;
    for h in crate::cache::hosts(core)? {
        if h.id == from || h.cordoned || h.endpoint.is_empty() {
            continue;
        }
        let load = loads.get(&h.id).copied().unwrap_or(0);
        if best.is_none_or(|(l, _)| load < l) {
            best = Some((load, h.id));
        }
    }
    best.map(|(_, h)| h).ok_or_else(|| {
        Error::conflict(
            "no_destination",
            "no other uncordoned host with a running agent",
        )
    })
}

async fn notice(core: &Core, mig: &mut Migration) -> Step<()> {
    let policy = load_policy(core, &mig.app)?;
    let now = core.store.now_ms();
    let at = match mig.notice_at_ms {
        Some(t) => t,
        None => {
            let deadline = now + policy.notice_period_ms as i64;
            let payload = serde_json::json!({
                "event": "machine.migrate.notice",
                "migration": mig.id,
                "machine_id": mig.machine_id,
                "app": mig.app,
                "from_host": mig.from_host,
                "to_host": mig.to_host,
                "private_ip": mig.old_ip,
                "new_private_ip": mig.new_ip,
                "stop_not_before": rfc3339(deadline),
                "stop_not_before_ms": deadline,
                "sent_at_ms": now,
            });
            let webhook = match &policy.webhook_url {
                Some(url) => {
                    Some(send_webhook(core, url, policy.webhook_secret.as_deref(), &payload).await)
                }
                None => None,
            };
            record_event(
                core,
                mig,
                NewEvent::new(
                    "migrate",
                    "notice",
                    "ferry",
                    serde_json::json!({"notice": payload, "webhook": webhook}),
                ),
            )?;
            mig.notice_at_ms = Some(now);
            if policy.notice_period_ms > 0 {
                // The notice is on record before the wait; with no wait it is saved with the
                // next phase.
                save(core, mig)?;
            }
            now
        }
    };
    let until = at + policy.notice_period_ms as i64;
    if core.store.now_ms() < until {
        let left = (until - core.store.now_ms()).clamp(0, 1000) as u64;
        tokio::time::sleep(Duration::from_millis(left)).await;
        return Ok(()); // come back: the notice period is not over
    }
    mig.phase = Phase::Noticed;
    Ok(())
}

/// POSTs the notice; the body is signed with HMAC-SHA256 (`X-Ferry-Signature: sha256=<hex>`).
/// The outcome goes into the event; a failing webhook does not stop the migration (the event is
/// the notice of record).
async fn send_webhook(
    core: &Core,
    url: &str,
    secret: Option<&str>,
    payload: &serde_json::Value,
) -> serde_json::Value {
    use hmac::Mac;
    let body = payload.to_string();
    let mut headers = vec![
        ("content-type", "application/json".to_owned()),
        ("x-ferry-event", "machine.migrate.notice".to_owned()),
    ];
    if let Some(s) = secret {
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(s.as_bytes()).expect("any key length");
        mac.update(body.as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        headers.push(("x-ferry-signature", format!("sha256={sig}")));
    }
    core.webhooks.post(url, &headers, body).await
}

/// One copy round of `fork` from `from` to `to` (agents), `dir` forcing the destination
/// directory (rollback). Progress is published while it runs.
#[allow(clippy::too_many_arguments)]
async fn copy_round(
    core: &Core,
    mig_id: &str,
    session: &str,
    token: &str,
    src_dir: &str,
    target_volume: &str,
    from: &str,
    to: &str,
    dir: Option<String>,
    size_mb: Option<u64>,
) -> Step<(VolumeRound, String)> {
    let (src_ep, dst_ep) = (endpoint(core, from)?, endpoint(core, to)?);
    let exp: VolumeExpected = core
        .agents
        .volume_expect(
            &dst_ep,
            &VolumeExpect {
                session: session.to_owned(),
                token: token.to_owned(),
                volume_id: target_volume.to_owned(),
                dir,
                size_mb,
            },
        )
        .await?;
    let send = VolumeSend {
        session: session.to_owned(),
        token: token.to_owned(),
        src_dir: src_dir.to_owned(),
        addr: exp.addr.clone(),
        target: target_volume.to_owned(),
    };
    let poll = {
        let (agents, progress, ep, session, id) = (
            core.agents.clone(),
            core.migrations.progress.clone(),
            src_ep.clone(),
            session.to_owned(),
            mig_id.to_owned(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if let Ok(p) = agents.volume_progress(&ep, &session).await {
                    progress.lock().unwrap().insert(id.clone(), p);
                }
            }
        })
    };
    let r = core.agents.volume_send(&src_ep, &send).await;
    poll.abort();
    core.migrations.progress.lock().unwrap().remove(mig_id);
    Ok((r?, exp.dir))
}

/// One copy round of volume `i` from the source host to the destination.
async fn forward_round(core: &Core, mig: &Migration, i: usize) -> Step<(VolumeRound, String)> {
    let v = &mig.volumes[i];
    // A fork of a size-limited volume is a file system of the same size on the destination.
    let size = crate::volumes::volume(core, &v.src_volume)?.agent_size_mb();
    copy_round(
        core,
        &mig.id,
        &v.session,
        &v.token,
        &v.src_dir,
        &v.dst_volume,
        &mig.from_host,
        &mig.to_host,
        None,
        size,
    )
    .await
}

/// The machine as it will be on the destination: the switch records the same host, region,
/// field, address and instance (and points its mounts at the forks).
fn destination_machine(core: &Core, mig: &Migration) -> Result<Machine> {
    let mut next = core.store.get_machine(&mig.machine_id)?;
    let to = parse_host(&mig.to_host)?;
    next.region = crate::cache::host(core, to)?.region;
    next.host = Some(to);
    next.machine_field = Some(MachineField(mig.new_field));
    next.private_ip = Some(mig.new_ip.clone());
    next.instance_id = mig.new_instance_id.clone();
    Ok(next)
}

/// Asks the destination to build the machine's namespace, veth, address and cgroups now,
/// while the machine still runs on its source: the start after the stop then costs what a
/// restart in place does (a new namespace costs ~40 ms, most of it the kernel's), and the new
/// address refuses connections at once instead of dropping them once the bridge sends the old
/// address there. Best effort: a start builds whatever is missing; a rollback destroys it.
async fn prepare_destination(core: &Core, mig: &Migration) {
    if !mig.was_running {
        return;
    }
    let run = (|| -> Result<(String, crate::proto::RunMachine)> {
        let run = crate::machines::run_of(core, &destination_machine(core, mig)?, Vec::new())?;
        Ok((endpoint(core, &mig.to_host)?, run))
    })();
    let result: Result<()> = match run {
        Ok((ep, run)) => core.agents.prepare(&ep, &run).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(
            "migration {}: preparing host {} (its start will do it): {}",
            mig.id,
            mig.to_host,
            e.message
        );
    }
}

/// Asks the destination to set the machine up and hold it (`Agents::stage`), once the volumes
/// are copied but the final round and the destination has the machine's image, before the
/// stop: the machine as the switch will record it, on the copies' directories. Its start after
/// the stop then only releases what is set up (a fraction of a restart's start), and nothing of the machine's own runs before that start. Best effort: a
/// start that finds no staging (or one for another spec) sets the machine up itself; a rollback
/// destroys it.
async fn stage_destination(core: &Core, mig: &Migration) {
    if !mig.was_running || mig.volumes.iter().any(|v| v.dst_dir.is_none()) {
        return;
    }
    let run = (|| -> Result<(String, crate::proto::RunMachine)> {
        // The volumes as the source has them (the forks have no records before the switch),
        // then each mount pointed at its fork, on the fork's directory, as the switch will.
        let mut run = crate::machines::run_of(core, &destination_machine(core, mig)?, Vec::new())?;
        let mut dirs = Vec::with_capacity(run.config.mounts.len());
        for (i, mount) in run.config.mounts.iter_mut().enumerate() {
            let Some(v) = mig.volumes.iter().find(|v| v.src_volume == mount.volume) else {
                return Err(Error::internal(format!(
                    "mount {i}: not one of the migration's volumes"
                )));
            };
            mount.volume = v.dst_volume.clone();
            if let Some(r) = run.volumes.get_mut(i) {
                r.id = v.dst_volume.clone();
            }
            dirs.push(v.dst_dir.clone().unwrap_or_default());
        }
        run.volume_dirs = dirs;
        Ok((endpoint(core, &mig.to_host)?, run))
    })();
    let result: Result<()> = match run {
        Ok((ep, run)) => core.agents.stage(&ep, &run).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(
            "migration {}: staging on host {} (its start will set it up): {}",
            mig.id,
            mig.to_host,
            e.message
        );
    }
}

async fn precopy(core: &Core, mig: &mut Migration) -> Step<()> {
    prepare_destination(core, mig).await;
    if !mig.precopy {
        mig.phase = Phase::Precopied;
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let mut bytes = 0;
    // Two rounds: the first moves everything while the machine runs (long), the second what
    // changed meanwhile, so the final round after the stop has little left.
    for round in 0..2 {
        for i in 0..mig.volumes.len() {
            let (r, dir) = forward_round(core, mig, i).await?;
            bytes += r.bytes_sent;
            core.metrics.volume_bytes_copied.inc_by(r.bytes_sent);
            mig.stats.chunks_resent += r.chunks_resent;
            if mig.volumes[i].dst_dir.as_deref() != Some(&dir) {
                mig.volumes[i].dst_dir = Some(dir);
                save(core, mig)?;
            }
            if round == 0 {
                crate::crash_point("precopy-round");
            }
        }
    }
    mig.stats.precopy_ms = t0.elapsed().as_millis() as u64;
    mig.stats.precopy_bytes = bytes;
    let ev = serde_json::json!({"migration": mig.id, "bytes": bytes, "ms": mig.stats.precopy_ms});
    record_event(
        core,
        mig,
        NewEvent::new("migrate", "precopied", "ferry", ev),
    )?;
    mig.phase = Phase::Precopied;
    Ok(())
}

/// Started and every check of the current instance passing (or no checks).
fn ready(core: &Core, m: &Machine) -> bool {
    if m.state != S::Started {
        return false;
    }
    let Ok(config) = serde_json::from_value::<MachineConfig>(m.config.clone()) else {
        return false;
    };
    if config.checks.is_empty() {
        return true;
    }
    let Ok(events) = core.store.events(&m.id) else {
        return false;
    };
    // The latest result of each check from this instance (the agent reports a check when its
    // result changes, tagged with the instance).
    config.checks.keys().all(|name| {
        events
            .iter()
            .rev()
            .filter(|e| e.r#type == "check" && e.request["instance_id"] == m.instance_id.as_str())
            .find(|e| e.request["detail"]["name"] == name.as_str())
            .is_some_and(|e| e.request["detail"]["passing"] == true)
    })
}

/// Whether the machine's config has no health checks (its readiness is its state alone).
fn has_no_checks(m: &Machine) -> bool {
    serde_json::from_value::<MachineConfig>(m.config.clone()).is_ok_and(|c| c.checks.is_empty())
}

/// Why machine `m` counts against its app's `max_unavailable`, if it does.
///
/// The rule (also in the policy's API docs): a machine counts when it *should* be running and
/// is not ready. It should be running when it is `starting`, `started`, `failed`, or `stopped`
/// by itself (it exited or crashed: its last exit was not asked for). A machine stopped on
/// purpose (`ferry machine stop`, an earlier migration's stop of a stopped machine) or never
/// started does not count: it is idle, not an outage the policy protects against.
fn unavailable(core: &Core, m: &Machine) -> Option<&'static str> {
    let last_exit_requested =
        || last_exit_event(core, &m.id).map(|e| e.request["exit_event"]["requested_stop"] == true);
    let why = unavailability(m.state, || ready(core, m), last_exit_requested);
    if why.is_none() && m.state == S::Stopped && being_moved_while_running(core, &m.id) {
        // Stopped by its own migration (the stop was "requested", by us): it should run.
        return Some("being migrated");
    }
    why
}

/// An unfinished migration of a machine that was running when it began.
fn being_moved_while_running(core: &Core, machine: &str) -> bool {
    core.store
        .active_migration(machine)
        .ok()
        .flatten()
        .and_then(|r| from_record(r).ok())
        .is_some_and(|m| m.was_running && !m.phase.finished())
}

/// [`unavailable`]'s rule on plain facts (unit-tested): the state, whether the checks pass
/// (asked only for a started machine) and whether the last exit was requested by a stop call
/// (`None`: no exit recorded).
fn unavailability(
    state: S,
    ready: impl FnOnce() -> bool,
    last_exit_requested: impl FnOnce() -> Option<bool>,
) -> Option<&'static str> {
    match state {
        S::Started if ready() => None,
        S::Started => Some("started but not ready"),
        S::Starting => Some("starting"),
        S::Failed => Some("failed"),
        // Stopped without anyone asking (exited, crashed, gone while its agent was down):
        // its desired state is still started.
        S::Stopped if last_exit_requested() != Some(true) => Some("exited on its own"),
        // Stopped on purpose, never started, on its way out or moved away.
        _ => None,
    }
}

async fn stop_source(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    let m = core.store.get_machine(&mig.machine_id)?;
    image_on_destination(core, mig, &m).await?;
    if mig.stats.stopped_at_ms.is_none() {
        // Once the destination has the image (the staging needs its root) and before the stop.
        stage_destination(core, mig).await;
    }
    if mig.was_running && mig.stats.stopped_at_ms.is_none() {
        // max_unavailable: the others that should run and are not ready, plus this one, must fit.
        let policy = load_policy(core, &mig.app)?;
        let down: Vec<String> = core
            .store
            .list_machines(Some(&mig.app))?
            .iter()
            .filter(|o| o.id != m.id)
            .filter_map(|o| unavailable(core, o).map(|why| format!("{} ({why})", o.id)))
            .collect();
        if down.len() as u32 + 1 > policy.max_unavailable {
            let waited = core.store.now_ms() - mig.updated_at_ms;
            if waited > policy.healthy_deadline_ms as i64 {
                return Err(StepError::RollBack(format!(
                    "{} other machines of app {} should be running and are not ready ({}), \
                     and max_unavailable is {}",
                    down.len(),
                    mig.app,
                    down.join(", "),
                    policy.max_unavailable
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
    }
    // A machine that was not running has no downtime: nothing to time, nothing to announce.
    if mig.was_running && mig.stats.stopped_at_ms.is_none() {
        let ev = serde_json::json!({"migration": mig.id});
        record_event(core, mig, NewEvent::new("migrate", "stopping", "ferry", ev))?;
        mig.stats.stopped_at_ms = Some(core.store.now_ms());
        save(core, mig)?;
    }
    stop_machine_now(core, &m).await?;
    mig.phase = Phase::Stopped;
    Ok(())
}

/// Stops the machine where the store places it, with its stop_config (idempotent; also finishes
/// a stop a crashed server left in `stopping`).
/// The destination holds the machine's image (the digest its config pins, never a tag) before
/// the source stops: a pull that fails (registry down, image gone) leaves the machine running
/// where it is and the migration rolls back. A host that has it already needs no registry.
async fn image_on_destination(core: &Core, mig: &Migration, m: &Machine) -> Step<()> {
    let Some(image) = m.config.get("image").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    if mig.stats.stopped_at_ms.is_some() {
        return Ok(()); // pulled before this stop already (a resumed step)
    }
    let host = crate::cache::host(core, parse_host(&mig.to_host)?)?;
    crate::images::ensure_on_host(core, &host, image).await?;
    Ok(())
}

async fn stop_machine_now(core: &Core, m: &Machine) -> Step<()> {
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
    let params = crate::machines::stop_params(&StopRequest::default(), &config)?;
    match m.state {
        S::Started | S::Starting => {
            crate::machines::stop_inner(core, &m.id, params, S::Stopped).await?;
        }
        S::Stopping => {
            let ep = crate::hosts::machine_endpoint(core, m)?;
            match core.agents.stop(&ep, &m.id, &params).await {
                Ok(_) => {}
                // Not running (or unknown) on its host any more: stopped is what we want.
                Err(e) if matches!(e.agent_code.as_deref(), Some("not_running" | "not_found")) => {}
                Err(e) => return Err(StepError::Retry(e.message)),
            }
            core.store.transition(&m.id, &[S::Stopping], S::Stopped)?;
            core.changed();
        }
        _ => {}
    }
    Ok(())
}

async fn final_sync(core: &Core, mig: &mut Migration) -> Step<()> {
    let t0 = std::time::Instant::now();
    let (mut bytes, mut chunks) = (0, 0);
    for i in 0..mig.volumes.len() {
        let v = mig.volumes[i].clone();
        let (r, dir) = forward_round(core, mig, i).await?;
        if !r.verified {
            return Err(StepError::Retry(format!(
                "volume {} copy not verified (root {})",
                v.src_volume, r.root
            )));
        }
        bytes += r.bytes_sent;
        core.metrics.volume_bytes_copied.inc_by(r.bytes_sent);
        chunks += r.chunks_sent;
        mig.stats.chunks_resent += r.chunks_resent;
        let f = &mut mig.volumes[i];
        f.dst_dir = Some(dir);
        f.root = Some(r.root);
        f.verified = true;
    }
    mig.stats.final_sync_ms = t0.elapsed().as_millis() as u64;
    mig.stats.final_bytes = bytes;
    mig.stats.final_chunks = chunks;
    let ev = serde_json::json!({"migration": mig.id, "bytes": bytes, "chunks": chunks,
        "roots": mig.volumes.iter().map(|v| v.root.clone()).collect::<Vec<_>>()});
    record_event(core, mig, NewEvent::new("migrate", "synced", "ferry", ev))?;
    mig.phase = Phase::Synced;
    Ok(())
}

/// Removes a machine's local state (process, namespace, cgroup, run dir) on `host`.
async fn forget_on(core: &Core, machine: &str, host: &str) -> Step<()> {
    let ep = endpoint(core, host)?;
    core.agents.destroy(&ep, machine).await?;
    Ok(())
}

async fn switch(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    if mig
        .volumes
        .iter()
        .any(|v| !v.verified || v.dst_dir.is_none())
    {
        // Never start on an unverified volume.
        return Err(StepError::RollBack("a volume copy is not verified".into()));
    }
    let m = core.store.get_machine(&mig.machine_id)?;
    let to = parse_host(&mig.to_host)?;
    let already = m.instance_id == mig.new_instance_id;
    if !already {
        // The source copy must never run again: fenced before the commit (a quick mark). Its
        // namespace stays until the destination runs it (`wait_healthy`), so the old address
        // is refused, not dropped, until the bridge maps it to the new one.
        let ep = endpoint(core, &mig.from_host)?;
        core.agents.fence(&ep, &m.id).await?;
        // The policy only says how long the source's volumes are kept: not read without any.
        let retention_ms = match mig.volumes.is_empty() {
            true => 0,
            false => load_policy(core, &mig.app)?.volume_retention_ms,
        };
        let now = core.store.now_ms();
        for v in &mig.volumes {
            let src = crate::volumes::volume(core, &v.src_volume)?;
            crate::volumes::put_volume(
                core,
                &VolumeView {
                    id: v.dst_volume.clone(),
                    // The fork belongs where its source did: the moved machine's org.
                    org: src.org.clone(),
                    host_dir: v.dst_dir.clone().unwrap_or_default(),
                    size_mb: src.size_mb,
                    kept_by_agent: src.kept_by_agent,
                    created_at: rfc3339(now),
                    host: Some(mig.to_host.clone()),
                    state: "active".into(),
                    forked_from: Some(src.id.clone()),
                    destroy_after: None,
                    destroy_after_ms: None,
                    revision: 0,
                },
            )?;
        }
        let mut config: MachineConfig =
            serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
        for mount in config.mounts.iter_mut() {
            if let Some(v) = mig.volumes.iter().find(|v| v.src_volume == mount.volume) {
                mount.volume = v.dst_volume.clone();
            }
        }
        let host = crate::cache::host(core, to)?;
        let mut next = m.clone();
        next.host = Some(to);
        next.region = host.region.clone();
        next.machine_field = Some(MachineField(mig.new_field));
        next.private_ip = Some(mig.new_ip.clone());
        next.instance_id = mig.new_instance_id.clone();
        next.config = serde_json::to_value(&config).map_err(Error::internal)?;
        // The commit point: from here the machine is the destination's.
        core.store
            .update_machine_if(&next, &[S::Stopped, S::Failed, S::Created])?;
        for v in &mig.volumes {
            let mut src = crate::volumes::volume(core, &v.src_volume)?;
            mark_pending_destroy(&mut src, now, retention_ms);
            crate::volumes::put_volume(core, &src)?;
        }
        core.changed();
    }
    add_instance(
        core,
        &m.id,
        InstanceRecord {
            instance_id: mig.old_instance_id.clone(),
            host: mig.from_host.clone(),
            private_ip: mig.old_ip.clone(),
            state: "migrated".into(),
            ended_at: rfc3339(core.store.now_ms()),
            migration: mig.id.clone(),
        },
    )?;
    mig.phase = Phase::Switched;
    Ok(())
}

async fn start_destination(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    let m = core.store.get_machine(&mig.machine_id)?;
    if !mig.launch_recorded {
        // A record saved in `mapped` before the mapping step recorded the launch.
        record_event(core, mig, launch_event(mig))?;
        mig.launch_recorded = true;
        save(core, mig)?;
    }
    if mig.was_running && m.state != S::Started {
        let config: MachineConfig =
            serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
        let dirs = crate::volumes::resolve_volumes(core, &config)?;
        if let Err(e) =
            crate::machines::launch(core, &m.id, dirs, &[S::Stopped, S::Failed, S::Starting]).await
        {
            return Err(StepError::RollBack(format!(
                "starting on host {}: {}",
                mig.to_host, e.message
            )));
        }
    }
    let now = core.store.now_ms();
    mig.stats.started_at_ms = Some(now);
    mig.stats.downtime_ms = mig.stats.stopped_at_ms.map(|s| (now - s).max(0) as u64);
    mig.phase = Phase::Started;
    Ok(())
}

/// The machine's log entry for its launch on the destination.
fn launch_event(mig: &Migration) -> NewEvent {
    let ev = serde_json::json!({"migrated": true, "migration": mig.id,
        "from_host": mig.from_host, "to_host": mig.to_host,
        "old_instance_id": mig.old_instance_id, "instance_id": mig.new_instance_id,
        "old_ip": mig.old_ip, "private_ip": mig.new_ip});
    NewEvent::new("launch", "migrated", "ferry", ev)
}

async fn map_old_address(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    let old: FleetAddr = mig
        .old_ip
        .parse()
        .map_err(|e| Error::internal(format!("{e}")))?;
    let new: FleetAddr = mig
        .new_ip
        .parse()
        .map_err(|e| Error::internal(format!("{e}")))?;
    // The org owning the network is the machine's: no need to look it up as `install` does.
    crate::bridge::install_in_org(core, old, new).await?;
    // The launch is on record before it happens, saved with this phase (not in a save of its
    // own between the mapping and the start: that is downtime).
    if !mig.launch_recorded {
        record_event(core, mig, launch_event(mig))?;
        mig.launch_recorded = true;
    }
    mig.phase = Phase::Mapped;
    Ok(())
}

/// How often at most a migration in `started` reads its machine while it waits out
/// `min_healthy_time`.
const HEALTHY_POLL_MS: i64 = 250;

async fn wait_healthy(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    // The source host forgets the fenced copy (namespace, cgroup, run dir) now that the
    // destination has the machine: off the downtime's path. Best effort: a source host that is
    // down keeps a stopped, fenced copy until it is destroyed.
    if let Err(StepError::Retry(e) | StepError::RollBack(e)) =
        forget_on(core, &mig.machine_id, &mig.from_host).await
    {
        tracing::warn!(
            "migration {}: host {} keeps its fenced copy of {}: {e}",
            mig.id,
            mig.from_host,
            mig.machine_id,
        );
    }
    let policy = load_policy(core, &mig.app)?;
    if mig.was_running {
        let started = mig
            .stats
            .started_at_ms
            .unwrap_or_else(|| core.store.now_ms());
        let deadline = started + policy.healthy_deadline_ms as i64;
        let mut ready_since: Option<i64> = None;
        // Ready by the last read of the whole record, with no checks: until min_healthy_time is
        // up, the machine's state is looked at where the change feed keeps it (on etcd the
        // watch's memory, not a round trip per look); any other state than `started` there
        // sends it back to reading the record.
        let mut ready_without_checks = false;
        let to = parse_host(&mig.to_host)?;
        loop {
            if let (true, Some(since)) = (ready_without_checks, ready_since) {
                let left = since + policy.min_healthy_time_ms as i64 - core.store.now_ms();
                let state = core
                    .store
                    .followed_machine_summaries(Some(to))?
                    .into_iter()
                    .find(|s| s.id == mig.machine_id)
                    .map(|s| s.state);
                if left > 0 && state == Some(S::Started) {
                    tokio::time::sleep(Duration::from_millis(left.min(HEALTHY_POLL_MS) as u64))
                        .await;
                    continue;
                }
            }
            let m = core.store.get_machine(&mig.machine_id)?;
            let now = core.store.now_ms();
            if matches!(m.state, S::Stopped | S::Failed) {
                // It exited on the destination (its restart policy did not bring it back): it
                // would never become healthy, so do not wait out the deadline.
                return Err(StepError::RollBack(format!(
                    "the machine exited on host {} {} ms after its start ({}), before it had \
                     run for min_healthy_time ({} ms)",
                    mig.to_host,
                    now - started,
                    last_exit(core, &m.id),
                    policy.min_healthy_time_ms
                )));
            }
            // Until it is ready, look again soon; once it is, at most every HEALTHY_POLL (an
            // exit meanwhile is seen within that) and right when min_healthy_time is up. On etcd
            // each look is a round trip, and a drain has every migration of a host here at once.
            let mut pause = 100;
            ready_without_checks = false;
            if ready(core, &m) {
                ready_without_checks = has_no_checks(&m);
                let since = *ready_since.get_or_insert(now);
                let left = since + policy.min_healthy_time_ms as i64 - now;
                if left <= 0 {
                    break;
                }
                pause = left.min(HEALTHY_POLL_MS);
            } else {
                ready_since = None;
            }
            if now > deadline {
                return Err(StepError::RollBack(format!(
                    "machine not healthy for {} ms within the healthy_deadline of {} ms",
                    policy.min_healthy_time_ms, policy.healthy_deadline_ms
                )));
            }
            tokio::time::sleep(Duration::from_millis(pause as u64)).await;
        }
    }
    finish(core, mig, "done", None)?;
    mig.phase = Phase::Done;
    Ok(())
}

/// The machine's latest `exit` event (a stop it was asked for, or an exit of its own).
fn last_exit_event(core: &Core, machine: &str) -> Option<ferry_store::Event> {
    let events = core.store.events(machine).ok()?;
    events.into_iter().rev().find(|e| e.r#type == "exit")
}

/// The machine's last exit as words, e.g. "exit code 3" or "killed by signal 9".
fn last_exit(core: &Core, machine: &str) -> String {
    let Some(e) = last_exit_event(core, machine) else {
        return "no exit recorded".into();
    };
    let x = &e.request["exit_event"];
    match (x["exit_code"].as_i64(), x["signal"].as_i64()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => e.status.clone(),
    }
}

fn finish(core: &Core, mig: &mut Migration, status: &str, reason: Option<&str>) -> Result<()> {
    if let Some(n) = mig.lock_nonce.take() {
        let _ = core.store.release_lock(&lock_name(mig), &n);
        // One waiter, not all: only one can take the lock, and each that tries costs store
        // round trips. The others wait for the next release (or their poll).
        core.migrations.network_notify(mig.network_id).notify_one();
    }
    mig.finished_at_ms = Some(core.store.now_ms());
    let ev = serde_json::json!({"migration": mig.id, "from_host": mig.from_host,
        "to_host": mig.to_host, "downtime_ms": mig.stats.downtime_ms, "reason": reason});
    record_event(core, mig, NewEvent::new("migrate", status, "ferry", ev))?;
    core.metrics
        .migrations_finished
        .get_or_create(&crate::metrics::OutcomeLabels {
            outcome: status.to_owned(),
        })
        .inc();
    if let (Some(ms), "done") = (mig.stats.downtime_ms, status) {
        core.metrics.migration_downtime.observe(ms as f64 / 1000.0);
    }
    Ok(())
}

async fn roll_back(core: &Arc<Core>, mig: &mut Migration) -> Step<()> {
    let from = mig.rollback_from.unwrap_or(Phase::Pending);
    let reason = mig.error.clone().unwrap_or_default();
    let m = core.store.get_machine(&mig.machine_id)?;
    // The store says whether the switch happened (a crash may have hit between the switch and
    // the phase's record), not the phase.
    let _ = from;
    if m.instance_id != mig.old_instance_id {
        undo_switch(core, mig, &m).await?;
    } else {
        // Never switched: the source still owns the machine; drop what the destination built
        // for it (`prepare_destination`) and the partial copies.
        let to = endpoint(core, &mig.to_host);
        if let Ok(ep) = &to {
            if let Err(e) = core.agents.destroy(ep, &mig.machine_id).await {
                tracing::warn!(
                    "migration {}: removing what host {} prepared: {}",
                    mig.id,
                    mig.to_host,
                    e.message
                );
            }
        }
        for v in &mig.volumes {
            if let (Some(dir), Ok(ep)) = (&v.dst_dir, &to) {
                let _ = core
                    .agents
                    .volume_remove(ep, &VolumeRemove { dir: dir.clone() })
                    .await;
            }
        }
        if mig.was_running {
            let m = core.store.get_machine(&mig.machine_id)?;
            if m.state == S::Stopping {
                stop_machine_now(core, &m).await?;
            }
            let m = core.store.get_machine(&mig.machine_id)?;
            if m.state != S::Started {
                let config: MachineConfig =
                    serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
                let dirs = crate::volumes::resolve_volumes(core, &config)?;
                crate::machines::launch(core, &m.id, dirs, &[S::Stopped, S::Failed, S::Starting])
                    .await
                    .map_err(|e| StepError::Retry(e.message))?;
            }
        }
    }
    finish(core, mig, "rolled_back", Some(&reason))?;
    mig.phase = Phase::RolledBack;
    Ok(())
}

/// Rollback after the destination owned the machine: stop and forget it there, copy its volumes
/// back (it may have written to them), point the store at the source again, drop the mapping.
async fn undo_switch(core: &Arc<Core>, mig: &mut Migration, m: &Machine) -> Step<()> {
    let from = parse_host(&mig.from_host)?;
    // Already pointed back at the source by an earlier attempt (then the source may have run and
    // written since: copying back again would lose that).
    let switched_back = m.host == Some(from) && m.private_ip.as_deref() == Some(&mig.old_ip);
    if !switched_back {
        copy_back(core, mig, m).await?;
    }
    let m = core.store.get_machine(&mig.machine_id)?;
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
    let now = core.store.now_ms();
    let policy = load_policy(core, &mig.app)?;
    for v in &mig.volumes {
        if let Ok(mut src) = crate::volumes::volume(core, &v.src_volume) {
            src.state = "active".into();
            src.destroy_after = None;
            src.destroy_after_ms = None;
            crate::volumes::put_volume(core, &src)?;
        }
        if let Ok(mut dst) = crate::volumes::volume(core, &v.dst_volume) {
            if dst.state == "active" {
                mark_pending_destroy(&mut dst, now, policy.volume_retention_ms);
                crate::volumes::put_volume(core, &dst)?;
            }
        }
    }
    add_instance(
        core,
        &m.id,
        InstanceRecord {
            instance_id: mig.new_instance_id.clone(),
            host: mig.to_host.clone(),
            private_ip: mig.new_ip.clone(),
            state: "rolled_back".into(),
            ended_at: rfc3339(now),
            migration: mig.id.clone(),
        },
    )?;
    crate::bridge::uninstall(core, &mig.old_ip, &mig.new_ip).await?;
    core.changed();
    if mig.was_running && m.state != S::Started {
        let dirs = crate::volumes::resolve_volumes(core, &config)?;
        crate::machines::launch(core, &m.id, dirs, &[S::Stopped, S::Failed, S::Starting])
            .await
            .map_err(|e| StepError::Retry(e.message))?;
    }
    Ok(())
}

/// Stops and forgets the destination instance, copies its volumes back over the source's, and
/// points the store at the source placement again (a fresh instance ID, the old address).
async fn copy_back(core: &Arc<Core>, mig: &mut Migration, m: &Machine) -> Step<()> {
    stop_machine_now(core, m).await?;
    forget_on(core, &m.id, &mig.to_host).await?;
    for v in mig.volumes.clone() {
        let Some(dst_dir) = &v.dst_dir else { continue };
        let (r, _) = copy_round(
            core,
            &mig.id,
            &format!("{}-back", v.session),
            &v.token,
            dst_dir,
            &v.src_volume,
            &mig.to_host,
            &mig.from_host,
            Some(v.src_dir.clone()),
            None,
        )
        .await?;
        if !r.verified {
            return Err(StepError::Retry(
                "copying the volume back: not verified".into(),
            ));
        }
    }
    let m = core.store.get_machine(&mig.machine_id)?;
    let mut config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(Error::internal)?;
    for mount in config.mounts.iter_mut() {
        if let Some(v) = mig.volumes.iter().find(|v| v.dst_volume == mount.volume) {
            mount.volume = v.src_volume.clone();
        }
    }
    let from = parse_host(&mig.from_host)?;
    let mut back = m.clone();
    back.host = Some(from);
    back.region = crate::cache::host(core, from)?.region;
    back.machine_field = Some(MachineField(mig.old_field));
    back.private_ip = Some(mig.old_ip.clone());
    back.instance_id = new_instance_id();
    back.config = serde_json::to_value(&config).map_err(Error::internal)?;
    core.store
        .update_machine_if(&back, &[S::Stopped, S::Failed, S::Created])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(state: S, ready: bool, last_exit_requested: Option<bool>) -> Option<&'static str> {
        unavailability(state, || ready, || last_exit_requested)
    }

    #[test]
    fn a_machine_stopped_on_purpose_or_never_started_is_not_unavailable() {
        assert_eq!(rule(S::Stopped, false, Some(true)), None);
        assert_eq!(rule(S::Created, false, None), None);
        assert_eq!(rule(S::Destroyed, false, None), None);
        assert_eq!(rule(S::Migrated, false, None), None);
    }

    #[test]
    fn a_machine_that_should_run_and_is_not_ready_is_unavailable() {
        assert_eq!(rule(S::Started, true, None), None);
        assert_eq!(rule(S::Started, false, None), Some("started but not ready"));
        assert_eq!(rule(S::Starting, false, None), Some("starting"));
        assert_eq!(rule(S::Failed, false, Some(true)), Some("failed"));
        // Exited on its own (a crash, restart policy no) or lost while its agent was down.
        assert_eq!(
            rule(S::Stopped, false, Some(false)),
            Some("exited on its own")
        );
        assert_eq!(rule(S::Stopped, false, None), Some("exited on its own"));
    }
}
