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
    #[arg(long, value_name = "FILE")]
    owners: Option<PathBuf>,
    /// Sweep every machine's config and env through the machines API (not built yet: issue 3).
    #[arg(long)]
    fleet: bool,
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
    /// One JSON document ({hits, skipped, changes, summary}) instead of human output.
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

pub fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    if args.fleet {
        ferry_sweep::fleet_index()?;
    }
    let owners: Box<dyn OwnerIndex> = match &args.owners {
        Some(path) => Box::new(MachineIndex::load(path)?),
        None if args.rewrite => {
            anyhow::bail!("--rewrite needs to know the owners: pass --owners FILE (or, once the machines API exists, --fleet)")
        }
        None => Box::new(NoOwners),
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
    let report = ferry_sweep::sweep(&args.paths, &opts, owners.as_ref())?;

    // Write errors (a closed pipe under `| head`) must not turn into a panic; the exit status
    // still reports the sweep.
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(stdout, "{}", report.to_json());
    } else {
        let _ = stdout.write_all(report.human_stdout().as_bytes());
        let _ = std::io::stderr().write_all(report.human_stderr().as_bytes());
    }
    let _ = stdout.flush();
    Ok(ExitCode::from(report.exit_code()))
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
