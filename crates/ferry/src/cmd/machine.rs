//! `ferry machine ...`: run, list, status, stop, start, destroy, exec.

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::{anyhow, bail, Context, Result};
use ferry_core::config::{InitConfig, MachineConfig, MountConfig};
use ferry_core::views::{
    CreateApp, CreateMachine, CreateVolume, ExecBody, ExecView, MachineView, MetadataValue,
    SignalRequest, StopRequest, UpdateMachine, VolumeView,
};
use std::collections::BTreeMap;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct MachineArgs {
    #[command(subcommand)]
    cmd: MachineCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum MachineCmd {
    /// Create and start a machine: `ferry machine run --app web -- python3 -m http.server 8080`.
    ///
    /// From an OCI image: `ferry machine run --app web --image localhost:5000/web:1 [-- CMD]`.
    Run(Box<RunArgs>),
    /// List machines (of one app, or all).
    List {
        #[arg(long)]
        app: Option<String>,
    },
    /// Show a machine and its event log.
    Status { id: String },
    /// Stop a machine (its stop_config signal, then SIGKILL after the timeout).
    Stop {
        id: String,
        /// Override the signal (SIGINT SIGTERM SIGQUIT SIGUSR1 SIGUSR2 SIGKILL SIGSTOP).
        #[arg(long)]
        signal: Option<String>,
        /// Override the timeout, e.g. 10s (at most 300s).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Start a stopped machine.
    Start { id: String },
    /// Destroy a machine (`--force` stops it first).
    Destroy {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Move a machine to another host: same ID, new instance and address; its volumes are
    /// forked over the fabric (copied while it runs, then only what changed after the stop,
    /// verified with BLAKE3). DNS follows it and the bridge maps the old address to the new one.
    /// Waits and shows progress unless --detach.
    Migrate {
        id: String,
        /// Destination host (hex ID); default: the least-loaded other host.
        #[arg(long)]
        to: Option<String>,
        /// Print the migration ID and return at once.
        #[arg(long)]
        detach: bool,
        /// Stop first, then copy everything, then start ("cold"; longer downtime).
        #[arg(long)]
        no_precopy: bool,
        /// Show the plan (destination, gates, bytes) and who holds this machine's address;
        /// change nothing.
        #[arg(long, conflicts_with_all = ["detach", "no_precopy"])]
        dry_run: bool,
    },
    /// Change a machine's config: applied as a new version (a new instance ID and an `update`
    /// event); a running machine is stopped and started again with it. Only what the flags
    /// name changes (`--config` replaces the whole config). Mounts cannot change.
    ///
    /// `ferry machine update ID --env LOG=debug --image localhost:5000/web:2`
    Update(Box<UpdateArgs>),
    /// Stop a machine and start it again (same instance); a stopped one is just started.
    Restart {
        id: String,
        /// Override the stop signal (SIGINT SIGTERM SIGQUIT SIGUSR1 SIGUSR2 SIGKILL SIGSTOP).
        #[arg(long)]
        signal: Option<String>,
        /// Override the stop timeout, e.g. 10s (at most 300s).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Send a signal to a running machine's command (SIGINT SIGTERM SIGQUIT SIGUSR1 SIGUSR2
    /// SIGKILL SIGSTOP; the SIG prefix is optional).
    Signal { id: String, signal: String },
    /// Show what a machine wrote to stdout and stderr, from every host it ran on (lines from
    /// before a migration or update included, as long as their host keeps them).
    ///
    /// `ferry machine logs ID -f --since 10m` (Ctrl-C to stop following). With --json, one JSON
    /// object per line: timestamp, instance_id, host, stream, message.
    Logs {
        id: String,
        /// Keep printing new lines as the machine writes them, until it is destroyed.
        #[arg(short, long)]
        follow: bool,
        /// Only lines newer than this: a duration (30s, 10m, 2h) or an RFC 3339 time.
        #[arg(long, value_name = "DURATION|TIME")]
        since: Option<String>,
        /// Only the newest N lines (1..=10000).
        #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000))]
        tail: Option<u32>,
    },
    /// Read or change a machine's metadata (`config.metadata`; no restart, no new instance).
    /// `metadata.process_group` names its DNS process group.
    Metadata {
        #[command(subcommand)]
        op: MetadataOp,
    },
    /// Run a command inside a machine; exits with its status.
    Exec {
        id: String,
        /// Seconds before the command is killed.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(clap::Subcommand)]
enum MetadataOp {
    /// Every key and value.
    List { id: String },
    /// Set one key.
    Set {
        id: String,
        key: String,
        value: String,
    },
    /// Remove one key.
    Rm { id: String, key: String },
}

#[derive(clap::Args)]
struct UpdateArgs {
    id: String,
    /// Run this OCI image (pulled and pinned on the machine's host first).
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Set an environment variable, repeatable: `--env K=V`.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Remove an environment variable, repeatable.
    #[arg(long = "unset-env", value_name = "K")]
    unset_env: Vec<String>,
    #[arg(long)]
    memory_mb: Option<u32>,
    #[arg(long)]
    cpus: Option<u32>,
    /// The whole new config as JSON (a file path, or - for stdin); the flags above are then
    /// not allowed.
    #[arg(long, conflicts_with_all = ["image", "env", "unset_env", "memory_mb", "cpus", "cmd"])]
    config: Option<String>,
    /// Record the new config without starting a running machine again (it stays stopped).
    #[arg(long)]
    skip_launch: bool,
    /// A new command and its arguments.
    #[arg(last = true)]
    cmd: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The app; created (in --org) if it does not exist yet.
    #[arg(long)]
    app: String,
    #[arg(long, default_value = "personal")]
    org: String,
    /// Place it on this host (hex ID from `ferry host list`).
    #[arg(long)]
    host: Option<String>,
    /// A volume: a size (`1gb`, `500mb`) for a new one, or an existing host directory;
    /// `:PATH` sets where it appears (default /data).
    #[arg(long, value_name = "SIZE_OR_DIR[:PATH]")]
    volume: Option<String>,
    /// Environment, repeatable: `--env K=V`.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value_t = 256)]
    memory_mb: u32,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Stop signal (default SIGINT).
    #[arg(long)]
    stop_signal: Option<String>,
    /// Stop timeout, e.g. 5s (default 5s, at most 300s).
    #[arg(long)]
    stop_timeout: Option<String>,
    /// Restart policy: no, on-failure, always.
    #[arg(long, default_value = "no")]
    restart: String,
    /// Run an OCI image (`registry[:port]/repository:tag` or `...@sha256:...`) instead of the
    /// host's system directories. The machine's host pulls it first (only the layers it lacks);
    /// the machine records the digest, not the tag. The image's entrypoint, cmd, env, user and
    /// working directory apply; a command after `--` replaces the image's cmd (its entrypoint
    /// stays), `--env` adds to or overrides its env. Registries on loopback are spoken to over
    /// plain HTTP; others over HTTPS unless `ferry image registry set --insecure` says otherwise.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// The whole config as JSON (a file path, or - for stdin); flags above are then ignored.
    #[arg(long)]
    config: Option<String>,
    /// The command and its arguments.
    #[arg(last = true)]
    cmd: Vec<String>,
}

pub fn run(args: MachineArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    let json = args.api.json;
    match args.cmd {
        MachineCmd::Run(r) => {
            let m = run_machine(&c, *r)?;
            if json {
                print_json(&m)?;
            } else {
                println!("{}", m.id);
                eprintln!(
                    "machine {} ({}) is {} on host {} at {}",
                    m.id,
                    m.name,
                    m.state,
                    m.host.as_deref().unwrap_or("-"),
                    m.private_ip.as_deref().unwrap_or("-")
                );
            }
        }
        MachineCmd::List { app } => {
            let apps: Vec<String> = match app {
                Some(a) => vec![a],
                None => c.list_apps(None)?.into_iter().map(|a| a.name).collect(),
            };
            let mut all = Vec::new();
            for a in apps {
                all.extend(c.list_machines(&a, false)?);
            }
            if json {
                print_json(&all)?;
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.name.clone(),
                            m.app.clone(),
                            m.state.clone(),
                            m.region.clone(),
                            m.host.clone().unwrap_or_default(),
                            m.private_ip.clone().unwrap_or_default(),
                            m.updated_at.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "NAME",
                        "APP",
                        "STATE",
                        "REGION",
                        "HOST",
                        "PRIVATE IP",
                        "UPDATED",
                    ],
                    &rows,
                );
            }
        }
        MachineCmd::Status { id } => {
            let m = find(&c, &id)?;
            let full: MachineView = c.get_machine(&m.app, &id)?;
            if json {
                print_json(&full)?;
            } else {
                status(&full);
            }
        }
        MachineCmd::Stop {
            id,
            signal,
            timeout,
        } => {
            let m = find(&c, &id)?;
            let m: MachineView = c.stop_machine(&m.app, &id, &StopRequest { signal, timeout })?;
            done(json, &m, "stopped")?;
        }
        MachineCmd::Start { id } => {
            let m = find(&c, &id)?;
            let m: MachineView = c.start_machine(&m.app, &id)?;
            done(json, &m, "started")?;
        }
        MachineCmd::Destroy { id, force } => {
            let m = find(&c, &id)?;
            let m: MachineView = c.destroy_machine(&m.app, &id, force)?;
            done(json, &m, "destroyed")?;
        }
        MachineCmd::Migrate {
            id,
            to,
            dry_run: true,
            ..
        } => {
            let m = find(&c, &id)?;
            let plan = c.migrate_plan(&m.app, &id, to.as_deref())?;
            return super::migrate::print_plan(&plan, json);
        }
        MachineCmd::Migrate {
            id,
            to,
            detach,
            no_precopy,
            ..
        } => {
            let m = find(&c, &id)?;
            return super::migrate::machine_migrate(&c, &m.app, &id, to, !no_precopy, detach, json);
        }
        MachineCmd::Update(u) => {
            let m = find(&c, &u.id)?;
            let config = updated_config(&m, &u)?;
            let req = UpdateMachine {
                config,
                skip_launch: u.skip_launch,
            };
            let m: MachineView = c.update_machine(&m.app, &u.id, &req)?;
            done(json, &m, &format!("updated (instance {})", m.instance_id))?;
        }
        MachineCmd::Restart {
            id,
            signal,
            timeout,
        } => {
            let m = find(&c, &id)?;
            let m = c.restart_machine(&m.app, &id, &StopRequest { signal, timeout })?;
            done(json, &m, "restarted")?;
        }
        MachineCmd::Signal { id, signal } => {
            let m = find(&c, &id)?;
            let r = c.signal_machine(
                &m.app,
                &id,
                &SignalRequest {
                    signal: signal.clone(),
                },
            )?;
            if json {
                print_json(&r)?;
            } else {
                println!("sent {signal} to {id}");
            }
        }
        MachineCmd::Logs {
            id,
            follow,
            since,
            tail,
        } => {
            let m = find(&c, &id)?;
            let print = |l: &ferry_core::logs::LogLine| -> Result<()> {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                if json {
                    serde_json::to_writer(&mut out, l)?;
                    writeln!(out)?;
                } else {
                    let short = &l.instance_id[l.instance_id.len().saturating_sub(6)..];
                    let tag = if l.stream == "stderr" { " err" } else { "" };
                    writeln!(out, "{} [{short}{tag}] {}", l.timestamp, l.message)?;
                }
                Ok(())
            };
            if follow {
                c.follow_logs(&m.app, &id, since.as_deref(), tail, |l| {
                    print(&l).map_err(|e| ferry_client::ClientError::BadArgument(e.to_string()))
                })?;
            } else {
                let v = c.machine_logs(&m.app, &id, since.as_deref(), tail)?;
                for l in &v.lines {
                    print(l)?;
                }
                for g in &v.unavailable {
                    eprintln!(
                        "warning: host {} did not answer for its part: {}",
                        g.host, g.error
                    );
                }
            }
        }
        MachineCmd::Metadata { op } => {
            let v = match &op {
                MetadataOp::List { id } => {
                    let m = find(&c, id)?;
                    c.get_metadata(&m.app, id)?
                }
                MetadataOp::Set { id, key, value } => {
                    let m = find(&c, id)?;
                    let req = MetadataValue {
                        value: value.clone(),
                    };
                    c.set_metadata(&m.app, id, key, &req)?
                }
                MetadataOp::Rm { id, key } => {
                    let m = find(&c, id)?;
                    c.delete_metadata(&m.app, id, key)?
                }
            };
            if json {
                print_json(&v)?;
            } else {
                for (k, val) in &v.metadata {
                    println!("{k}={val}");
                }
            }
        }
        MachineCmd::Exec { id, timeout, cmd } => {
            let m = find(&c, &id)?;
            let r: ExecView = c.exec_machine(
                &m.app,
                &id,
                &ExecBody {
                    cmd,
                    timeout: Some(timeout),
                },
            )?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", r.stdout);
                eprint!("{}", r.stderr);
            }
            return Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(1)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn done(json: bool, m: &MachineView, what: &str) -> Result<()> {
    if json {
        print_json(m)
    } else {
        println!("machine {} {what}", m.id);
        Ok(())
    }
}

/// Finds a machine by ID across apps (the CLI takes bare IDs; the API is per app).
fn find(c: &ferry_client::Client, id: &str) -> Result<MachineView> {
    if id.len() != 14 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{id:?} is not a machine ID (14 hex characters, as `ferry machine list` shows)");
    }
    for a in c.list_apps(None)? {
        let ms: Vec<MachineView> = c.list_machines(&a.name, true)?;
        if let Some(m) = ms.into_iter().find(|m| m.id == id) {
            return Ok(m);
        }
    }
    bail!("machine {id} not found")
}

fn parse_size_mb(s: &str) -> Option<u64> {
    let l = s.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = l.strip_suffix("gb").or_else(|| l.strip_suffix('g')) {
        (n, 1024)
    } else if let Some(n) = l.strip_suffix("mb").or_else(|| l.strip_suffix('m')) {
        (n, 1)
    } else {
        return None;
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
}

/// A whole config as JSON from a file, or from stdin for `-` (`--config`).
fn read_config(src: &str) -> Result<MachineConfig> {
    let text = if src == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(src).with_context(|| format!("reading {src}"))?
    };
    serde_json::from_str::<MachineConfig>(&text)
        .with_context(|| format!("{src} is not a machine config"))
}

/// `--env K=V` flags as a map (a later one wins).
fn parse_env(flags: &[String]) -> Result<BTreeMap<String, String>> {
    flags
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("--env {kv:?} is not K=V"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The machine's config with what `u` changes (or `u.config` whole), checked before sending.
fn updated_config(m: &MachineView, u: &UpdateArgs) -> Result<MachineConfig> {
    let config = match &u.config {
        Some(src) => read_config(src)?,
        None => {
            let mut config: MachineConfig =
                serde_json::from_value(m.config.clone()).context("the machine's current config")?;
            if let Some(i) = &u.image {
                config.image = Some(i.clone());
            }
            config.env.extend(parse_env(&u.env)?);
            for k in &u.unset_env {
                if config.env.remove(k).is_none() {
                    bail!("--unset-env {k}: the machine has no such variable");
                }
            }
            if let Some(mb) = u.memory_mb {
                config.guest.memory_mb = mb;
            }
            if let Some(n) = u.cpus {
                config.guest.cpus = n;
            }
            if !u.cmd.is_empty() {
                config.init.cmd = u.cmd.clone();
            }
            config
        }
    };
    config.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(config)
}

fn run_machine(c: &ferry_client::Client, r: RunArgs) -> Result<MachineView> {
    ferry_core::config::validate_name("app name", &r.app).map_err(|e| anyhow!("{e}"))?;
    let mut config = match &r.config {
        Some(src) => read_config(src)?,
        None => {
            if r.cmd.is_empty() && r.image.is_none() {
                bail!("give the command after --, e.g. `ferry machine run --app web -- sleep 60`, or an --image");
            }
            let env = parse_env(&r.env)?;
            let restart = serde_json::from_value(serde_json::json!({"policy": r.restart}))
                .map_err(|_| anyhow!("--restart {:?}: use no, on-failure or always", r.restart))?;
            MachineConfig {
                image: r.image.clone(),
                init: InitConfig { cmd: r.cmd.clone() },
                env,
                guest: ferry_core::config::GuestConfig {
                    memory_mb: r.memory_mb,
                    cpus: r.cpus,
                },
                mounts: vec![],
                stop_config: ferry_core::config::StopConfig {
                    signal: r.stop_signal.clone(),
                    timeout: r.stop_timeout.clone(),
                },
                restart,
                checks: BTreeMap::new(),
                metadata: BTreeMap::new(),
            }
        }
    };
    // Check before creating anything (the app, a volume): bad input changes nothing.
    config.validate().map_err(|e| anyhow!("{e}"))?;
    let volume_req = match &r.volume {
        None => None,
        Some(v) => {
            let (what, path) = match v.rsplit_once(':') {
                Some((w, p)) if p.starts_with('/') => (w, p.to_owned()),
                _ => (v.as_str(), "/data".to_owned()),
            };
            ferry_core::config::validate_guest_path("--volume path", &path)
                .map_err(|e| anyhow!("{e}"))?;
            let req = match parse_size_mb(what) {
                Some(mb) if (1..=1_048_576).contains(&mb) => CreateVolume {
                    size_mb: Some(mb),
                    host_dir: None,
                    org_slug: None,
                },
                Some(_) => bail!("--volume {what}: size must be between 1mb and 1024gb"),
                None if what.starts_with('/') => {
                    if !std::path::Path::new(what).is_dir() {
                        bail!("--volume {what}: not an existing directory");
                    }
                    CreateVolume {
                        size_mb: None,
                        host_dir: Some(what.to_owned()),
                        org_slug: None,
                    }
                }
                None => bail!(
                    "--volume {what:?}: give a size like 1gb or 500mb, or an absolute directory"
                ),
            };
            Some((req, path))
        }
    };
    // The app is made on first use; any other failure than "no such app" is the user's to see.
    match c.get_app(&r.app) {
        Ok(_) => {}
        Err(e) if e.code() == Some("not_found") => {
            c.create_app(&CreateApp {
                app_name: r.app.clone(),
                org_slug: Some(r.org.clone()),
            })?;
        }
        Err(e) => return Err(e.into()),
    }
    if let Some((req, path)) = volume_req {
        let v: VolumeView = c.create_volume(&req)?;
        config.mounts.push(MountConfig { volume: v.id, path });
    }
    Ok(c.create_machine(
        &r.app,
        &CreateMachine {
            name: r.name,
            host: r.host,
            config,
            skip_launch: false,
        },
    )?)
}

/// The machine and its Event Logs table, like `fly machine status`.
fn status(m: &MachineView) {
    println!("Machine ID: {}", m.id);
    println!("Instance ID: {}", m.instance_id);
    println!("State: {}\n", m.state);
    println!("VM");
    for (k, v) in [
        ("ID", m.id.clone()),
        ("Name", m.name.clone()),
        ("App", m.app.clone()),
        ("Org", m.org.clone()),
        ("Instance ID", m.instance_id.clone()),
        ("State", m.state.clone()),
        ("Region", m.region.clone()),
        ("Host", m.host.clone().unwrap_or_default()),
        ("Private IP", m.private_ip.clone().unwrap_or_default()),
        (
            "Command",
            m.config["init"]["cmd"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
        ),
        ("Created", m.created_at.clone()),
        ("Updated", m.updated_at.clone()),
    ] {
        println!("  {k:<12} = {v}");
    }
    if !m.previous_instances.is_empty() {
        println!("\nPrevious instances");
        let rows: Vec<Vec<String>> = m
            .previous_instances
            .iter()
            .map(|i| {
                vec![
                    i.instance_id.clone(),
                    i.state.clone(),
                    i.host.clone(),
                    i.private_ip.clone(),
                    i.ended_at.clone(),
                    i.migration.clone(),
                ]
            })
            .collect();
        table(
            &[
                "INSTANCE",
                "STATE",
                "HOST",
                "PRIVATE IP",
                "ENDED",
                "MIGRATION",
            ],
            &rows,
        );
    }
    println!("\nEvent Logs");
    let rows: Vec<Vec<String>> = m
        .events
        .iter()
        .flatten()
        .map(|e| {
            let detail = match e.request.get("exit_event") {
                Some(x) if !x.is_null() => format!(
                    "exit_code={} signal={}{}",
                    x["exit_code"]
                        .as_i64()
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                    x["signal"]
                        .as_i64()
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                    if x["escalated_to_sigkill"].as_bool() == Some(true) {
                        " (SIGKILL after timeout)"
                    } else {
                        ""
                    }
                ),
                _ if e.request.get("migrated").and_then(|v| v.as_bool()) == Some(true) => {
                    "migrated=true".into()
                }
                _ => String::new(),
            };
            vec![
                e.status.to_uppercase(),
                e.kind.clone(),
                e.source.clone(),
                ferry_core::views::rfc3339(e.timestamp),
                detail,
            ]
        })
        .collect();
    table(&["STATE", "EVENT", "SOURCE", "TIMESTAMP", "INFO"], &rows);
}
