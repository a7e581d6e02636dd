//! The CLI's side of the API: a blocking HTTP client that turns JSON errors into one clear line,
//! and plain-text tables.

use anyhow::{anyhow, Result};
use serde::Serialize;

/// Where the API is: `--api`, else `FERRY_API`, else the dev default.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The ferry API address; several servers of one fleet, comma-separated, fail over.
    #[arg(
        long,
        env = "FERRY_API",
        default_value = "http://127.0.0.1:4280",
        global = true
    )]
    pub api: String,
    /// The API token (`<id>.<secret>`). Without it: the file `ferry dev` writes for this API
    /// address (`~/.config/ferry/tokens/HOST:PORT`).
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The CA certificate an `https://` API's certificate must be signed by (the server's
    /// `<state dir>/tls/ca.pem`). Without it: the copy `ferry dev` writes for this address
    /// (`~/.config/ferry/cas/HOST:PORT.pem`).
    #[arg(long, env = "FERRY_CA", global = true, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The typed API client (`ferry-client`), at the address the user chose.
pub struct Client;

impl Client {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(args: &ApiArgs) -> Result<ferry_client::Client> {
        // Long enough for the slowest call the CLI makes (a stop may wait 300 s for its signal).
        let first = args.api.split(',').next().unwrap_or_default().trim();
        let ca_path = args
            .ca
            .clone()
            .or_else(|| ca_file(first).filter(|f| f.exists()));
        let ca = match &ca_path {
            Some(p) => Some(
                std::fs::read(p).map_err(|e| anyhow!("the CA certificate {}: {e}", p.display()))?,
            ),
            None => None,
        };
        let c = ferry_client::Client::with_ca(
            &args.api,
            std::time::Duration::from_secs(600),
            ca.as_deref(),
        )
        .map_err(|e| anyhow!("{e} (set --api or FERRY_API)"))?;
        Ok(c.with_token(token(args).as_deref()))
    }
}

/// The token the CLI sends: `--token` / `FERRY_TOKEN`, else the one `ferry dev` wrote for the
/// first API address, else none (the server then answers 401 and says what is missing).
pub fn token(args: &ApiArgs) -> Option<String> {
    if let Some(t) = args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(t.to_owned());
    }
    let first = args.api.split(',').next()?.trim();
    let t = std::fs::read_to_string(token_file(first)?).ok()?;
    Some(t.trim().to_owned()).filter(|t| !t.is_empty())
}

/// Where the CA of the fleet at `api` is kept for the CLI (next to its token).
pub fn ca_file(api: &str) -> Option<std::path::PathBuf> {
    let f = token_file(api)?;
    let name = format!("{}.pem", f.file_name()?.to_string_lossy());
    Some(f.parent()?.parent()?.join("cas").join(name))
}

/// Where the admin token of the fleet at `api` is kept for the CLI: one file per API address
/// (host and port), so fleets on one machine never take each other's token.
/// `$FERRY_CONFIG_DIR/tokens/HOST:PORT`, by default under `~/.config/ferry`.
pub fn token_file(api: &str) -> Option<std::path::PathBuf> {
    let url = reqwest::Url::parse(api).ok()?;
    let key = format!("{}:{}", url.host_str()?, url.port_or_known_default()?);
    let dir = match std::env::var_os("FERRY_CONFIG_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".config/ferry"),
    };
    Some(dir.join("tokens").join(key))
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
