//! `ferry bridge ...`: the address-mapping bridge (old addresses keep working after a move).

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::{bail, Result};
use ferry_core::bridge::{GateRequest, Gates, MapRequest, MappingView, ReportLine, RetireRequest};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BridgeArgs {
    #[command(subcommand)]
    cmd: BridgeCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum BridgeCmd {
    /// Mappings with their hits and last use.
    List,
    /// Map OLD to NEW: sockets aimed at OLD reach NEW, and apps still see OLD as their peer.
    /// Both must be addresses of one org's network.
    Map { old: String, new: String },
    /// Per machine, the old addresses it still dials: the configs to fix.
    Report,
    /// Retire a mapping (OLD then fails fast), or every mapping unused for a while.
    Retire {
        old: Option<String>,
        /// e.g. 7d, 12h.
        #[arg(long, conflicts_with = "old")]
        unused_for: Option<String>,
    },
    /// Switch the bridge on for an org or an app (it is on by default).
    Enable {
        #[arg(long, conflicts_with = "app")]
        org: Option<String>,
        #[arg(long)]
        app: Option<String>,
    },
    /// Switch the bridge off for an org or an app.
    Disable {
        #[arg(long, conflicts_with = "app")]
        org: Option<String>,
        #[arg(long)]
        app: Option<String>,
    },
}

fn ms(t: Option<i64>) -> String {
    t.map(ferry_core::views::rfc3339)
        .unwrap_or_else(|| "never".into())
}

pub fn run(args: BridgeArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    let json = args.api.json;
    let rows = |v: &[MappingView]| -> Vec<Vec<String>> {
        v.iter()
            .map(|m| {
                vec![
                    m.old.clone(),
                    m.new.clone(),
                    m.network_id.to_string(),
                    if m.retired {
                        "retired".into()
                    } else {
                        "active".into()
                    },
                    m.hits.to_string(),
                    ms(m.last_use),
                    m.callers.join(","),
                ]
            })
            .collect()
    };
    let header = [
        "OLD", "NEW", "NETWORK", "STATUS", "HITS", "LAST USE", "CALLERS",
    ];
    match args.cmd {
        BridgeCmd::List => {
            let v: Vec<MappingView> = c.list_bridge_mappings()?;
            if json {
                print_json(&v)?
            } else {
                table(&header, &rows(&v))
            }
        }
        BridgeCmd::Map { old, new } => {
            let v: MappingView = c.map_address(&MapRequest { old, new })?;
            if json {
                print_json(&v)?
            } else {
                println!("{} -> {} (network {})", v.old, v.new, v.network_id)
            }
        }
        BridgeCmd::Report => {
            let v: Vec<ReportLine> = c.bridge_report()?;
            if json {
                print_json(&v)?
            } else {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .flat_map(|l| {
                        l.dials.iter().map(move |d| {
                            vec![
                                l.machine_id.clone(),
                                l.app.clone(),
                                d.old.clone(),
                                d.count.to_string(),
                                ms(Some(d.first_use)),
                                ms(Some(d.last_use)),
                            ]
                        })
                    })
                    .collect();
                table(
                    &[
                        "MACHINE",
                        "APP",
                        "DIALS OLD ADDRESS",
                        "COUNT",
                        "FIRST USE",
                        "LAST USE",
                    ],
                    &rows,
                );
            }
        }
        BridgeCmd::Retire { old, unused_for } => {
            if old.is_none() && unused_for.is_none() {
                bail!("give an old address, or --unused-for DURATION");
            }
            let v: Vec<MappingView> =
                c.retire_bridge_mappings(&RetireRequest { old, unused_for })?;
            if json {
                print_json(&v)?
            } else {
                println!("retired {} mapping(s)", v.len());
                table(&header, &rows(&v))
            }
        }
        BridgeCmd::Enable { org, app } | BridgeCmd::Disable { org, app }
            if org.is_none() && app.is_none() =>
        {
            bail!("give --org ORG or --app APP")
        }
        BridgeCmd::Enable { org, app } => {
            let g: Gates = c.set_bridge_gate(&GateRequest {
                org,
                app,
                enabled: true,
            })?;
            if json {
                print_json(&g)?
            } else {
                println!(
                    "bridge off for orgs {:?}, apps {:?}",
                    g.orgs_off, g.apps_off
                )
            }
        }
        BridgeCmd::Disable { org, app } => {
            let g: Gates = c.set_bridge_gate(&GateRequest {
                org,
                app,
                enabled: false,
            })?;
            if json {
                print_json(&g)?
            } else {
                println!(
                    "bridge off for orgs {:?}, apps {:?}",
                    g.orgs_off, g.apps_off
                )
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
