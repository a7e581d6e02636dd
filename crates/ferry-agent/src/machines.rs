//! The agent's machine table and its HTTP interface.

use crate::AgentError;
use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_addr::{HostId, MachineField, NetworkId};
use ferry_api::ApiError;
use ferry_core::config::{CheckKind, CheckType, RestartPolicy};
use ferry_core::error::PERMANENT_VOLUME_ERROR;
use ferry_core::proto::{
    AgentReport, ExecRequest, ExecResult, ExitInfo, LocalMachine, RegisterHost, RunMachine,
    StopMachine,
};
use ferry_core::proto::{BridgeHit, BridgeSync, VolumeRef};
use ferry_ebpf::bridge::Bridge;
use ferry_net::{HostNet, NetNs};
use ferry_runtime::{CgroupLayout, InitSpec, Limits, MachineCgroup, MountSpec, Running};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub host_id: HostId,
    pub region: String,
    /// The host's network namespace (`None`: the agent's own, on a real host).
    pub host_netns: Option<String>,
    /// A real host's address on the underlay (docs/design.md#underlay): the agent then wires
    /// the fabric itself, one route per other host from the watch. `None` on a dev fleet's
    /// hosts, whose fabric `ferry dev` wires.
    pub underlay: Option<std::net::IpAddr>,
    /// Prefix of machine namespace names (`ferry-<fleet>`).
    pub fleet: String,
    /// Where run directories live (`<state_dir>/machines/<id>`).
    pub state_dir: PathBuf,
    /// The servers' agent listeners, e.g. `https://127.0.0.1:4281`, in the order to try them (see
    /// [`crate::control`]). At least one.
    pub servers: Vec<String>,
    /// The join token this agent presents to the servers (`ferry token create --join`).
    pub join_token: Option<String>,
    /// The CA (PEM) that signed the servers' certificates, for `https://` servers.
    pub server_ca: Option<Vec<u8>>,
    /// The host's certificate and key (PEM, PEM) from its join: its proof of who it is to the
    /// servers (and its listener's certificate).
    pub identity: Option<(String, String)>,
    /// The `ferry` binary (machines run `ferry init`).
    pub ferry_exe: PathBuf,
    pub mtu: u32,
    pub bridge_mode: crate::BridgeMode,
    /// The volume receiver's port on the host's fabric address.
    pub volume_port: u16,
    /// What image pulls accept (layer sizes above all).
    pub image_limits: ferry_image::Limits,
    /// How much of the machines' output is kept.
    pub logs: crate::LogPolicy,
}

struct Slot {
    run: RunMachine,
    running: Option<Arc<Running>>,
    /// Set while the server stops or destroys it: its exit is not news then.
    stopping: bool,
    restarts: u32,
    /// This instance moved to another host (see `fence_machine`): never started here again.
    fenced: bool,
    /// A start set up ahead and held (see `stage_machine`): what it was set up with.
    staged: Option<Staged>,
}

/// A machine set up by `stage_machine` whose command waits for its release.
struct Staged {
    running: Arc<Running>,
    spec: InitSpec,
}

/// Kills a held machine (nothing of its own ran: no stop signal to honour).
fn discard_staging(running: &Running) -> Result<(), AgentError> {
    ferry_runtime::stop(
        running,
        ferry_runtime::Signal::SIGKILL,
        Duration::from_secs(5),
    )?;
    Ok(())
}

pub struct Agent {
    pub(crate) cfg: AgentConfig,
    /// `.internal` DNS for this host's machines.
    pub(crate) dns: crate::dns::HostDns,
    logs: crate::logs::Logs,
    host: HostNet,
    cgroups: CgroupLayout,
    machines: Mutex<HashMap<String, Slot>>,
    /// The servers, and which one answered last.
    pub(crate) servers: Arc<crate::control::Servers>,
    pub(crate) rt: tokio::runtime::Handle,
    /// What the watch stream does (`GET /v1/state`).
    pub(crate) watch_status: Mutex<crate::control::WatchStatus>,
    /// One bridge state applied at a time: a push and a watch line never interleave their
    /// map updates (the last one applied wins whole).
    bridge_apply: Mutex<()>,
    /// Per server, the generation of the last bridge state applied from it (see
    /// [`BridgeSync::generation`]).
    bridge_applied: Mutex<HashMap<String, u64>>,
    /// The address-mapping bridge (cgroup eBPF); `None` on hosts without a cgroup v2 tree.
    bridge: Mutex<Option<Bridge>>,
    /// The last bridge state the server sent (nft mode applies it to machines started later).
    bridge_state: Mutex<BridgeSync>,
    /// Each machine's gate as last written to the bridge's machine map (eBPF mode; changed only
    /// with `bridge` locked). A bridge state is applied as its difference from this: the watch
    /// sends the whole state on every change of the host's machines, and writing every gate
    /// (a cgroup lookup and a map update per machine) made each start on a host with 1,000
    /// machines wait behind ~1,000 cgroup lookups (BENCHMARKS.md, issue 17 item 4).
    gates_written: Mutex<HashMap<String, bool>>,
    /// nft mode: (machine, old address) -> (packets, first seen ms, last change ms).
    nft_seen: Mutex<NftSeen>,
    /// Volume forks to and from this host (migration).
    volumes: Arc<crate::volumes::Volumes>,
    /// The root filesystem layers of every machine without an OCI image (the default image;
    /// see ferry-runtime's sandbox module).
    image: Vec<ferry_runtime::Layer>,
    /// OCI images: the host's layer store and its puller (`images.rs`).
    pub(crate) images: Arc<ferry_image::Puller>,
}

/// Every machine's process limit (threads count too): generous for real workloads, and a fork
/// bomb inside one machine stops here instead of exhausting the host's pids.
pub const MACHINE_PIDS_MAX: u64 = 4096;

type Shared = State<Arc<Agent>>;

/// nft mode: (machine, old address) -> (packets, first seen ms, last change ms).
type NftSeen = HashMap<(String, std::net::Ipv6Addr), (u64, i64, i64)>;

fn api_err(e: AgentError) -> ApiError {
    match e {
        AgentError::UnknownMachine(_) => ApiError::not_found(e.to_string()),
        AgentError::NotRunning(_) => ApiError::conflict("not_running", e.to_string()),
        AgentError::Fenced { .. } => ApiError::conflict("fenced", e.to_string()),
        AgentError::Invalid(m) => ApiError::invalid(m),
        AgentError::VolumeUnsupported(m) => ApiError::new(422, PERMANENT_VOLUME_ERROR, m),
        AgentError::Image(e) => crate::images::image_err(e),
        e => ApiError::internal(e),
    }
}

impl Agent {
    /// Prepares the host (idempotent: safe on a host an earlier agent already set up) and finds
    /// the machines an earlier agent left running.
    pub fn start(cfg: AgentConfig, rt: tokio::runtime::Handle) -> Result<Arc<Agent>, AgentError> {
        let ns = match &cfg.host_netns {
            Some(n) => NetNs::named(n),
            None => NetNs::own(),
        };
        let pins = PathBuf::from(ferry_net::BPF_PIN_ROOT)
            .join(cfg.fleet.trim_start_matches(ferry_net::FERRY_PREFIX))
            .join(format!("{:x}", cfg.host_id.get()));
        let host = HostNet::start(cfg.host_id, &ns, Some(pins))?;
        if let Some(addr) = cfg.underlay {
            let mtu = host.attach_underlay(addr)?;
            tracing::info!("underlay {addr}: the overlay link's MTU is {mtu}");
        }
        let cgroups = CgroupLayout::discover()?;
        let bridge_pins = PathBuf::from(ferry_net::BPF_PIN_ROOT)
            .join(cfg.fleet.trim_start_matches(ferry_net::FERRY_PREFIX))
            .join(format!("{:x}", cfg.host_id.get()))
            .join("bridge");
        let bridge = match (cfg.bridge_mode, Bridge::load(&bridge_pins)) {
            (crate::BridgeMode::Nft, _) => None,
            (_, r) => match r {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("the address-mapping bridge is off on this host: {e}");
                    None
                }
            },
        };
        std::fs::create_dir_all(cfg.state_dir.join("machines"))
            .map_err(|e| AgentError::io("creating the state dir", e))?;
        let image = ferry_runtime::default_image(&cfg.state_dir.join("images"))?;
        let images = Arc::new(ferry_image::Puller::new(ferry_image::Store::open(
            &cfg.state_dir.join("images").join("oci"),
        )?));
        let volumes = crate::volumes::Volumes::start(
            &ns,
            &cfg.state_dir,
            std::net::SocketAddr::new(
                cfg.underlay
                    .unwrap_or(HostNet::underlay_addr(cfg.host_id).into()),
                cfg.volume_port,
            ),
        )?;
        let servers = Arc::new(crate::control::Servers::new(
            cfg.servers.clone(),
            cfg.join_token.as_deref(),
            cfg.server_ca.as_deref(),
            cfg.identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        ));
        let dns = crate::dns::HostDns::start(&ns, &cfg.state_dir, &rt)?;
        let agent = Arc::new(Agent {
            dns,
            logs: crate::logs::Logs::new(&cfg.state_dir, cfg.logs),
            cfg,
            host,
            cgroups,
            machines: Mutex::new(HashMap::new()),
            servers,
            rt,
            watch_status: Default::default(),
            bridge_apply: Mutex::new(()),
            bridge_applied: Mutex::new(HashMap::new()),
            bridge: Mutex::new(bridge),
            bridge_state: Mutex::new(BridgeSync::default()),
            gates_written: Mutex::new(HashMap::new()),
            nft_seen: Mutex::new(HashMap::new()),
            volumes,
            image,
            images,
        });
        agent.reattach()?;
        Ok(agent)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("machines").join(id)
    }

    /// A machine's cgroup on this host: its ID plus the host, because the hosts of a dev fleet
    /// share one cgroup tree and a migrating machine briefly has a cgroup on two of them.
    fn cgroup_name(&self, id: &str) -> String {
        format!("{id}.h{:x}", self.cfg.host_id.get())
    }

    fn netns_name(&self, field: u32) -> String {
        format!(
            "{}-m{:x}-{:x}",
            self.cfg.fleet,
            self.cfg.host_id.get(),
            field
        )
    }

    /// Rebuilds the table from run directories; live shims are watched again.
    fn reattach(self: &Arc<Self>) -> Result<(), AgentError> {
        let dir = self.cfg.state_dir.join("machines");
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| AgentError::io("reading run dirs", e))?
            .flatten()
        {
            let run_dir = entry.path();
            // A machine prepared for a start that has not come yet has only `prepared.json`.
            let started = std::fs::read(run_dir.join("run.json"));
            let was_started = started.is_ok();
            let Ok(raw) = started.or_else(|_| std::fs::read(run_dir.join("prepared.json"))) else {
                continue;
            };
            let Ok(run) = serde_json::from_slice::<RunMachine>(&raw) else {
                continue;
            };
            let mut running = Running::attach(&run_dir)?.map(Arc::new);
            if let Some(r) = running.as_ref().filter(|r| !was_started || r.held()) {
                // A staged start (set up, held; or released by a start that this agent did not
                // finish) whose command never ran: a start, if it comes, sets it up again.
                tracing::info!(
                    "machine {} was staged, not started: removing the staging",
                    run.id
                );
                discard_staging(r)?;
                running = None;
            }
            let id = run.id.clone();
            let fenced =
                std::fs::read_to_string(run_dir.join(FENCED)).is_ok_and(|i| i == run.instance_id);
            let live = running.clone();
            self.machines.lock().unwrap().insert(
                id.clone(),
                Slot {
                    run,
                    running,
                    stopping: false,
                    restarts: 0,
                    fenced,
                    staged: None,
                },
            );
            if let Some(r) = live {
                tracing::info!("reattached to machine {id} (pid {})", r.pid());
                self.watch(id.clone(), r.clone());
                self.check(id, r);
            }
        }
        Ok(())
    }

    /// IDs of the machines running now.
    pub fn running(&self) -> Vec<String> {
        let t = self.machines.lock().unwrap();
        t.iter()
            .filter(|(_, s)| s.running.as_ref().is_some_and(|r| !r.exited()))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Announces this agent (and what it found running) to the first server that takes it,
    /// trying them all in turn until one does. Idempotent: a registration that reached a
    /// server which died before answering may be sent to another one.
    pub async fn register(&self, endpoint: &str) -> Result<(), crate::control::SendError> {
        let body = RegisterHost {
            host_id: self.cfg.host_id.get(),
            region: self.cfg.region.clone(),
            endpoint: endpoint.to_owned(),
            running: self.running(),
            underlay: self.cfg.underlay.map(|a| a.to_string()).unwrap_or_default(),
        };
        self.servers
            .post_until("/internal/v1/hosts", &body, None)
            .await
    }

    /// The fleet's other hosts, as the watch sent them: on a real host, exactly one route to
    /// each (a dev fleet's fabric is `ferry dev`'s, so nothing happens there).
    pub(crate) fn apply_peers(
        &self,
        peers: &[ferry_core::proto::PeerHost],
    ) -> Result<(), AgentError> {
        if self.cfg.underlay.is_none() {
            return Ok(());
        }
        let mut want = Vec::new();
        for p in peers {
            let (Ok(id), Ok(addr)) = (HostId::new(p.id), p.underlay.parse()) else {
                tracing::warn!(
                    "host {:x}: underlay {:?} is not usable; no route",
                    p.id,
                    p.underlay
                );
                continue;
            };
            want.push((id, addr));
        }
        let paths = self.host.set_peers(want)?;
        tracing::debug!("routes to {} other hosts: {paths:?}", paths.len());
        Ok(())
    }

    fn report(&self, r: AgentReport) {
        self.send_report(r);
    }

    /// The directory of each mount: a size-limited volume this agent keeps (made and mounted
    /// here if needed), or the host directory the server named.
    fn volume_dirs(&self, run: &RunMachine) -> Result<Vec<String>, AgentError> {
        let mut out = Vec::new();
        for (i, _) in run.config.mounts.iter().enumerate() {
            let dir =
                match run.volumes.get(i) {
                    Some(VolumeRef {
                        id,
                        size_mb: Some(mb),
                    }) => self.volumes.ensure(id, *mb)?.display().to_string(),
                    _ => run.volume_dirs.get(i).cloned().ok_or_else(|| {
                        AgentError::Invalid(format!("no directory for mount {i}"))
                    })?,
                };
            out.push(dir);
        }
        Ok(out)
    }

    /// Creates what is missing (network, cgroup) and starts `ferry init` for the machine.
    fn start_machine(self: &Arc<Self>, run: RunMachine) -> Result<i32, AgentError> {
        self.start_machine_timed(run, &mut Phases::default())
    }

    /// Builds what a start of `run` will need and that takes time, without running anything:
    /// the network namespace with its veth, address and routes, and the cgroups. A migration
    /// asks its destination for this while the volumes copy, so the start after the source's
    /// stop costs what a restart's does, and the new address answers (a refused connection) as
    /// soon as the bridge sends old-address traffic to it, instead of dropping it. A machine
    /// this host already has is left alone; `destroy` removes what this made.
    fn prepare_machine(&self, run: RunMachine) -> Result<(), AgentError> {
        let net = NetworkId::new(run.network_id).map_err(|e| AgentError::Invalid(e.to_string()))?;
        if self.machines.lock().unwrap().contains_key(&run.id) {
            return Ok(());
        }
        self.ensure_netns(net, MachineField(run.machine_field))?;
        self.ensure_cgroup(&run)?;
        // Known from now on, so a destroy removes what was built (a start meanwhile wins); the
        // record makes it known again to an agent that restarts before the start (`reattach`
        // reads it where a start left no `run.json`, which it never overwrites).
        let run_dir = self.run_dir(&run.id);
        std::fs::create_dir_all(&run_dir).map_err(|e| AgentError::io("creating the run dir", e))?;
        write_atomic(
            &run_dir.join("prepared.json"),
            &serde_json::to_vec(&run).expect("serializable"),
        )?;
        self.machines
            .lock()
            .unwrap()
            .entry(run.id.clone())
            .or_insert(Slot {
                run,
                running: None,
                stopping: false,
                restarts: 0,
                fenced: false,
                staged: None,
            });
        Ok(())
    }

    /// [`prepare_machine`](Self::prepare_machine), then the machine itself set up and held
    /// (namespaces, mounts, its root: what makes most of a start) without running anything of
    /// its own: its start then only releases it (see `InitSpec::hold`). A migration stages its
    /// machine on the destination once the volumes are copied but one round, while the source
    /// still runs; its start after the source's stop is then a fraction of a restart. Nothing
    /// is reported to the server about a staged machine (it does not run); a start with another
    /// spec, a destroy, or an agent restart removes the staging.
    fn stage_machine(&self, run: RunMachine) -> Result<(), AgentError> {
        if let Some(s) = self.machines.lock().unwrap().get(&run.id) {
            if s.fenced && s.run.instance_id == run.instance_id {
                return Err(AgentError::Fenced {
                    machine: run.id.clone(),
                    instance: run.instance_id.clone(),
                });
            }
            if s.running.as_ref().is_some_and(|r| !r.exited()) {
                return Ok(()); // it runs here already: nothing to stage
            }
        }
        self.prepare_machine(run.clone())?;
        let cg = self.ensure_cgroup(&run)?;
        self.attach_bridge(&run, &cg)?;
        let mut spec = self.init_spec(&run, &cg)?;
        spec.hold = true;
        let old = {
            let mut t = self.machines.lock().unwrap();
            let slot = t
                .get_mut(&run.id)
                .ok_or_else(|| AgentError::UnknownMachine(run.id.clone()))?;
            match slot.staged.take() {
                Some(st) if st.spec == spec && st.running.held() => {
                    slot.staged = Some(st);
                    return Ok(()); // staged already, the same way
                }
                other => other,
            }
        };
        if let Some(st) = old {
            discard_staging(&st.running)?;
        }
        let ns = NetNs::named(&self.netns_name(run.machine_field));
        let running = Arc::new(ferry_runtime::spawn_machine(
            &self.run_dir(&run.id),
            &ns.path(),
            &cg,
            &spec,
            &self.cfg.ferry_exe,
        )?);
        if !running.wait_held(Duration::from_secs(10)) {
            let _ = discard_staging(&running);
            return Err(AgentError::Invalid(format!(
                "machine {} could not be set up ahead of its start",
                run.id
            )));
        }
        let mut t = self.machines.lock().unwrap();
        match t.get_mut(&run.id) {
            // Still only prepared: the staging is its own.
            Some(slot)
                if slot.running.as_ref().is_none_or(|r| r.exited()) && slot.staged.is_none() =>
            {
                slot.staged = Some(Staged { running, spec });
                Ok(())
            }
            // A start or destroy came meanwhile: this staging is not wanted.
            _ => {
                drop(t);
                let _ = discard_staging(&running);
                Ok(())
            }
        }
    }

    /// The machine's network namespace (veth, address, routes), built if this host has none.
    fn ensure_netns(&self, net: NetworkId, field: MachineField) -> Result<NetNs, AgentError> {
        let ns = NetNs::named(&self.netns_name(field.0));
        if !ns.exists() {
            self.host.add_machine(ns.name(), net, field, self.cfg.mtu)?;
        }
        Ok(ns)
    }

    /// The machine's cgroups, created with its limits if this host has none.
    fn ensure_cgroup(&self, run: &RunMachine) -> Result<MachineCgroup, AgentError> {
        let name = self.cgroup_name(&run.id);
        if let Some(c) = MachineCgroup::open(&self.cgroups, &name)? {
            return Ok(c);
        }
        let limits = Limits {
            memory_mb: run.config.guest.memory_mb.into(),
            cpus: run.config.guest.cpus.into(),
            pids: MACHINE_PIDS_MAX,
        };
        Ok(self.cgroups.create_machine(&name, limits)?)
    }

    /// Starts a machine, timing each phase into `phases` (the start's reply carries them to the
    /// server's metrics: where starts spend their time, e.g. as a host fills up). A machine
    /// staged here with the same spec (`stage_machine`) is released instead of set up again.
    fn start_machine_timed(
        self: &Arc<Self>,
        run: RunMachine,
        phases: &mut Phases,
    ) -> Result<i32, AgentError> {
        let field = MachineField(run.machine_field);
        let net = NetworkId::new(run.network_id).map_err(|e| AgentError::Invalid(e.to_string()))?;
        if let Some(s) = self.machines.lock().unwrap().get(&run.id) {
            if s.fenced && s.run.instance_id == run.instance_id {
                return Err(AgentError::Fenced {
                    machine: run.id.clone(),
                    instance: run.instance_id.clone(),
                });
            }
            if let Some(r) = s.running.as_ref().filter(|r| !r.exited()) {
                return Ok(r.pid()); // already running: starting is idempotent
            }
        }
        let ns = self.ensure_netns(net, field)?;
        phases.lap("netns");
        let cg = self.ensure_cgroup(&run)?;
        phases.lap("cgroup");
        if self.cfg.bridge_mode == crate::BridgeMode::Nft {
            let mappings = self.bridge_state.lock().unwrap().mappings.clone();
            crate::nft::apply(&ns, run.network_id, run.bridge_enabled, &mappings)?;
        }
        self.attach_bridge(&run, &cg)?;
        phases.lap("bridge");
        let spec = self.init_spec(&run, &cg)?;
        let staged = self
            .machines
            .lock()
            .unwrap()
            .get_mut(&run.id)
            .and_then(|s| s.staged.take());
        let staged = match staged {
            Some(st)
                if st.spec.hold
                    && InitSpec {
                        hold: false,
                        ..st.spec.clone()
                    } == spec =>
            {
                Some(st.running)
            }
            Some(st) => {
                // Staged for another spec (the machine changed meanwhile): set up again.
                discard_staging(&st.running)?;
                None
            }
            None => None,
        };
        let run_dir = self.run_dir(&run.id);
        std::fs::create_dir_all(&run_dir).map_err(|e| AgentError::io("creating the run dir", e))?;
        // The record first: a crash between the two leaves a run dir that reattach can read.
        write_atomic(
            &run_dir.join("run.json"),
            &serde_json::to_vec(&run).expect("serializable"),
        )?;
        let _ = std::fs::remove_file(run_dir.join("exit.json"));
        // Another instance than the one fenced (see the check above): a rollback's.
        let _ = std::fs::remove_file(run_dir.join(FENCED));
        phases.lap("files");
        let released = staged.filter(|r| r.release().is_ok());
        let running = match released {
            Some(r) => {
                phases.lap("release");
                r
            }
            None => {
                let r = Arc::new(ferry_runtime::spawn_machine(
                    &run_dir,
                    &ns.path(),
                    &cg,
                    &spec,
                    &self.cfg.ferry_exe,
                )?);
                phases.lap("spawn");
                r
            }
        };
        // "started" means PID 1 runs in the machine, not merely that its shim was forked.
        if running.wait_init_pid(Duration::from_secs(10)).is_none() && running.exited() {
            tracing::warn!("machine {} ended before its init started", run.id);
        }
        phases.lap("init");
        let pid = running.pid();
        let id = run.id.clone();
        {
            let mut t = self.machines.lock().unwrap();
            let restarts = t.get(&id).map(|s| s.restarts).unwrap_or(0);
            t.insert(
                id.clone(),
                Slot {
                    run,
                    running: Some(running.clone()),
                    stopping: false,
                    restarts,
                    fenced: false,
                    staged: None,
                },
            );
        }
        self.watch(id.clone(), running.clone());
        self.check(id, running);
        Ok(pid)
    }

    /// The bridge goes on the machine's cgroup before its first process can open a socket
    /// (attaching is a no-op once done; the machine's entry is written each time).
    fn attach_bridge(&self, run: &RunMachine, cg: &MachineCgroup) -> Result<(), AgentError> {
        let net = NetworkId::new(run.network_id).map_err(|e| AgentError::Invalid(e.to_string()))?;
        if let (Some(b), Some(v2)) = (self.bridge.lock().unwrap().as_mut(), cg.v2_dir()) {
            let addr: std::net::Ipv6Addr = run
                .private_ip
                .parse()
                .map_err(|_| AgentError::Invalid(format!("private ip {}", run.private_ip)))?;
            b.attach_cgroup(v2)
                .map_err(|e| AgentError::Invalid(format!("bridge: {e}")))?;
            let id = ferry_ebpf::bridge::cgroup_id(v2)
                .map_err(|e| AgentError::Invalid(format!("bridge: {e}")))?;
            b.set_machine(id, net, addr, run.bridge_enabled)
                .map_err(|e| AgentError::Invalid(format!("bridge: {e}")))?;
            self.gates_written
                .lock()
                .unwrap()
                .insert(run.id.clone(), run.bridge_enabled);
        }
        Ok(())
    }

    /// What `ferry init` runs for `run`: the image's layers replace the default root; its
    /// config gives the command (a cmd of the machine's replaces the image's Cmd), env (the
    /// machine's win), workdir and user.
    fn init_spec(&self, run: &RunMachine, cg: &MachineCgroup) -> Result<InitSpec, AgentError> {
        let (layers, cmd, env, workdir, user) = match &run.config.image {
            None => (
                self.image.clone(),
                run.config.init.cmd.clone(),
                run.config.env.clone(),
                None,
                None,
            ),
            Some(image) => {
                let (layer, ic) = self.image_root(image)?;
                let mut env: std::collections::BTreeMap<String, String> =
                    ic.env_pairs().into_iter().collect();
                env.extend(run.config.env.clone());
                let cmd = ic.command(&run.config.init.cmd);
                if cmd.is_empty() {
                    return Err(AgentError::Invalid(format!(
                        "image {image} has no entrypoint or cmd, and the machine gives no command"
                    )));
                }
                (
                    vec![layer],
                    cmd,
                    env,
                    Some(ic.working_dir.clone()).filter(|w| !w.is_empty()),
                    Some(ic.user.clone()).filter(|u| !u.is_empty()),
                )
            }
        };
        Ok(InitSpec {
            machine_id: run.id.clone(),
            app: run.app.clone(),
            private_ip: run.private_ip.clone(),
            region: run.region.clone(),
            cmd,
            env,
            mounts: run
                .config
                .mounts
                .iter()
                .zip(&run.volume_dirs)
                .map(|(m, dir)| MountSpec {
                    host_path: dir.into(),
                    guest_path: m.path.clone().into(),
                })
                .collect(),
            workdir,
            user,
            sandbox: Some(ferry_runtime::SandboxSpec {
                // The machine's cgroup lives as long as the machine: the range is its own until
                // then (machines of other agents on this box included).
                id_base: ferry_runtime::claim_id_range(&cg.dirs()[0].1)?,
                layers,
            }),
            log: Some(self.logs.spec(&run.id, &run.instance_id)?),
            hold: false,
        })
    }

    /// Runs the machine's health checks on a thread of its own while this instance lives.
    /// Status changes become events; a liveness check failing three times in a row restarts the
    /// machine (whatever its restart policy: a live but broken process is what liveness is for).
    fn check(self: &Arc<Self>, id: String, running: Arc<Running>) {
        let run = match self.machines.lock().unwrap().get(&id) {
            Some(s) => s.run.clone(),
            None => return,
        };
        if run.config.checks.is_empty() {
            return;
        }
        let Ok(ip) = run.private_ip.parse::<std::net::IpAddr>() else {
            return;
        };
        let netns = NetNs::named(&self.netns_name(run.machine_field)).path();
        let checks: Vec<(String, ferry_runtime::Check)> = run
            .config
            .checks
            .iter()
            .map(|(name, c)| {
                let kind = match c.kind_of {
                    CheckType::Tcp => ferry_runtime::CheckKind::Tcp {
                        port: c.port.unwrap_or(0),
                    },
                    CheckType::Http => ferry_runtime::CheckKind::Http {
                        port: c.port.unwrap_or(0),
                        path: c.path.clone().unwrap_or_else(|| "/".into()),
                    },
                    CheckType::Exec => ferry_runtime::CheckKind::Exec {
                        cmd: c.command.clone().unwrap_or_default(),
                    },
                };
                let role = match c.kind {
                    CheckKind::Liveness => ferry_runtime::CheckRole::Liveness,
                    CheckKind::Readiness => ferry_runtime::CheckRole::Readiness,
                };
                (
                    name.clone(),
                    ferry_runtime::Check {
                        kind,
                        interval: c.interval(),
                        timeout: c.timeout(),
                        role,
                    },
                )
            })
            .collect();
        let agent = self.clone();
        std::thread::spawn(move || {
            let mut last: HashMap<String, bool> = HashMap::new();
            let mut failures: HashMap<String, u32> = HashMap::new();
            let mut next: Vec<std::time::Instant> =
                checks.iter().map(|_| std::time::Instant::now()).collect();
            loop {
                let current = agent
                    .machines
                    .lock()
                    .unwrap()
                    .get(&id)
                    .and_then(|s| s.running.clone());
                if running.exited() || !current.is_some_and(|r| Arc::ptr_eq(&r, &running)) {
                    return; // this instance is gone; a new one has its own checker
                }
                let now = std::time::Instant::now();
                for (i, (name, check)) in checks.iter().enumerate() {
                    if now < next[i] {
                        continue;
                    }
                    next[i] = now + check.interval;
                    let r = ferry_runtime::run_check(&running, ip, &netns, check);
                    let fails = failures.entry(name.clone()).or_default();
                    *fails = if r.ok { 0 } else { *fails + 1 };
                    if last.get(name) != Some(&r.ok) {
                        last.insert(name.clone(), r.ok);
                        agent.report(AgentReport {
                            machine_id: id.clone(),
                            instance_id: run.instance_id.clone(),
                            kind: "check".into(),
                            state: "started".into(),
                            exit: None,
                            detail: serde_json::json!({"name": name, "passing": r.ok, "role": format!("{:?}", check.role).to_lowercase(), "output": r.detail}),
                            report_id: String::new(),
                        });
                    }
                    if matches!(check.role, ferry_runtime::CheckRole::Liveness) && *fails >= 3 {
                        agent.restart_unhealthy(&id, &run, name);
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }

    fn restart_unhealthy(self: &Arc<Self>, id: &str, run: &RunMachine, check: &str) {
        let running = {
            let mut t = self.machines.lock().unwrap();
            let Some(s) = t.get_mut(id) else { return };
            s.stopping = true;
            s.running.clone()
        };
        if let Some(r) = running {
            let sig = ferry_runtime::parse_signal(run.config.stop_config.signal())
                .unwrap_or(ferry_runtime::Signal::SIGKILL);
            let _ = ferry_runtime::stop(&r, sig, run.config.stop_config.timeout());
        }
        let result = self.start_machine(run.clone());
        self.report(AgentReport {
            machine_id: id.to_owned(),
            instance_id: run.instance_id.clone(),
            kind: "restart".into(),
            state: if result.is_ok() {
                "started".into()
            } else {
                "stopped".into()
            },
            exit: None,
            detail: serde_json::json!({"reason": format!("liveness check {check} failed 3 times")}),
            report_id: String::new(),
        });
    }

    /// Waits for the machine's exit on a thread of its own and applies the restart policy.
    fn watch(self: &Arc<Self>, id: String, running: Arc<Running>) {
        let agent = self.clone();
        std::thread::spawn(move || {
            let exit = loop {
                if let Some(e) = running.wait_exit(Duration::from_secs(3600)) {
                    break e;
                }
            };
            let (run, stopping, restarts) = {
                let t = agent.machines.lock().unwrap();
                match t.get(&id) {
                    // A newer instance replaced this one: its watcher reports.
                    Some(s) if s.running.as_ref().is_some_and(|r| Arc::ptr_eq(r, &running)) => {
                        (s.run.clone(), s.stopping, s.restarts)
                    }
                    _ => return,
                }
            };
            if stopping {
                return; // the stop or destroy call reports this exit
            }
            let info = ExitInfo {
                exit_code: exit.exit_code,
                signal: exit.signal,
                escalated_to_sigkill: false,
                requested_stop: false,
            };
            let policy = run.config.restart.policy;
            let max = run.config.restart.max_retries.unwrap_or(10);
            let again = match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !exit.success() && restarts < max,
                RestartPolicy::No => false,
            };
            if again {
                if let Some(s) = agent.machines.lock().unwrap().get_mut(&id) {
                    s.restarts += 1;
                }
                std::thread::sleep(Duration::from_millis(200)); // no hot loop on a crashing command
                match agent.start_machine(run.clone()) {
                    Ok(_) => {
                        agent.report(AgentReport {
                            machine_id: id.clone(),
                            instance_id: run.instance_id.clone(),
                            kind: "restart".into(),
                            state: "started".into(),
                            exit: Some(info),
                            detail: serde_json::json!({"policy": policy, "restarts": restarts + 1}),
                            report_id: String::new(),
                        });
                        return;
                    }
                    Err(e) => tracing::warn!("restarting {id}: {e}"),
                }
            }
            agent.report(AgentReport {
                machine_id: id,
                instance_id: run.instance_id,
                kind: "exit".into(),
                state: "stopped".into(),
                exit: Some(info),
                detail: serde_json::json!({"oom_killed": exit.oom_killed}),
                report_id: String::new(),
            });
        });
    }

    fn stop_machine(&self, id: &str, req: &StopMachine) -> Result<ExitInfo, AgentError> {
        let running = {
            let mut t = self.machines.lock().unwrap();
            let s = t
                .get_mut(id)
                .ok_or_else(|| AgentError::UnknownMachine(id.into()))?;
            s.stopping = true;
            s.running.clone()
        };
        let Some(running) = running else {
            return Err(AgentError::NotRunning(id.into()));
        };
        let sig = ferry_runtime::parse_signal(&req.signal)?;
        let out = ferry_runtime::stop(&running, sig, Duration::from_millis(req.timeout_ms))?;
        Ok(ExitInfo {
            exit_code: out.exit.exit_code,
            signal: out.exit.signal,
            escalated_to_sigkill: out.escalated_to_sigkill,
            requested_stop: true,
        })
    }

    /// A migration's switch: this instance of the machine moved to another host and must never
    /// run here again, whoever asks (a confused server, a restart policy, an agent restart).
    /// Quick, unlike a destroy: the stopped machine's namespace and cgroup stay until the
    /// server destroys them once the destination runs it, so addresses that still lead here
    /// are refused, not dropped, until the bridge sends them to the new instance. Durable (a
    /// `fenced` file in the run directory); a start of another instance (a rollback's) is
    /// allowed.
    fn fence_machine(&self, id: &str) -> Result<(), AgentError> {
        let running = {
            let mut t = self.machines.lock().unwrap();
            let Some(slot) = t.get_mut(id) else {
                return Ok(()); // not here: nothing to fence
            };
            slot.fenced = true;
            slot.stopping = true;
            let marker = self.run_dir(id).join(FENCED);
            if let Some(dir) = marker.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| AgentError::io("creating the run dir", e))?;
            }
            write_atomic(&marker, slot.run.instance_id.as_bytes())?;
            slot.running.clone()
        };
        if let Some(r) = running.filter(|r| !r.exited()) {
            ferry_runtime::stop(&r, ferry_runtime::Signal::SIGKILL, Duration::from_secs(5))?;
        }
        Ok(())
    }

    fn destroy_machine(&self, id: &str) -> Result<(), AgentError> {
        let slot = self.machines.lock().unwrap().remove(id);
        let Some(mut slot) = slot else { return Ok(()) }; // already gone: idempotent
        slot.stopping = true;
        if let Some(st) = slot.staged.take() {
            discard_staging(&st.running)?;
        }
        if let Some(r) = slot.running.as_ref().filter(|r| !r.exited()) {
            ferry_runtime::stop(r, ferry_runtime::Signal::SIGKILL, Duration::from_secs(5))?;
        }
        let field = MachineField(slot.run.machine_field);
        let ns = NetNs::named(&self.netns_name(field.0));
        if let Ok(addr) = slot.run.private_ip.parse::<ferry_addr::FleetAddr>() {
            let m = ferry_net::MachineNet {
                ns,
                addr,
                host_iface: ferry_net::host::machine_iface(field),
            };
            self.host.remove_machine(&m)?;
        }
        if let Some(cg) = MachineCgroup::open(&self.cgroups, &self.cgroup_name(id))? {
            if let (Some(b), Some(v2)) = (self.bridge.lock().unwrap().as_mut(), cg.v2_dir()) {
                if let Ok(cid) = ferry_ebpf::bridge::cgroup_id(v2) {
                    let _ = b.detach_cgroup_id(cid);
                    let _ = b.forget_machine(cid);
                }
            }
            cg.remove()?;
        }
        self.gates_written.lock().unwrap().remove(id);
        let _ = std::fs::remove_dir_all(self.run_dir(id));
        // The machine's log stays (a migrated machine's earlier lines are read from here), as
        // long as the logs of departed machines fit their budget.
        let present: std::collections::HashSet<String> =
            self.machines.lock().unwrap().keys().cloned().collect();
        self.logs.prune_departed(&|m| present.contains(m));
        Ok(())
    }

    fn read_logs(
        &self,
        id: &str,
        q: &ferry_core::proto::LogQuery,
    ) -> Result<Vec<ferry_core::proto::LogRecord>, AgentError> {
        self.logs.read(id, q)
    }

    /// The handle of the machine's processes, if this host has the machine and started it.
    fn running_handle(&self, id: &str) -> Result<Arc<Running>, AgentError> {
        self.machines
            .lock()
            .unwrap()
            .get(id)
            .ok_or_else(|| AgentError::UnknownMachine(id.into()))?
            .running
            .clone()
            .ok_or_else(|| AgentError::NotRunning(id.into()))
    }

    fn signal(&self, id: &str, req: &ferry_core::proto::SignalMachine) -> Result<(), AgentError> {
        let sig = ferry_runtime::parse_signal(&req.signal)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let running = Some(self.running_handle(id)?)
            .filter(|r| !r.exited())
            .ok_or_else(|| AgentError::NotRunning(id.into()))?;
        match running.signal(sig) {
            Err(ferry_runtime::RuntimeError::NotRunning) => Err(AgentError::NotRunning(id.into())),
            r => Ok(r?),
        }
    }

    fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        let running = self.running_handle(id)?;
        let out =
            ferry_runtime::exec_in(&running, &req.cmd, Duration::from_millis(req.timeout_ms))?;
        Ok(ExecResult {
            exit_code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    pub(crate) fn image_limits(&self) -> ferry_image::Limits {
        self.cfg.image_limits
    }

    /// Image digest -> the machines of this host whose config names it (running or not).
    pub(crate) fn image_users(
        &self,
    ) -> std::collections::BTreeMap<ferry_image::Digest, Vec<String>> {
        let mut out: std::collections::BTreeMap<_, Vec<String>> = Default::default();
        for (id, s) in self.machines.lock().unwrap().iter() {
            let Some(image) = &s.run.config.image else {
                continue;
            };
            let digest = crate::images::pinned_digest(image)
                .or_else(|| self.images.store().find(image).map(|r| r.digest));
            if let Some(d) = digest {
                out.entry(d).or_default().push(id.clone());
            }
        }
        out
    }

    /// See [`metrics`]. Built per scrape: the counters live in the kernel and the table here.
    fn metrics_text(&self) -> Result<String, AgentError> {
        use prometheus_client::encoding::text::encode;
        use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
        use prometheus_client::registry::Registry;
        type Labels = Vec<(String, String)>;
        let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let mut reg = Registry::with_prefix("ferry_agent");
        let machines = self.list();
        let running = machines.iter().filter(|m| m.running).count();
        let by_state = Family::<Labels, Gauge>::default();
        by_state
            .get_or_create(&label("state", "running"))
            .set(running as i64);
        by_state
            .get_or_create(&label("state", "not_running"))
            .set((machines.len() - running) as i64);
        reg.register("machines", "Machines on this host", by_state);
        let drops = Family::<Labels, Counter>::default();
        let rewrites = Family::<Labels, Counter>::default();
        for (stat, n) in self.host.stats()? {
            let name = stat.name().trim_start_matches("dropped_");
            if stat.is_drop() {
                drops.get_or_create(&label("reason", name)).inc_by(n);
            } else {
                rewrites.get_or_create(&label("kind", name)).inc_by(n);
            }
        }
        reg.register(
            "dataplane_drops",
            "Packets the data plane dropped, by reason",
            drops,
        );
        reg.register(
            "dataplane_rewrites",
            "Packets the data plane rewrote, by kind",
            rewrites,
        );
        let dns = Family::<Labels, Counter>::default();
        for (code, n) in self.dns.answered().into_iter().enumerate() {
            if n > 0 {
                let rcode = ferry_dns::ZoneData::rcode_name(code);
                dns.get_or_create(&label("rcode", &rcode)).inc_by(n);
            }
        }
        reg.register(
            "dns_responses",
            "Answers of this host's .internal DNS to its machines, by response code",
            dns,
        );
        let mut out = String::new();
        encode(&mut out, &reg)
            .map_err(|e| AgentError::Invalid(format!("encoding metrics: {e}")))?;
        Ok(out)
    }

    fn list(&self) -> Vec<LocalMachine> {
        let t = self.machines.lock().unwrap();
        t.iter()
            .map(|(id, s)| LocalMachine {
                id: id.clone(),
                instance_id: s.run.instance_id.clone(),
                running: s.running.as_ref().is_some_and(|r| !r.exited()),
                pid: s.running.as_ref().map(|r| r.pid()),
            })
            .collect()
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(
                "/v1/machines",
                get(|State(a): Shared| async move { Json(a.list()) }),
            )
            .route("/v1/machines/{id}/start", post(start))
            .route("/v1/machines/{id}/prepare", post(prepare))
            .route("/v1/machines/{id}/stage", post(stage))
            .route("/v1/machines/{id}/stop", post(stop))
            .route("/v1/machines/{id}/destroy", post(destroy))
            .route("/v1/machines/{id}/fence", post(fence))
            .route("/v1/machines/{id}/exec", post(exec))
            .route("/v1/machines/{id}/signal", post(signal))
            .route("/v1/machines/{id}/logs", post(logs))
            .route("/v1/bridge/sync", post(bridge_sync))
            .route("/v1/state", get(agent_state))
            .route("/metrics", get(metrics))
            .route("/v1/bridge/hits", get(bridge_hits))
            .route("/v1/volumes/expect", post(volume_expect))
            .route("/v1/volumes/send", post(volume_send))
            .route("/v1/volumes/progress/{session}", get(volume_progress))
            .route("/v1/volumes/remove", post(volume_remove))
            .route("/v1/images", get(crate::images::list))
            .route("/v1/images/pull", post(crate::images::pull))
            .route("/v1/images/remove", post(crate::images::remove))
            .with_state(self)
    }
}

/// Runs blocking machine work off the async workers (it may wait on processes for minutes).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
        .map(Json)
        .map_err(api_err)
}

/// A start or prepare names one machine in its path and in its body: the same one.
fn same_machine(id: &str, run: &RunMachine) -> Result<(), ApiError> {
    if run.id != id {
        return Err(ApiError::invalid("machine id in path and body differ"));
    }
    Ok(())
}

async fn start(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(run): Json<RunMachine>,
) -> Result<Json<serde_json::Value>, ApiError> {
    same_machine(&id, &run)?;
    blocking(move || {
        let mut run = run;
        run.volume_dirs = a.volume_dirs(&run)?;
        let dirs = run.volume_dirs.clone();
        let mut phases = Phases::default();
        let r = a.start_machine_timed(run, &mut phases);
        // Test hook: the machine runs but the server never hears so.
        ferry_core::crash_point("agent-start");
        r.map(|pid| serde_json::json!({"pid": pid, "volume_dirs": dirs, "phases": phases.done}))
    })
    .await
}

async fn prepare(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(run): Json<RunMachine>,
) -> Result<Json<serde_json::Value>, ApiError> {
    same_machine(&id, &run)?;
    blocking(move || {
        a.prepare_machine(run)
            .map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

async fn stage(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(run): Json<RunMachine>,
) -> Result<Json<serde_json::Value>, ApiError> {
    same_machine(&id, &run)?;
    blocking(move || {
        let mut run = run;
        run.volume_dirs = a.volume_dirs(&run)?;
        let r = a.stage_machine(run);
        // Test hook: the machine is staged but the server never hears so.
        ferry_core::crash_point("agent-staged");
        r.map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

async fn stop(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<StopMachine>,
) -> Result<Json<ExitInfo>, ApiError> {
    blocking(move || {
        ferry_core::crash_point("agent-stop"); // test hook: asked to stop, dies first
        a.stop_machine(&id, &req)
    })
    .await
}

async fn fence(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        a.fence_machine(&id)
            .map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

async fn destroy(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let r = a.destroy_machine(&id);
        ferry_core::crash_point("agent-destroy"); // test hook: done, but nobody hears so
        r.map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

async fn volume_expect(
    State(a): Shared,
    Json(req): Json<ferry_core::proto::VolumeExpect>,
) -> Result<Json<ferry_core::proto::VolumeExpected>, ApiError> {
    blocking(move || a.volumes.expect(req)).await
}

async fn volume_send(
    State(a): Shared,
    Json(req): Json<ferry_core::proto::VolumeSend>,
) -> Result<Json<ferry_core::proto::VolumeRound>, ApiError> {
    blocking(move || a.volumes.send(req)).await
}

async fn volume_progress(
    State(a): Shared,
    UrlPath(session): UrlPath<String>,
) -> Json<ferry_core::proto::VolumeProgress> {
    Json(a.volumes.progress(&session))
}

async fn volume_remove(
    State(a): Shared,
    Json(req): Json<ferry_core::proto::VolumeRemove>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        a.volumes
            .remove(&req.dir)
            .map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

/// `GET /metrics`: this host's machines by state, and the data plane's counters (drops by
/// reason, rewrites by kind) read from the pinned BPF map, as OpenMetrics text.
async fn metrics(State(a): Shared) -> Result<impl axum::response::IntoResponse, ApiError> {
    let text = blocking(move || a.metrics_text()).await?.0;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

async fn signal(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<ferry_core::proto::SignalMachine>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        a.signal(&id, &req)
            .map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

async fn logs(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(q): Json<ferry_core::proto::LogQuery>,
) -> Result<Json<Vec<ferry_core::proto::LogRecord>>, ApiError> {
    blocking(move || a.read_logs(&id, &q)).await
}

async fn exec(
    State(a): Shared,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<ExecRequest>,
) -> Result<Json<ExecResult>, ApiError> {
    blocking(move || a.exec(&id, &req)).await
}

impl Agent {
    /// (machine ID, network ID, namespace) of every machine whose namespace exists now.
    fn machine_namespaces(&self) -> Vec<(String, u32, NetNs)> {
        let t = self.machines.lock().unwrap();
        t.iter()
            .map(|(id, s)| {
                (
                    id.clone(),
                    s.run.network_id,
                    NetNs::named(&self.netns_name(s.run.machine_field)),
                )
            })
            .filter(|(_, _, ns)| ns.exists())
            .collect()
    }

    /// The v2 cgroup ID of each machine on this host.
    fn cgroup_ids(&self) -> HashMap<String, u64> {
        let ids: Vec<String> = self.machines.lock().unwrap().keys().cloned().collect();
        ids.into_iter()
            .filter_map(|id| Some((id.clone(), self.cgroup_id(&id)?)))
            .collect()
    }

    /// The v2 cgroup ID of one machine, if its cgroup exists.
    fn cgroup_id(&self, id: &str) -> Option<u64> {
        let cg = MachineCgroup::open(&self.cgroups, &self.cgroup_name(id)).ok()??;
        ferry_ebpf::bridge::cgroup_id(cg.v2_dir()?).ok()
    }

    /// Makes the host's bridge maps equal to `sync` (the server sends the whole state).
    pub(crate) fn apply_bridge(&self, sync: &BridgeSync) -> Result<(), AgentError> {
        let _one = self.bridge_apply.lock().unwrap();
        let last = self
            .bridge_applied
            .lock()
            .unwrap()
            .get(&sync.origin)
            .copied();
        if !sync.supersedes(last) {
            tracing::info!(
                "skipping a bridge state of {} read before one applied ({} < {last:?})",
                sync.origin,
                sync.generation
            );
            return Ok(());
        }
        self.apply_bridge_state(sync)?;
        self.bridge_applied
            .lock()
            .unwrap()
            .insert(sync.origin.clone(), sync.generation);
        Ok(())
    }

    fn apply_bridge_state(&self, sync: &BridgeSync) -> Result<(), AgentError> {
        let previous = std::mem::replace(&mut *self.bridge_state.lock().unwrap(), sync.clone());
        if self.cfg.bridge_mode == crate::BridgeMode::Nft {
            let gate = |s: &BridgeSync, id: &str| s.gates.get(id).copied().unwrap_or(true);
            for (id, net, ns) in self.machine_namespaces() {
                // A table is replaced whole, counters included: one whose rules did not change
                // is left alone, or every sync (the watch sends one on any change of the host's
                // state) would zero the hits that tell who still dials an old address.
                let rules = crate::nft::ruleset(net, gate(sync, &id), &sync.mappings);
                let before = crate::nft::ruleset(net, gate(&previous, &id), &previous.mappings);
                if rules == before && previous.gates.contains_key(&id) {
                    continue;
                }
                crate::nft::apply(&ns, net, gate(sync, &id), &sync.mappings)?;
            }
            return Ok(());
        }
        // Only the gates that differ from what the map holds are written (see `gates_written`);
        // a machine whose cgroup does not exist yet gets its gate when it starts.
        let changed: Vec<(String, bool)> = {
            let written = self.gates_written.lock().unwrap();
            sync.gates
                .iter()
                .filter(|(id, on)| written.get(*id) != Some(*on))
                .map(|(id, on)| (id.clone(), *on))
                .collect()
        };
        let nets: HashMap<String, (NetworkId, std::net::Ipv6Addr)> = {
            let machines = self.machines.lock().unwrap();
            changed
                .iter()
                .filter_map(|(id, _)| {
                    let s = machines.get(id)?;
                    Some((
                        id.clone(),
                        (
                            NetworkId::new(s.run.network_id).ok()?,
                            s.run.private_ip.parse().ok()?,
                        ),
                    ))
                })
                .collect()
        };
        let cgroups: HashMap<String, u64> = nets
            .keys()
            .filter_map(|id| Some((id.clone(), self.cgroup_id(id)?)))
            .collect();
        let mut guard = self.bridge.lock().unwrap();
        let Some(b) = guard.as_mut() else {
            return Ok(());
        };
        let e = |e: ferry_ebpf::bridge::BridgeError| AgentError::Invalid(format!("bridge: {e}"));
        let want: Vec<(NetworkId, std::net::Ipv6Addr, std::net::Ipv6Addr, bool)> = sync
            .mappings
            .iter()
            .filter_map(|m| {
                Some((
                    NetworkId::new(m.network_id).ok()?,
                    m.old.parse().ok()?,
                    m.new.parse().ok()?,
                    m.retired,
                ))
            })
            .collect();
        for have in b.mappings().map_err(e)? {
            if !want
                .iter()
                .any(|w| w.0 == have.net && w.1 == have.old && w.2 == have.new)
            {
                b.unmap(have.net, have.old).map_err(e)?;
            }
        }
        for (net, old, new, retired) in want {
            b.map(net, old, new).map_err(e)?;
            if retired {
                b.retire(net, old).map_err(e)?;
            }
        }
        for (id, enabled) in changed {
            if let (Some(cid), Some((net, addr))) = (cgroups.get(&id), nets.get(&id)) {
                b.set_machine(*cid, *net, *addr, enabled).map_err(e)?;
                self.gates_written.lock().unwrap().insert(id, enabled);
            }
        }
        Ok(())
    }

    /// Uses of old addresses by this host's machines.
    fn bridge_hits(&self) -> Result<Vec<BridgeHit>, AgentError> {
        if self.cfg.bridge_mode == crate::BridgeMode::Nft {
            return self.nft_hits();
        }
        let by_cgroup: HashMap<u64, String> = self
            .cgroup_ids()
            .into_iter()
            .map(|(id, cid)| (cid, id))
            .collect();
        let guard = self.bridge.lock().unwrap();
        let Some(b) = guard.as_ref() else {
            return Ok(vec![]);
        };
        let hits = b
            .hits()
            .map_err(|e| AgentError::Invalid(format!("bridge: {e}")))?;
        let ms = |ns: u64| {
            ferry_ebpf::bridge::boot_ns_to_system_time(ns)
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        Ok(hits
            .into_iter()
            .filter_map(|h| {
                Some(BridgeHit {
                    network_id: h.net.get(),
                    old: h.old.to_string(),
                    machine_id: by_cgroup.get(&h.caller_cgroup_id)?.clone(),
                    count: h.count,
                    first_use: ms(h.first_ns),
                    last_use: ms(h.last_ns),
                })
            })
            .collect())
    }
}

impl Agent {
    /// nft counters count packets, and have no timestamps: the agent notes when each counter
    /// first moved and last moved, as seen at read time.
    fn nft_hits(&self) -> Result<Vec<BridgeHit>, AgentError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut seen = self.nft_seen.lock().unwrap();
        let mut out = Vec::new();
        for (id, net, ns) in self.machine_namespaces() {
            for (old, packets) in crate::nft::counters(&ns)? {
                if packets == 0 {
                    continue;
                }
                let e = seen.entry((id.clone(), old)).or_insert((0, now, now));
                if packets != e.0 {
                    e.0 = packets;
                    e.2 = now;
                }
                out.push(BridgeHit {
                    network_id: net,
                    old: old.to_string(),
                    machine_id: id.clone(),
                    count: packets,
                    first_use: e.1,
                    last_use: e.2,
                });
            }
        }
        Ok(out)
    }
}

async fn bridge_sync(
    State(a): Shared,
    Json(sync): Json<BridgeSync>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        a.apply_bridge(&sync)
            .map(|()| serde_json::json!({"ok": true}))
    })
    .await
}

/// `GET /v1/state`: the servers, the watch, and the bridge state this host holds now.
async fn agent_state(State(a): Shared) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "host": format!("{:x}", a.cfg.host_id.get()),
        "servers": a.servers.urls(),
        "watch": a.watch_status.lock().unwrap().clone(),
        "bridge": a.bridge_state.lock().unwrap().clone(),
    }))
}

async fn bridge_hits(State(a): Shared) -> Result<Json<Vec<BridgeHit>>, ApiError> {
    blocking(move || a.bridge_hits()).await
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| AgentError::io(format!("renaming to {}", path.display()), e))
}

/// In a machine's run directory: its instance moved away (`fence_machine`).
const FENCED: &str = "fenced";

/// The phases of one start, each timed from the end of the one before.
struct Phases {
    since: std::time::Instant,
    done: std::collections::BTreeMap<&'static str, f64>,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            since: std::time::Instant::now(),
            done: Default::default(),
        }
    }
}

impl Phases {
    /// Ends phase `name` now (seconds since the previous one ended).
    fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done
            .insert(name, now.duration_since(self.since).as_secs_f64());
        self.since = now;
    }
}
