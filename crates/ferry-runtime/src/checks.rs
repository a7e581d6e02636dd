//! Machine health checks (docs/design.md#machine-config): tcp, http and exec, for liveness (failures restart the
//! machine) and readiness (gates traffic and migrations). Scheduling them every `interval` and
//! acting on the results is the agent's job; this module runs one check once.
//!
//! tcp and http connect to `[private_ip]:port` *from inside the machine's network namespace*,
//! so they test exactly what other machines reach. `setns` changes only the calling thread, so
//! each such check runs on a short-lived dedicated thread that enters the namespace and exits
//! afterwards; the caller's thread (possibly a tokio worker) never changes namespace. The caller
//! waits on a channel with the check's timeout, so a wedged thread cannot stall it.
//!
//! http sends a hand-written `HTTP/1.0` GET: a check only needs the status line, and 1.0 means
//! the server closes the connection after one response with no chunked encoding or keep-alive
//! to handle, so a few lines replace an HTTP client (and its TLS stack and async runtime) in the
//! runtime's dependencies.

use crate::exec::exec_in;
use crate::machine::Running;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum CheckKind {
    /// Passes when a TCP connection to the port succeeds.
    Tcp { port: u16 },
    /// Passes on a 2xx or 3xx answer to `GET path`.
    Http { port: u16, path: String },
    /// Passes when the command exits 0 inside the machine.
    Exec { cmd: Vec<String> },
}

/// What a failing check means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckRole {
    Liveness,
    Readiness,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub role: CheckRole,
}

/// One check's result; `detail` is a short human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub ok: bool,
    pub detail: String,
}

impl CheckResult {
    fn pass(detail: impl Into<String>) -> Self {
        CheckResult {
            ok: true,
            detail: detail.into(),
        }
    }
    fn fail(detail: impl Into<String>) -> Self {
        CheckResult {
            ok: false,
            detail: detail.into(),
        }
    }
}

/// Runs `check` once against the machine.
pub fn run_check(
    running: &Running,
    private_ip: IpAddr,
    netns: &Path,
    check: &Check,
) -> CheckResult {
    let timeout = check.timeout.max(Duration::from_millis(1));
    match &check.kind {
        CheckKind::Tcp { port } => {
            let addr = SocketAddr::new(private_ip, *port);
            in_netns(netns, timeout, move || {
                TcpStream::connect_timeout(&addr, timeout)
                    .map(|_| CheckResult::pass(format!("connected to {addr}")))
                    .unwrap_or_else(|e| CheckResult::fail(format!("connecting to {addr}: {e}")))
            })
        }
        CheckKind::Http { port, path } => {
            let addr = SocketAddr::new(private_ip, *port);
            let path = path.clone();
            in_netns(netns, timeout, move || http_get(addr, &path, timeout))
        }
        CheckKind::Exec { cmd } => match exec_in(running, cmd, timeout) {
            Ok(o) if o.exit_code == 0 => CheckResult::pass("exit 0"),
            Ok(o) => {
                let mut out = o.stderr_lossy();
                if out.trim().is_empty() {
                    out = o.stdout_lossy();
                }
                let out: String = out.trim().chars().take(200).collect();
                CheckResult::fail(format!("exit {}: {out}", o.exit_code))
            }
            Err(e) => CheckResult::fail(e.to_string()),
        },
    }
}

/// Runs `f` on a fresh thread inside the network namespace at `netns`, waiting at most
/// `timeout` (plus a little slack for thread start-up).
fn in_netns(
    netns: &Path,
    timeout: Duration,
    f: impl FnOnce() -> CheckResult + Send + 'static,
) -> CheckResult {
    let ns = match std::fs::File::open(netns) {
        Ok(f) => f,
        Err(e) => return CheckResult::fail(format!("opening {}: {e}", netns.display())),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("ferry-check".into())
        .spawn(move || {
            // The thread dies after this one check, taking its namespace membership with it.
            let r = match nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
                Ok(()) => f(),
                Err(e) => CheckResult::fail(format!("entering the machine's netns: {e}")),
            };
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        return CheckResult::fail(format!("starting a check thread: {e}"));
    }
    rx.recv_timeout(timeout + Duration::from_millis(200))
        .unwrap_or_else(|_| CheckResult::fail(format!("timed out after {timeout:?}")))
}

fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> CheckResult {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return CheckResult::fail(format!("connecting to {addr}: {e}")),
    };
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: ferry-check\r\nConnection: close\r\n\r\n"
    );
    let _ = s.set_write_timeout(Some(left()));
    if let Err(e) = s.write_all(req.as_bytes()) {
        return CheckResult::fail(format!("sending the request: {e}"));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let _ = s.set_read_timeout(Some(left()));
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return CheckResult::fail(format!("reading the response: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or("").trim();
    let code = line
        .strip_prefix("HTTP/")
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(c) if (200..400).contains(&c) => CheckResult::pass(format!("GET {path}: {line}")),
        Some(_) => CheckResult::fail(format!("GET {path}: {line}")),
        None => CheckResult::fail(format!("GET {path}: not an HTTP response: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_json() {
        let c: CheckKind = serde_json::from_str(r#"{"type":"http","port":80,"path":"/"}"#).unwrap();
        assert_eq!(
            c,
            CheckKind::Http {
                port: 80,
                path: "/".into()
            }
        );
        let r: CheckRole = serde_json::from_str(r#""readiness""#).unwrap();
        assert_eq!(r, CheckRole::Readiness);
    }

    #[test]
    fn http_against_local_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            for (i, s) in l.incoming().take(2).enumerate() {
                let mut s = s.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b);
                let status = if i == 0 { "200 OK" } else { "503 Unavailable" };
                let _ = s.write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes());
            }
        });
        let r = http_get(addr, "/healthz", Duration::from_secs(2));
        assert!(r.ok, "{r:?}");
        let r = http_get(addr, "healthz", Duration::from_secs(2));
        assert!(!r.ok && r.detail.contains("503"), "{r:?}");
        t.join().unwrap();
    }
}
