//! `ferry agent` (one per host) and `ferry init` (PID 1 of every machine).

use anyhow::{Context, Result};
use ferry_addr::HostId;
use ferry_agent::{Agent, AgentConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// This host's ID (hex, 80000000 and above).
    #[arg(long)]
    host_id: String,
    #[arg(long, default_value = "dev")]
    region: String,
    /// The host's network namespace (dev fleets: `ferry dev` wires its fabric); the agent does
    /// its network work there. Without it, the agent works in its own namespace (a real host).
    #[arg(long, required_unless_present = "underlay")]
    netns: Option<String>,
    /// A real host: its address on the underlay network (IPv6, or IPv4), held by one of its
    /// interfaces. The agent then wires the fabric itself: the fabric programs on that
    /// interface, a VXLAN link over it (UDP 4789) for hosts that are not on-link or have an
    /// IPv4 underlay, and exactly one route per other host, kept current from the server.
    #[arg(long, value_name = "ADDR")]
    underlay: Option<std::net::IpAddr>,
    /// Prefix of machine namespaces and BPF pins (`ferry-<fleet>`).
    #[arg(long, default_value = "ferry-fleet")]
    fleet: String,
    /// Where this agent keeps machine run directories.
    #[arg(long)]
    state_dir: PathBuf,
    /// The API servers, comma-separated (`http://10.0.0.1:4280,http://10.0.0.2:4280`): the
    /// agent registers and reports to the first one that answers, skips those that are down,
    /// and holds its watch (the host's desired state) open on one of them, moving to the next
    /// when that one goes away.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        default_value = "http://127.0.0.1:4280"
    )]
    server: String,
    /// The join token the servers' agent routes require (`ferry token create --join`); from
    /// the environment rather than the command line, where every user can read it.
    #[arg(long, env = "FERRY_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The CA certificate (PEM file) that signed the servers' certificates, for `https://`
    /// servers (a `ferry server init` CA: `<state dir>/tls/ca.pem`).
    #[arg(long, env = "FERRY_SERVER_CA", value_name = "FILE")]
    server_ca: Option<PathBuf>,
    /// How the address-mapping bridge is done: cgroup eBPF, or nftables DNAT.
    #[arg(long, value_enum, default_value = "ebpf")]
    bridge_mode: BridgeModeArg,
    /// The volume receiver's TCP port on this host's fabric address (migrations copy volumes to
    /// it from other hosts).
    #[arg(long, default_value_t = 4290)]
    volume_port: u16,
    /// The largest compressed image layer a pull accepts, in MiB (bigger ones are refused with
    /// `image_too_big` before a byte is downloaded; a layer may unpack to 4x that).
    #[arg(long, default_value_t = 2048)]
    image_max_layer_mb: u64,
    /// A machine instance's output log rotates at this size, in KiB.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(4..=1 << 20))]
    log_file_kb: u64,
    /// Rotated log files kept per instance besides the current one (so an instance keeps at
    /// most (1 + this) x --log-file-kb of output).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=16))]
    log_keep: u32,
    /// Logs of machines that left this host (migrated or destroyed) are kept, oldest deleted
    /// first, up to this many MiB in all.
    #[arg(long, default_value_t = 256)]
    log_departed_mb: u64,
    /// Listen address for the server's calls (port 0: any free port). Default: port 4282 on
    /// the underlay address with --underlay, else 127.0.0.1:0.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BridgeModeArg {
    /// cgroup eBPF programs on every machine (the default).
    Ebpf,
    /// nftables DNAT in every machine's namespace (comparison; kernels without cgroup BPF).
    Nft,
}

pub fn run(args: AgentArgs) -> Result<ExitCode> {
    let id = u32::from_str_radix(&args.host_id, 16)
        .ok()
        .and_then(|v| HostId::new(v).ok());
    let servers = server_list(&args.server)?;
    if let Some(t) = &args.join_token {
        anyhow::ensure!(
            t.bytes().all(|b| b.is_ascii_graphic()),
            "--join-token (FERRY_JOIN_TOKEN): not a token"
        );
    }
    let server_ca = match &args.server_ca {
        Some(f) => {
            let pem = std::fs::read(f).with_context(|| format!("--server-ca {}", f.display()))?;
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--server-ca {}: not a PEM certificate", f.display()))?;
            Some(pem)
        }
        None => None,
    };
    let host_id = id.with_context(|| {
        format!(
            "--host-id {}: not a host ID (hex, 80000000 and above)",
            args.host_id
        )
    })?;
    std::fs::create_dir_all(&args.state_dir)?;
    std::fs::write(
        args.state_dir.join("agent.pid"),
        std::process::id().to_string(),
    )?;
    // Whatever mask the parent had, machines (spawned from here) must receive every signal.
    nix::sys::signal::SigSet::all().thread_unblock()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cfg = AgentConfig {
            host_id,
            region: args.region,
            host_netns: args.netns,
            underlay: args.underlay,
            fleet: args.fleet,
            state_dir: args.state_dir.clone(),
            servers,
            join_token: args.join_token.filter(|t| !t.is_empty()),
            server_ca,
            ferry_exe: std::env::current_exe()?,
            mtu: ferry_net::fleet::DEFAULT_MTU,
            volume_port: args.volume_port,
            image_limits: ferry_image::Limits {
                max_layer_bytes: args.image_max_layer_mb << 20,
                max_unpacked_layer_bytes: (args.image_max_layer_mb << 20).saturating_mul(4),
                ..Default::default()
            },
            logs: ferry_agent::LogPolicy {
                max_bytes: args.log_file_kb << 10,
                keep: args.log_keep,
                departed_bytes: args.log_departed_mb << 20,
            },
            bridge_mode: match args.bridge_mode {
                BridgeModeArg::Ebpf => ferry_agent::BridgeMode::Ebpf,
                BridgeModeArg::Nft => ferry_agent::BridgeMode::Nft,
            },
        };
        let handle = tokio::runtime::Handle::current();
        let agent = tokio::task::spawn_blocking(move || Agent::start(cfg, handle)).await??;
        let listen = args.listen.unwrap_or_else(|| match args.underlay {
            Some(a) => std::net::SocketAddr::new(a, 4282),
            None => "127.0.0.1:0".parse().expect("an address"),
        });
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        std::fs::write(args.state_dir.join("agent.addr"), &endpoint)?;
        // Serve, register (with whichever server is up, waiting while none is), then watch.
        let app = agent.clone().router();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            match agent.register(&endpoint).await {
                Ok(()) => break,
                // Refused (e.g. a host ID the fleet does not accept): say so, keep trying, as
                // an operator may fix the server side.
                Err(e) => {
                    tracing::warn!("registering: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                }
            }
        }
        tokio::spawn(agent.clone().watch_forever());
        tracing::info!("agent for host {:x} serving at {endpoint}", host_id.get());
        server.await??;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

/// `--server A,B`: each a base URL (`http://HOST:PORT`, no trailing slash kept).
fn server_list(s: &str) -> Result<Vec<String>> {
    let urls: Vec<String> = s
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .collect();
    for u in &urls {
        anyhow::ensure!(
            u.starts_with("http://") || u.starts_with("https://"),
            "--server {s}: {u:?} is not an http:// or https:// URL"
        );
    }
    Ok(urls)
}

pub fn init(args: ferry_runtime::InitArgs) -> Result<ExitCode> {
    let code = ferry_runtime::init_main(args);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
