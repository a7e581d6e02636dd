//! `ferry agent` (one per host) and `ferry init` (PID 1 of every machine).

use anyhow::{Context, Result};
use ferry_agent::identity::{Identity, IdentityError};
use ferry_agent::{Agent, AgentConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The region this host is in (sent when it joins and registers).
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
    /// Where this agent keeps machine run directories, and its identity (`identity/`: host ID,
    /// key and certificate, from its join).
    #[arg(long, default_value = "/var/lib/ferry/agent")]
    state_dir: PathBuf,
    /// The servers' agent listeners, comma-separated (`https://10.0.0.1:4281,https://10.0.0.2:4281`;
    /// a server writes its own to `agent-api.url` in its state directory): the agent joins
    /// through the first that answers (once: the identity is kept), registers and reports to
    /// the first one that answers, skips those that are down, and holds its watch (the host's
    /// desired state) open on one of them, moving to the next when that one goes away.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        default_value = "https://127.0.0.1:4281"
    )]
    server: String,
    /// The join token a host without an identity joins with (`ferry token create --join`);
    /// from the environment rather than the command line, where every user can read it.
    #[arg(long, env = "FERRY_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The fleet CA (PEM file) the servers' certificates chain to (a server's
    /// `<state dir>/tls/ca.pem`): needed to join; afterwards the one the join answered is kept.
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
        let listen = listen_addr(&args);
        let me = host_identity(&args, &servers, server_ca.as_deref()).await?;
        let host_id = me.host_id;
        // After the join, the fleet CA it answered is what the servers are checked against.
        let server_ca = server_ca.or_else(|| Some(me.ca_pem.clone().into_bytes()));
        let cfg = AgentConfig {
            host_id,
            region: args.region,
            host_netns: args.netns,
            underlay: args.underlay,
            fleet: args.fleet,
            state_dir: args.state_dir.clone(),
            servers,
            // Joined: from now on the host proves who it is by its certificate, and the join
            // token (which could make new hosts) is not sent again.
            join_token: None,
            server_ca,
            identity: Some((me.cert_pem.clone(), me.key_pem.clone())),
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
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let endpoint = format!("https://{}", listener.local_addr()?);
        std::fs::write(args.state_dir.join("agent.addr"), &endpoint)?;
        // Serve, register (with whichever server is up, waiting while none is), then watch.
        let server = serve_mtls(listener, agent.clone().router(), &me)?;
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
        server.await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

/// Where the agent listens for its servers: `--listen`, else port 4282 of the underlay address
/// (a real host), else any free port on loopback (a dev fleet).
fn listen_addr(args: &AgentArgs) -> std::net::SocketAddr {
    args.listen.unwrap_or_else(|| match args.underlay {
        Some(a) => std::net::SocketAddr::new(a, 4282),
        None => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    })
}

/// This host's identity: the one kept in the state directory, or a new one from a join
/// (retried while no server answers, as registration is; a refusal, e.g. a wrong join token,
/// ends the agent: no retry would fix it).
async fn host_identity(
    args: &AgentArgs,
    servers: &[String],
    server_ca: Option<&[u8]>,
) -> Result<Identity> {
    use ferry_agent::identity;
    if let Some(id) = identity::load(&args.state_dir)? {
        return Ok(id);
    }
    let token = args
        .join_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .with_context(|| {
            format!(
                "{} has no identity: joining needs a join token (FERRY_JOIN_TOKEN)",
                args.state_dir.display()
            )
        })?;
    let ca = server_ca.context(
        "joining needs the fleet CA the servers' certificates chain to: --server-ca or \
         FERRY_SERVER_CA (a server's <state dir>/tls/ca.pem)",
    )?;
    // The listener's address goes in the certificate (the server checks it when it calls).
    let addresses: Vec<std::net::IpAddr> = Some(listen_addr(args).ip())
        .filter(|ip| !ip.is_unspecified())
        .into_iter()
        .collect();
    let mut delay = std::time::Duration::from_millis(100);
    let me = loop {
        match identity::join(servers, token, ca, &args.region, &addresses).await {
            Ok(me) => break me,
            Err(IdentityError::Unavailable(e)) => {
                tracing::warn!("joining: {e}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    identity::save(&args.state_dir, &me)?;
    tracing::info!("joined the fleet as host {:x}", me.host_id.get());
    Ok(me)
}

/// Serves the agent's API over TLS with the host's certificate, to the fleet's servers only: a
/// client certificate from the fleet CA is required at the handshake, and it must be a
/// server's (not another host's); any other caller's connection is closed.
fn serve_mtls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    me: &Identity,
) -> Result<tokio::task::JoinHandle<()>> {
    let id = ferry_pki::Issued {
        cert_pem: me.cert_pem.clone(),
        key_pem: me.key_pem.clone(),
    };
    let config = ferry_pki::server_config(&id, ferry_pki::ClientAuth::Required(&me.ca_pem))
        .context("the agent listener's TLS")?;
    Ok(tokio::spawn(super::tls::serve_peers(
        listener,
        app,
        config,
        |cert| cert.is_some_and(ferry_pki::is_server).then_some(()),
    )))
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
