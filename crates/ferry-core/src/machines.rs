//! Apps and machines: create, place, start, stop, destroy, wait, leases, exec, and the agents'
//! reports. Every operation follows one shape: validate the input (nothing is written before
//! that), check the lease, move the machine's state with a compare-and-set in the store, call the
//! agent, record the outcome and an event. Illegal transitions are refused as conflicts and
//! change nothing.

use crate::auth::Caller;
use crate::config::{
    canonical_signal, validate_machine_id, validate_name, MachineConfig, ALLOWED_SIGNALS,
    MAX_STOP_TIMEOUT,
};
use crate::error::{Error, Kind, Result};
use crate::hosts::{machine_endpoint, parse_host, place};
use crate::proto::{
    AgentReport, ExecRequest, ExecResult, ExitInfo, RunMachine, StopMachine, VolumeRef,
};
use crate::views::*;
use crate::volumes::{put_volume, resolve_volumes, volume};
use crate::Core;
use ferry_store::{new_instance_id, new_machine_id, Machine, MachineState, NewEvent};
use std::time::Duration;

use MachineState as S;

// ---- apps -------------------------------------------------------------------------------------

fn app_view(a: &ferry_store::App) -> AppView {
    let n = a.network_id.get();
    AppView {
        name: a.name.clone(),
        org: a.org.clone(),
        network_id: n,
        network: format!("fdaa:{:x}:{:x}::/48", n >> 16, n & 0xffff),
        created_at: rfc3339(a.created_at_ms),
    }
}

/// Creates an app in its org's network: an org token's own org; an admin's choice (`personal`
/// when no org is given).
pub fn create_app(core: &Core, caller: &Caller, req: CreateApp) -> Result<AppView> {
    validate_name("app name", &req.app_name)?;
    if let Some(o) = &req.org_slug {
        validate_name("org", o)?;
    }
    let org = crate::auth::org_for_new(caller, req.org_slug.as_deref())?;
    let app = core.store.create_app(&req.app_name, &org)?;
    Ok(app_view(&app))
}

/// Apps by name, of one org or all (an org token: of its own org only, whatever it asks; asking
/// for another org gets what an org without apps gets, an empty list).
pub fn list_apps(core: &Core, caller: &Caller, org: Option<&str>) -> Result<Vec<AppView>> {
    caller.require_user()?;
    let org = match (caller.org_name(), org) {
        (Some(own), Some(asked)) if own != asked => return Ok(Vec::new()),
        (Some(own), _) => Some(own),
        (None, asked) => asked,
    };
    Ok(core.store.list_apps(org)?.iter().map(app_view).collect())
}

pub fn get_app(core: &Core, app: &str) -> Result<AppView> {
    Ok(app_view(&core.store.get_app(app)?))
}

/// Deletes an app with no machines left but destroyed ones.
pub fn delete_app(core: &Core, app: &str) -> Result<()> {
    core.store.delete_app(app)?;
    Ok(())
}

// ---- machines ---------------------------------------------------------------------------------

/// Loads a machine and checks it belongs to `app` (another app's machine is "not found").
pub fn machine_of(core: &Core, app: &str, id: &str) -> Result<Machine> {
    validate_machine_id(id)?;
    // A machine of another app (maybe of another org) and one that does not exist get the same
    // answer, word for word: the ID alone must not tell that it exists somewhere.
    let missing = || Error::not_found(format!("machine {id} in app {app}"));
    match core.store.get_machine(id) {
        Ok(m) if m.app == app => Ok(m),
        Ok(_) => Err(missing()),
        Err(e) if e.is_not_found() => Err(missing()),
        Err(e) => Err(e.into()),
    }
}

/// The app's machines, oldest first (with destroyed and migrated-away ones if asked).
pub fn list_machines(core: &Core, app: &str, include_deleted: bool) -> Result<Vec<MachineView>> {
    core.store.get_app(app)?;
    let ms = if include_deleted {
        core.store.list_machines_all(Some(app))?
    } else {
        core.store.list_machines(Some(app))?
    };
    Ok(ms.iter().map(|m| MachineView::new(m, None)).collect())
}

/// Creates a machine: placed (on its volume's host if it has one), its image pulled there, its
/// address allocated, then launched unless `skip_launch`.
pub async fn create_machine(core: &Core, app: &str, req: CreateMachine) -> Result<MachineView> {
    req.config.validate()?;
    if let Some(n) = &req.name {
        validate_name("machine name", n)?;
    }
    // From memory once read: the store's create below checks again that the app exists.
    let app = crate::cache::app(core, app)?;
    let volume_dirs = resolve_volumes(core, &req.config)?;
    // A volume that lives on a host already takes its machine there.
    let mut want = req.host.clone();
    for mount in &req.config.mounts {
        let v = volume(core, &mount.volume)?;
        // Another org's volume is one that does not exist (the store's own words for that).
        if v.org.as_ref().is_some_and(|o| *o != app.org) {
            return Err(ferry_store::StoreError::NotFound {
                kind: "volume",
                id: v.id.clone(),
            }
            .into());
        }
        if let (true, Some(h)) = (v.kept_by_agent, &v.host) {
            match &want {
                Some(w) if parse_host(w)? != parse_host(h)? => {
                    return Err(Error::conflict(
                        "volume_elsewhere",
                        format!("volume {} lives on host {h}, not on host {w}", v.id),
                    ))
                }
                _ => want = Some(h.clone()),
            }
        }
    }
    let host = place(core, want.as_deref())?;
    // The host pulls the image first (nothing exists yet if that fails); the config records
    // the digest it resolved, never the tag.
    let mut req = req;
    if let Some(image) = req.config.image.clone() {
        req.config.image = Some(crate::images::ensure_on_host(core, &host, &image).await?);
    }
    let id = new_machine_id();
    let config = serde_json::to_value(&req.config).map_err(Error::internal)?;
    // The store gives it a field never used on the host and the address from it, and records
    // the `created` event, in one step.
    let m = Machine {
        id: id.clone(),
        name: req
            .name
            .unwrap_or_else(|| format!("{}-{}", app.name, &id[..6])),
        app: app.name.clone(),
        org: app.org.clone(),
        network_id: app.network_id,
        host: Some(host.id),
        region: host.region.clone(),
        machine_field: None,
        private_ip: None,
        instance_id: new_instance_id(),
        state: S::Created,
        config: config.clone(),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    let created = NewEvent::new(
        "launch",
        "created",
        "user",
        crate::auth::stamp(serde_json::json!({"config": config})),
    );
    let t = std::time::Instant::now();
    core.store.create_machine_placed(&m, &created)?;
    core.metrics.start_phase("create", t.elapsed());
    core.changed();
    let m = if req.skip_launch {
        core.store.get_machine(&id)?
    } else {
        launch(core, &id, volume_dirs, &[S::Created]).await?
    };
    Ok(MachineView::new(&m, None))
}

/// What an agent needs to run `m` as the store has it (its host, field, address, instance).
pub(crate) fn run_of(core: &Core, m: &Machine, volume_dirs: Vec<String>) -> Result<RunMachine> {
    let config = config_of(m)?;
    Ok(RunMachine {
        id: m.id.clone(),
        app: m.app.clone(),
        instance_id: m.instance_id.clone(),
        network_id: m.network_id.get(),
        machine_field: m.machine_field.map(|f| f.0).unwrap_or_default(),
        private_ip: m.private_ip.clone().unwrap_or_default(),
        region: m.region.clone(),
        volumes: config
            .mounts
            .iter()
            .map(|mount| {
                let v = volume(core, &mount.volume)?;
                Ok(VolumeRef {
                    size_mb: v.agent_size_mb(),
                    id: v.id,
                })
            })
            .collect::<Result<_>>()?,
        config,
        volume_dirs,
        bridge_enabled: crate::bridge::gate(core, m)?,
    })
}

/// Starts a machine that is in one of `from`: -> starting -> (agent) -> started | failed.
pub async fn launch(
    core: &Core,
    id: &str,
    volume_dirs: Vec<String>,
    from: &[MachineState],
) -> Result<Machine> {
    let t = std::time::Instant::now();
    let mut m = core.store.transition(id, from, S::Starting)?;
    core.metrics.start_phase("starting", t.elapsed());
    core.changed();
    let run = run_of(core, &m, volume_dirs)?;
    let ep = machine_endpoint(core, &m)?;
    let t = std::time::Instant::now();
    match core.agents.start(&ep, &run).await {
        Ok(reply) => {
            core.metrics.start_phase("agent", t.elapsed());
            for (phase, secs) in &reply.phases {
                if let Ok(d) = std::time::Duration::try_from_secs_f64(*secs) {
                    core.metrics.start_phase(phase, d);
                }
            }
            let t = std::time::Instant::now();
            // A size-limited volume used for the first time now lives on this host.
            for (r, dir) in run.volumes.iter().zip(&reply.volume_dirs) {
                let mut v = volume(core, &r.id)?;
                let host = m.host.map(|h| format!("{:x}", h.get()));
                if v.kept_by_agent && (&v.host_dir != dir || v.host != host) {
                    v.host_dir = dir.to_owned();
                    v.host = host;
                    put_volume(core, &v)?;
                }
            }
            let started = NewEvent::new(
                "start",
                "started",
                "flyd",
                crate::auth::stamp(serde_json::json!({})),
            );
            m = match core
                .store
                .transition_recorded(id, &[S::Starting], S::Started, &started)
            {
                Ok(m) => m,
                Err(e) => {
                    // The agent reported this instance's exit before its answer got here
                    // (see `agent_report`): the machine stays as that report left it.
                    let now = core.store.get_machine(id)?;
                    if now.instance_id != m.instance_id
                        || !matches!(now.state, S::Stopped | S::Failed)
                    {
                        return Err(e.into());
                    }
                    core.changed();
                    return Ok(now);
                }
            };
            core.metrics.start_phase("started", t.elapsed());
            core.metrics.machine_event("start");
        }
        Err(e) => return Err(failed(core, id, S::Starting, "start", e)?),
    }
    core.changed();
    Ok(m)
}

/// The agent refused what a machine in state `from` was doing: the machine is `failed`, with
/// the agent's reason in an event of `kind`. Answers the agent's error, to pass on.
fn failed(core: &Core, id: &str, from: MachineState, kind: &str, e: Error) -> Result<Error> {
    let event = NewEvent::new(
        kind,
        "failed",
        "flyd",
        crate::auth::stamp(serde_json::json!({"error": e.message})),
    );
    core.store
        .transition_recorded(id, &[from], S::Failed, &event)?;
    core.changed();
    Ok(e)
}

/// The machine with its events and its instances before migrations.
pub fn get_machine(core: &Core, app: &str, id: &str) -> Result<MachineView> {
    let m = machine_of(core, app, id)?;
    let events = core.store.events(id)?;
    let mut v = MachineView::new(&m, Some(events));
    v.previous_instances = crate::migrate::instances(core, id);
    Ok(v)
}

/// `s` as a signal name a machine may be sent (see [`canonical_signal`]).
fn signal_name(s: &str) -> Result<String> {
    canonical_signal(s).ok_or_else(|| {
        Error::invalid(format!(
            "signal {} is not one of {}",
            s.to_ascii_uppercase(),
            ALLOWED_SIGNALS.join(" ")
        ))
    })
}

pub fn stop_params(req: &StopRequest, config: &MachineConfig) -> Result<StopMachine> {
    let signal = signal_name(
        req.signal
            .as_deref()
            .unwrap_or_else(|| config.stop_config.signal()),
    )?;
    let timeout = match &req.timeout {
        Some(t) => humantime::parse_duration(t)
            .map_err(|_| Error::invalid(format!("timeout {t:?} is not a duration like \"5s\"")))?,
        None => config.stop_config.timeout(),
    };
    if timeout > MAX_STOP_TIMEOUT {
        return Err(Error::invalid(format!(
            "timeout {:?} is over the maximum of 300s",
            timeout
        )));
    }
    Ok(StopMachine {
        signal,
        timeout_ms: timeout.as_millis() as u64,
    })
}

/// started -> stopping -> (agent stops with signal, timeout, SIGKILL) -> stopped.
pub async fn stop_inner(
    core: &Core,
    id: &str,
    params: StopMachine,
    next: MachineState,
) -> Result<(Machine, ExitInfo)> {
    let m = core
        .store
        .transition(id, &[S::Started, S::Starting], S::Stopping)?;
    core.changed();
    let ep = machine_endpoint(core, &m)?;
    let exit: ExitInfo = match core.agents.stop(&ep, id, &params).await {
        Ok(e) => e,
        Err(e) => return Err(failed(core, id, S::Stopping, "exit", e)?),
    };
    let ended_by = if exit.escalated_to_sigkill {
        "SIGKILL after timeout".to_owned()
    } else {
        params.signal.clone()
    };
    let stopped = NewEvent::new(
        "exit",
        "stopped",
        "flyd",
        crate::auth::stamp(
            serde_json::json!({"exit_event": exit, "signal": params.signal, "timeout_ms": params.timeout_ms, "ended_by": ended_by}),
        ),
    );
    let m = core
        .store
        .transition_recorded(id, &[S::Stopping], next, &stopped)?;
    core.metrics.machine_event("stop");
    core.changed();
    Ok((m, exit))
}

/// Stops a machine with its config's signal and timeout, or the ones asked for.
pub async fn stop_machine(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
    req: StopRequest,
) -> Result<MachineView> {
    let m = machine_of(core, app, id)?;
    let config = config_of(&m)?;
    let params = stop_params(&req, &config)?;
    core.store.check_lease(id, lease)?;
    let (m, _) = stop_inner(core, id, params, S::Stopped).await?;
    Ok(MachineView::new(&m, None))
}

/// The machine's config as recorded at create (validated then).
pub(crate) fn config_of(m: &Machine) -> Result<MachineConfig> {
    serde_json::from_value(m.config.clone()).map_err(Error::internal)
}

/// Starts a created, stopped or failed machine.
pub async fn start_machine(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
) -> Result<MachineView> {
    let m = machine_of(core, app, id)?;
    core.store.check_lease(id, lease)?;
    let dirs = resolve_volumes(core, &config_of(&m)?)?;
    let m = launch(core, id, dirs, &[S::Created, S::Stopped, S::Failed]).await?;
    Ok(MachineView::new(&m, None))
}

/// Destroys a machine; a running one only with `force` (it is stopped first).
pub async fn destroy_machine(
    core: &Core,
    app: &str,
    id: &str,
    force: bool,
    lease: Option<&str>,
) -> Result<MachineView> {
    let m = machine_of(core, app, id)?;
    core.store.check_lease(id, lease)?;
    if matches!(m.state, S::Started | S::Starting) {
        if !force {
            return Err(Error::conflict(
                "machine_running",
                format!(
                    "machine {id} is {}: stop it first, or destroy with force",
                    m.state.as_str()
                ),
            ));
        }
        let params = stop_params(&StopRequest::default(), &config_of(&m)?)?;
        stop_inner(core, id, params, S::Stopped).await?;
    }
    let m = core
        .store
        .transition(id, &[S::Created, S::Stopped, S::Failed], S::Destroying)?;
    core.changed();
    let ep = machine_endpoint(core, &m)?;
    core.agents.destroy(&ep, id).await?;
    let destroyed = NewEvent::new(
        "destroy",
        "destroyed",
        "user",
        crate::auth::stamp(serde_json::json!({})),
    );
    let m = core
        .store
        .transition_recorded(id, &[S::Destroying], S::Destroyed, &destroyed)?;
    core.changed();
    Ok(MachineView::new(&m, None))
}

/// The longest a wait may last.
pub const MAX_WAIT_SECS: u64 = 300;

/// Answers as soon as the machine is in `state` (default `started`), or a timeout error after
/// `timeout` seconds (default 60, at most [`MAX_WAIT_SECS`]).
pub async fn wait_machine(
    core: &Core,
    app: &str,
    id: &str,
    state: Option<&str>,
    timeout: Option<u64>,
) -> Result<WaitView> {
    let want: MachineState = state.unwrap_or("started").parse().map_err(|_| {
        Error::invalid(format!(
            "state {:?} is not a machine state",
            state.unwrap_or_default()
        ))
    })?;
    let timeout = timeout.unwrap_or(60);
    if timeout > MAX_WAIT_SECS {
        return Err(Error::invalid("timeout is at most 300 seconds"));
    }
    machine_of(core, app, id)?;
    let mut rx = core.changes.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let m = core.store.get_machine(id)?;
        if m.state == want {
            return Ok(WaitView {
                ok: true,
                state: m.state.as_str().into(),
            });
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return Err(Error::new(
                Kind::Timeout,
                "timeout",
                format!(
                    "machine {id} is {}, not {}",
                    m.state.as_str(),
                    want.as_str()
                ),
            ));
        }
    }
}

/// The machine's events, oldest first.
pub fn machine_events(core: &Core, app: &str, id: &str) -> Result<Vec<EventView>> {
    machine_of(core, app, id)?;
    Ok(core
        .store
        .events(id)?
        .iter()
        .rev()
        .map(EventView::from)
        .collect())
}

fn lease_view(l: &ferry_store::Lease) -> LeaseView {
    LeaseView {
        nonce: l.nonce.clone(),
        expires_at: l.expires_at_ms,
        owner: l.owner.clone(),
        description: l.description.clone(),
    }
}

/// Takes the machine's lease (a conflict while someone else holds one), or refreshes the one
/// whose nonce is given.
pub fn acquire_lease(
    core: &Core,
    app: &str,
    id: &str,
    nonce: Option<&str>,
    req: LeaseRequest,
) -> Result<LeaseView> {
    machine_of(core, app, id)?;
    let ttl = req.ttl.unwrap_or(30);
    if !(1..=3600).contains(&ttl) {
        return Err(Error::invalid("lease ttl must be 1..=3600 seconds"));
    }
    let desc = req.description.unwrap_or_default();
    if desc.len() > 256 {
        return Err(Error::invalid("lease description is at most 256 bytes"));
    }
    let lease = match nonce {
        Some(n) => core.store.refresh_lease(id, n, ttl * 1000)?,
        None => core.store.acquire_lease(id, ttl * 1000, "api", &desc)?,
    };
    Ok(lease_view(&lease))
}

pub fn get_lease(core: &Core, app: &str, id: &str) -> Result<LeaseView> {
    machine_of(core, app, id)?;
    let l = core
        .store
        .current_lease(id)?
        .ok_or_else(|| Error::not_found(format!("lease on machine {id}")))?;
    Ok(lease_view(&l))
}

/// Releases the lease with this nonce (already gone is fine).
pub fn release_lease(core: &Core, app: &str, id: &str, nonce: &str) -> Result<()> {
    machine_of(core, app, id)?;
    core.store.release_lease(id, nonce)?;
    Ok(())
}

/// Runs a command in a started machine and answers its exit code and output.
pub async fn exec_machine(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
    req: ExecBody,
) -> Result<ExecView> {
    let m = machine_of(core, app, id)?;
    if req.cmd.is_empty() || req.cmd[0].is_empty() || req.cmd.iter().any(|a| a.contains('\0')) {
        return Err(Error::invalid("cmd must name a program (no NUL bytes)"));
    }
    let timeout = req.timeout.unwrap_or(30);
    if !(1..=600).contains(&timeout) {
        return Err(Error::invalid("exec timeout must be 1..=600 seconds"));
    }
    core.store.check_lease(id, lease)?;
    if m.state != S::Started {
        return Err(Error::conflict(
            "machine_not_started",
            format!("machine {id} is {}", m.state.as_str()),
        ));
    }
    let ep = machine_endpoint(core, &m)?;
    let r: ExecResult = core
        .agents
        .exec(
            &ep,
            id,
            &ExecRequest {
                cmd: req.cmd,
                timeout_ms: timeout * 1000,
            },
        )
        .await?;
    Ok(ExecView {
        exit_code: r.exit_code,
        stdout: r.stdout,
        stderr: r.stderr,
    })
}

/// An agent's report of what happened to a machine by itself (an exit, a restart, a check).
pub fn agent_report(core: &Core, r: AgentReport) -> Result<serde_json::Value> {
    let m = core.store.get_machine(&r.machine_id)?;
    if m.instance_id != r.instance_id {
        return Ok(serde_json::json!({"ignored": "stale instance"}));
    }
    let to: MachineState = r
        .state
        .parse()
        .map_err(|_| Error::invalid(format!("state {:?}", r.state)))?;
    // A report sent again (to another server, after the first one died before answering) is
    // recognized by its ID in the machine's events: recorded once.
    if !r.report_id.is_empty()
        && core
            .store
            .events(&m.id)?
            .iter()
            .any(|e| e.request["report_id"] == r.report_id.as_str())
    {
        return Ok(serde_json::json!({"ok": true, "duplicate": true}));
    }
    // A check result changes no state; and a machine the server is still starting becomes
    // `started` by the server's own hand when the agent answers. Refusing those reports would
    // lose them (the agent reports a check only when its result changes).
    let news = r.kind != "check" && !(to == S::Started && m.state == S::Starting);
    let ev = NewEvent::new(
        &r.kind,
        &r.state,
        "flyd",
        crate::auth::stamp(
            serde_json::json!({"exit_event": r.exit, "detail": r.detail, "instance_id": r.instance_id, "report_id": r.report_id}),
        ),
    );
    if matches!(r.kind.as_str(), "exit" | "restart") {
        core.metrics.machine_event(&r.kind);
    }
    if to != m.state && news {
        // Only a running machine can change by itself; anything else is the server's doing.
        // An exit may arrive while the server still has the machine `starting` (it exited
        // before the agent's answer to the start reached the server): refusing it would lose
        // it, and the machine would stay `started` with nothing running. `launch` then finds it
        // stopped and leaves it so.
        let from: &[MachineState] = if r.kind == "exit" {
            &[S::Started, S::Starting]
        } else {
            &[S::Started]
        };
        core.store.transition_recorded(&m.id, from, to, &ev)?;
    } else {
        core.store.add_event(
            &m.id,
            &ev.r#type,
            &ev.status,
            &ev.source,
            ev.request.clone(),
        )?;
    }
    core.changed();
    Ok(serde_json::json!({"ok": true}))
}

/// Starts again every machine in `ids` that is stopped (used when a dev fleet comes back).
pub async fn resume(core: &Core, ids: &[String]) -> Vec<(String, Result<()>)> {
    let mut out = Vec::new();
    for id in ids {
        let r = async {
            let m = core.store.get_machine(id)?;
            let config = config_of(&m)?;
            let dirs = resolve_volumes(core, &config)?;
            launch(core, id, dirs, &[S::Stopped, S::Failed, S::Started])
                .await
                .map(|_| ())
        }
        .await;
        out.push((id.clone(), r));
    }
    out
}

/// Stops every started machine (dev shutdown) and returns their IDs.
pub async fn stop_all(core: &Core) -> Vec<String> {
    let mut stopped = Vec::new();
    let Ok(ms) = core.store.list_machines(None) else {
        return stopped;
    };
    let mut tasks = Vec::new();
    for m in ms.into_iter().filter(|m| m.state == S::Started) {
        let Ok(config) = config_of(&m) else {
            continue;
        };
        let Ok(p) = stop_params(&StopRequest::default(), &config) else {
            continue;
        };
        tasks.push(async move { (m.id.clone(), stop_inner(core, &m.id, p, S::Stopped).await) });
    }
    // Concurrently: each stop may wait out its machine's stop timeout.
    for (id, r) in futures::future::join_all(tasks).await {
        if r.is_ok() {
            stopped.push(id);
        }
    }
    stopped
}

// ---- the Machines API's other verbs -----------------------------------------------------------

/// Sends a signal to a started machine's command; the event records who asked.
pub async fn signal_machine(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
    req: SignalRequest,
) -> Result<OkView> {
    let signal = signal_name(req.signal.trim())?;
    let m = machine_of(core, app, id)?;
    core.store.check_lease(id, lease)?;
    if m.state != S::Started {
        return Err(Error::conflict(
            "machine_not_started",
            format!("machine {id} is {}", m.state.as_str()),
        ));
    }
    let ep = machine_endpoint(core, &m)?;
    let req = crate::proto::SignalMachine {
        signal: signal.clone(),
    };
    core.agents.signal(&ep, id, &req).await?;
    core.store.add_event(
        id,
        "signal",
        "sent",
        "user",
        crate::auth::stamp(serde_json::json!({"signal": signal})),
    )?;
    Ok(OkView { ok: true })
}

/// Stops a started machine (with its stop config, or the signal and timeout asked for) and
/// starts it again, same instance; a stopped or failed one is just started.
pub async fn restart_machine(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
    req: StopRequest,
) -> Result<MachineView> {
    let m = machine_of(core, app, id)?;
    let config = config_of(&m)?;
    let params = stop_params(&req, &config)?;
    core.store.check_lease(id, lease)?;
    settled(&m)?;
    core.store.add_event(
        id,
        "restart",
        "requested",
        "user",
        crate::auth::stamp(
            serde_json::json!({"signal": params.signal, "timeout_ms": params.timeout_ms}),
        ),
    )?;
    if m.state == S::Started {
        stop_inner(core, id, params, S::Stopped).await?;
    }
    let dirs = resolve_volumes(core, &config)?;
    let m = launch(core, id, dirs, &[S::Created, S::Stopped, S::Failed]).await?;
    Ok(MachineView::new(&m, None))
}

/// Refuses a machine in the middle of a change (starting, stopping, destroying, migrating away).
fn settled(m: &Machine) -> Result<()> {
    if !matches!(m.state, S::Started | S::Stopped | S::Failed | S::Created) {
        return Err(Error::conflict(
            "machine_busy",
            format!(
                "machine {} is {}: try again when it settles",
                m.id,
                m.state.as_str()
            ),
        ));
    }
    Ok(())
}

/// Holds the machine's lease for one operation: the caller's (checked), or one taken here for
/// the operation and released after it, so nobody else changes the machine meanwhile.
struct OpLease<'a> {
    core: &'a Core,
    id: String,
    taken: Option<String>,
}

impl<'a> OpLease<'a> {
    fn hold(core: &'a Core, id: &str, lease: Option<&str>, what: &str) -> Result<Self> {
        let taken = match lease {
            Some(n) => {
                core.store.check_lease(id, Some(n))?;
                None
            }
            None => Some(core.store.acquire_lease(id, 120_000, "api", what)?.nonce),
        };
        Ok(OpLease {
            core,
            id: id.to_owned(),
            taken,
        })
    }
}

impl Drop for OpLease<'_> {
    fn drop(&mut self) {
        if let Some(n) = &self.taken {
            let _ = self.core.store.release_lease(&self.id, n);
        }
    }
}

/// Replaces the machine's config (all of it) as a new version: validated first, the image
/// pulled on its host first, then applied under a new instance ID with its own event; a
/// running machine is stopped and started again with it (unless `skip_launch`). Its mounts
/// cannot change (volumes stay where they are; migrate to move them). Refused while a
/// migration moves it. The machine's lease is held for the whole update.
pub async fn update_machine(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
    req: UpdateMachine,
) -> Result<MachineView> {
    req.config.validate()?;
    let m = machine_of(core, app, id)?;
    let old = config_of(&m)?;
    if req.config.mounts != old.mounts {
        return Err(Error::invalid(
            "an update cannot change mounts (a volume stays with its machine's host); keep \
             them as they are",
        ));
    }
    let held = OpLease::hold(core, id, lease, "update")?;
    if let Some(mig) = core.store.active_migration(id)? {
        return Err(Error::conflict(
            "migration_in_progress",
            format!("machine {id} is being moved by migration {}", mig.id),
        ));
    }
    settled(&m)?;
    let mut config = req.config;
    if let Some(image) = config.image.clone() {
        let host =
            core.store.get_host(m.host.ok_or_else(|| {
                Error::conflict("not_placed", format!("machine {id} has no host"))
            })?)?;
        config.image = Some(crate::images::ensure_on_host(core, &host, &image).await?);
    }
    let was_running = m.state == S::Started;
    if was_running {
        stop_inner(
            core,
            id,
            stop_params(&StopRequest::default(), &old)?,
            S::Stopped,
        )
        .await?;
    }
    let cur = core.store.get_machine(id)?;
    let next = Machine {
        config: serde_json::to_value(&config).map_err(Error::internal)?,
        instance_id: new_instance_id(),
        ..cur.clone()
    };
    let updated = core
        .store
        .update_machine_if(&next, &[S::Created, S::Stopped, S::Failed])?;
    core.store.add_event(
        id,
        "update",
        "updated",
        "user",
        crate::auth::stamp(serde_json::json!({
            "previous_instance_id": cur.instance_id,
            "instance_id": updated.instance_id,
            "config": updated.config,
        })),
    )?;
    core.changed();
    let m = if was_running && !req.skip_launch {
        let dirs = resolve_volumes(core, &config)?;
        launch(core, id, dirs, &[S::Stopped]).await?
    } else {
        updated
    };
    drop(held);
    Ok(MachineView::new(&m, None))
}

/// The machine's metadata (`config.metadata`).
pub fn get_metadata(
    core: &Core,
    app: &str,
    id: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    Ok(config_of(&machine_of(core, app, id)?)?.metadata)
}

/// Sets (`Some`) or removes (`None`) one metadata key; answers the metadata now. Metadata
/// changes no instance and restarts nothing (DNS follows a changed `process_group` at once).
pub fn set_metadata(
    core: &Core,
    app: &str,
    id: &str,
    lease: Option<&str>,
    key: &str,
    value: Option<String>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let ok_key = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok_key {
        return Err(Error::invalid(format!(
            "metadata key {key:?} must be 1..=128 of [A-Za-z0-9._-]"
        )));
    }
    let m = machine_of(core, app, id)?;
    core.store.check_lease(id, lease)?;
    let mut config = config_of(&m)?;
    match value {
        Some(v) => {
            config.metadata.insert(key.to_owned(), v);
        }
        None => {
            if config.metadata.remove(key).is_none() {
                return Err(Error::not_found(format!(
                    "metadata key {key:?} of machine {id}"
                )));
            }
        }
    }
    config.validate()?;
    let next = Machine {
        config: serde_json::to_value(&config).map_err(Error::internal)?,
        ..m.clone()
    };
    // Compare-and-set on the state it was read in: a concurrent start or stop is a conflict,
    // not an overwrite of what it wrote.
    core.store.update_machine_if(&next, &[m.state])?;
    core.changed();
    Ok(config.metadata)
}
