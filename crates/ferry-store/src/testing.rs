//! Real etcd processes on loopback, for tests: one member or a cluster of several.
//!
//! Its job: start Debian's `etcd` binary (package `etcd-server`, installed by
//! `scripts/setup.sh`) with free ports and a temporary data directory, wait until it serves
//! (polling its `/health` endpoint with a deadline, never a fixed sleep), and kill and reap every
//! member when the [`EtcdCluster`] is dropped, also when a test panics. Members can be killed and
//! restarted one at a time, for failure tests. It must never leave a process or a directory
//! behind, and never be compiled into the product: it exists under `cfg(test)` and the `testing`
//! cargo feature only.
//!
//! ```no_run
//! // In another crate's integration test, with ferry-store's `testing` feature on:
//! let mut etcd = ferry_store::testing::EtcdCluster::start(3).unwrap();
//! let store = ferry_store::open(&etcd.url("/t1")).unwrap();
//! store.ensure_org("acme").unwrap();
//! etcd.kill(0); // one member down: the other two keep quorum
//! store.ensure_org("other").unwrap();
//! etcd.restart(0).unwrap();
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long a member may take to serve after it was started (etcd's own election timeout is 1 s;
/// the rest is slack for a loaded machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One etcd process of a cluster.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Errors of the harness: what failed, with the member's log tail when it is the member's fault.
#[derive(Debug, thiserror::Error)]
pub enum EtcdTestError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("etcd member {name} did not become healthy within {timeout:?}; its log ends:\n{log}")]
    NotReady {
        name: String,
        timeout: Duration,
        log: String,
    },
    #[error("etcd member {name} exited with {status} while starting; its log ends:\n{log}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log: String,
    },
}

/// A running etcd cluster of one or more members on 127.0.0.1. Dropping it kills and reaps every
/// member and removes the data directories.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    // Last: removed after the processes are gone.
    dir: tempfile::TempDir,
}

/// A port nobody listens on now (the kernel's pick for port 0). Another process could take it
/// before etcd binds it; etcd then fails to start and [`EtcdCluster::start`] says so.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl EtcdCluster {
    /// Starts `n` members (1 for a plain store, 3 for quorum tests) and waits until every one
    /// answers healthy.
    pub fn start(n: usize) -> Result<EtcdCluster, EtcdTestError> {
        assert!(n >= 1, "a cluster needs a member");
        let dir = tempfile::Builder::new().prefix("ferry-etcd-").tempdir()?;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("m{i}");
            members.push(Member {
                client_port: free_port()?,
                peer_port: free_port()?,
                data_dir: dir.path().join(&name),
                log: dir.path().join(format!("{name}.log")),
                name,
                child: None,
            });
        }
        let mut c = EtcdCluster {
            members,
            token: format!("ferry-test-{}", crate::model::new_machine_id()),
            dir,
        };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        for i in 0..n {
            c.wait_healthy(i)?;
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), EtcdTestError> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &mut self.members[i];
        let log = File::options().create(true).append(true).open(&m.log)?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // EtcdStore::delete_app is one transaction over all of an app's machines.
            .args(["--max-txn-ops", "4096"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        m.child = Some(child);
        Ok(())
    }

    /// Polls member `i`'s `/health` until it reports a leader, or fails with its log.
    pub fn wait_healthy(&mut self, i: usize) -> Result<(), EtcdTestError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let m = &mut self.members[i];
            if let Some(child) = m.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    m.child = None;
                    return Err(EtcdTestError::Exited {
                        name: m.name.clone(),
                        status,
                        log: log_tail(&m.log),
                    });
                }
            }
            if healthy(m.client_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EtcdTestError::NotReady {
                    name: m.name.clone(),
                    timeout: READY_TIMEOUT,
                    log: log_tail(&m.log),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `HOST:PORT` of every member (running or not).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The connect string for [`crate::open`], with every member and the key prefix `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints().join(","),
            prefix.trim_matches('/')
        )
    }

    /// Kills member `i` with SIGKILL and reaps it (a crash, not a shutdown).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it is healthy (which, in a
    /// cluster, needs a quorum of members running: use [`EtcdCluster::restart_all`] after all
    /// were killed).
    pub fn restart(&mut self, i: usize) -> Result<(), EtcdTestError> {
        self.kill(i);
        self.spawn(i, "existing")?;
        self.wait_healthy(i)
    }

    /// Starts every member that is not running again, then waits until all are healthy.
    pub fn restart_all(&mut self) -> Result<(), EtcdTestError> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i, "existing")?;
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never true: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The temporary directory holding the data directories and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `GET /health` over plain HTTP/1.0: etcd answers `{"health":"true"}` once it has a leader.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.replace(' ', "").contains("\"health\":\"true\"")
}

/// One single-member etcd shared by the tests of this process that run at the same time, each
/// under its own key prefix: started by the first, killed when the last one drops its `Arc`
/// (a later test starts a fresh one). Saves a start per test.
pub fn shared_etcd() -> Arc<EtcdCluster> {
    static SHARED: Mutex<Weak<EtcdCluster>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = slot.upgrade() {
        return c;
    }
    let c = Arc::new(EtcdCluster::start(1).expect("starting etcd (is etcd-server installed?)"));
    *slot = Arc::downgrade(&c);
    c
}
