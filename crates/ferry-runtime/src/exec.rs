//! `exec`: running a command inside a live machine, like `nsenter` + cgroup join.
//!
//! The command joins the machine's cgroups and the net, uts, pid and mount namespaces of its
//! PID 1 (`/proc/<init>/ns/*`), gets the machine's environment and working directory, and runs
//! with its output captured. In a sandboxed machine it also joins the cgroup namespace and, last,
//! the user namespace as its root, and the grandchild takes the machine's capability set,
//! `no_new_privs` and seccomp filter just before exec: an exec'd command is held exactly like the
//! machine's own processes.
//!
//! `setns` into a pid namespace only affects the caller's *children*, so the process std spawns
//! forks once more between fork and exec (the `nsenter` double fork): the grandchild, now a
//! member of the machine's pid namespace, execs the command; the intermediate process waits for
//! it and exits with its status (128+signal for a signal). The intermediate closes every fd above
//! stderr first, including std's exec-status pipe, so `spawn` returns as soon as the grandchild
//! execs instead of when the command ends. On a timeout the command's process group (it runs in
//! a session of its own) and the intermediate are SIGKILLed; `PR_SET_PDEATHSIG` covers the
//! command should the intermediate die first. Processes that leave the group (daemons) survive
//! an exec timeout, as they would `docker exec`'s.

use crate::machine::Running;
use crate::sys::{kill_group, kill_quiet, pidfd_open, pidfd_wait, proc_stat};
use crate::{Result, RuntimeError};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an exec'd command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code, or 128+signal when a signal killed the command.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// The namespaces joined, in order. Mount goes last: entering it changes our root and cwd, and
/// the other namespace files were opened beforehand anyway. A sandboxed machine's cgroup
/// namespace is joined too, and its user namespace after all of these (they belong to the host's
/// user namespace: joining them needs the host privileges the user namespace would take away).
const NAMESPACES: [(&str, libc::c_int); 5] = [
    ("net", libc::CLONE_NEWNET),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
];

/// Runs `cmd` (argv, no shell) inside the machine and returns its exit code and output.
/// Fails with [`RuntimeError::Timeout`] (after killing it) if it runs longer than `timeout`.
pub fn exec_in(running: &Running, cmd: &[String], timeout: Duration) -> Result<ExecOutput> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err(RuntimeError::Invalid("exec command: it is empty".into()));
    }
    let spec = running.spec()?;
    // Right after a start the shim may not have forked init yet: give it a moment.
    let init = running
        .wait_init_pid(Duration::from_secs(5))
        .ok_or(RuntimeError::NotRunning)?;
    let (_, init_start) = proc_stat(init).ok_or(RuntimeError::NotRunning)?;
    let sandboxed = spec.sandbox.is_some();
    let namespaces: Vec<(&str, libc::c_int)> = NAMESPACES
        .iter()
        .copied()
        .filter(|(n, _)| sandboxed || *n != "cgroup")
        .collect();
    let ns_files: Vec<File> = namespaces
        .iter()
        .map(|(n, _)| {
            File::open(format!("/proc/{init}/ns/{n}"))
                .map_err(|e| RuntimeError::io(format!("opening the machine's {n} namespace"), e))
        })
        .collect::<Result<_>>()?;
    let userns = if sandboxed {
        Some(
            File::open(format!("/proc/{init}/ns/user"))
                .map_err(|e| RuntimeError::io("opening the machine's user namespace", e))?,
        )
    } else {
        None
    };
    // Built before the fork: applying it afterwards is only raw syscalls.
    let lockdown = if sandboxed {
        Some(crate::sandbox::Lockdown::get()?)
    } else {
        None
    };
    // The pid may have been recycled between reading init.pid and opening: check it still is
    // the same process now that the namespace handles are held.
    if proc_stat(init).map(|s| s.1) != Some(init_start) {
        return Err(RuntimeError::NotRunning);
    }
    let procs: Vec<File> = running
        .cgroup_procs()
        .iter()
        .map(|p| {
            OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|e| RuntimeError::io(format!("opening {}", p.display()), e))
        })
        .collect::<Result<_>>()?;
    let workdir = CString::new(spec.workdir())
        .map_err(|_| RuntimeError::Invalid("workdir: contains NUL".into()))?;

    let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let ns_fds: Vec<(i32, libc::c_int)> = ns_files
        .iter()
        .zip(namespaces.iter())
        .map(|(f, (_, flag))| (f.as_raw_fd(), *flag))
        .collect();
    let userns_fd = userns.as_ref().map(|f| f.as_raw_fd());

    let mut command = Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .env_clear()
        .envs(spec.machine_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure makes only async-signal-safe syscalls (write,
    // setns, setgroups, setres[ug]id, chdir, fork, close_range, waitpid, prctl, getppid, capset,
    // seccomp, _exit) on fds, a CString and seccomp programs prepared above, which outlive
    // spawn; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            crate::init::write_pid_to(&proc_fds)?;
            for &(fd, flag) in &ns_fds {
                if libc::setns(fd, flag) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = userns_fd {
                crate::sandbox::enter_userns(&fd)?;
            }
            if libc::chdir(workdir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => {
                    // The grandchild, in the machine's pid namespace. Die with the intermediate
                    // (timeouts kill it); its parent lives outside our namespace, so getppid()
                    // is 0 while it is alive and 1 (init adopted us) once it is gone.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != 0 {
                        libc::_exit(137);
                    }
                    // Its own session and process group (pgid = its host pid), so a timeout can
                    // kill everything it started, not just the direct child.
                    libc::setsid();
                    crate::sys::unblock_all_signals()?;
                    // Last: the filter would refuse nothing above, but it is the machine's rule
                    // from here on.
                    match lockdown {
                        Some(l) => l.apply(),
                        None => Ok(()),
                    }
                }
                child => {
                    // The intermediate: hold nothing open (std's exec-status pipe above all),
                    // wait, and pass the status on.
                    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                    let mut status = 0;
                    while libc::waitpid(child, &mut status, 0) < 0 {
                        if *libc::__errno_location() != libc::EINTR {
                            libc::_exit(126);
                        }
                    }
                    let code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else if libc::WIFSIGNALED(status) {
                        128 + libc::WTERMSIG(status)
                    } else {
                        126
                    };
                    libc::_exit(code)
                }
            }
        });
    }
    let deadline = Instant::now() + timeout;
    let mut child = command
        .spawn()
        .map_err(|e| RuntimeError::io(format!("exec {:?} in the machine", cmd[0]), e))?;
    drop(procs);
    drop(ns_files);
    drop(userns);

    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        reader(child.stdout.take().expect("piped"), out.clone()),
        reader(child.stderr.take().expect("piped"), err.clone()),
    ];
    let pidfd = pidfd_open(child.id() as i32).map_err(|e| RuntimeError::io("pidfd_open", e))?;
    if !pidfd_wait(&pidfd, deadline.saturating_duration_since(Instant::now())) {
        // The command is the intermediate's only child; it leads its own process group.
        for gc in children_of(child.id() as i32) {
            kill_group(gc, libc::SIGKILL);
            kill_quiet(gc, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        return Err(RuntimeError::Timeout(
            timeout,
            format!("exec {:?} in the machine (killed)", cmd[0]),
        ));
    }
    let status = child
        .wait()
        .map_err(|e| RuntimeError::io("waiting for exec", e))?;
    // Background processes the command left behind may still hold the pipes: collect output
    // until they close or the deadline passes, whichever is first.
    for r in readers {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = r.recv_timeout(left.max(Duration::from_millis(50)));
    }
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    let take = |b: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().expect("not poisoned"));
    Ok(ExecOutput {
        exit_code,
        stdout: take(&out),
        stderr: take(&err),
    })
}

/// Drains `src` into `buf` on a thread; the receiver fires at EOF.
fn reader(
    mut src: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf
                    .lock()
                    .expect("not poisoned")
                    .extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// Host pids of the children of `parent` (scanning /proc: field 4 of stat is the ppid).
fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
