//! `ferry server`: the control plane alone, for fleets whose hosts run `ferry agent` themselves.
//! It runs the same components as `ferry dev` ([`super::control`]): the API, DNS state, resumed
//! migrations, volume expiry and the bridge state pushed to hosts that register.

use anyhow::{Context, Result};
use ferry_store::SqliteStore;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(subcommand)]
    cmd: Option<ServerCmd>,
    /// Where the store (SQLite), the tokens and the TLS certificates live.
    #[arg(long, default_value = "/var/lib/ferry/server", global = true)]
    state_dir: PathBuf,
    /// The API listener.
    #[arg(long, default_value = "127.0.0.1:4280")]
    listen: std::net::SocketAddr,
    /// The agent listener: hosts join, register, report and watch here, always over TLS
    /// (the fleet CA's; hosts present their certificates). Agents' `--server` names it.
    #[arg(long, default_value = "[::]:4281")]
    agent_listen: std::net::SocketAddr,
    /// A DNS name or IP address agents reach this server at (repeatable), for the certificate
    /// of the agent listener (localhost, 127.0.0.1, ::1 and a specific --agent-listen address
    /// are always in it).
    #[arg(long, value_name = "NAME")]
    agent_san: Vec<String>,
    /// Also answer `.internal` DNS queries here (UDP and TCP), for operators and for hosts
    /// that forward to the server, e.g. 127.0.0.1:5353.
    #[arg(long)]
    dns_listen: Option<std::net::SocketAddr>,
    /// A registry to pull images from over plain HTTP (repeatable; loopback ones always are).
    #[arg(long, value_name = "ADDR")]
    registry: Vec<String>,
    /// Registry credentials, a JSON file: `{"reg.example:5000": {"username": "u", "password":
    /// "p"}, "other.example": {"token": "..."}}`; never logged or shown.
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
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
}

#[derive(clap::Subcommand)]
enum ServerCmd {
    /// Make the API's server certificate (in `<state dir>/tls`, signed by the fleet CA there,
    /// which is made first if missing): from then on the API is served over TLS only, and
    /// clients trust `<state dir>/tls/ca.pem` (the CLI: FERRY_CA; agents: FERRY_SERVER_CA).
    Init {
        /// A DNS name or IP address the server is reached at (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always in the certificate.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
    },
}

pub fn run(args: ServerArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    if let Some(ServerCmd::Init { san }) = &args.cmd {
        super::tls::init(&args.state_dir, san)?;
        return Ok(ExitCode::SUCCESS);
    }
    let store: Arc<dyn ferry_store::Store> = match &args.store {
        Some(url) => ferry_store::open(url).with_context(|| format!("--store {url}"))?,
        None => Arc::new(SqliteStore::open(args.state_dir.join("ferry.db"))?),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cp = super::control::ControlPlane::start(
        &rt,
        store,
        &args.state_dir,
        args.state_dir.join("volumes"),
        args.listen,
        &super::control::AgentListen {
            addr: args.agent_listen,
            names: args.agent_san.clone(),
        },
        args.dns_listen,
    )?;
    cp.ctx
        .allow_host_dirs(args.host_dir_root.clone())
        .context("--host-dir-root")?;
    super::image::apply_registry_flags(&cp.ctx, &args.registry, args.registry_auth.as_deref())?;
    cp.resume(&rt);
    eprintln!(
        "ferry server: API on {}://{}{}",
        if cp.tls { "https" } else { "http" },
        args.listen,
        if cp.tls {
            format!(
                " (clients trust {})",
                super::tls::ca_file(&args.state_dir).display()
            )
        } else {
            " (plain HTTP: `ferry server init` makes its TLS certificates)".into()
        }
    );
    eprintln!(
        "ferry server: agents join and report at {} (mutual TLS; they trust {})",
        cp.agent_url,
        super::tls::ca_file(&args.state_dir).display()
    );
    // The paths, not the secrets: a server's log is read by more people than its state.
    eprintln!(
        "ferry server: an admin token is in {} (FERRY_TOKEN for the CLI), a join token for \
         agents in {} (FERRY_JOIN_TOKEN)",
        super::control::admin_token_file(&args.state_dir).display(),
        super::control::join_token_file(&args.state_dir).display()
    );
    if let Some(d) = args.dns_listen {
        eprintln!("ferry server: .internal DNS on {d}");
    }
    rt.block_on(async {
        tokio::signal::ctrl_c().await?;
        eprintln!("ferry server: stopping");
        Ok(ExitCode::SUCCESS)
    })
}
