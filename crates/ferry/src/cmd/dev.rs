//! `ferry dev`: a whole fleet on this box (API server, N host namespaces, one agent process per
//! host, the embedded store), with a demo; `ferry dev clean` removes what ferry left behind.

use anyhow::{bail, Context, Result};
use ferry_core::machines;
use ferry_net::{netns, DevFleet, Mode};
use ferry_store::{SqliteStore, Store};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    cmd: Option<DevCmd>,
    /// How many hosts (network namespaces joined by a fabric bridge, one agent each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    hosts: u32,
    /// Where the store (SQLite), volumes and run directories live. Starting again on the same
    /// directory brings the fleet back: machines that were started run again, same IDs and
    /// addresses.
    #[arg(long, default_value = "/var/lib/ferry/dev")]
    state_dir: PathBuf,
    /// Fleet name: prefixes every namespace (`ferry-<name>-...`) and BPF pin of this fleet.
    #[arg(long, default_value = "dev")]
    name: String,
    /// The API listener (the CLI finds it through FERRY_API or --api).
    #[arg(long, default_value = "127.0.0.1:4280")]
    listen: std::net::SocketAddr,
    /// The operator's `.internal` DNS listener (UDP and TCP; every org's names).
    #[arg(long, default_value = "127.0.0.1:4253")]
    dns_listen: std::net::SocketAddr,
    /// How the address-mapping bridge is done on every host: cgroup eBPF, or nftables DNAT.
    #[arg(long, value_enum, default_value = "ebpf")]
    bridge_mode: super::agent::BridgeModeArg,
    /// A registry the fleet pulls images from over plain HTTP (repeatable), e.g. a
    /// `docker-registry` on 127.0.0.1:5000 (loopback registries are plain HTTP anyway; this
    /// also covers other addresses). Then: `ferry machine run --app web --image ADDR/repo:tag`.
    #[arg(long, value_name = "ADDR")]
    registry: Vec<String>,
    /// Registry credentials, a JSON file: `{"registry.example:5000": {"username": "u",
    /// "password": "p"}, "other.example": {"token": "..."}}`. Kept in the store, sent to agents
    /// only with a pull, never logged or shown (`ferry image registry list` shows the kind).
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
    /// The demo also runs a machine from this OCI image (with its own command), e.g.
    /// `--registry 127.0.0.1:5000 --demo-image 127.0.0.1:5000/web:1`.
    #[arg(long, value_name = "REF")]
    demo_image: Option<String>,
    /// A directory below which operators' directory volumes (`ferry volume create --host-dir`,
    /// `--volume /dir:/path`) may be (repeatable). None by default: such a volume is a host
    /// directory mounted read-write into a machine, so only directories set aside for it.
    #[arg(long, value_name = "DIR")]
    host_dir_root: Vec<PathBuf>,
    /// Where the fleet's state lives: `sqlite://PATH` (default: `ferry.db` in the state
    /// directory) or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (several servers can share one
    /// etcd cluster; etcd needs `--max-txn-ops` of 1024 or more).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The largest compressed image layer a host accepts, in MiB.
    #[arg(long, default_value_t = 2048)]
    image_max_layer_mb: u64,
    /// Skip the demo apps on a fresh state directory.
    #[arg(long)]
    no_demo: bool,
    /// Run the demo, print the result, stop everything and exit (for scripts and CI).
    #[arg(long)]
    exit_after_demo: bool,
    /// Only hosts and agents, for servers that run elsewhere (`ferry server`, several of them
    /// on one etcd): no API, store, DNS or demo of its own; the agents register with, report to
    /// and watch the first of these servers that answers (their agent listeners,
    /// comma-separated `https://` URLs, trusted through FERRY_SERVER_CA). Each host joins once
    /// (its ID and certificate are kept in the state directory). Stopping it kills its hosts' machines
    /// and removes the hosts (the servers keep their records). Machines get no `fdaa::3` DNS in
    /// this mode (by default `ferry dev`'s own server answers there, and there is none here);
    /// ask a server's `--dns-listen` instead.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        conflicts_with_all = ["store", "demo_image", "registry", "registry_auth", "host_dir_root"]
    )]
    control_plane: Option<String>,
    /// With `--control-plane`: the join token its agents present to those servers (a
    /// `ferry server` writes one to `join.token` in its state directory).
    #[arg(
        long,
        env = "FERRY_JOIN_TOKEN",
        hide_env_values = true,
        requires = "control_plane"
    )]
    join_token: Option<String>,
}

#[derive(clap::Subcommand)]
enum DevCmd {
    /// Remove everything ferry created on this machine: `ferry-*` namespaces (with their links,
    /// routes and TC programs), BPF pins under /sys/fs/bpf/ferry, machine cgroups, and
    /// processes still running in them. Safe to run any time no fleet is in use.
    Clean,
}

pub fn run(args: DevArgs) -> Result<ExitCode> {
    if let Some(DevCmd::Clean) = args.cmd {
        let mut removed = Vec::new();
        if let Ok(layout) = ferry_runtime::CgroupLayout::discover() {
            for id in layout.machine_ids() {
                if let Ok(Some(cg)) = ferry_runtime::MachineCgroup::open(&layout, &id) {
                    cg.kill_all();
                    if cg.remove().is_ok() {
                        removed.push(format!("cgroup of machine {id}"));
                    }
                }
            }
        }
        removed.extend(ferry_net::clean_all().context("cleaning up")?);
        // Every ferry volume file system still mounted (their machines are gone by now).
        for m in ferry_agent::disk::unmount_volumes_under(std::path::Path::new("/")) {
            removed.push(format!("volume mount {}", m.display()));
        }
        if removed.is_empty() {
            println!("nothing to clean");
        }
        for r in removed {
            println!("removed {r}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ferry dev creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    if let Some(urls) = args.control_plane.clone() {
        return hosts_only(&args, &urls);
    }
    // A fleet whose namespaces exist: another `ferry dev` runs it (refuse), or one was killed
    // (take it over: its machines may still be running and its migrations half done).
    let adopt = !netns::list(&format!("ferry-{}-", args.name)).is_empty();
    if adopt {
        if let Some(pid) = live_ferry_pid(&args.state_dir.join("dev.pid")) {
            bail!(
                "fleet {:?} is run by `ferry dev` (pid {pid}): stop it first, or use another --name",
                args.name
            );
        }
        // (Only the default store lives in the state directory; a `--store` is found by URL.)
        if args.store.is_none() && !args.state_dir.join("ferry.db").exists() {
            bail!(
                "a fleet named {:?} exists on this machine but {} has no store for it: run \
                 `ferry dev clean`, or use another --name or --state-dir",
                args.name,
                args.state_dir.display()
            );
        }
        eprintln!(
            "fleet {:?} was left running by a `ferry dev` that ended without stopping it: taking it over",
            args.name
        );
    }
    let sigs = claim(&args)?;

    let store: Arc<dyn Store> = match &args.store {
        Some(url) => ferry_store::open(url).with_context(|| format!("--store {url}"))?,
        None => Arc::new(SqliteStore::open(args.state_dir.join("ferry.db"))?),
    };
    let t0 = Instant::now();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Each host's `.internal` DNS at fdaa::3 is served by its own agent, from the snapshots
    // this control plane publishes; the server answers only the operator's listener.
    let cp = super::control::ControlPlane::start(
        &rt,
        store.clone(),
        &args.state_dir,
        args.state_dir.join("volumes"),
        args.listen,
        &super::control::AgentListen {
            addr: "127.0.0.1:0".parse()?,
            names: vec![],
        },
        Some(args.dns_listen),
    )?;
    let ctx = cp.ctx.clone();
    ctx.allow_host_dirs(args.host_dir_root.clone())
        .context("--host-dir-root")?;
    super::image::apply_registry_flags(&ctx, &args.registry, args.registry_auth.as_deref())?;
    let api = format!(
        "{}://{}",
        if cp.tls { "https" } else { "http" },
        args.listen
    );
    let ca = cp.tls.then(|| super::tls::ca_file(&args.state_dir));
    // The CLI finds the admin token without being told (docs/design.md#tokens): the one-command
    // experience stays.
    let cli_token = super::client::token_file(&api);
    if let Some(f) = &cli_token {
        super::control::write_secret(f, &cp.admin_token)?;
    }
    // And the CA its certificate chains to, beside the token.
    if let (Some(ca), Some(dst)) = (&ca, super::client::ca_file(&api)) {
        if let Some(d) = dst.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(ca, &dst).with_context(|| format!("copying the CA to {}", dst.display()))?;
    }

    // The hosts join as any host does (docs/design.md#tokens): through this control plane's
    // agent listener, with its join token; each gets a host ID the store never hands out again
    // and a certificate, both kept in its directory (and the IDs in `<state>/host-ids`), so a
    // restart joins only the hosts it lacks.
    let fleet_ca = super::tls::fleet_ca(&args.state_dir)?;
    upgrade_host_ids(&args.state_dir, store.as_ref(), &fleet_ca)?;
    let host_ids = host_ids(
        &args.state_dir,
        args.hosts,
        std::slice::from_ref(&cp.agent_url),
        &cp.join_token,
        &super::tls::ca_file(&args.state_dir),
    )?;
    // Endpoints of a previous run are stale until the agents register again.
    for id in &host_ids {
        if let Ok(mut h) = store.get_host(*id) {
            h.endpoint.clear();
            store.put_host(&h)?;
        }
    }
    let hosts = &host_ids;
    let fleet = if adopt {
        // The old agents still serve (they were the dead process's children): replace them, as
        // after an agent crash; they reattach to the machines from their run directories.
        for h in hosts {
            let pidfile = host_dir(&args.state_dir, h.get()).join("agent.pid");
            if let Some(pid) = live_ferry_pid(&pidfile) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                wait_for(Duration::from_secs(5), || {
                    live_ferry_pid(&pidfile).is_none()
                });
            }
        }
        DevFleet::adopt(&args.name, Mode::Swap, hosts)?
    } else {
        let mut fleet = DevFleet::create(&args.name, Mode::Swap)?;
        for id in hosts {
            fleet.add_host_with_id(*id)?;
        }
        fleet
    };
    let mut fleet = fleet;

    let agents = Agents::start(
        &args,
        &hosts.iter().map(|h| h.get()).collect::<Vec<_>>(),
        &cp.agent_url,
        &cp.join_token,
        Some(&super::tls::ca_file(&args.state_dir)),
    )?;
    let registered = wait_for(Duration::from_secs(20), || {
        store
            .list_hosts()
            .map(|hs| hs.iter().all(|h| !h.endpoint.is_empty()))
            .unwrap_or(false)
    });
    if !registered {
        agents.stop();
        bail!("the host agents did not register within 20 s (see the log above)");
    }

    // Machines that were running when the fleet last stopped run again.
    let resume: Vec<String> = store
        .kv_get("dev/resume")?
        .map(|s| serde_json::from_str(&s).unwrap_or_default())
        .unwrap_or_default();
    let mut resumed = 0;
    for (id, r) in rt.block_on(machines::resume(&ctx, &resume)) {
        match r {
            Ok(()) => resumed += 1,
            Err(e) => eprintln!("machine {id} did not come back: {e}"),
        }
    }
    store.kv_put("dev/resume", "[]")?;
    // Migrations a crash or a stop interrupted carry on (or roll back) from their last step.
    cp.resume(&rt);

    println!(
        "ferry dev: fleet {:?}, {} hosts, API {api}, DNS {} (and [fdaa::3]:53 in every machine), state in {} (up in {:.1?}{})",
        args.name,
        hosts.len(),
        args.dns_listen,
        args.state_dir.display(),
        t0.elapsed(),
        if resumed > 0 {
            format!(", {resumed} machines resumed")
        } else {
            String::new()
        }
    );
    let mut ok = true;
    if !args.no_demo && store.list_apps(None)?.is_empty() {
        // A demo that errs (an API call failed) still tears the fleet down below.
        ok = match rt.block_on(demo(
            &api,
            &cp.admin_token,
            ca.as_deref(),
            args.demo_image.as_deref(),
        )) {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                false
            }
        };
    }
    if !args.exit_after_demo {
        println!("\nexplore (in another shell):");
        println!("  export FERRY_API={api}");
        println!(
            "  export FERRY_TOKEN={}   # an admin token; the CLI also reads it from {}",
            cp.admin_token,
            cli_token.as_ref().map_or_else(
                || super::control::admin_token_file(&args.state_dir)
                    .display()
                    .to_string(),
                |f| f.display().to_string()
            )
        );
        println!(
            "  ferry machine list          ferry host list          ferry machine status <id>"
        );
        println!("  ferry machine run --app web -- python3 -m http.server 8080 --bind ::");
        for r in &args.registry {
            println!(
                "  ferry machine run --app web --image {r}/<repository>:<tag>   ferry image list"
            );
        }
        println!("  ferry machine exec <id> -- getent ahostsv6 hello.internal");
        println!("  ferry machine logs <id> -f");
        println!(
            "  open '{api}/ui#token={}'   # the live dashboard (the page keeps the token for its tab)",
            cp.admin_token
        );
        println!(
            "  dig @{} -p {} +short AAAA hello.internal",
            args.dns_listen.ip(),
            args.dns_listen.port()
        );
        println!("Ctrl-C stops every machine (its stop_config) and the fleet; `ferry dev` again brings it back.");
        let sig = sigs.wait()?;
        eprintln!("{sig:?}: stopping machines");
    }
    let stopped = rt.block_on(machines::stop_all(&ctx));
    store.kv_put("dev/resume", &serde_json::to_string(&stopped)?)?;
    eprintln!(
        "stopped {} machines; stopping agents and the fleet",
        stopped.len()
    );
    agents.stop();
    // Only this fleet's machines: other fleets may run on this machine at the same time.
    let ours: Vec<String> = store
        .list_machines_all(None)?
        .into_iter()
        .map(|m| m.id)
        .collect();
    remove_machine_cgroups(&ours);
    // The volumes' file systems: mounted again by the agents when the fleet comes back.
    ferry_agent::disk::unmount_volumes_under(&args.state_dir);
    fleet.teardown()?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What every `ferry dev` does first: blocks the stop signals before any thread starts (so
/// every thread inherits the mask and the main thread alone receives them through sigwait),
/// and makes the state directory with this process's pid in it. Answers the signals to wait on.
fn claim(args: &DevArgs) -> Result<nix::sys::signal::SigSet> {
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.thread_block()?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    std::fs::write(
        args.state_dir.join("dev.pid"),
        std::process::id().to_string(),
    )?;
    Ok(sigs)
}

/// `ferry dev --control-plane URLS`: hosts and agents only, for servers started elsewhere.
fn hosts_only(args: &DevArgs, urls: &str) -> Result<ExitCode> {
    let urls: Vec<String> = urls
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .collect();
    if !netns::list(&format!("ferry-{}-", args.name)).is_empty() {
        bail!(
            "a fleet named {:?} exists on this machine: stop it first, or use another --name",
            args.name
        );
    }
    let sigs = claim(args)?;
    let t0 = Instant::now();
    let join = args.join_token.clone().unwrap_or_default();
    anyhow::ensure!(
        !join.is_empty(),
        "--control-plane needs --join-token (or FERRY_JOIN_TOKEN): the servers' agent listeners \
         let hosts join with one (a `ferry server` writes one to join.token in its state \
         directory)"
    );
    let ca = std::env::var_os("FERRY_SERVER_CA")
        .map(PathBuf::from)
        .context(
            "--control-plane needs FERRY_SERVER_CA: the fleet CA the servers' certificates chain \
             to (a server's <state dir>/tls/ca.pem)",
        )?;
    let ids = host_ids(&args.state_dir, args.hosts, &urls, &join, &ca)?;
    let mut fleet = DevFleet::create(&args.name, Mode::Swap)?;
    for id in &ids {
        fleet.add_host_with_id(*id)?;
    }
    let raw: Vec<u32> = ids.iter().map(|h| h.get()).collect();
    let agents = Agents::start(args, &raw, &urls.join(","), &join, Some(&ca))?;
    // Registered: every agent watches one of the servers.
    let registered = wait_for(Duration::from_secs(30), || {
        all_registered(&urls, &args.state_dir, &raw)
    });
    if !registered {
        agents.stop();
        fleet.teardown()?;
        bail!("the host agents did not register with {urls:?} within 30 s (see the log above)");
    }
    println!(
        "ferry dev: fleet {:?}, {} hosts ({}), agents of {} (up in {:.1?}); Ctrl-C stops it",
        args.name,
        raw.len(),
        raw.iter()
            .map(|h| format!("{h:x}"))
            .collect::<Vec<_>>()
            .join(" "),
        urls.join(","),
        t0.elapsed()
    );
    let sig = sigs.wait()?;
    eprintln!("{sig:?}: stopping agents, machines and the fleet");
    agents.stop();
    // The machines of this fleet's hosts, from the agents' run directories.
    let mut ours = Vec::new();
    for h in &raw {
        let dir = args
            .state_dir
            .join("hosts")
            .join(format!("{h:x}"))
            .join("machines");
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            ours.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    remove_machine_cgroups(&ours);
    ferry_agent::disk::unmount_volumes_under(&args.state_dir);
    fleet.teardown()?;
    Ok(ExitCode::SUCCESS)
}

/// This fleet's host IDs: each host joined once through one of `urls` (the servers' agent
/// listeners), which allocated its ID; its identity is kept in its directory and the IDs in
/// `<state>/host-ids`, so a restart joins only the hosts it lacks.
fn host_ids(
    state: &std::path::Path,
    n: u32,
    urls: &[String],
    join_token: &str,
    ca: &std::path::Path,
) -> Result<Vec<ferry_addr::HostId>> {
    let file = state.join("host-ids");
    let mut ids: Vec<ferry_addr::HostId> = Vec::new();
    for s in std::fs::read_to_string(&file)
        .unwrap_or_default()
        .split_whitespace()
    {
        let Some(h) = u32::from_str_radix(s, 16)
            .ok()
            .and_then(|v| ferry_addr::HostId::new(v).ok())
        else {
            continue;
        };
        // Only hosts whose identity is whole (a join that died half-way is done again).
        if matches!(ferry_agent::identity::load(&host_dir(state, h.get())), Ok(Some(id)) if id.host_id == h)
        {
            ids.push(h);
        }
    }
    if ids.len() < n as usize {
        let pem = std::fs::read(ca).with_context(|| format!("FERRY_SERVER_CA {}", ca.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        while ids.len() < n as usize {
            let me = rt
                .block_on(ferry_agent::identity::join(
                    urls,
                    join_token,
                    &pem,
                    "dev",
                    &["127.0.0.1".parse()?],
                ))
                .context("joining a host")?;
            ferry_agent::identity::save(&host_dir(state, me.host_id.get()), &me)?;
            ids.push(me.host_id);
            std::fs::write(
                &file,
                ids.iter()
                    .map(|h| format!("{:x}\n", h.get()))
                    .collect::<String>(),
            )?;
        }
    }
    ids.truncate(n as usize);
    Ok(ids)
}

/// A host's directory (its agent's state directory).
fn host_dir(state: &std::path::Path, host: u32) -> PathBuf {
    state.join("hosts").join(format!("{host:x}"))
}

/// A state directory from before hosts joined (its hosts are in the store, `host-ids` is not
/// there): those hosts keep their IDs (their machines are on them), each given the
/// certificate a join would give, and `host-ids` is written so later starts join as usual.
fn upgrade_host_ids(state: &std::path::Path, store: &dyn Store, ca: &ferry_pki::Ca) -> Result<()> {
    let file = state.join("host-ids");
    if file.exists() {
        return Ok(());
    }
    let old = store.list_hosts()?;
    if old.is_empty() {
        return Ok(());
    }
    for h in &old {
        let made = ca.issue_host(h.id.get(), &["127.0.0.1".parse()?])?;
        ferry_agent::identity::save(
            &host_dir(state, h.id.get()),
            &ferry_agent::identity::Identity {
                host_id: h.id,
                cert_pem: made.cert_pem,
                key_pem: made.key_pem,
                ca_pem: ca.pem().to_owned(),
            },
        )?;
    }
    std::fs::write(
        &file,
        old.iter()
            .map(|h| format!("{:x}\n", h.id.get()))
            .collect::<String>(),
    )?;
    Ok(())
}

/// Whether every host of `hosts` has its watch open on one of `urls` (its agent writes the
/// server to `watching`): a watch opens only for a host the server has registered, and a
/// server's host list would need an admin token.
fn all_registered(urls: &[String], state: &std::path::Path, hosts: &[u32]) -> bool {
    hosts.iter().all(|h| {
        std::fs::read_to_string(host_dir(state, *h).join("watching"))
            .is_ok_and(|s| urls.iter().any(|u| *u == s.trim()))
    })
}

fn remove_machine_cgroups(ids: &[String]) {
    if let Ok(layout) = ferry_runtime::CgroupLayout::discover() {
        // Agents name a machine's cgroup `<machine id>.h<host>`.
        for name in layout.machine_ids() {
            let owner = name.split('.').next().unwrap_or_default();
            if !ids.iter().any(|id| id == owner) {
                continue;
            }
            if let Ok(Some(cg)) = ferry_runtime::MachineCgroup::open(&layout, &name) {
                cg.kill_all();
                let _ = cg.remove();
            }
        }
    }
}

/// The pid in `pidfile` if that process is alive and is a `ferry` (not a recycled pid).
fn live_ferry_pid(pidfile: &std::path::Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie (state Z) is dead for our purposes.
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    (comm.trim() == "ferry" && state != "Z").then_some(pid)
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One `ferry agent` process per host, restarted if it dies (as systemd would on a real host).
struct Agents {
    children: Arc<Mutex<Vec<(u32, Child)>>>,
    stopping: Arc<AtomicBool>,
}

impl Agents {
    fn start(
        args: &DevArgs,
        hosts: &[u32],
        api: &str,
        join_token: &str,
        server_ca: Option<&std::path::Path>,
    ) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let spawn = {
            let (exe, name, dir, api, max_layer, join, ca) = (
                exe.clone(),
                args.name.clone(),
                args.state_dir.clone(),
                api.to_owned(),
                args.image_max_layer_mb.to_string(),
                join_token.to_owned(),
                server_ca.map(|p| p.to_path_buf()),
            );
            let mode = match args.bridge_mode {
                super::agent::BridgeModeArg::Ebpf => "ebpf",
                super::agent::BridgeModeArg::Nft => "nft",
            };
            move |h: u32| -> std::io::Result<Child> {
                let sd = dir.join("hosts").join(format!("{h:x}"));
                std::fs::create_dir_all(&sd)?;
                let mut cmd = Command::new(&exe);
                // SAFETY: only async-signal-safe calls (sigprocmask) between fork and exec.
                unsafe {
                    use std::os::unix::process::CommandExt;
                    // ferry dev blocks SIGINT/SIGTERM for sigwait; agents must not inherit that.
                    cmd.pre_exec(|| {
                        nix::sys::signal::SigSet::all()
                            .thread_unblock()
                            .map_err(std::io::Error::from)
                    });
                }
                // A new agent says afresh which server it watches.
                let _ = std::fs::remove_file(sd.join("watching"));
                cmd.args(["agent", "--region", "dev"])
                    .args([
                        "--netns",
                        &format!("ferry-{name}-h{h:x}"),
                        "--fleet",
                        &format!("ferry-{name}"),
                    ])
                    .arg("--state-dir")
                    .arg(&sd)
                    .args(["--server", &api, "--bridge-mode", mode])
                    .args(["--image-max-layer-mb", &max_layer])
                    // In the environment, not on the command line, where anyone can read it.
                    .env("FERRY_JOIN_TOKEN", &join);
                if let Some(ca) = &ca {
                    cmd.env("FERRY_SERVER_CA", ca);
                }
                cmd.spawn()
            }
        };
        let mut children = Vec::new();
        for &h in hosts {
            children.push((h, spawn(h)?));
        }
        let children = Arc::new(Mutex::new(children));
        let stopping = Arc::new(AtomicBool::new(false));
        let (c, s) = (children.clone(), stopping.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let mut kids = c.lock().unwrap();
                if s.load(Ordering::Relaxed) {
                    break;
                }
                for (h, child) in kids.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        eprintln!("agent of host {h:x} exited ({status}); restarting it");
                        match spawn(*h) {
                            Ok(n) => *child = n,
                            Err(e) => eprintln!("restarting the agent of host {h:x}: {e}"),
                        }
                    }
                }
            }
        });
        Ok(Agents { children, stopping })
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut kids = self.children.lock().unwrap();
        for (_, c) in kids.iter_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for (_, c) in kids.iter_mut() {
            let _ = c.wait();
        }
    }
}

/// Two apps in one org (a web server and a client that calls it over its private address) and
/// one app in another org that cannot.
async fn demo(
    api: &str,
    token: &str,
    ca: Option<&std::path::Path>,
    demo_image: Option<&str>,
) -> Result<bool> {
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let mut http = reqwest::Client::builder()
        .default_headers(auth)
        .use_rustls_tls();
    if let Some(ca) = ca {
        http = http
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
    }
    let http = http.build()?;
    let post = |path: String, body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{api}{path}");
        async move {
            let r = http.post(&url).json(&body).send().await?;
            let status = r.status();
            let v: serde_json::Value = r.json().await?;
            if !status.is_success() {
                bail!("{url}: {}", v["error"]);
            }
            Ok::<_, anyhow::Error>(v)
        }
    };
    println!("\ndemo:");
    for (app, org) in [
        ("hello", "personal"),
        ("client", "personal"),
        ("intruder", "acme"),
    ] {
        post(
            "/v1/apps".into(),
            serde_json::json!({"app_name": app, "org_slug": org}),
        )
        .await?;
    }
    let server_py = r#"import http.server, os, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b = ("hello from machine %s at %s\n" % (os.environ["FERRY_MACHINE_ID"], os.environ["FERRY_PRIVATE_IP"])).encode()
        s.send_response(200); s.end_headers(); s.wfile.write(b)
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6
S(("::", 8080), H).serve_forever()
"#;
    let hosts: Vec<serde_json::Value> = http
        .get(format!("{api}/v1/hosts"))
        .send()
        .await?
        .json()
        .await?;
    let host = |i: usize| {
        hosts[i % hosts.len()]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let web = post(
        "/v1/apps/hello/machines".into(),
        serde_json::json!({"host": host(0), "config": {"init": {"cmd": ["python3", "-c", server_py]},
            "checks": {"web": {"type": "tcp", "port": 8080, "kind": "readiness"}}}}),
    )
    .await?;
    let sleeper = serde_json::json!({"init": {"cmd": ["sleep", "infinity"]}});
    let client = post(
        "/v1/apps/client/machines".into(),
        serde_json::json!({"host": host(1), "config": sleeper}),
    )
    .await?;
    let intruder = post(
        "/v1/apps/intruder/machines".into(),
        serde_json::json!({"host": host(2), "config": sleeper}),
    )
    .await?;
    let ip = web["private_ip"].as_str().unwrap_or_default().to_owned();
    for m in [&web, &client, &intruder] {
        println!(
            "  {:<9} {} {:<8} host {} {}",
            m["app"].as_str().unwrap_or(""),
            m["id"].as_str().unwrap_or(""),
            m["state"].as_str().unwrap_or(""),
            m["host"].as_str().unwrap_or(""),
            m["private_ip"].as_str().unwrap_or("")
        );
    }
    let fetch = |tries: u32, target: &str| {
        format!(
            r#"import urllib.request, time
err = None
for i in range({tries}):
    try:
        print(urllib.request.urlopen("http://{target}:8080/", timeout=2).read().decode(), end="")
        break
    except Exception as e:
        err = e
        time.sleep(0.1)
else:
    print("unreachable:", err)
    raise SystemExit(1)
"#
        )
    };
    let mut ok = true;
    let by_ip = format!("[{ip}]");
    for (who, m, target, expect) in [
        ("client (same org)", &client, "hello.internal", true),
        ("intruder (org acme)", &intruder, "hello.internal", false),
        ("intruder (org acme)", &intruder, by_ip.as_str(), false),
    ] {
        let script = fetch(if expect { 50 } else { 1 }, target);
        let r = post(
            format!(
                "/v1/apps/{}/machines/{}/exec",
                m["app"].as_str().unwrap_or(""),
                m["id"].as_str().unwrap_or("")
            ),
            serde_json::json!({"cmd": ["python3", "-c", script], "timeout": 30}),
        )
        .await?;
        let reached = r["exit_code"].as_i64() == Some(0);
        let out = r["stdout"].as_str().unwrap_or("").trim().to_owned();
        println!(
            "  {who} -> http://{target}:8080/: {}",
            if reached {
                out
            } else {
                format!("blocked ({out})")
            }
        );
        ok &= reached == expect;
    }

    // Move the web server to the third host: same ID, new address; its name and its old address
    // keep working for the client (DNS, and the bridge on the client's host).
    if hosts.len() < 2 {
        return Ok(ok); // nowhere to move it
    }
    let web_id = web["id"].as_str().unwrap_or_default();
    let to = host(hosts.len() - 1);
    let mig = post(
        format!("/v1/apps/hello/machines/{web_id}/migrate"),
        serde_json::json!({"to": to}),
    )
    .await?;
    let mig_id = mig["id"].as_str().unwrap_or_default().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let m: serde_json::Value = http
            .get(format!("{api}/v1/migrations/{mig_id}"))
            .send()
            .await?
            .json()
            .await?;
        if m["phase"] == "done" || m["phase"] == "rolled_back" || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "  migrated hello {web_id}: host {} -> {}, {} -> {}, {} (downtime {} ms)",
        done["from_host"].as_str().unwrap_or(""),
        done["to_host"].as_str().unwrap_or(""),
        done["old_ip"].as_str().unwrap_or(""),
        done["new_ip"].as_str().unwrap_or(""),
        done["phase"].as_str().unwrap_or("unfinished"),
        done["stats"]["downtime_ms"]
    );
    ok &= done["phase"] == "done";
    for target in ["hello.internal", by_ip.as_str()] {
        let r = post(
            format!(
                "/v1/apps/client/machines/{}/exec",
                client["id"].as_str().unwrap_or("")
            ),
            serde_json::json!({"cmd": ["python3", "-c", fetch(50, target)], "timeout": 30}),
        )
        .await?;
        let reached = r["exit_code"].as_i64() == Some(0);
        let out = r["stdout"].as_str().unwrap_or("").trim().to_owned();
        println!(
            "  client (same org) -> http://{target}:8080/ after the move: {}",
            if reached {
                out
            } else {
                format!("unreachable ({out})")
            }
        );
        ok &= reached;
    }
    if let Some(image) = demo_image {
        // A machine from an OCI image (pulled by its host from the --registry), its own command.
        post(
            "/v1/apps".into(),
            serde_json::json!({"app_name": "image-demo", "org_slug": "personal"}),
        )
        .await?;
        let m = post(
            "/v1/apps/image-demo/machines".into(),
            serde_json::json!({"config": {"image": image}}),
        )
        .await?;
        println!(
            "  image-demo {} from {} is {} on host {}",
            m["id"].as_str().unwrap_or(""),
            m["config"]["image"].as_str().unwrap_or(""),
            m["state"].as_str().unwrap_or(""),
            m["host"].as_str().unwrap_or("")
        );
        ok &= m["state"] == "started";
    }
    Ok(ok)
}
