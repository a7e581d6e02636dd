//! Shared pieces of ferry's benchmarks: medians and the report format. The benchmarks
//! themselves are binaries in `src/bin/`, run by the scripts in `bench/`.

/// Median of a non-empty sample (the machine is noisy: report medians, not means).
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `p` quantile (0..=1) of a non-empty sample, nearest rank (p99 of 200 runs: the 198th).
pub fn pct(v: &[f64], p: f64) -> f64 {
    assert!(!v.is_empty(), "quantile of nothing");
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

/// A setting from the environment (`N=100 bench/x.sh`), or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints one comparison line: ferry's median, the baseline's, their ratio.
pub fn report(what: &str, unit: &str, ferry: &[f64], baseline: &[f64]) -> f64 {
    let (f, b) = (median(ferry), median(baseline));
    let ratio = f / b;
    println!("{what:<34} ferry {f:>12.1} {unit:<8} baseline {b:>12.1} {unit:<8} ratio {ratio:.3}");
    ratio
}

/// A `ferry dev` fleet for a benchmark: its own name, API and DNS ports and state directory,
/// stopped (Ctrl-C: machines stop, namespaces go) and its state removed on drop.
pub struct BenchFleet {
    child: std::process::Child,
    pub api: String,
    /// The fleet's admin token (`admin.token` in its state directory).
    pub token: String,
    http: reqwest::blocking::Client,
    state: std::path::PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl BenchFleet {
    /// Starts `ferry dev` (binary `ferry`) with `hosts` hosts and `extra` flags, and waits until
    /// every agent registered.
    pub fn start(
        ferry: &str,
        name: &str,
        hosts: u32,
        extra: &[&str],
    ) -> anyhow::Result<BenchFleet> {
        use anyhow::Context;
        let (port, dns) = (free_port()?, free_port()?);
        let state = std::env::temp_dir().join(format!("ferry-bench-{name}"));
        let _ = std::fs::remove_dir_all(&state);
        let child = std::process::Command::new(ferry)
            .args([
                "dev",
                "--no-demo",
                "--name",
                name,
                "--hosts",
                &hosts.to_string(),
            ])
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--dns-listen",
                &format!("127.0.0.1:{dns}"),
            ])
            .args(extra)
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting ferry dev")?;
        // The control plane writes its admin token before it listens.
        let file = state.join("admin.token");
        let t = std::time::Instant::now();
        while !file.exists() && t.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let token = std::fs::read_to_string(&file)
            .context("ferry dev wrote no admin token")?
            .trim()
            .to_owned();
        let mut auth = reqwest::header::HeaderMap::new();
        auth.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
        let fleet = BenchFleet {
            child,
            api: format!("http://127.0.0.1:{port}"),
            token,
            http: reqwest::blocking::Client::builder()
                .default_headers(auth)
                .build()?,
            state,
        };
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(60) {
            if let Ok(v) = fleet.get("/v1/hosts") {
                if v.as_array().is_some_and(|a| {
                    a.len() == hosts as usize && a.iter().all(|h| h["endpoint"] != "")
                }) {
                    return Ok(fleet);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        anyhow::bail!("ferry dev did not come up")
    }

    /// An HTTP client that sends the fleet's admin token.
    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    pub fn get(&self, p: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.http.get(format!("{}{p}", self.api)).send()?.json()?)
    }

    /// The server's start phases so far: phase -> (seconds in all, starts), from `/metrics`
    /// (`ferry_machine_start_phase_seconds`). The difference of two reads is a window's.
    pub fn start_phases(&self) -> anyhow::Result<std::collections::BTreeMap<String, (f64, u64)>> {
        let text = self
            .http
            .get(format!("{}/metrics", self.api))
            .send()?
            .text()?;
        let mut out = std::collections::BTreeMap::<String, (f64, u64)>::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("ferry_machine_start_phase_seconds_") else {
                continue;
            };
            let (kind, rest) = rest.split_once("{phase=\"").unwrap_or(("", ""));
            let Some((phase, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let e = out.entry(phase.to_owned()).or_default();
            match kind {
                "sum" => e.0 = value.trim().parse().unwrap_or(0.0),
                "count" => e.1 = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(out)
    }

    /// A call that must succeed; the error names the path and the API's answer.
    pub fn call(
        &self,
        method: reqwest::Method,
        p: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let r = self
            .http
            .request(method, format!("{}{p}", self.api))
            .json(&body)
            .send()?;
        let s = r.status();
        let v: serde_json::Value = r.json()?;
        anyhow::ensure!(s.is_success(), "{p}: {v}");
        Ok(v)
    }
}

impl Drop for BenchFleet {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
