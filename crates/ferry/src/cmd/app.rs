//! `ferry app ...` and `ferry host ...`.

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::Result;
use ferry_api::views::{AppView, CreateApp, HostView};
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
        #[arg(long, default_value = "personal")]
        org: String,
    },
    /// List apps.
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Destroy an app (refused while it has machines that are not destroyed).
    Destroy { name: String },
}

pub fn run(args: AppArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    match args.cmd {
        AppCmd::Create { name, org } => {
            let a: AppView = c.post(
                "/v1/apps",
                &CreateApp {
                    app_name: name,
                    org_slug: Some(org),
                },
            )?;
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
            let path = match org {
                Some(o) => format!("/v1/apps?org_slug={o}"),
                None => "/v1/apps".into(),
            };
            let apps: Vec<AppView> = c.get(&path)?;
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
        AppCmd::Destroy { name } => {
            let v: serde_json::Value = c.delete(&format!("/v1/apps/{name}"))?;
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
}

pub fn host(args: HostArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    match args.cmd {
        HostCmd::List => {
            let hosts: Vec<HostView> = c.get("/v1/hosts")?;
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
    Create {
        #[arg(long, conflicts_with = "host_dir")]
        size_mb: Option<u64>,
        #[arg(long)]
        host_dir: Option<String>,
    },
}

pub fn volume(args: VolumeArgs) -> Result<ExitCode> {
    use ferry_api::views::{CreateVolume, VolumeView};
    let c = Client::new(&args.api)?;
    match args.cmd {
        VolumeCmd::List => {
            let vs: Vec<VolumeView> = c.get("/v1/volumes")?;
            if args.api.json {
                print_json(&vs)?;
            } else {
                let rows: Vec<Vec<String>> = vs
                    .iter()
                    .map(|v| {
                        vec![
                            v.id.clone(),
                            v.size_mb
                                .map(|s| format!("{s} MiB"))
                                .unwrap_or_else(|| "host dir".into()),
                            v.host_dir.clone(),
                            v.created_at.clone(),
                        ]
                    })
                    .collect();
                table(&["ID", "SIZE", "HOST DIR", "CREATED"], &rows);
            }
        }
        VolumeCmd::Create { size_mb, host_dir } => {
            if size_mb.is_none() && host_dir.is_none() {
                anyhow::bail!("give --size-mb N or --host-dir DIR");
            }
            let v: VolumeView = c.post("/v1/volumes", &CreateVolume { size_mb, host_dir })?;
            if args.api.json {
                print_json(&v)?;
            } else {
                println!("{}", v.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
