//! `ferry machine migrate`, `ferry host drain|cordon|uncordon`, `ferry app policy` and
//! `ferry migration list|status`: moving machines between hosts.

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::{bail, Result};
use ferry_core::migrate::preview::MovePlan;
use ferry_core::migrate::{DrainView, MigratePolicy, Migration, Phase, PolicyUpdate};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct MigrationArgs {
    #[command(subcommand)]
    cmd: MigrationCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum MigrationCmd {
    /// List migrations (oldest first), optionally of one machine.
    List {
        #[arg(long)]
        machine: Option<String>,
    },
    /// Show one migration: phase, hosts, addresses, volume copies, downtime.
    Status { id: String },
    /// Follow a migration until it ends (progress bar for the volume copy).
    Watch { id: String },
}

pub fn run(args: MigrationArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    let json = args.api.json;
    match args.cmd {
        MigrationCmd::List { machine } => {
            let all: Vec<Migration> = c.list_migrations(machine.as_deref(), None)?;
            if json {
                print_json(&all)?;
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.machine_id.clone(),
                            m.phase.as_str().into(),
                            format!("{} -> {}", m.from_host, m.to_host),
                            m.stats
                                .downtime_ms
                                .map(|d| format!("{d} ms"))
                                .unwrap_or_default(),
                            m.error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(
                    &["ID", "MACHINE", "PHASE", "HOSTS", "DOWNTIME", "NOTE"],
                    &rows,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        MigrationCmd::Status { id } => {
            let m: Migration = c.get_migration(&id)?;
            if json {
                print_json(&m)?;
            } else {
                describe(&m);
            }
            Ok(ExitCode::SUCCESS)
        }
        MigrationCmd::Watch { id } => follow(&c, &id, json),
    }
}

fn describe(m: &Migration) {
    println!(
        "migration {}  machine {}  app {}",
        m.id, m.machine_id, m.app
    );
    println!("  phase      {}", m.phase.as_str());
    println!("  host       {} -> {}", m.from_host, m.to_host);
    println!("  address    {} -> {}", m.old_ip, m.new_ip);
    println!(
        "  instance   {} -> {}",
        m.old_instance_id, m.new_instance_id
    );
    for v in &m.volumes {
        println!(
            "  volume     {} -> {} at {} ({})",
            v.src_volume,
            v.dst_volume,
            v.mount_path,
            match &v.root {
                Some(r) if v.verified => format!("verified, BLAKE3 {}", &r[..16.min(r.len())]),
                _ => "not verified yet".into(),
            }
        );
    }
    println!(
        "  copied     {} bytes before the stop ({} ms), {} bytes after ({} ms)",
        m.stats.precopy_bytes, m.stats.precopy_ms, m.stats.final_bytes, m.stats.final_sync_ms
    );
    if let Some(d) = m.stats.downtime_ms {
        println!("  downtime   {d} ms (stop on the source -> started on the destination)");
    }
    if let Some(e) = &m.error {
        println!("  note       {e}");
    }
}

/// Polls a migration until it ends, with a progress bar while volumes are copied. Exit status 0
/// only if it completed.
fn follow(c: &ferry_client::Client, id: &str, json: bool) -> Result<ExitCode> {
    let bar = (!json).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:<28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(3600);
    let m = loop {
        let m: Migration = c.get_migration(id)?;
        if let Some(b) = &bar {
            match &m.progress {
                Some(p) => {
                    b.set_length(p.bytes_total);
                    b.set_position(p.bytes_done);
                    b.set_message(format!("{} ({})", m.phase.as_str(), p.phase));
                }
                None => b.set_message(m.phase.as_str().to_owned()),
            }
        }
        if m.phase.finished() {
            break m;
        }
        if std::time::Instant::now() > deadline {
            bail!("migration {id} did not finish within an hour; it goes on: `ferry migration status {id}`");
        }
        std::thread::sleep(Duration::from_millis(150));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json {
        print_json(&m)?;
    } else {
        describe(&m);
    }
    Ok(if m.phase == Phase::Done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `ferry machine migrate ID [--to HOST] [--detach]`.
pub fn machine_migrate(
    c: &ferry_client::Client,
    app: &str,
    id: &str,
    to: Option<String>,
    precopy: bool,
    detach: bool,
    json: bool,
) -> Result<ExitCode> {
    let m: Migration = c.migrate_machine(
        app,
        id,
        &ferry_core::migrate::MigrateRequest {
            to,
            precopy: Some(precopy),
        },
    )?;
    if detach {
        if json {
            print_json(&m)?;
        } else {
            println!("{}", m.id);
            eprintln!(
                "migration {} started; follow it with `ferry migration watch {}`",
                m.id, m.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        eprintln!("migration {} of machine {id}", m.id);
    }
    follow(c, &m.id, json)
}

/// A drain's or a migration's plan: one block per machine, then its impact.
pub fn print_plan(plan: &MovePlan, json: bool) -> Result<ExitCode> {
    if json {
        print_json(plan)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "plan for host {}: {} to move, {} not (nothing changed)",
        plan.host,
        plan.moves.len(),
        plan.skipped.len()
    );
    for m in &plan.moves {
        println!(
            "\n{} ({} in {}, {}) {} -> {}  #{} of network {}, volumes up to {} MiB",
            m.machine_id,
            m.app,
            m.org,
            m.state,
            m.from_host,
            m.to_host,
            m.position_in_network,
            m.network_id,
            m.volume_bytes >> 20
        );
        println!("  address {} changes", m.address);
        for g in &m.gates {
            println!("  waits for: {g}");
        }
        if m.impact.is_empty() {
            println!("  nobody known holds its address");
        }
        for i in &m.impact {
            println!(
                "  BREAKS? {} (app {}) via {}: {}",
                i.machine_id, i.app, i.via, i.detail
            );
        }
    }
    for s in &plan.skipped {
        println!("\nnot moved: {} ({})", s.machine_id, s.reason);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry host drain HOST`: cordon, move everything off, report each machine's outcome.
pub fn drain(c: &ferry_client::Client, host: &str, detach: bool, json: bool) -> Result<ExitCode> {
    let d: DrainView = c.drain(host)?;
    if !json {
        eprintln!(
            "host {} cordoned; {} machines to move{}",
            d.host,
            d.migrations.len(),
            if d.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} skipped", d.skipped.len())
            }
        );
        for (m, why) in &d.skipped {
            eprintln!("  skipped {m}: {why}");
        }
    }
    if detach {
        if json {
            print_json(&d)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut done = std::collections::BTreeSet::new();
    let mut failed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(6 * 3600);
    while done.len() < d.migrations.len() {
        for id in &d.migrations {
            if done.contains(id) {
                continue;
            }
            let m: Migration = c.get_migration(id)?;
            if m.phase.finished() {
                done.insert(id.clone());
                if m.phase != Phase::Done {
                    failed += 1;
                }
                if !json {
                    eprintln!(
                        "  {} machine {}: {} ({} -> {}{})",
                        m.id,
                        m.machine_id,
                        m.phase.as_str(),
                        m.from_host,
                        m.to_host,
                        m.stats
                            .downtime_ms
                            .map(|d| format!(", downtime {d} ms"))
                            .or(m.error.map(|e| format!(": {e}")))
                            .unwrap_or_default()
                    );
                }
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("the drain did not finish within 6 hours; it goes on on the server");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if json {
        let all: Vec<Migration> = c.list_migrations(None, Some(host))?;
        print_json(&all)?;
    } else {
        eprintln!(
            "host {host} drained: {} moved, {failed} not moved",
            d.migrations.len() - failed
        );
    }
    Ok(if failed == 0 && d.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `ferry app policy APP [--max-unavailable N] ...`: shows the policy, after changing the given
/// fields.
pub fn policy(
    c: &ferry_client::Client,
    app: &str,
    update: PolicyUpdate,
    json: bool,
) -> Result<ExitCode> {
    let changing = serde_json::to_value(&update)?
        .as_object()
        .is_some_and(|o| o.values().any(|v| !v.is_null()));
    let p: MigratePolicy = if changing {
        c.set_policy(app, &update)?
    } else {
        c.get_policy(app)?
    };
    if json {
        print_json(&p)?;
    } else {
        let d = |ms: u64| humantime::format_duration(Duration::from_millis(ms)).to_string();
        println!("migrate policy of app {app}");
        println!("  max_unavailable     {}", p.max_unavailable);
        println!("  min_healthy_time    {}", d(p.min_healthy_time_ms));
        println!("  healthy_deadline    {}", d(p.healthy_deadline_ms));
        println!("  notice_period       {}", d(p.notice_period_ms));
        println!(
            "  webhook             {}{}",
            p.webhook_url.as_deref().unwrap_or("none"),
            if p.webhook_secret_set {
                " (signed)"
            } else {
                ""
            }
        );
        println!("  volume_retention    {}", d(p.volume_retention_ms));
    }
    Ok(ExitCode::SUCCESS)
}
