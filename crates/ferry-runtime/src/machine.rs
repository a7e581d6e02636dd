//! A machine's lifecycle on this host: spawn, find again after an agent restart, signal, wait,
//! stop (signal, timeout, SIGKILL).
//!
//! A machine's state lives in its *run directory*, not in the agent, so a restarted agent can
//! pick it up:
//!
//! | file          | written by | content                                                     |
//! |---------------|------------|-------------------------------------------------------------|
//! | `spec.json`   | agent      | the [`InitSpec`]                                            |
//! | `cgroup.json` | agent      | the machine's cgroup directories                            |
//! | `pid`         | agent      | `<shim pid> <start time>` (start time: `/proc/<pid>/stat` 22) |
//! | `init.pid`    | shim       | `<init host pid> <start time>`                              |
//! | `exit.json`   | shim       | [`ExitInfo`], atomically, when the machine ended            |
//! | `log`         | everyone   | stdout/stderr of init and the command (appended)            |
//!
//! The pid plus its start time identifies a process across pid reuse; the handle then holds a
//! pidfd, which keeps identifying it and can be waited on by a non-parent.

use crate::init::{files, InitSpec, FORWARDED_SIGNALS};
use crate::sys::{
    kill_quiet, now_ms, pidfd_open, pidfd_reap, pidfd_send_signal, pidfd_wait, proc_stat,
    write_atomic,
};
use crate::{MachineCgroup, Result, RuntimeError};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// How a machine ended, as the shim records it in `exit.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The command's exit code (`None` when a signal killed it).
    pub exit_code: Option<i32>,
    /// The signal that killed the command (`None` when it exited).
    pub signal: Option<i32>,
    /// The kernel OOM-killed something in the machine's memory cgroup while it ran.
    #[serde(default)]
    pub oom_killed: bool,
    pub finished_at_ms: i64,
}

impl ExitInfo {
    /// Reads `<run_dir>/exit.json`, if the machine has ended.
    pub fn read(run_dir: &Path) -> Option<ExitInfo> {
        let b = std::fs::read(run_dir.join(files::EXIT)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The shell-style code: the exit code, or 128+signal.
    pub fn code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        }
    }

    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The result of [`stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    pub exit: ExitInfo,
    /// The requested signal did not end the machine within the timeout: SIGKILL did.
    pub escalated_to_sigkill: bool,
}

/// The signals a user may send to a machine (docs/design.md#machine-config).
pub const ALLOWED_SIGNALS: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGKILL,
    Signal::SIGSTOP,
];

/// Parses `"SIGINT"`, `"INT"` or `"sigint"` (any case) into one of [`ALLOWED_SIGNALS`].
pub fn parse_signal(s: &str) -> Result<Signal> {
    let up = s.trim().to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up.clone()
    } else {
        format!("SIG{up}")
    };
    ALLOWED_SIGNALS
        .iter()
        .copied()
        .find(|sig| sig.as_str() == name)
        .ok_or_else(|| RuntimeError::Signal(s.to_owned()))
}

/// A live machine: a handle on its shim.
#[derive(Debug)]
pub struct Running {
    run_dir: PathBuf,
    pid: i32,
    start_time: u64,
    pidfd: OwnedFd,
    /// How it ended, once known. Several threads may wait on one handle (a watcher and a
    /// `stop`): the first to see the exit records it and the others get the same answer.
    exit: Mutex<Option<ExitInfo>>,
}

/// The cgroup record in the run dir.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CgroupRecord {
    pub(crate) procs: Vec<PathBuf>,
    v2: Option<PathBuf>,
}

impl CgroupRecord {
    /// The file that counts the machine's OOM kills: its v1 memory cgroup's
    /// `memory.oom_control`, else its v2 cgroup's `memory.events` (when the v2 tree has the
    /// memory controller). Found from the record alone: discovering the layout means reading
    /// the host's mountinfo, which grows with the machines on the host (a netns mount each).
    pub(crate) fn oom_kill_file(&self) -> Option<PathBuf> {
        let v1 = self
            .procs
            .iter()
            .filter_map(|p| p.parent())
            .map(|d| d.join("memory.oom_control"))
            .find(|f| f.exists());
        v1.or_else(|| {
            self.v2
                .as_ref()
                .map(|d| d.join("memory.events"))
                .filter(|f| f.exists())
        })
    }

    pub(crate) fn read(run_dir: &Path) -> Result<CgroupRecord> {
        let path = run_dir.join(files::CGROUP);
        let b = std::fs::read(&path)
            .map_err(|e| RuntimeError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&b).map_err(|e| RuntimeError::Json {
            what: format!("parsing {}", path.display()),
            source: e,
        })
    }
}

fn read_pid_file(path: &Path) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Starts a machine: writes its spec into `run_dir` and spawns the shim (`<ferry_exe> init
/// --spec <run_dir>/spec.json --netns <netns>`), which first moves itself into `cgroup`, the
/// network namespace at `netns` and new namespaces ([`crate::init::enter`]). Returns once the
/// shim is running (not once the command is).
pub fn spawn_machine(
    run_dir: &Path,
    netns: &Path,
    cgroup: &MachineCgroup,
    spec: &InitSpec,
    ferry_exe: &Path,
) -> Result<Running> {
    spec.validate()?;
    // A cgroup is named after its machine, optionally with a `.suffix` (the agent adds its host,
    // so two hosts of a dev fleet on one box never share a machine's cgroup during a migration).
    let owner = cgroup.machine_id().split('.').next().unwrap_or_default();
    if spec.machine_id != owner {
        return Err(RuntimeError::Invalid(format!(
            "cgroup: it belongs to {}, not {}",
            cgroup.machine_id(),
            spec.machine_id
        )));
    }
    std::fs::create_dir_all(run_dir)
        .map_err(|e| RuntimeError::io(format!("creating {}", run_dir.display()), e))?;
    // Leftovers of a previous run of this machine would be mistaken for this run's.
    for f in [
        files::EXIT,
        files::INIT_PID,
        files::PID,
        files::HELD,
        files::GO,
    ] {
        let _ = std::fs::remove_file(run_dir.join(f));
    }
    if spec.hold {
        let go = run_dir.join(files::GO);
        nix::unistd::mkfifo(
            &go,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .map_err(|e| RuntimeError::io(format!("making {}", go.display()), e.into()))?;
    }
    let spec_path = run_dir.join(files::SPEC);
    write_atomic(
        &spec_path,
        &serde_json::to_vec_pretty(spec).expect("InitSpec serializes"),
    )?;
    let record = CgroupRecord {
        procs: cgroup.join_paths(),
        v2: cgroup.v2_dir().map(Path::to_path_buf),
    };
    write_atomic(
        &run_dir.join(files::CGROUP),
        &serde_json::to_vec_pretty(&record).expect("record serializes"),
    )?;

    let log_path = run_dir.join(files::LOG);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| RuntimeError::io(format!("opening {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| RuntimeError::io("duplicating the log fd", e))?;
    // Checked here for a clear error; the shim opens it again to enter it.
    File::open(netns)
        .map_err(|e| RuntimeError::io(format!("opening netns {}", netns.display()), e))?;
    // No code runs between fork and exec: the shim enters the machine's cgroups and namespaces
    // itself, first thing. That lets the standard library spawn with posix_spawn (a vfork-like
    // clone sharing the agent's memory) instead of fork: a fork copies the agent's page tables
    // and mappings (a thread stack per machine it watches) and the exec then tears the copy
    // down, work that grew with the machines on the host (a start at 1,000 machines spent
    // ~9 ms in fork and ~9 ms in the child's exec, against ~3 and ~1.5 on an empty host).
    let mut cmd = Command::new(ferry_exe);
    cmd.arg("init")
        .arg("--spec")
        .arg(&spec_path)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--netns")
        .arg(netns)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let child = cmd
        .spawn()
        .map_err(|e| RuntimeError::io(format!("starting {}", ferry_exe.display()), e))?;
    let pid = child.id() as i32;
    // The shim is our unreaped child, so its pid cannot be reused yet: no race here. The Child
    // is dropped (not waited): `Running::wait_exit` reaps it through the pidfd.
    drop(child);
    let pidfd = pidfd_open(pid).map_err(|e| RuntimeError::io("pidfd_open", e))?;
    let (_, start_time) = proc_stat(pid).ok_or(RuntimeError::NotRunning)?;
    write_atomic(
        &run_dir.join(files::PID),
        format!("{pid} {start_time}\n").as_bytes(),
    )?;
    Ok(Running {
        run_dir: run_dir.to_path_buf(),
        pid,
        start_time,
        pidfd,
        exit: Mutex::new(None),
    })
}

impl Running {
    /// Finds the machine whose run directory is `run_dir` after an agent restart. `None` when
    /// its shim is gone (or the pid now belongs to another process).
    pub fn attach(run_dir: &Path) -> Result<Option<Running>> {
        let Some((pid, start_time)) = read_pid_file(&run_dir.join(files::PID)) else {
            return Ok(None);
        };
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(RuntimeError::io("pidfd_open", e)),
        };
        // Checked after opening the pidfd: if the pid still has our start time now, the pidfd
        // (opened earlier) refers to that same process.
        match proc_stat(pid) {
            Some((state, st)) if st == start_time && state != 'Z' => Ok(Some(Running {
                run_dir: run_dir.to_path_buf(),
                pid,
                start_time,
                pidfd,
                exit: Mutex::new(None),
            })),
            _ => Ok(None),
        }
    }

    /// The shim's pid (host pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The shim's start time (clock ticks after boot), as recorded in the pid file.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The spec the machine was started with.
    pub fn spec(&self) -> Result<InitSpec> {
        InitSpec::read(&self.run_dir.join(files::SPEC))
    }

    /// The host pid of the machine's PID 1, once the shim has started it.
    pub fn init_pid(&self) -> Option<i32> {
        let (pid, start) = read_pid_file(&self.run_dir.join(files::INIT_PID))?;
        match proc_stat(pid) {
            Some((state, st)) if st == start && state != 'Z' => Some(pid),
            _ => None,
        }
    }

    /// Like [`init_pid`](Self::init_pid), but waits up to `timeout` for the shim to start init.
    pub fn wait_init_pid(&self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.init_pid() {
                return Some(p);
            }
            if std::time::Instant::now() >= deadline || self.exited() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether a machine spawned with [`InitSpec::hold`](crate::InitSpec::hold) is set up and
    /// waits for its [`release`](Self::release).
    pub fn held(&self) -> bool {
        self.run_dir.join(files::HELD).exists() && !self.exited()
    }

    /// Waits up to `timeout` until a held machine is set up: true then, false if it ended (its
    /// setup failed) or is still setting up.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.held() {
                return true;
            }
            if std::time::Instant::now() >= deadline || self.exited() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Runs a held machine's command (see [`InitSpec::hold`](crate::InitSpec::hold)); then
    /// [`wait_init_pid`](Self::wait_init_pid) says when it runs.
    /// [`RuntimeError::NotRunning`] if it is not held (ended, or never held).
    pub fn release(&self) -> Result<()> {
        if !self.held() {
            return Err(RuntimeError::NotRunning);
        }
        let go = self.run_dir.join(files::GO);
        // Non-blocking: init holds the FIFO open, so the open succeeds at once; if init is
        // gone there is no reader and it fails (ENXIO) instead of waiting.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&go)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => RuntimeError::NotRunning,
                _ => RuntimeError::io(format!("opening {}", go.display()), e),
            })?;
        std::io::Write::write_all(&mut f, b"g")
            .map_err(|e| RuntimeError::io(format!("writing {}", go.display()), e))
    }

    /// The machine's cgroup `cgroup.procs` files, as recorded at spawn.
    pub fn cgroup_procs(&self) -> Vec<PathBuf> {
        std::fs::read(self.run_dir.join(files::CGROUP))
            .ok()
            .and_then(|b| serde_json::from_slice::<CgroupRecord>(&b).ok())
            .map(|r| r.procs)
            .unwrap_or_default()
    }

    /// True once the shim has exited (and then reaps it, if it is our child).
    pub fn exited(&self) -> bool {
        self.wait_exit(Duration::ZERO).is_some()
    }

    /// Waits up to `timeout` for the machine to end and returns how it ended. Works whether or
    /// not this process is the shim's parent.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        if !pidfd_wait(&self.pidfd, timeout) {
            return None;
        }
        let mut cached = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = *cached {
            return Some(e);
        }
        let e = self.collect_exit();
        *cached = Some(e);
        Some(e)
    }

    /// Reaps the exited shim (if ours) and reads or, failing that, writes its `exit.json`.
    fn collect_exit(&self) -> ExitInfo {
        // Reap it if it is our child (no-op otherwise), so it does not linger as a zombie.
        let status = pidfd_reap(&self.pidfd);
        if let Some(e) = ExitInfo::read(&self.run_dir) {
            return e;
        }
        // The shim itself was killed before it could write exit.json: record what we know.
        let info = ExitInfo {
            exit_code: status.and_then(|s| s.0),
            signal: status.and_then(|s| s.1),
            oom_killed: false,
            finished_at_ms: now_ms(),
        };
        let _ = write_atomic(
            &self.run_dir.join(files::EXIT),
            &serde_json::to_vec(&info).expect("ExitInfo serializes"),
        );
        info
    }

    /// Sends `sig` to the machine's command.
    ///
    /// The catchable signals go to the shim, which forwards them to init, which forwards them to
    /// the command. SIGKILL and SIGSTOP cannot be caught (so not forwarded): SIGKILL goes to
    /// init, whose death makes the kernel kill the whole pid namespace; SIGSTOP goes to every
    /// process in the namespace except init (which must keep reaping).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        match sig {
            Signal::SIGKILL => {
                match self.init_pid() {
                    Some(init) => kill_quiet(init, libc::SIGKILL),
                    // No init yet (or already gone): take the shim and the cgroup down.
                    None => self.kill_hard(),
                }
                Ok(())
            }
            Signal::SIGSTOP => {
                let init = self.init_pid().ok_or(RuntimeError::NotRunning)?;
                for pid in pids_in_pid_ns_of(init) {
                    if pid != init {
                        kill_quiet(pid, libc::SIGSTOP);
                    }
                }
                Ok(())
            }
            s if FORWARDED_SIGNALS.contains(&s) => pidfd_send_signal(&self.pidfd, s as i32)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::ESRCH) {
                        RuntimeError::NotRunning
                    } else {
                        RuntimeError::io(format!("sending {s}"), e)
                    }
                }),
            s => Err(RuntimeError::Signal(s.as_str().to_owned())),
        }
    }

    /// SIGKILLs init (taking the pid namespace with it), the shim and anything left in the
    /// machine's cgroups.
    fn kill_hard(&self) {
        if let Some(init) = self.init_pid() {
            kill_quiet(init, libc::SIGKILL);
        }
        let _ = pidfd_send_signal(&self.pidfd, libc::SIGKILL);
        for p in self.cgroup_procs() {
            for pid in std::fs::read_to_string(&p)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                kill_quiet(pid, libc::SIGKILL);
            }
        }
    }
}

/// Host pids of every process in the pid namespace `pid` is in (scanning the host's /proc).
fn pids_in_pid_ns_of(pid: i32) -> Vec<i32> {
    let Ok(target) = std::fs::read_link(format!("/proc/{pid}/ns/pid")) else {
        return Vec::new();
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/ns/pid"))
                .ok()
                .as_ref()
                == Some(&target)
        })
        .collect()
}

/// Stops a machine the way its stop_config says: sends `signal`, waits up to `timeout`, then
/// SIGKILLs init (and, should the shim itself hang, the shim and the whole cgroup).
pub fn stop(running: &Running, signal: Signal, timeout: Duration) -> Result<StopOutcome> {
    if let Some(exit) = running.wait_exit(Duration::ZERO) {
        return Ok(StopOutcome {
            exit,
            escalated_to_sigkill: false,
        });
    }
    match running.signal(signal) {
        Ok(()) | Err(RuntimeError::NotRunning) => {}
        Err(e) => return Err(e),
    }
    if let Some(exit) = running.wait_exit(timeout) {
        return Ok(StopOutcome {
            exit,
            escalated_to_sigkill: false,
        });
    }
    tracing::info!(pid = running.pid, %signal, ?timeout, "machine ignored its stop signal; SIGKILL");
    match running.init_pid() {
        Some(init) => kill_quiet(init, libc::SIGKILL),
        None => running.kill_hard(),
    }
    // The shim normally reports init's death right away; if it does not, kill everything.
    let exit = match running.wait_exit(Duration::from_secs(2)) {
        Some(e) => e,
        None => {
            running.kill_hard();
            running.wait_exit(Duration::from_secs(2)).ok_or_else(|| {
                RuntimeError::Timeout(
                    Duration::from_secs(4),
                    format!("machine shim {} survived SIGKILL", running.pid),
                )
            })?
        }
    };
    Ok(StopOutcome {
        exit,
        escalated_to_sigkill: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGINT").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("int").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("sigusr2").unwrap(), Signal::SIGUSR2);
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("SIGSTOP").unwrap(), Signal::SIGSTOP);
        for bad in ["SIGHUP", "SIGSEGV", "9", "", "SIG", "SIGINTX"] {
            let e = parse_signal(bad).unwrap_err();
            assert!(e.to_string().contains("allowed are SIGINT"), "{e}");
        }
    }

    #[test]
    fn exit_info_json() {
        let e: ExitInfo =
            serde_json::from_str(r#"{"exit_code":null,"signal":9,"finished_at_ms":1}"#).unwrap();
        assert_eq!(e.code(), 137);
        assert!(!e.oom_killed);
        assert!(!e.success());
    }
}
