//! `ferry image ...`: pull (with progress), list, rm, and registry settings.

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::{anyhow, bail, Result};
use ferry_core::images::{PullRequest, RegistrySettings, RegistryView, RemoveRequest, RemovedView};
use ferry_core::proto::{ImageInfo, PullLine, RegistryCredentials};
use std::collections::BTreeMap;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum ImageCmd {
    /// Pull an image onto the fleet's hosts ahead of time, with progress.
    ///
    /// Machines pull their image by themselves too; pulling first makes their start fast:
    /// `ferry image pull localhost:5000/web:1`. Shows each layer's progress; layers a host has
    /// already (from any image) are not downloaded again. Every blob is checked against its
    /// digest and every layer is unpacked without writing outside itself; a bad image is
    /// refused with its reason and leaves nothing behind.
    Pull {
        /// `registry[:port]/repository:tag` or `...@sha256:<digest>`.
        image: String,
        /// Only this host (hex, from `ferry host list`); default: every uncordoned host.
        #[arg(long)]
        host: Option<String>,
    },
    /// List the images on every host: digest, names, layers, size, the machines using it.
    List,
    /// Remove an image and the layers no other image uses.
    ///
    /// By name, pinned reference or digest, from every host holding it (or --host). Refused
    /// while any machine (running or stopped) uses it: destroy those first.
    Rm {
        image: String,
        /// Only this host (hex).
        #[arg(long)]
        host: Option<String>,
    },
    /// How the fleet talks to registries: plain HTTP, credentials.
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
}

#[derive(clap::Subcommand)]
enum RegistryCmd {
    /// Set a registry's options (plain HTTP, credentials).
    ///
    /// `echo "$PW" | ferry image registry set reg.example:5000 --username u --password-stdin`.
    /// Secrets are read from stdin so they never show in `ps` or shell history, and are never
    /// printed.
    Set {
        /// `host[:port]` as image references name it.
        registry: String,
        /// Speak plain HTTP to it (registries on loopback always are).
        #[arg(long)]
        insecure: bool,
        /// Basic auth user (also what token servers are asked with); the password on stdin.
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the basic-auth password from stdin.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Read a bearer token from stdin (sent as it is).
        #[arg(long, conflicts_with = "username")]
        token_stdin: bool,
    },
    /// List registries with settings (the kind of auth, never the secret).
    List,
    /// Forget a registry's settings and credentials.
    Rm { registry: String },
}

fn human_size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn read_secret() -> Result<String> {
    let s = std::io::read_to_string(std::io::stdin())?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        bail!("nothing on stdin");
    }
    Ok(s)
}

pub fn run(args: ImageArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    let json = args.api.json;
    match args.cmd {
        ImageCmd::Pull { image, host } => {
            let bar = (!json).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {msg:<30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .expect("a valid template"),
                );
                b
            });
            let mut done: BTreeMap<(String, usize), u64> = BTreeMap::new();
            let mut failed = false;
            let mut results = Vec::new();
            c.pull_image(&PullRequest { image, host }, |line: PullLine| {
                match &line {
                    PullLine::Progress(p) => {
                        if let Some(b) = &bar {
                            let host = p["host"].as_str().unwrap_or("").to_string();
                            match p["kind"].as_str() {
                                Some("resolved") => {
                                    b.inc_length(p["bytes"].as_u64().unwrap_or(0));
                                    b.set_message(format!(
                                        "host {host}: {} layers, {} cached",
                                        p["layers"], p["cached"]
                                    ));
                                }
                                Some("layer") => {
                                    let i = p["index"].as_u64().unwrap_or(0) as usize;
                                    let now = p["done"].as_u64().unwrap_or(0);
                                    let before = done.insert((host.clone(), i), now).unwrap_or(0);
                                    b.inc(now.saturating_sub(before));
                                    b.set_message(format!("host {host}: layer {}", i + 1));
                                }
                                _ => {}
                            }
                        }
                    }
                    PullLine::Image(i) => {
                        if let Some(b) = &bar {
                            b.println(format!(
                                "host {}: {} ({} layers, {})",
                                i.host.as_deref().unwrap_or("?"),
                                i.pinned,
                                i.layers,
                                human_size(i.size)
                            ));
                        }
                        results.push(line.clone());
                    }
                    PullLine::Error { message, code, .. } => {
                        failed = true;
                        if let Some(b) = &bar {
                            b.println(format!("error: {message} ({code})"));
                        }
                        results.push(line.clone());
                    }
                }
                Ok(())
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if json {
                print_json(&results)?;
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        ImageCmd::List => {
            let v: Vec<ImageInfo> = c.list_images()?;
            if json {
                print_json(&v)?;
            } else {
                table(
                    &["HOST", "NAME", "DIGEST", "LAYERS", "SIZE", "MACHINES"],
                    &v.iter()
                        .map(|i| {
                            vec![
                                i.host.clone().unwrap_or_default(),
                                i.names.last().cloned().unwrap_or_default(),
                                i.digest.chars().take(19).collect(),
                                i.layers.to_string(),
                                human_size(i.size),
                                if i.machines.is_empty() {
                                    "-".into()
                                } else {
                                    i.machines.join(",")
                                },
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::Rm { image, host } => {
            let v: Vec<RemovedView> = c.remove_image(&RemoveRequest { image, host })?;
            if json {
                print_json(&v)?;
            } else {
                for r in &v {
                    println!(
                        "host {}: removed, {} layers freed",
                        r.host,
                        r.removed_layers.len()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::Registry { cmd } => {
            let v: Vec<RegistryView> = match cmd {
                RegistryCmd::Set {
                    registry,
                    insecure,
                    username,
                    password_stdin: _,
                    token_stdin,
                } => {
                    let credentials = match (username, token_stdin) {
                        (Some(username), _) => Some(RegistryCredentials::Basic {
                            username,
                            password: read_secret()?,
                        }),
                        (None, true) => Some(RegistryCredentials::Bearer {
                            token: read_secret()?,
                        }),
                        (None, false) => None,
                    };
                    vec![c.put_registry(
                        &registry,
                        &RegistrySettings {
                            insecure,
                            credentials,
                        },
                    )?]
                }
                RegistryCmd::List => c.list_registries()?,
                RegistryCmd::Rm { registry } => {
                    vec![c.delete_registry(&registry)?]
                }
            };
            if json {
                print_json(&v)?;
            } else {
                table(
                    &["REGISTRY", "PLAIN HTTP", "AUTH", "USER"],
                    &v.iter()
                        .map(|r| {
                            vec![
                                r.registry.clone(),
                                r.insecure.to_string(),
                                r.auth.clone(),
                                r.username.clone().unwrap_or_default(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
    .map_err(|e: anyhow::Error| anyhow!("{e:#}"))
}

/// `--registry ADDR` (plain HTTP) and `--registry-auth FILE` (credentials) of `ferry dev` and
/// `ferry server`: written to the store's registry settings at start.
pub fn apply_registry_flags(
    ctx: &ferry_core::Core,
    insecure: &[String],
    auth_file: Option<&std::path::Path>,
) -> Result<()> {
    use anyhow::Context;
    let current = |r: &str| -> Result<RegistrySettings> {
        Ok(ferry_core::images::registries(ctx)
            .map_err(|e| anyhow!("{e}"))?
            .remove(r)
            .unwrap_or_default())
    };
    for r in insecure {
        let mut s = current(r)?;
        s.insecure = true;
        ferry_core::images::set_registry(ctx, r, Some(s))
            .map_err(|e| anyhow!("--registry {r}: {e}"))?;
    }
    if let Some(file) = auth_file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let creds: BTreeMap<String, RegistryCredentials> = serde_json::from_str(&text)
            .with_context(|| {
                format!(
                    "{}: not a map of registry -> {{username, password}} or {{token}}",
                    file.display()
                )
            })?;
        for (r, c) in creds {
            let mut s = current(&r)?;
            s.credentials = Some(c);
            ferry_core::images::set_registry(ctx, &r, Some(s))
                .map_err(|e| anyhow!("--registry-auth {r}: {e}"))?;
        }
    }
    Ok(())
}
