//! `ferry sweep`: flags and output for the `ferry-sweep` library (find literal fleet addresses in
//! configs, name their owners, rewrite them to DNS names). Exit status: 0 no literal remains,
//! 1 some do, 2 error.
use ferry_sweep::{Backup, MachineIndex, NoOwners, Options, OwnerIndex, RewriteOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Find literal fleet addresses (fdaa::/16) in config files, say whose they are, and optionally
/// rewrite them to `<id>.vm.<app>.internal`.
///
/// Exit status: 0 when no literal remains, 1 when some do (after --rewrite: those it could not
/// rewrite), 2 on error. Nothing is hidden by .gitignore; .git directories and ferry's own
/// backups (*.ferry-bak) are left out; binary, unreadable and special files, symlink loops and
/// files over --max-file-size are skipped with a note.
#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when no literal remains, 1 when some do (after --rewrite: those it could \
not rewrite), 2 on error.\n.gitignore is not honoured; .git directories and ferry's own backups (*.ferry-bak) \
are left out; binary, unreadable and special files, symlink loops and files over --max-file-size are skipped \
with a note."
)]
pub struct SweepArgs {
    /// Files and directories to sweep.
    #[arg(required_unless_present = "fleet")]
    paths: Vec<PathBuf>,
    /// Machine list naming the owners of addresses:
    /// {"machines":[{"id","app","private_ip","old_ips":[...]}]} (what the machines API returns).
    /// Without it, the owners come from the API (--api) when one answers.
    #[arg(long, value_name = "FILE")]
    owners: Option<PathBuf>,
    /// Do not ask the API for owners (hits are then reported with unknown owners).
    #[arg(long, conflicts_with_all = ["owners", "fleet"])]
    offline: bool,
    /// Also sweep every machine's config and env through the machines API, and take the owners
    /// from it: each machine's current address, and as old addresses those the bridge maps to
    /// it. Machine configs are reported as `fleet://<app>/<id>`; they are never rewritten here.
    #[arg(long)]
    fleet: bool,
    /// The ferry API: owners of addresses (unless --owners or --offline), and --fleet.
    #[arg(long, env = "FERRY_API", default_value = "http://127.0.0.1:4280")]
    api: String,
    /// Replace each literal whose owner is known with `<id>.vm.<app>.internal`, keeping a backup.
    #[arg(long)]
    rewrite: bool,
    /// With --rewrite: print the diff only, change nothing.
    #[arg(long, requires = "rewrite")]
    dry_run: bool,
    /// With --rewrite: put backups under DIR (at each file's absolute path) instead of FILE.ferry-bak.
    #[arg(long, value_name = "DIR", requires = "rewrite")]
    backup_dir: Option<PathBuf>,
    /// Skip files larger than this (bytes, or with a K/M/G suffix: 64M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    max_file_size: u64,
    /// Scanning threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// One JSON document instead of human output, always of one shape:
    /// {"owners": {"source": "file"|"api"|"none", "detail"}, "files": REPORT|null,
    /// "fleet": REPORT|null}, each REPORT {hits, skipped, changes, summary}.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                other => return Err(format!("unknown size unit {other:?} (use K, M or G)")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Where this sweep's owners came from, as the output says it.
#[derive(serde::Serialize)]
struct OwnersSource {
    /// `file` (--owners), `api` (the machines API answered), `none` (ran offline).
    source: &'static str,
    detail: String,
}

pub fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    // The fleet's view: required with --fleet; otherwise the default source of owners, and a
    // sweep whose API does not answer runs offline (and says so).
    let (fleet, offline_reason) = if args.fleet {
        (Some(fleet_snapshot(&args.api, true)?), None)
    } else if args.owners.is_some() {
        (None, None)
    } else if args.offline {
        (None, Some("--offline".to_owned()))
    } else {
        match fleet_snapshot(&args.api, false) {
            Ok(f) => (Some(f), None),
            Err(e) => (
                None,
                Some(format!("no ferry API answered at {}: {e:#}", args.api)),
            ),
        }
    };
    let (owners, source): (Box<dyn OwnerIndex>, OwnersSource) = match (&args.owners, &fleet) {
        (Some(path), _) => (
            Box::new(MachineIndex::load(path)?),
            OwnersSource {
                source: "file",
                detail: path.display().to_string(),
            },
        ),
        (None, Some(f)) => (
            Box::new(MachineIndex::from_machines(f.records.clone())?),
            OwnersSource {
                source: "api",
                detail: format!("{} ({} machines)", args.api, f.records.len()),
            },
        ),
        (None, None) if args.rewrite => anyhow::bail!(
            "--rewrite needs to know the owners: pass --owners FILE, or run where the API \
             answers ({})",
            offline_reason.unwrap_or_default()
        ),
        (None, None) => (
            Box::new(NoOwners),
            OwnersSource {
                source: "none",
                detail: format!(
                    "ran offline, owners unknown ({})",
                    offline_reason.unwrap_or_default()
                ),
            },
        ),
    };
    let rewrite = args.rewrite.then(|| RewriteOptions {
        dry_run: args.dry_run,
        backup: args.backup_dir.clone().map_or(Backup::Beside, Backup::Dir),
    });
    let exclude = args
        .owners
        .iter()
        .map(|p| {
            (
                p.clone(),
                "the --owners file (input of this sweep)".to_owned(),
            )
        })
        .collect();
    let opts = Options {
        max_file_size: args.max_file_size,
        threads: args.threads,
        rewrite,
        exclude,
    };
    // Machine configs: scanned as files of a scratch directory, reported as fleet://<app>/<id>,
    // never rewritten (a config changes through the API, as a new machine version).
    let mut fleet_out = None;
    if let Some(f) = fleet.as_ref().filter(|_| args.fleet) {
        let scan = Options {
            max_file_size: args.max_file_size,
            threads: args.threads,
            rewrite: None,
            exclude: vec![],
        };
        let report = ferry_sweep::sweep(&[f.dir.path().to_path_buf()], &scan, owners.as_ref())?;
        let prefix = format!("{}/", f.dir.path().display());
        let fix = |s: String| s.replace(&prefix, "fleet://");
        fleet_out = Some((
            report.exit_code(),
            fix(report.to_json()),
            fix(report.human_stdout()),
            fix(report.human_stderr()),
        ));
    }
    let files = if args.paths.is_empty() {
        None
    } else {
        Some(ferry_sweep::sweep(&args.paths, &opts, owners.as_ref())?)
    };

    // Write errors (a closed pipe under `| head`) must not turn into a panic; the exit status
    // still reports the sweep.
    let mut stdout = std::io::stdout().lock();
    let mut code = 0u8;
    if args.json {
        let raw = |r: Option<&str>| match r {
            Some(j) => serde_json::from_str::<serde_json::Value>(j).unwrap_or_default(),
            None => serde_json::Value::Null,
        };
        let files_json = files.as_ref().map(|r| r.to_json());
        let doc = serde_json::json!({
            "owners": source,
            "files": raw(files_json.as_deref()),
            "fleet": raw(fleet_out.as_ref().map(|f| f.1.as_str())),
        });
        let _ = writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?);
    } else if source.source != "file" {
        let _ = writeln!(std::io::stderr(), "note: owners: {}", source.detail);
    }
    if let Some((c, _, out, err)) = &fleet_out {
        code = code.max(*c);
        if !args.json {
            let _ = stdout.write_all(out.as_bytes());
            let _ = std::io::stderr().write_all(err.as_bytes());
        }
    }
    if let Some(r) = &files {
        code = code.max(r.exit_code());
        if !args.json {
            let _ = stdout.write_all(r.human_stdout().as_bytes());
            let _ = std::io::stderr().write_all(r.human_stderr().as_bytes());
        }
    }
    let _ = stdout.flush();
    Ok(ExitCode::from(code))
}

/// What `--fleet` reads from the API: owners, and every machine's config as a scratch file.
struct FleetSnapshot {
    records: Vec<ferry_sweep::MachineRecord>,
    dir: tempfile::TempDir,
}

/// The fleet's owners (and, with `configs`, every machine's config as a scratch file).
fn fleet_snapshot(api: &str, configs: bool) -> anyhow::Result<FleetSnapshot> {
    use anyhow::Context;
    let c = super::client::Client::new(&super::client::ApiArgs {
        api: api.to_owned(),
        token: std::env::var("FERRY_TOKEN").ok(),
        ca: std::env::var_os("FERRY_CA").map(Into::into),
        json: false,
    })?;
    let apps = c.list_apps(None)?;
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let mut records = Vec::new();
    for a in apps {
        let ms = c.list_machines(&a.name, false)?;
        for m in ms {
            if configs {
                let d = dir.path().join(&m.app);
                std::fs::create_dir_all(&d)?;
                std::fs::write(d.join(&m.id), serde_json::to_string_pretty(&m.config)?)?;
            }
            if let Some(ip) = m.private_ip {
                records.push(ferry_sweep::MachineRecord {
                    id: m.id,
                    app: m.app,
                    private_ip: ip,
                    old_ips: vec![],
                });
            }
        }
    }
    // Old addresses: what the bridge still maps to a machine's current one.
    let mappings = c.list_bridge_mappings()?;
    for mapping in mappings {
        if let Some(r) = records.iter_mut().find(|r| r.private_ip == mapping.new) {
            r.old_ips.push(mapping.old);
        }
    }
    Ok(FleetSnapshot { records, dir })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10kib"), Ok(10 << 10));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }
}
