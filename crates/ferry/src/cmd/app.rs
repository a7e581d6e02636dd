//! `ferry app ...` and `ferry host ...`.

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::Result;
use ferry_core::views::{AppView, CreateApp, HostView};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct AppArgs {
    #[command(subcommand)]
    cmd: AppCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum AppCmd {
    /// Create an app in an org (the org gets its private network on first use).
    Create {
        name: String,
        /// Default: an org token's own org; with an admin token, `personal`.
        #[arg(long)]
        org: Option<String>,
    },
    /// List apps.
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Destroy an app (refused while it has machines that are not destroyed).
    Destroy { name: String },
    /// Show, or change, how the app's machines migrate (drains respect it).
    Policy {
        name: String,
        /// At most this many of the app's machines unavailable at once (default 1), counting the
        /// one about to move. Unavailable: should be running (starting, started, failed, or
        /// exited on its own) and not ready. Machines stopped on purpose do not count.
        #[arg(long)]
        max_unavailable: Option<u32>,
        /// A moved machine must run (and pass its checks) this long before its move is done and
        /// the next one moves (default 10s); one that exits before is moved back.
        #[arg(long)]
        min_healthy_time: Option<String>,
        /// Roll back if the moved machine is not healthy this long after its start (default 60s).
        #[arg(long)]
        healthy_deadline: Option<String>,
        /// Time between the migration notice (event, webhook) and the stop (default 0s).
        #[arg(long)]
        notice_period: Option<String>,
        /// POST the notice as JSON here ("" removes it).
        #[arg(long)]
        webhook_url: Option<String>,
        /// Sign the webhook body with HMAC-SHA256 (header X-Ferry-Signature: sha256=HEX).
        #[arg(long)]
        webhook_secret: Option<String>,
        /// Keep a migrated machine's source volume this long (default 24h).
        #[arg(long)]
        volume_retention: Option<String>,
    },
}

pub fn run(args: AppArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    match args.cmd {
        AppCmd::Create { name, org } => {
            let a: AppView = c.create_app(&CreateApp {
                app_name: name,
                org_slug: org,
            })?;
            if args.api.json {
                print_json(&a)?;
            } else {
                println!(
                    "app {} created in org {} (network {})",
                    a.name, a.org, a.network
                );
            }
        }
        AppCmd::List { org } => {
            let apps: Vec<AppView> = c.list_apps(org.as_deref())?;
            if args.api.json {
                print_json(&apps)?;
            } else {
                let rows: Vec<Vec<String>> = apps
                    .iter()
                    .map(|a| {
                        vec![
                            a.name.clone(),
                            a.org.clone(),
                            a.network.clone(),
                            a.created_at.clone(),
                        ]
                    })
                    .collect();
                table(&["NAME", "ORG", "NETWORK", "CREATED"], &rows);
            }
        }
        AppCmd::Policy {
            name,
            max_unavailable,
            min_healthy_time,
            healthy_deadline,
            notice_period,
            webhook_url,
            webhook_secret,
            volume_retention,
        } => {
            return super::migrate::policy(
                &c,
                &name,
                ferry_core::migrate::PolicyUpdate {
                    max_unavailable,
                    min_healthy_time,
                    healthy_deadline,
                    notice_period,
                    webhook_url,
                    webhook_secret,
                    volume_retention,
                },
                args.api.json,
            );
        }
        AppCmd::Destroy { name } => {
            let v = c.delete_app(&name)?;
            if args.api.json {
                print_json(&v)?;
            } else {
                println!("app {name} destroyed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct HostArgs {
    #[command(subcommand)]
    cmd: HostCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum HostCmd {
    /// List hosts with their infra prefixes and machine counts.
    List,
    /// Cordon the host, then migrate every machine off it (one at a time per network, each
    /// app's policy respected). Waits and reports each machine unless --detach.
    Drain {
        host: String,
        #[arg(long)]
        detach: bool,
        /// Show the plan (each machine, its destination, order, gates, bytes) and who would
        /// break (machines holding a moving address in their config, or dialling an old one
        /// through the bridge); change nothing.
        #[arg(long, conflicts_with = "detach")]
        dry_run: bool,
    },
    /// Stop placing new machines on the host.
    Cordon { host: String },
    /// Place machines on the host again.
    Uncordon { host: String },
    /// The host leaves the fleet: every other host drops its route to it, and its ID is never
    /// used again. Refused while machines are placed on it (`ferry host drain` first); stop its
    /// agent first, or it registers the host again.
    Remove { host: String },
}

pub fn host(args: HostArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    match args.cmd {
        HostCmd::Drain {
            host,
            dry_run: true,
            ..
        } => {
            let plan = c.drain_plan(&host)?;
            return super::migrate::print_plan(&plan, args.api.json);
        }
        HostCmd::Drain { host, detach, .. } => {
            return super::migrate::drain(&c, &host, detach, args.api.json);
        }
        HostCmd::Remove { host } => {
            let v = c.remove_host(&host)?;
            if args.api.json {
                print_json(&v)?;
            } else {
                println!("host {host} removed");
            }
        }
        HostCmd::Cordon { ref host } | HostCmd::Uncordon { ref host } => {
            let (v, verb) = if matches!(args.cmd, HostCmd::Cordon { .. }) {
                (c.cordon(host)?, "cordon")
            } else {
                (c.uncordon(host)?, "uncordon")
            };
            if args.api.json {
                print_json(&v)?;
            } else {
                println!("host {host} {verb}ed");
            }
        }
        HostCmd::List => {
            let hosts: Vec<HostView> = c.list_hosts()?;
            if args.api.json {
                print_json(&hosts)?;
            } else {
                let rows: Vec<Vec<String>> = hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.id.clone(),
                            h.region.clone(),
                            h.infra_prefix.clone(),
                            h.machines.to_string(),
                            if h.cordoned {
                                "cordoned".into()
                            } else {
                                "ready".into()
                            },
                            h.endpoint.clone(),
                            if h.underlay.is_empty() {
                                "-".into()
                            } else {
                                h.underlay.clone()
                            },
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "REGION",
                        "INFRA PREFIX",
                        "MACHINES",
                        "STATUS",
                        "AGENT",
                        "UNDERLAY",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    cmd: VolumeCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum VolumeCmd {
    /// List volumes (created by `ferry machine run --volume` or the API).
    List,
    /// Create an empty volume of a size in MiB, or register an existing host directory.
    ///
    /// A sized volume is an ext4 file system of that size (at least 8 MiB), made by the agent
    /// of the host where its first machine runs; that machine and later ones using it run
    /// there. Writes past the size fail with ENOSPC inside the machine.
    Create {
        /// Size in MiB (8..=1048576).
        #[arg(long, conflicts_with = "host_dir")]
        size_mb: Option<u64>,
        /// An existing absolute directory on the host (no size limit).
        #[arg(long)]
        host_dir: Option<String>,
        /// The org whose machines may mount it (an org token: its own, the default; an admin
        /// token without it: any org's).
        #[arg(long)]
        org: Option<String>,
    },
}

pub fn volume(args: VolumeArgs) -> Result<ExitCode> {
    use ferry_core::views::{CreateVolume, VolumeView};
    let c = Client::new(&args.api)?;
    match args.cmd {
        VolumeCmd::List => {
            let vs: Vec<VolumeView> = c.list_volumes()?;
            if args.api.json {
                print_json(&vs)?;
            } else {
                let rows: Vec<Vec<String>> = vs
                    .iter()
                    .map(|v| {
                        vec![
                            v.id.clone(),
                            v.state.clone(),
                            v.size_mb
                                .map(|s| format!("{s} MiB"))
                                .unwrap_or_else(|| "host dir".into()),
                            v.host.clone().unwrap_or_else(|| "-".into()),
                            if v.host_dir.is_empty() {
                                "(made on its first machine's host)".into()
                            } else {
                                v.host_dir.clone()
                            },
                            v.forked_from.clone().unwrap_or_default(),
                            v.destroy_after.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "STATE",
                        "SIZE",
                        "HOST",
                        "DIR",
                        "FORKED FROM",
                        "DESTROY AFTER",
                    ],
                    &rows,
                );
            }
        }
        VolumeCmd::Create {
            size_mb,
            host_dir,
            org,
        } => {
            if size_mb.is_none() && host_dir.is_none() {
                anyhow::bail!("give --size-mb N or --host-dir DIR");
            }
            let v: VolumeView = c.create_volume(&CreateVolume {
                size_mb,
                host_dir,
                org_slug: org,
            })?;
            if args.api.json {
                print_json(&v)?;
            } else {
                println!("{}", v.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
