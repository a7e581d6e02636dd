//! `ferry token`: API tokens (an admin's job). A token is shown once, when it is made; the
//! server keeps only a hash of its secret.

use super::client::{print_json, table, ApiArgs, Client};
use anyhow::{bail, Result};
use ferry_core::auth::CreateToken;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    cmd: TokenCmd,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum TokenCmd {
    /// Make a token and print it (the only time its secret is shown).
    Create {
        /// Scoped to this org: its apps, machines, volumes, bridge mappings and migrations.
        #[arg(long, conflicts_with_all = ["admin", "join"])]
        org: Option<String>,
        /// Everything: hosts, drains, images, tokens, every org.
        #[arg(long, conflicts_with = "join")]
        admin: bool,
        /// For hosts joining the fleet (`ferry agent --join-token`): the agents' routes only.
        #[arg(long)]
        join: bool,
        /// Valid this long (e.g. 30d, 12h); default: until revoked.
        #[arg(long)]
        ttl: Option<String>,
        /// A note shown by `ferry token list`.
        #[arg(long)]
        description: Option<String>,
    },
    /// Every token (never a secret): ID, kind, org, expiry, revoked.
    List,
    /// Revoke a token by ID: every later call with it answers 401.
    Revoke { id: String },
}

pub fn run(args: TokenArgs) -> Result<ExitCode> {
    let c = Client::new(&args.api)?;
    match args.cmd {
        TokenCmd::Create {
            org,
            admin,
            join,
            ttl,
            description,
        } => {
            let kind = match (&org, admin, join) {
                (Some(_), false, false) => "org",
                (None, true, false) => "admin",
                (None, false, true) => "join",
                _ => bail!("give one of --org ORG, --admin or --join"),
            };
            let t = c.create_token(&CreateToken {
                kind: kind.into(),
                org,
                ttl,
                description,
            })?;
            if args.api.json {
                print_json(&t)?;
            } else {
                println!("{}", t.token);
                eprintln!(
                    "token {} ({kind}{}): shown this once; the server keeps only its hash",
                    t.view.id,
                    t.view
                        .org
                        .as_deref()
                        .map(|o| format!(" of org {o}"))
                        .unwrap_or_default()
                );
            }
        }
        TokenCmd::List => {
            let ts = c.list_tokens()?;
            if args.api.json {
                print_json(&ts)?;
            } else {
                let when = |ms: i64| ferry_core::views::rfc3339(ms);
                let rows: Vec<Vec<String>> = ts
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.kind.clone(),
                            t.org.clone().unwrap_or_else(|| "-".into()),
                            when(t.created_at),
                            t.expires_at.map(when).unwrap_or_else(|| "never".into()),
                            if t.revoked { "revoked" } else { "" }.into(),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "KIND",
                        "ORG",
                        "CREATED",
                        "EXPIRES",
                        "REVOKED",
                        "DESCRIPTION",
                    ],
                    &rows,
                );
            }
        }
        TokenCmd::Revoke { id } => {
            let t = c.revoke_token(&id)?;
            if args.api.json {
                print_json(&t)?;
            } else {
                println!("revoked {}", t.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
