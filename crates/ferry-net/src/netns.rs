//! Named network namespaces (compatible with `ip netns`: bind mounts under `/run/netns`) and
//! running code inside one.
//!
//! `setns` changes only the calling thread, so namespace work never happens on a caller's thread
//! (it may be a tokio worker): [`run_in`] spawns a dedicated thread, and [`NsThread`] keeps one
//! alive for a series of jobs.

use crate::NetError;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Where `ip netns` keeps its names; sharing it lets operators use `ip netns exec` on ours.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace. Dropping the handle does not delete it: call [`NetNs::delete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: String,
    /// Set for the process's own namespace ([`NetNs::own`]), which has no name.
    own: Option<PathBuf>,
}

impl NetNs {
    /// The handle of an existing namespace (no check that it exists).
    pub fn named(name: &str) -> Self {
        NetNs {
            name: name.to_owned(),
            own: None,
        }
    }

    /// The namespace this process started in (a real host's agent works in it): its main
    /// thread's, which never enters another, so a worker thread that did still finds it.
    pub fn own() -> Self {
        NetNs {
            name: "host".to_owned(),
            own: Some(PathBuf::from(format!(
                "/proc/{}/ns/net",
                std::process::id()
            ))),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        match &self.own {
            Some(p) => p.clone(),
            None => Path::new(NETNS_DIR).join(&self.name),
        }
    }

    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    pub fn open(&self) -> Result<File, NetError> {
        File::open(self.path()).map_err(|e| NetError::io(format!("opening netns {}", self.name), e))
    }

    /// Creates a fresh namespace, mounted at `/run/netns/<name>`, then runs `setup` inside it on
    /// the creating thread (sysctls must be written from inside the namespace).
    pub fn create(name: &str) -> Result<Self, NetError> {
        validate_name(name)?;
        ensure_netns_dir()?;
        let ns = NetNs::named(name);
        if ns.exists() {
            return Err(NetError::Exists(format!("network namespace {name}")));
        }
        let target = ns.path();
        std::thread::scope(|s| {
            s.spawn(|| -> Result<(), NetError> {
                File::create(&target)
                    .map_err(|e| NetError::io(format!("creating {}", target.display()), e))?;
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetError::sys("unshare(CLONE_NEWNET)", e))?;
                let bind = mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                );
                if let Err(e) = bind {
                    let _ = std::fs::remove_file(&target);
                    return Err(NetError::sys("bind-mounting the namespace", e));
                }
                Ok(())
            })
            .join()
            .expect("netns creation thread panicked")
        })?;
        Ok(ns)
    }

    /// Unmounts and removes the name. The kernel frees the namespace (and its interfaces) once no
    /// process or thread is inside it any more.
    pub fn delete(&self) -> Result<(), NetError> {
        if self.own.is_some() {
            return Err(NetError::Invalid(
                "the process's own namespace is not ferry's to delete".into(),
            ));
        }
        let p = self.path();
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(NetError::sys("unmounting a namespace", e)),
        }
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetError::io(format!("removing {}", p.display()), e)),
        }
    }
}

/// Every named namespace whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<NetNs> {
    let mut v: Vec<NetNs> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .map(|n| NetNs::named(&n))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn validate_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "{name:?} is not a valid namespace name"
        )))
    }
}

/// Makes `/run/netns` a shared mount point the way iproute2 does, so namespaces mounted by either
/// tool are visible to the other.
fn ensure_netns_dir() -> Result<(), NetError> {
    // Two threads racing here the first time would both bind-mount /run/netns onto itself, and a
    // namespace mounted in between would vanish under the second layer: one at a time.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(NETNS_DIR)
        .map_err(|e| NetError::io("creating /run/netns".into(), e))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| NetError::sys("bind-mounting /run/netns", e))?;
        shared().map_err(|e| NetError::sys("making /run/netns shared", e))?;
    }
    Ok(())
}

/// Enters `ns` on the current thread. Only for threads this crate owns.
fn enter(ns: &NetNs) -> Result<(), NetError> {
    let f = ns.open()?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::sys("setns", e))
}

/// Runs `f` on a fresh thread inside `ns` and returns its result.
pub fn run_in<R: Send>(ns: &NetNs, f: impl FnOnce() -> R + Send) -> Result<R, NetError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetError::Panicked(ns.name.clone()))?
    })
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| NetError::io(format!("writing {path}"), e))
}

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A thread that lives inside one namespace and runs jobs against its state `S` in order.
/// Dropping it ends the thread (after the queued jobs), so it no longer pins the namespace.
pub struct NsThread<S> {
    tx: Option<mpsc::Sender<Job<S>>>,
    thread: Option<JoinHandle<()>>,
    ns: NetNs,
}

impl<S: 'static> NsThread<S> {
    /// Starts the thread in `ns` and builds its state there with `init`.
    pub fn start(
        ns: &NetNs,
        init: impl FnOnce() -> Result<S, NetError> + Send + 'static,
    ) -> Result<Self, NetError> {
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns2 = ns.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ns-{}", ns.name))
            .spawn(move || {
                let state = enter(&ns2).and_then(|()| init());
                let mut state = match state {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for job in rx {
                    job(&mut state);
                }
            })
            .map_err(|e| NetError::io("spawning a namespace thread".into(), e))?;
        ready_rx
            .recv()
            .map_err(|_| NetError::Panicked(ns.name.clone()))??;
        Ok(NsThread {
            tx: Some(tx),
            thread: Some(thread),
            ns: ns.clone(),
        })
    }

    /// Runs `f` on the namespace thread and waits for its result.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (tx, rx) = mpsc::channel();
        let job: Job<S> = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.tx
            .as_ref()
            .expect("sender lives until drop")
            .send(job)
            .map_err(|_| NetError::Panicked(self.ns.name.clone()))?;
        rx.recv()
            .map_err(|_| NetError::Panicked(self.ns.name.clone()))
    }
}

impl<S> Drop for NsThread<S> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts `f` on a new thread inside `ns` (for servers that outlive the call).
pub fn spawn_in<R: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> R + Send + 'static,
) -> JoinHandle<Result<R, NetError>> {
    let ns = ns.clone();
    std::thread::spawn(move || {
        enter(&ns)?;
        Ok(f())
    })
}
