//! `ferry init`: the machine's handle on the host (the *shim*) and its PID 1 (*init*).
//!
//! The agent starts `ferry init --spec <run dir>/spec.json` through
//! [`spawn_machine`](crate::spawn_machine), which has already put the process in the machine's
//! cgroups and network namespace, made it a session leader and unshared new pid, mount and uts
//! namespaces. So when [`init_main`] runs:
//!
//! * **the shim** (the process the agent spawned) is still in the host pid namespace. It forks
//!   once, records the child's host pid in `init.pid`, forwards SIGINT/SIGTERM/SIGQUIT/SIGUSR1/
//!   SIGUSR2/SIGHUP to it, waits for it, writes `exit.json` atomically and exits with the same
//!   code. The agent watches the shim (a pidfd works for non-children too), so the machine
//!   survives agent restarts: nothing the machine needs lives in the agent.
//! * **init** (the forked child) is PID 1 of the new pid namespace. It takes its own mount
//!   namespace (so the shim keeps the host's `/proc`), makes every mount private, mounts a fresh
//!   `/proc`, sets the hostname, bind-mounts volumes and its own `resolv.conf`/`hosts`, then runs
//!   the command with the machine's environment, forwards signals to it, reaps every zombie and
//!   exits with the command's exit code (128+signal when it was killed by a signal). The
//!   command's raw outcome reaches the shim over a pipe so `exit.json` can tell "exited 130" from
//!   "killed by SIGINT".
//!
//! A **sandboxed** machine (the spec has a [`SandboxSpec`](crate::SandboxSpec); the agent always
//! sets one) differs in three places: the spawn leaves the pid namespace to the shim, which first
//! has the machine's user namespace made by a helper child (so the helper takes no pid in the
//! machine and the command is still PID 2), and the mount namespace to init (the shim stays in
//! the host's, so no copy of the host's mount table lives as long as the machine); init builds the machine's own root filesystem,
//! pivots into it, joins the user namespace and drops privileges (see [`crate::sandbox`]); and
//! the shim writes `init.pid` only once init says it is set up.
//!
//! Without a sandbox there is no separate root filesystem: guest paths are host paths seen
//! through the machine's mount namespace, so a missing guest mountpoint directory is created on
//! the host's filesystem (it stays empty there; the bind mount is only visible inside the
//! machine). Only the runtime's benchmark baseline runs machines that way now.
//!
//! Signals: both processes block the signals they handle and take them with `sigwait`, so no
//! signal is lost between fork and the loop, and no work happens in a signal handler. A PID 1
//! only receives signals from outside its namespace when it has a handler installed (the kernel
//! drops those whose disposition is the default), hence the no-op handlers.

use crate::sys::{fmt_int, now_ms, proc_stat, write_atomic};
use crate::{cgroup, Result, RuntimeError};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The DNS server every machine uses (docs/design.md#dns).
pub const NAMESERVER: &str = "fdaa::3";
/// The name `/etc/hosts` gives the machine's own private address.
pub const LOCAL_6PN: &str = "ferry-local-6pn";
/// `PATH` when the config sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Files in a machine's run directory.
pub mod files {
    pub const SPEC: &str = "spec.json";
    pub const PID: &str = "pid";
    pub const INIT_PID: &str = "init.pid";
    pub const EXIT: &str = "exit.json";
    pub const LOG: &str = "log";
    pub const CGROUP: &str = "cgroup.json";
    pub const RESOLV: &str = "resolv.conf";
    pub const HOSTS: &str = "hosts";
    /// A held machine's release (a FIFO: one byte written to it runs the command).
    pub const GO: &str = "go";
    /// Present while a held machine is set up and waits for its release.
    pub const HELD: &str = "held";
}

/// Exit code of `ferry init` when the machine could not be set up (like `docker run`'s 125).
pub const EXIT_SETUP_FAILED: i32 = 125;

/// Signals the shim and init pass on to the command.
pub const FORWARDED_SIGNALS: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGHUP,
];

/// `ferry init`'s command line.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The machine's init spec (JSON), written by the agent into the machine's run directory.
    #[arg(long, value_name = "PATH")]
    pub spec: PathBuf,
    /// Where `exit.json`, `resolv.conf` and `hosts` go (default: the spec's directory).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// The machine's network namespace. The agent starts the shim in the host's namespaces and
    /// cgroup; with this, the shim first joins the machine's cgroups (from the run directory's
    /// `cgroup.json`), enters this namespace, makes a session of its own and unshares the rest.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
}

/// A volume: `host_path` (a directory on the host) appears at `guest_path` inside the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub host_path: PathBuf,
    pub guest_path: PathBuf,
}

/// Everything `ferry init` needs to know about the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    pub machine_id: String,
    pub app: String,
    pub private_ip: String,
    pub region: String,
    /// argv of the command (no shell).
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Who the command runs as (an image's `User`): `name`, `uid`, `uid:gid`, `name:group`;
    /// names are looked up in the machine's own `/etc/passwd` and `/etc/group`. Root if unset.
    #[serde(default)]
    pub user: Option<String>,
    /// The machine's sandbox (docs/design.md#sandbox). `None` runs the command in the host's root filesystem
    /// as host root, as ferry did before the sandbox; the agent always sets it, the runtime's
    /// benchmark keeps `None` as its baseline.
    #[serde(default)]
    pub sandbox: Option<crate::sandbox::SandboxSpec>,
    /// Where the shim keeps the machine's stdout and stderr ([`crate::logs`]). Without it, the
    /// machine writes straight into the file the agent gave the shim as its stdout and stderr.
    #[serde(default)]
    pub log: Option<crate::logs::LogSpec>,
    /// A staged start: init sets the machine up (namespaces, mounts, root) and then waits for
    /// [`Running::release`](crate::Running::release) before it runs the command, so the
    /// release costs a fraction of a start. A migration stages the machine on its destination
    /// while its volumes copy; nothing of the machine's own runs until it is released.
    #[serde(default)]
    pub hold: bool,
}

impl InitSpec {
    /// Rejects specs that could not be run (so the agent fails before spawning anything).
    pub fn validate(&self) -> Result<()> {
        cgroup::validate_id(&self.machine_id)?;
        if self.cmd.is_empty() || self.cmd[0].is_empty() {
            return Err(RuntimeError::Invalid("command: it is empty".into()));
        }
        let nul = |s: &str| s.contains('\0');
        if self.cmd.iter().any(|a| nul(a)) {
            return Err(RuntimeError::Invalid("command: contains a NUL byte".into()));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || nul(k) || nul(v) {
                return Err(RuntimeError::Invalid(format!("env variable {k:?}")));
            }
        }
        for m in &self.mounts {
            if !m.guest_path.is_absolute() || !m.host_path.is_absolute() {
                return Err(RuntimeError::Invalid(format!(
                    "mount {} -> {}: paths must be absolute",
                    m.host_path.display(),
                    m.guest_path.display()
                )));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') || nul(w) {
                return Err(RuntimeError::Invalid(format!("workdir {w:?}")));
            }
        }
        if let Some(sb) = &self.sandbox {
            sb.validate()?;
        }
        Ok(())
    }

    /// The complete environment of the command (and of `exec`): a minimal base, then the
    /// config's env, then the `FERRY_*` variables (platform facts the config cannot override).
    pub fn machine_env(&self) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), "/root".into());
        env.extend(self.env.clone());
        env.insert("FERRY_MACHINE_ID".into(), self.machine_id.clone());
        env.insert("FERRY_APP_NAME".into(), self.app.clone());
        env.insert("FERRY_PRIVATE_IP".into(), self.private_ip.clone());
        env.insert("FERRY_REGION".into(), self.region.clone());
        env.into_iter().collect()
    }

    /// The working directory of the command.
    pub fn workdir(&self) -> &str {
        self.workdir.as_deref().unwrap_or("/")
    }

    /// Reads a spec file.
    pub fn read(path: &Path) -> Result<InitSpec> {
        let text = std::fs::read(path)
            .map_err(|e| RuntimeError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text).map_err(|e| RuntimeError::Json {
            what: format!("parsing {}", path.display()),
            source: e,
        })
    }
}

/// `/etc/hosts` inside the machine.
pub fn hosts_file(spec: &InitSpec) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{} {}\n",
        spec.private_ip, spec.machine_id, LOCAL_6PN
    )
}

/// `/etc/resolv.conf` inside the machine.
pub fn resolv_conf() -> String {
    format!("nameserver {NAMESERVER}\n")
}

macro_rules! say {
    ($($t:tt)*) => { eprintln!("ferry init: {}", format_args!($($t)*)) };
}

/// `ferry init`. Returns the process exit code. Call it before any other thread starts (it forks
/// and is meant to be the whole process); the binary's `init` subcommand should
/// `std::process::exit(init_main(args))`.
pub fn init_main(args: InitArgs) -> i32 {
    let spec = match InitSpec::read(&args.spec).and_then(|s| s.validate().map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            say!("{e}");
            return EXIT_SETUP_FAILED;
        }
    };
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        args.spec
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    if let Some(netns) = &args.netns {
        if let Err(e) = enter(&spec, &run_dir, netns) {
            say!("entering the machine: {e}");
            return EXIT_SETUP_FAILED;
        }
    }
    match shim(&spec, &run_dir) {
        Ok(code) => code,
        Err(e) => {
            say!("{e}");
            EXIT_SETUP_FAILED
        }
    }
}

/// Moves the shim (single-threaded, before anything else) where spawn_machine wants it: the
/// machine's cgroups first (from here on every process of the machine, the shim included, is
/// accounted and limited), the machine's network namespace, a session of its own (the agent's
/// terminal and process-group signals, Ctrl-C on `ferry dev`, must not reach machines: the agent
/// stops them with their stop_config), and new namespaces: only uts for a sandboxed machine
/// (its shim makes the user namespace and then the pid namespace itself, see `shim`; init takes
/// a mount namespace and drops the host's tree), pid, mount and uts otherwise.
fn enter(spec: &InitSpec, run_dir: &Path, netns: &Path) -> Result<()> {
    let record = crate::machine::CgroupRecord::read(run_dir)?;
    let pid = std::process::id().to_string();
    for p in &record.procs {
        std::fs::write(p, &pid)
            .map_err(|e| RuntimeError::io(format!("joining {}", p.display()), e))?;
    }
    let ns = std::fs::File::open(netns)
        .map_err(|e| RuntimeError::io(format!("opening netns {}", netns.display()), e))?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| RuntimeError::sys("setns (net)", e))?;
    nix::unistd::setsid().map_err(|e| RuntimeError::sys("setsid", e))?;
    let flags = if spec.sandbox.is_some() {
        CloneFlags::CLONE_NEWUTS
    } else {
        CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS
    };
    unshare(flags).map_err(|e| RuntimeError::sys("unshare", e))
}

/// True once `unshare(CLONE_NEWPID)` has happened: our children go to another pid namespace.
fn pid_ns_unshared() -> bool {
    let a = std::fs::read_link("/proc/self/ns/pid");
    let b = std::fs::read_link("/proc/self/ns/pid_for_children");
    match (a, b) {
        (Ok(a), Ok(b)) => a != b,
        // The kernel cannot name the new namespace until its first process (our init) exists,
        // and says so with ENOENT; without an unshare the link names our own namespace.
        (Ok(_), Err(e)) => e.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs no-op handlers for the forwarded signals and SIGCHLD and blocks them all; both the
/// shim and init then take them synchronously with `sigwait`. The child inherits both; `exec`
/// resets the handlers and the command's spawn clears the mask, so the command starts clean.
fn block_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    for s in FORWARDED_SIGNALS.iter().chain([Signal::SIGCHLD].iter()) {
        set.add(*s);
        let act = SigAction::new(
            SigHandler::Handler(noop_handler),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is trivially async-signal-safe.
        unsafe { sigaction(*s, &act) }.map_err(|e| RuntimeError::sys("sigaction", e))?;
    }
    set.thread_block()
        .map_err(|e| RuntimeError::sys("sigprocmask", e))?;
    Ok(set)
}

/// The command's outcome as init reports it to the shim: exit code or signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Exited(i32),
    Killed(i32),
}

impl Outcome {
    fn code(self) -> i32 {
        match self {
            Outcome::Exited(c) => c,
            Outcome::Killed(s) => 128 + s,
        }
    }
    fn encode(self) -> String {
        match self {
            Outcome::Exited(c) => format!("exit {c}"),
            Outcome::Killed(s) => format!("signal {s}"),
        }
    }
    fn decode(s: &str) -> Option<Outcome> {
        let (k, v) = s.trim().split_once(' ')?;
        let v = v.parse().ok()?;
        match k {
            "exit" => Some(Outcome::Exited(v)),
            "signal" => Some(Outcome::Killed(v)),
            _ => None,
        }
    }
}

/// True when this process is in another network namespace than its parent (the agent), as
/// spawn_machine puts it.
fn own_net_ns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link(format!("/proc/{}/ns/net", nix::unistd::getppid())),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

fn shim(spec: &InitSpec, run_dir: &Path) -> Result<i32> {
    // A sandboxed machine's shim unshares the pid namespace itself (see below); otherwise
    // `enter` did.
    let started_by_agent = match spec.sandbox {
        Some(_) => !pid_ns_unshared() && own_net_ns(),
        None => pid_ns_unshared(),
    };
    if !started_by_agent {
        return Err(RuntimeError::Invalid(
            "process context: ferry init must be started by the ferry agent (in new namespaces)"
                .into(),
        ));
    }
    if thread_count() != 1 {
        return Err(RuntimeError::Invalid(
            "process context: ferry init must run before any other thread starts".into(),
        ));
    }
    // The pipes first, so that every later message of the shim and of init reaches the log.
    let mut pump = match &spec.log {
        Some(l) => {
            let (pump, out, err) = crate::logs::Pump::new(l.clone())
                .map_err(|e| RuntimeError::io(format!("opening {}", l.path.display()), e))?;
            for (w, fd) in [(out, 1), (err, 2)] {
                nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&w), fd)
                    .map_err(|e| RuntimeError::sys("dup2", e))?;
            }
            Some(pump)
        }
        None => None,
    };
    // The machine's user namespace is made by a helper child of the shim, in the host's pid
    // namespace, before the machine's pid namespace exists: so the helper takes no pid in the
    // machine and the command stays PID 2. Init inherits the handle.
    let userns = match &spec.sandbox {
        Some(sb) => {
            let fd = crate::sandbox::make_userns(sb.id_base)?;
            unshare(CloneFlags::CLONE_NEWPID)
                .map_err(|e| RuntimeError::sys("unshare(CLONE_NEWPID)", e))?;
            Some(fd)
        }
        None => None,
    };
    // The shim lives in the machine's cgroups: a rising oom_kill count there means the kernel
    // OOM-killed something of this machine.
    let oom_file = match crate::machine::CgroupRecord::read(run_dir) {
        Ok(r) => r.oom_kill_file(),
        // Not started by spawn_machine's record: find our own cgroup the long way.
        Err(_) => cgroup::CgroupLayout::discover()
            .ok()
            .and_then(|l| l.own_oom_kill_file()),
    };
    let oom_kills = || oom_file.as_deref().and_then(cgroup::read_oom_kill);
    let oom_before = oom_kills();
    if spec.sandbox.is_some() {
        crate::sandbox::netns_sysctls();
    }
    let set = block_signals()?;
    let (report_rx, report_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RuntimeError::sys("pipe2", e))?;

    // Init says "set up" on this pipe once the machine's view is complete (for a sandboxed
    // machine: pivoted and in its user namespace). Only then does `init.pid` appear, so whoever
    // waits for it (the agent's "started", exec) never enters a half-built machine.
    let (setup_rx, setup_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RuntimeError::sys("pipe2", e))?;

    // SAFETY: the process is single-threaded (checked above), so the child may run arbitrary
    // code after fork.
    let child = match unsafe { fork() }.map_err(|e| RuntimeError::sys("fork", e))? {
        ForkResult::Child => {
            drop(report_rx);
            drop(setup_rx);
            drop(pump);
            let code = pid1(spec, run_dir, userns.as_ref(), report_tx, setup_tx, &set);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => child,
    };
    drop(report_tx);
    drop(setup_tx);
    drop(userns);
    // EOF (init failed to set up and exited) leaves init.pid unwritten. A held machine's
    // init says "h" first (set up, waiting for its release): `held` marks it until "1".
    let mut setup_rx = std::fs::File::from(setup_rx);
    let mut said = [0u8; 1];
    while matches!(setup_rx.read(&mut said), Ok(1)) {
        if said[0] == b'h' {
            let _ = write_atomic(&run_dir.join(files::HELD), b"");
            continue;
        }
        let _ = std::fs::remove_file(run_dir.join(files::HELD));
        if let Some((_, start)) = proc_stat(child.as_raw()) {
            let _ = write_atomic(
                &run_dir.join(files::INIT_PID),
                format!("{} {start}\n", child.as_raw()).as_bytes(),
            );
        }
        break;
    }
    drop(setup_rx);

    let status = match pump.as_mut() {
        None => wait_forwarding(child, &set),
        Some(p) => pump_until_exit(child, &set, p)?,
    };

    let mut report = String::new();
    let _ = std::fs::File::from(report_rx).read_to_string(&mut report);
    let outcome = Outcome::decode(&report).or(match status {
        WaitStatus::Exited(_, c) => Some(Outcome::Exited(c)),
        WaitStatus::Signaled(_, s, _) => Some(Outcome::Killed(s as i32)),
        _ => None,
    });
    let oom_after = oom_kills();
    let info = crate::ExitInfo {
        exit_code: match outcome {
            Some(Outcome::Exited(c)) => Some(c),
            _ => None,
        },
        signal: match outcome {
            Some(Outcome::Killed(s)) => Some(s),
            _ => None,
        },
        oom_killed: matches!((oom_before, oom_after), (Some(a), Some(b)) if b > a),
        finished_at_ms: now_ms(),
    };
    let json = serde_json::to_vec(&info).expect("ExitInfo serializes");
    if let Err(e) = write_atomic(&run_dir.join(files::EXIT), &json) {
        match pump.as_mut() {
            Some(p) => p.note(&format!("ferry init: {e}")),
            None => say!("{e}"),
        }
    }
    Ok(outcome.map_or(EXIT_SETUP_FAILED, Outcome::code))
}

/// Waits for init, forwarding the signals the shim takes to it.
fn wait_forwarding(child: Pid, set: &SigSet) -> WaitStatus {
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return s,
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => return WaitStatus::StillAlive,
                Err(_) => {}
            },
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

/// How long the shim keeps reading output after init exited. Init's exit kills everything in
/// the machine's pid namespace, so the pipes' last writers are gone at once; this only bounds
/// a writer that escaped (none should).
const DRAIN_AFTER_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Like [`wait_forwarding`], and meanwhile moves the machine's output into its log. One thread:
/// the shim forks after this is set up and must stay single-threaded until then, and a poll
/// over a signalfd and the pipes needs no second one.
fn pump_until_exit(child: Pid, set: &SigSet, pump: &mut crate::logs::Pump) -> Result<WaitStatus> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let sfd = SignalFd::with_flags(set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| RuntimeError::sys("signalfd", e))?;
    let timeout = |d: Option<std::time::Duration>| {
        d.map_or(PollTimeout::NONE, |d| {
            PollTimeout::try_from(d.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX)
        })
    };
    let status = 'wait: loop {
        let (sig_ready, ready) = {
            let pipes = pump.fds();
            let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                pipes
                    .iter()
                    .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            match poll(&mut fds, timeout(pump.next_deadline())) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(RuntimeError::sys("poll", e)),
            }
            let hit = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let ready: Vec<usize> = pipes
                .iter()
                .zip(&fds[1..])
                .filter(|(_, f)| hit(f))
                .map(|((i, _), _)| *i)
                .collect();
            (hit(&fds[0]), ready)
        };
        for i in ready {
            pump.readable(i);
        }
        pump.tick(false);
        if !sig_ready {
            continue;
        }
        while let Ok(Some(info)) = sfd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break 'wait s,
                    Ok(_) => {}
                    Err(nix::errno::Errno::ECHILD) => break 'wait WaitStatus::StillAlive,
                    Err(_) => {}
                },
                Ok(sig) => {
                    let _ = nix::sys::signal::kill(child, sig);
                }
                Err(_) => {}
            }
        }
    };
    // The shim's own copies of the write ends go, so the pipes end once the machine's do.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let null = std::os::fd::AsRawFd::as_raw_fd(&null);
        let _ = nix::unistd::dup2(null, 1);
        let _ = nix::unistd::dup2(null, 2);
    }
    let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
    while !pump.done() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let pipes = pump.fds();
        let mut fds: Vec<PollFd> = pipes
            .iter()
            .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, timeout(Some(left))).is_err() {
            break;
        }
        let ready: Vec<usize> = pipes
            .iter()
            .zip(&fds)
            .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|((i, _), _)| *i)
            .collect();
        for i in ready {
            pump.readable(i);
        }
    }
    pump.tick(true);
    Ok(status)
}

/// PID 1 of the machine. Returns its exit code.
fn pid1(
    spec: &InitSpec,
    run_dir: &Path,
    userns: Option<&OwnedFd>,
    report: OwnedFd,
    setup: OwnedFd,
    set: &SigSet,
) -> i32 {
    // Opened before the machine's root replaces the host's: the release comes through it.
    let go = match spec.hold {
        false => None,
        true => match OpenOptions::new()
            .read(true)
            .write(true) // a FIFO opened for both never blocks here and never reads EOF
            .custom_flags(libc::O_CLOEXEC)
            .open(run_dir.join(files::GO))
        {
            Ok(f) => Some(f),
            Err(e) => {
                say!("opening the release of machine {}: {e}", spec.machine_id);
                return EXIT_SETUP_FAILED;
            }
        },
    };
    if let Err(e) = setup_machine(spec, run_dir, userns) {
        say!("setting up machine {}: {e}", spec.machine_id);
        return EXIT_SETUP_FAILED;
    }
    let mut setup = std::fs::File::from(setup);
    if let Some(mut go) = go {
        // Set up and held: the shim marks it, and nothing runs until a byte arrives.
        let _ = setup.write_all(b"h");
        let mut b = [0u8; 1];
        loop {
            match go.read(&mut b) {
                Ok(1) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return EXIT_SETUP_FAILED,
            }
        }
    }
    let _ = setup.write_all(b"1");
    let mut cmd = std::process::Command::new(&spec.cmd[0]);
    cmd.args(&spec.cmd[1..])
        .env_clear()
        .envs(spec.machine_env())
        .current_dir(spec.workdir());
    if let Some(u) = spec.user.as_deref().filter(|u| !u.is_empty()) {
        // Looked up now: init is inside the machine's root, so these are the image's files.
        match crate::user::resolve(u, Path::new("/etc")) {
            Ok(who) => {
                // std drops supplementary groups (setgroups(0)) before setgid/setuid.
                cmd.uid(who.uid).gid(who.gid);
                if let Some(home) = who.home {
                    if !spec.env.contains_key("HOME") {
                        cmd.env("HOME", home);
                    }
                }
            }
            Err(e) => {
                say!("user {u:?}: {e}");
                let _ =
                    std::fs::File::from(report).write_all(Outcome::Exited(126).encode().as_bytes());
                return 126;
            }
        }
    }
    // SAFETY: the closure only calls pthread_sigmask on a stack value (async-signal-safe).
    unsafe { cmd.pre_exec(crate::sys::unblock_all_signals) };
    let workload = match cmd.spawn() {
        Ok(c) => Pid::from_raw(c.id() as i32),
        Err(e) => {
            say!("starting {:?}: {e}", spec.cmd[0]);
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let _ =
                std::fs::File::from(report).write_all(Outcome::Exited(code).encode().as_bytes());
            return code;
        }
    };

    let mut outcome = None;
    while outcome.is_none() {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                // SIGCHLDs coalesce: reap everything that is ready, ours or adopted orphans.
                loop {
                    match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(p, c)) if p == workload => {
                            outcome = Some(Outcome::Exited(c))
                        }
                        Ok(WaitStatus::Signaled(p, s, _)) if p == workload => {
                            outcome = Some(Outcome::Killed(s as i32))
                        }
                        Ok(WaitStatus::StillAlive) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            Ok(sig) => {
                let _ = nix::sys::signal::kill(workload, sig);
            }
            Err(_) => {}
        }
    }
    let outcome = outcome.expect("loop ends with an outcome");
    let _ = std::fs::File::from(report).write_all(outcome.encode().as_bytes());
    // Exiting as PID 1 makes the kernel SIGKILL whatever is left in the namespace.
    outcome.code()
}

/// Namespaced setup of the machine's view of the system (mounts, hostname, files).
fn setup_machine(spec: &InitSpec, run_dir: &Path, userns: Option<&OwnedFd>) -> Result<()> {
    // A mount namespace of init's own, so the shim (which shares the one spawn created) keeps
    // seeing the host's /proc.
    // A sandboxed machine also gets a cgroup namespace rooted at its own cgroups (init is in
    // them already), so its /sys/fs/cgroup shows nothing else.
    let flags = if spec.sandbox.is_some() {
        CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP
    } else {
        CloneFlags::CLONE_NEWNS
    };
    unshare(flags).map_err(|e| RuntimeError::sys("unshare(CLONE_NEWNS)", e))?;
    // Private, recursively: nothing mounted here propagates back to the host (/ is usually
    // shared), and host mounts no longer leak in.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| RuntimeError::sys("making / private", e))?;
    nix::unistd::sethostname(&spec.machine_id).map_err(|e| RuntimeError::sys("sethostname", e))?;

    if let (Some(sb), Some(userns)) = (&spec.sandbox, userns) {
        let lockdown = crate::sandbox::Lockdown::get()?;
        let (resolv, hosts) = (resolv_conf(), hosts_file(spec));
        let etc = crate::sandbox::EtcFiles {
            resolv: &resolv,
            hosts: &hosts,
        };
        return crate::sandbox::enter(spec, sb, userns, &run_dir.join("sandbox"), etc, lockdown);
    }

    // A /proc for our pid namespace: `ps` and /proc/1 then show the machine, not the host.
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| RuntimeError::sys("mounting /proc", e))?;

    for m in &spec.mounts {
        bind(&m.host_path, &m.guest_path)?;
    }

    let resolv = run_dir.join(files::RESOLV);
    let hosts = run_dir.join(files::HOSTS);
    write_atomic(&resolv, resolv_conf().as_bytes())?;
    write_atomic(&hosts, hosts_file(spec).as_bytes())?;
    for (src, dst) in [(&resolv, "/etc/resolv.conf"), (&hosts, "/etc/hosts")] {
        // The host may lack the file (or have a dangling resolv.conf symlink): the machine then
        // runs without it, which is worth a line in its log but not a failed start.
        if let Err(e) = mount(
            Some(src.as_path()),
            dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            say!("bind-mounting {dst}: {e} (left as on the host)");
        }
    }
    Ok(())
}

/// Bind-mounts `host` at `guest`, creating the mountpoint (a directory, or an empty file when
/// `host` is a file).
fn bind(host: &Path, guest: &Path) -> Result<()> {
    let meta = std::fs::metadata(host)
        .map_err(|e| RuntimeError::io(format!("volume {}", host.display()), e))?;
    if !guest.exists() {
        let made = if meta.is_dir() {
            std::fs::create_dir_all(guest)
        } else {
            guest
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(guest).map(drop))
        };
        made.map_err(|e| RuntimeError::io(format!("creating {}", guest.display()), e))?;
    }
    mount(
        Some(host),
        guest,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| RuntimeError::sys(format!("bind-mounting {}", guest.display()), e))
}

/// Writes `pid` into each fd (a `cgroup.procs`). Runs between fork and exec: no allocation.
pub(crate) fn write_pid_to(fds: &[i32]) -> std::io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut buf = [0u8; 24];
    let s = fmt_int(pid as u64, &mut buf);
    for &fd in fds {
        // SAFETY: s is a live byte slice; fd is an open descriptor owned by the parent.
        if unsafe { libc::write(fd, s.as_ptr().cast(), s.len()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InitSpec {
        serde_json::from_str(
            r#"{"machine_id":"m1","app":"a","private_ip":"fdaa::2","region":"dev","cmd":["true"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn spec_defaults_and_env() {
        let mut s = spec();
        s.validate().unwrap();
        assert_eq!(s.workdir(), "/");
        s.env.insert("PATH".into(), "/x".into());
        s.env.insert("FERRY_REGION".into(), "evil".into());
        let env: BTreeMap<_, _> = s.machine_env().into_iter().collect();
        assert_eq!(env["PATH"], "/x");
        assert_eq!(env["FERRY_REGION"], "dev");
        assert_eq!(env["FERRY_MACHINE_ID"], "m1");
    }

    #[test]
    fn spec_validation() {
        let mut s = spec();
        s.cmd.clear();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.mounts.push(MountSpec {
            host_path: "/tmp".into(),
            guest_path: "data".into(),
        });
        assert!(s.validate().is_err());
        let mut s = spec();
        s.machine_id = "../x".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn outcome_roundtrip() {
        for o in [Outcome::Exited(3), Outcome::Killed(9)] {
            assert_eq!(Outcome::decode(&o.encode()), Some(o));
        }
        assert_eq!(Outcome::Killed(2).code(), 130);
        assert_eq!(Outcome::decode("garbage"), None);
    }

    #[test]
    fn etc_files() {
        assert_eq!(resolv_conf(), "nameserver fdaa::3\n");
        assert!(hosts_file(&spec()).contains("fdaa::2\tm1 ferry-local-6pn\n"));
    }
}
