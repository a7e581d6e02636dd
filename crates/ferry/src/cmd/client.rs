//! The CLI's side of the API: a blocking HTTP client that turns JSON errors into one clear line,
//! and plain-text tables.

use anyhow::{anyhow, bail, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Where the API is: `--api`, else `FERRY_API`, else the dev default.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The ferry API address.
    #[arg(
        long,
        env = "FERRY_API",
        default_value = "http://127.0.0.1:4280",
        global = true
    )]
    pub api: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Client {
    base: String,
    http: reqwest::blocking::Client,
}

impl Client {
    pub fn new(args: &ApiArgs) -> Result<Self> {
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(600))
            .build()?;
        Ok(Client {
            base: args.api.trim_end_matches('/').to_owned(),
            http,
        })
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        let resp = req.send().map_err(|e| {
            anyhow!("cannot reach the ferry API at {} ({e}); is `ferry dev` running? (set --api or FERRY_API)", self.base)
        })?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            match serde_json::from_str::<ferry_api::error::ErrorBody>(&text) {
                Ok(b) => bail!("{} ({})", b.error, b.code),
                Err(_) => bail!("HTTP {status}: {text}"),
            }
        }
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("unexpected reply from the API: {e}: {text}"))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
    }
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
    }
    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
    }

    /// POSTs and hands each line of a newline-delimited JSON answer to `each` as it arrives
    /// (a pull's progress); an error status is reported like any other call's.
    pub fn post_lines<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut each: impl FnMut(T) -> Result<()>,
    ) -> Result<()> {
        use std::io::BufRead;
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .map_err(|e| anyhow!("cannot reach the ferry API at {} ({e})", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text()?;
            match serde_json::from_str::<ferry_api::error::ErrorBody>(&text) {
                Ok(b) => bail!("{} ({})", b.error, b.code),
                Err(_) => bail!("HTTP {status}: {text}"),
            }
        }
        for line in std::io::BufReader::new(resp).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            each(
                serde_json::from_str(&line)
                    .map_err(|e| anyhow!("unexpected line {line:?}: {e}"))?,
            )?;
        }
        Ok(())
    }
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
