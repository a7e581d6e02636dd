//! End-to-end tests of the machine runtime against the real kernel (run as root): each test gets
//! its own network namespace, cgroup and run directory, all removed in `Drop` even on panic,
//! and spawns the crate's `ferry-init-test` binary as `ferry init`.

use ferry_net::NetNs;
use ferry_runtime::logs::{self, LogLine, LogSpec, Stream};
use ferry_runtime::{
    claim_id_range, default_image, exec_in, run_check, spawn_machine, stop, CgroupLayout, Check,
    CheckKind, CheckRole, InitSpec, Limits, MachineCgroup, MountSpec, Running, RuntimeError,
    SandboxSpec, Signal,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const INIT_EXE: &str = env!("CARGO_BIN_EXE_ferry-init-test");
const PRIVATE_IP: &str = "fdaa:0:1:a7b:1:0:0:2";
const LONG: Duration = Duration::from_secs(15);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One test machine and everything it owns on the host.
struct TestMachine {
    id: String,
    ns: NetNs,
    dir: tempfile::TempDir,
    cg: MachineCgroup,
    running: Option<Running>,
}

impl TestMachine {
    fn new(limits: Limits) -> TestMachine {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("ferry-t{}-{n}", std::process::id());
        let ns = NetNs::create(&id).expect("creating the test netns");
        let ip: Ipv6Addr = PRIVATE_IP.parse().unwrap();
        ferry_net::netns::run_in(&ns, || {
            let nl = ferry_net::nl::Netlink::new()?;
            let lo = nl.require_index("lo")?;
            nl.up(lo, None)?;
            nl.add_address(lo, ip, 128)
        })
        .unwrap()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::discover().expect("cgroup layout");
        let cg = match layout.create_machine(&id, limits) {
            Ok(cg) => cg,
            Err(e) => {
                let _ = ns.delete();
                panic!("creating cgroups: {e}");
            }
        };
        TestMachine {
            id,
            ns,
            dir,
            cg,
            running: None,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn spec(&self, cmd: &[&str]) -> InitSpec {
        InitSpec {
            machine_id: self.id.clone(),
            app: "testapp".into(),
            private_ip: PRIVATE_IP.into(),
            region: "dev".into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            mounts: Vec::new(),
            workdir: None,
            user: None,
            sandbox: Some(self.sandbox()),
            log: Some(self.log_spec()),
            hold: false,
        }
    }

    /// Where the shim keeps this machine's output: as the agent does, in a bounded log.
    fn log_spec(&self) -> LogSpec {
        LogSpec {
            path: self.dir.path().join("logs").join("instance.log"),
            max_bytes: 64 * 1024,
            keep: 1,
        }
    }

    fn log_lines(&self) -> Vec<LogLine> {
        logs::read_log(&self.log_spec().path, 1, logs::Cursor::default())
    }

    /// The sandbox the agent would give this machine: the default image (built in the test's
    /// own directory) and an ID range of its own.
    fn sandbox(&self) -> SandboxSpec {
        SandboxSpec {
            id_base: claim_id_range(&self.cg.dirs()[0].1).expect("an id range"),
            layers: default_image(&self.dir.path().join("images")).expect("the default image"),
        }
    }

    fn start(&mut self, spec: &InitSpec) -> &Running {
        let r = spawn_machine(
            &self.run_dir(),
            &self.ns.path(),
            &self.cg,
            spec,
            Path::new(INIT_EXE),
        )
        .expect("spawning the machine");
        self.running = Some(r);
        self.running.as_ref().unwrap()
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("started")
    }

    /// What the shim's own stderr got (before its pipes existed), then the machine's output.
    fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.run_dir().join("log")).unwrap_or_default();
        for l in self.log_lines() {
            s.push_str(&l.message);
            s.push('\n');
        }
        s
    }

    /// Waits until the machine's log contains `what` (the command got going).
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + LONG;
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "log never showed {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestMachine {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = stop(&r, Signal::SIGKILL, Duration::from_secs(3));
        }
        if let Err(e) = self.cg.remove() {
            eprintln!("removing test cgroup: {e}");
        }
        let _ = self.ns.delete();
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn line<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} line in log:\n{log}"))
}

#[test]
fn init_is_pid1_with_env_hostname_etc_files_and_volume() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 128,
        cpus: 1.0,
        pids: 0,
    });
    let vol = m.dir.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let guest = m.dir.path().join("guest/data");
    let host_resolv = std::fs::read("/etc/resolv.conf").unwrap();
    let host_hosts = std::fs::read("/etc/hosts").unwrap();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();

    let mut spec = m.spec(&[]);
    spec.cmd = sh(r#"echo pid=$$
echo init=$(tr '\0' ' ' < /proc/1/cmdline)
echo hostname=$(cat /proc/sys/kernel/hostname)
echo env=$FERRY_MACHINE_ID,$FERRY_APP_NAME,$FERRY_PRIVATE_IP,$FERRY_REGION,$CUSTOM
echo resolv=$(cat /etc/resolv.conf)
echo hosts=$(grep ferry-local-6pn /etc/hosts)
echo cwd=$(pwd)
echo hello-volume > f
echo sum=$(sha256sum f | cut -d' ' -f1)
exit 7"#);
    spec.env.insert("CUSTOM".into(), "custom value".into());
    spec.mounts.push(MountSpec {
        host_path: vol.clone(),
        guest_path: guest.clone(),
    });
    spec.workdir = Some(guest.to_str().unwrap().to_owned());
    let exit = m.start(&spec).wait_exit(LONG).expect("machine exits");
    let log = m.log();
    assert_eq!(exit.exit_code, Some(7), "{exit:?}\n{log}");
    assert_eq!(exit.signal, None);

    assert_eq!(line(&log, "pid="), "2", "the command is init's first child");
    let init = line(&log, "init=");
    assert!(
        init.contains("ferry-init-test init --spec"),
        "PID 1 is ferry init: {init}"
    );
    assert_eq!(line(&log, "hostname="), m.id);
    assert_eq!(
        line(&log, "env="),
        format!("{},testapp,{PRIVATE_IP},dev,custom value", m.id)
    );
    assert_eq!(line(&log, "resolv="), "nameserver fdaa::3");
    assert_eq!(
        line(&log, "hosts="),
        format!("{PRIVATE_IP} {} ferry-local-6pn", m.id)
    );
    assert_eq!(line(&log, "cwd="), guest.to_str().unwrap());
    // The write landed in the host's volume directory, byte for byte.
    assert_eq!(
        std::fs::read_to_string(vol.join("f")).unwrap(),
        "hello-volume\n"
    );
    assert_eq!(line(&log, "sum="), sha256(&vol.join("f")));
    // ...and none of it leaked into the host's view.
    assert!(
        !guest.exists(),
        "the mountpoint was made in the machine's own root filesystem, not the host's"
    );
    assert_eq!(std::fs::read("/etc/resolv.conf").unwrap(), host_resolv);
    assert_eq!(std::fs::read("/etc/hosts").unwrap(), host_hosts);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
    // Attaching to an ended machine finds nothing.
    assert!(Running::attach(&m.run_dir()).unwrap().is_none());
}

#[test]
fn limits_applied_and_processes_in_the_cgroup() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.5,
        pids: 0,
    });
    assert_eq!(m.cg.memory_limit_bytes(), Some(64 << 20));
    assert_eq!(m.cg.cpu_quota(), Some((50_000, 100_000)));
    let spec = m.spec(&["sh", "-c", "echo ready; exec sleep 60"]);
    m.start(&spec);
    m.wait_log("ready");
    let r = m.running();
    let init = r.wait_init_pid(LONG).expect("init started");
    let pids = m.cg.pids();
    assert!(pids.contains(&r.pid()), "shim {} in {pids:?}", r.pid());
    assert!(pids.contains(&init), "init {init} in {pids:?}");
    assert!(
        pids.len() >= 3,
        "the command is in the cgroup too: {pids:?}"
    );
    // Every hierarchy: the shim's /proc/<pid>/cgroup names the machine's cgroup.
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", r.pid())).unwrap();
    let want = format!("/ferry/{}", m.id);
    for (kind, dir) in m.cg.dirs() {
        assert!(dir.ends_with(format!("ferry/{}", m.id)), "{kind:?} {dir:?}");
    }
    assert!(
        own.lines().filter(|l| l.ends_with(&want)).count() >= m.cg.dirs().len(),
        "{own}"
    );
    if let Some(v2) = m.cg.v2_dir() {
        assert!(v2.join("cgroup.procs").exists());
    }
    // The reopened handle (agent restart) finds the same cgroups.
    let layout = CgroupLayout::discover().unwrap();
    assert_eq!(
        MachineCgroup::open(&layout, &m.id).unwrap().as_ref(),
        Some(&m.cg)
    );
    assert!(layout.machine_ids().contains(&m.id));
}

#[test]
fn oom_kill_is_reported() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 32,
        cpus: 0.0,
        pids: 0,
    });
    let spec = m.spec(&[
        "python3",
        "-c",
        "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1",
    ]);
    let exit = m.start(&spec).wait_exit(LONG).expect("machine exits");
    assert_eq!(exit.signal, Some(9), "{exit:?}\n{}", m.log());
    assert!(exit.oom_killed, "{exit:?}");
}

#[test]
fn stop_with_sigint_is_not_escalated() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.0,
        pids: 0,
    });
    let spec = m.spec(&["sh", "-c", "echo ready; exec sleep 60"]);
    m.start(&spec);
    m.wait_log("ready");
    let t = Instant::now();
    let out = stop(m.running(), Signal::SIGINT, Duration::from_secs(5)).unwrap();
    assert!(!out.escalated_to_sigkill, "{out:?}");
    assert_eq!(out.exit.signal, Some(libc_sigint()), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.run_dir().join("exit.json")).unwrap()).unwrap();
    assert_eq!(on_disk["signal"], 2);
    assert!(on_disk["exit_code"].is_null());
    assert!(on_disk["finished_at_ms"].as_i64().unwrap() > 0);
}

fn libc_sigint() -> i32 {
    Signal::SIGINT as i32
}

#[test]
fn stop_escalates_to_sigkill_when_the_signal_is_ignored() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.0,
        pids: 0,
    });
    let spec = m.spec(&["sh", "-c", "trap '' INT; echo ready; sleep 60"]);
    m.start(&spec);
    m.wait_log("ready");
    let t = Instant::now();
    let out = stop(m.running(), Signal::SIGINT, Duration::from_secs(1)).unwrap();
    let took = t.elapsed();
    assert!(out.escalated_to_sigkill, "{out:?}");
    assert_eq!(out.exit.signal, Some(9), "{out:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // Killing init took the whole pid namespace (the sleep) with it.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !m.cg.pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(m.cg.pids(), Vec::<i32>::new());
}

#[test]
fn zombies_are_reaped() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.0,
        pids: 0,
    });
    // Each subshell exits at once, orphaning its background child to PID 1, which must reap it.
    let spec = m.spec(&[
        "sh",
        "-c",
        "(true &); (sleep 0.1 &); (sh -c 'exit 3' &); echo ready; sleep 60",
    ]);
    m.start(&spec);
    m.wait_log("ready");
    std::thread::sleep(Duration::from_millis(600));
    let out = exec_in(
        m.running(),
        &sh("for f in /proc/[0-9]*/stat; do cat $f; echo; done"),
        Duration::from_secs(5),
    )
    .unwrap();
    let stats = out.stdout_lossy();
    let states: Vec<(i32, char)> = stats
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let pid = l.split_whitespace().next().unwrap().parse().unwrap();
            let state = l[l.rfind(')').unwrap() + 2..].chars().next().unwrap();
            (pid, state)
        })
        .collect();
    assert!(states.iter().any(|&(p, _)| p == 1), "{stats}");
    assert!(
        !states.iter().any(|&(_, s)| s == 'Z'),
        "zombie left: {stats}"
    );
    // PID 1, the sh, its sleep, and the exec's own sh and cat (the exec ran in the pid ns).
    assert!(states.len() <= 6, "{stats}");
}

#[test]
fn output_is_logged_by_stream_in_order_bounded_and_partial_lines_show() {
    let mut m = TestMachine::new(limits());
    let spec = m.spec(&[
        "sh",
        "-c",
        r#"echo out1; echo err1 >&2
head -c 1000000 /dev/zero | tr '\0' 'x' | fold -w 100; echo
echo last-line; exec sleep 60"#,
    ]);
    m.start(&spec);
    m.wait_log("last-line");
    let lines = m.log_lines();
    let pick = |msg: &str| lines.iter().find(|l| l.message == msg).cloned();
    // The flood rotated the first lines away; stream and order survive in what is kept.
    let kept: Vec<_> = lines
        .iter()
        .filter(|l| l.message.starts_with('x'))
        .collect();
    let odd: Vec<_> = kept
        .iter()
        .filter(|l| l.message.len() != 100 || l.stream != Stream::Stdout)
        .collect();
    assert!(odd.is_empty(), "lines split or merged: {odd:?}");
    assert!(kept.len() > 100, "only {} flood lines kept", kept.len());
    assert!(lines.windows(2).all(|w| w[0].ts_us <= w[1].ts_us));
    assert_eq!(lines.last().unwrap().message, "last-line");
    let on_disk: u64 = std::fs::read_dir(m.dir.path().join("logs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= 2 * 64 * 1024,
        "a 1 MB flood kept {on_disk} bytes on disk (limit: 2 files of 64 KiB)"
    );
    assert!(pick("out1").is_none(), "rotated away by the flood");
    stop(m.running(), Signal::SIGKILL, LONG).unwrap();

    // A quiet machine: everything is there, stdout and stderr apart.
    let mut q = TestMachine::new(limits());
    // A prompt without a newline must show up (after PARTIAL_FLUSH) while the machine waits.
    let spec = q.spec(&[
        "sh",
        "-c",
        "echo out1; echo err1 >&2; printf 'prompt> '; exec sleep 60",
    ]);
    q.start(&spec);
    q.wait_log("prompt> ");
    let lines = q.log_lines();
    let got: Vec<_> = lines
        .iter()
        .map(|l| (l.stream, l.message.as_str()))
        .collect();
    assert!(got.contains(&(Stream::Stdout, "out1")), "{got:?}");
    assert!(got.contains(&(Stream::Stderr, "err1")), "{got:?}");
    assert!(got.contains(&(Stream::Stdout, "prompt> ")), "{got:?}");
    // The machine's output stays in its log after it is gone, and the pipes were drained.
    q.running().signal(Signal::SIGTERM).ok();
    let exit = stop(q.running(), Signal::SIGKILL, LONG).unwrap();
    assert!(exit.exit.signal.is_some());
    assert_eq!(q.log_lines().len(), lines.len());
}

#[test]
fn a_held_machine_is_set_up_but_runs_nothing_until_released() {
    let mut m = TestMachine::new(limits());
    let marker = m.dir.path().join("vol");
    std::fs::create_dir(&marker).unwrap();
    let mut spec = m.spec(&[
        "sh",
        "-c",
        "echo ran > /data/ran; echo ready; exec sleep 60",
    ]);
    spec.mounts = vec![MountSpec {
        host_path: marker.clone(),
        guest_path: "/data".into(),
    }];
    spec.hold = true;
    m.start(&spec);
    assert!(m.running().wait_held(LONG), "never held:\n{}", m.log());
    // Set up, yet neither init's pid (what "started" waits for) nor the command exists.
    assert_eq!(m.running().init_pid(), None);
    assert!(!marker.join("ran").exists());
    // Files written to the volume while held are what the command sees (a migration's final
    // copy round lands after the staging).
    std::fs::write(marker.join("late"), "late\n").unwrap();
    m.running().release().unwrap();
    assert!(m.running().wait_init_pid(LONG).is_some());
    m.wait_log("ready");
    assert_eq!(
        std::fs::read_to_string(marker.join("ran")).unwrap(),
        "ran\n"
    );
    let out = exec_in(m.running(), &sh("cat /data/late"), Duration::from_secs(5)).unwrap();
    assert_eq!(out.stdout_lossy(), "late\n");
    assert!(!m.running().held());
    // Released once: a second release finds nothing held.
    assert!(matches!(
        m.running().release(),
        Err(ferry_runtime::RuntimeError::NotRunning)
    ));
}

#[test]
fn a_held_machine_killed_before_its_release_leaves_nothing_running() {
    let mut m = TestMachine::new(limits());
    let mut spec = m.spec(&["sh", "-c", "echo ran; exec sleep 60"]);
    spec.hold = true;
    m.start(&spec);
    assert!(m.running().wait_held(LONG), "never held:\n{}", m.log());
    let out = stop(m.running(), Signal::SIGKILL, Duration::from_secs(5)).unwrap();
    assert!(out.exit.exit_code.is_some() || out.exit.signal.is_some());
    assert!(!m.running().held());
    assert!(!m.log().contains("ran"));
    // Nothing of the machine is left in its cgroup (killed processes leave it as they are
    // reaped: waited for, with a bound).
    let procs = m.running().cgroup_procs();
    let deadline = Instant::now() + LONG;
    loop {
        let left: Vec<String> = procs
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<String>()
            .lines()
            .map(String::from)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still in the cgroup: {left:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        m.running().release(),
        Err(ferry_runtime::RuntimeError::NotRunning)
    ));
}

#[test]
fn attach_after_agent_restart_then_stop() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.0,
        pids: 0,
    });
    let spec = m.spec(&["sh", "-c", "echo ready; exec sleep 60"]);
    let pid = m.start(&spec).pid();
    m.wait_log("ready");
    // The agent "restarts": its handle is gone, the machine is not.
    drop(m.running.take());
    let r = Running::attach(&m.run_dir())
        .unwrap()
        .expect("machine still running");
    assert_eq!(r.pid(), pid);
    assert!(r.wait_exit(Duration::from_millis(100)).is_none());
    let out = exec_in(&r, &sh("echo alive"), Duration::from_secs(5)).unwrap();
    assert_eq!(out.stdout_lossy(), "alive\n");
    let out = stop(&r, Signal::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(!out.escalated_to_sigkill);
    assert_eq!(out.exit.signal, Some(Signal::SIGTERM as i32));
    assert!(Running::attach(&m.run_dir()).unwrap().is_none());

    // A pid file whose pid now belongs to another process is not attached to.
    let other = m.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("pid"), format!("{} 1\n", std::process::id())).unwrap();
    assert!(Running::attach(&other).unwrap().is_none());
    assert!(Running::attach(&m.dir.path().join("nowhere"))
        .unwrap()
        .is_none());
}

#[test]
fn exec_returns_output_and_exit_code() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.0,
        pids: 0,
    });
    let mut spec = m.spec(&["sh", "-c", "echo ready; exec sleep 60"]);
    spec.env.insert("CUSTOM".into(), "x y".into());
    spec.workdir = Some("/tmp".into());
    m.start(&spec);
    m.wait_log("ready");
    let out = exec_in(
        m.running(),
        &sh(r#"echo out; echo err >&2
echo "$FERRY_MACHINE_ID $CUSTOM"
cat /proc/sys/kernel/hostname
tr '\0' ' ' < /proc/1/cmdline; echo
pwd
grep -c '^0::/$' /proc/self/cgroup
cat /etc/resolv.conf
exit 3"#),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(out.exit_code, 3, "{out:?}");
    assert_eq!(out.stderr_lossy(), "err\n");
    let stdout = out.stdout_lossy();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "out");
    assert_eq!(lines[1], format!("{} x y", m.id));
    assert_eq!(lines[2], m.id);
    assert!(lines[3].contains("ferry-init-test init"), "{stdout}");
    assert_eq!(lines[4], "/tmp");
    // In the machine's cgroup namespace, its own cgroup is the root: a process anywhere else
    // would show a "/../..." path.
    assert_eq!(lines[5], "1", "exec joined the machine's cgroups: {stdout}");
    assert_eq!(lines[6], "nameserver fdaa::3");

    // A signal-killed command reports 128+signal.
    let out = exec_in(m.running(), &sh("kill -9 $$"), Duration::from_secs(5)).unwrap();
    assert_eq!(out.exit_code, 137);
    // A missing program is an error from spawn.
    assert!(exec_in(
        m.running(),
        &["/nonexistent/prog".to_string()],
        Duration::from_secs(5)
    )
    .is_err());
    // Timeouts kill the command and say so, promptly.
    let t = Instant::now();
    let err = exec_in(m.running(), &sh("sleep 30"), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, RuntimeError::Timeout(..)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // ...and the sleep is gone from the machine.
    std::thread::sleep(Duration::from_millis(200));
    let ps = exec_in(
        m.running(),
        &sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!ps.stdout_lossy().contains("sleep 30"), "{ps:?}");
}

#[test]
fn tcp_http_and_exec_checks() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 256,
        cpus: 0.0,
        pids: 0,
    });
    let mut spec = m.spec(&["python3", "-m", "http.server", "8080", "--bind", PRIVATE_IP]);
    spec.workdir = Some("/tmp".into());
    m.start(&spec);
    let ip: IpAddr = PRIVATE_IP.parse().unwrap();
    let netns = m.ns.path();
    let check = |kind: CheckKind| Check {
        kind,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        role: CheckRole::Readiness,
    };
    let tcp = check(CheckKind::Tcp { port: 8080 });
    let deadline = Instant::now() + LONG;
    loop {
        let r = run_check(m.running(), ip, &netns, &tcp);
        if r.ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server never came up: {r:?}\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let http = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Http {
            port: 8080,
            path: "/".into(),
        }),
    );
    assert!(http.ok, "{http:?}");
    let http404 = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Http {
            port: 8080,
            path: "/no/such/file".into(),
        }),
    );
    assert!(!http404.ok && http404.detail.contains("404"), "{http404:?}");
    let ok = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Exec {
            cmd: sh("test \"$(cat /proc/sys/kernel/hostname)\" = \"$FERRY_MACHINE_ID\""),
        }),
    );
    assert!(ok.ok, "{ok:?}");

    // Nothing listens on 8081; the exec check fails.
    let t = Instant::now();
    let r = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Tcp { port: 8081 }),
    );
    assert!(!r.ok, "{r:?}");
    let r = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Http {
            port: 8081,
            path: "/".into(),
        }),
    );
    assert!(!r.ok, "{r:?}");
    let r = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Exec {
            cmd: sh("echo broken >&2; exit 1"),
        }),
    );
    assert!(!r.ok && r.detail.contains("exit 1: broken"), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The server is not reachable from the host's namespace: the checks really ran inside.
    assert!(std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::new(ip, 8080),
        Duration::from_millis(300)
    )
    .is_err());

    // Once the machine is gone every check fails (exec: not running).
    stop(m.running(), Signal::SIGTERM, Duration::from_secs(5)).unwrap();
    let r = run_check(m.running(), ip, &netns, &tcp);
    assert!(!r.ok);
    let r = run_check(
        m.running(),
        ip,
        &netns,
        &check(CheckKind::Exec { cmd: sh("true") }),
    );
    assert!(!r.ok, "{r:?}");
}

#[test]
fn bad_input_is_rejected() {
    let m = TestMachine::new(Limits {
        memory_mb: 16,
        cpus: 0.0,
        pids: 0,
    });
    let layout = CgroupLayout::discover().unwrap();
    assert!(layout
        .create_machine(
            "../escape",
            Limits {
                memory_mb: 1,
                cpus: 0.0,
                pids: 0,
            }
        )
        .is_err());
    let mut spec = m.spec(&["true"]);
    spec.machine_id = "someone-else".into();
    let err = spawn_machine(
        &m.run_dir(),
        &m.ns.path(),
        &m.cg,
        &spec,
        Path::new(INIT_EXE),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cgroup"), "{err}");
    let spec = m.spec(&[]);
    assert!(spawn_machine(
        &m.run_dir(),
        &m.ns.path(),
        &m.cg,
        &spec,
        Path::new(INIT_EXE)
    )
    .is_err());
    // `ferry init` run by hand (not in a fresh pid namespace) refuses.
    let dir = m.dir.path().join("manual");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("spec.json"),
        serde_json::to_vec(&m.spec(&["true"])).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(INIT_EXE)
        .args(["init", "--spec"])
        .arg(dir.join("spec.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ferry agent"));
}

#[test]
fn stop_with_sigstop_freezes_then_escalates() {
    let mut m = TestMachine::new(Limits {
        memory_mb: 64,
        cpus: 0.0,
        pids: 0,
    });
    let spec = m.spec(&["sh", "-c", "echo ready; exec sleep 60"]);
    m.start(&spec);
    m.wait_log("ready");
    let r = m.running();
    let init = r.wait_init_pid(LONG).unwrap();
    r.signal(Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let state = |pid: i32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        s[s.rfind(')').map_or(0, |i| i + 2)..].chars().next()
    };
    let stopped: Vec<i32> =
        m.cg.pids()
            .into_iter()
            .filter(|&p| state(p) == Some('T'))
            .collect();
    assert_eq!(stopped.len(), 1, "only the command stops: {stopped:?}");
    assert_eq!(state(init), Some('S'), "init keeps running");
    let t = Instant::now();
    let out = stop(r, Signal::SIGSTOP, Duration::from_millis(500)).unwrap();
    assert!(out.escalated_to_sigkill, "{out:?}");
    assert_eq!(out.exit.signal, Some(9));
    assert!(t.elapsed() < Duration::from_secs(3));
    // Unsupported signals are refused by the handle too.
    assert!(matches!(
        r.signal(Signal::SIGSEGV),
        Err(RuntimeError::Signal(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// The sandbox (docs/design.md#sandbox): what a machine sees, and escapes that must fail with the host
// unchanged afterwards.

/// Runs a shell script in the machine (as `ferry machine exec` does).
fn exec_sh(m: &TestMachine, script: &str) -> ferry_runtime::ExecOutput {
    exec_in(m.running(), &sh(script), Duration::from_secs(20)).expect("exec")
}

/// A field of `/proc/<pid>/status` (host view).
fn status_field(pid: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

fn sleeping_machine(limits: Limits) -> TestMachine {
    let mut m = TestMachine::new(limits);
    let spec = m.spec(&["sh", "-c", "echo ready; exec sleep 60"]);
    m.start(&spec);
    m.wait_log("ready");
    m
}

fn limits() -> Limits {
    Limits {
        memory_mb: 128,
        cpus: 0.0,
        pids: 256,
    }
}

#[test]
fn sandbox_root_is_an_unprivileged_range_with_docker_caps_and_seccomp() {
    let m = sleeping_machine(limits());
    let base = m.running().spec().unwrap().sandbox.unwrap().id_base;
    let out = exec_sh(
        &m,
        r#"cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g
grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|Seccomp|NoNewPrivs):' /proc/self/status
grep -E '^(CapEff|Seccomp):' /proc/1/status /proc/2/status
python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True)
for name, nr in (("add_key", 248), ("clone3", 435), ("personality", 135)):
    r = l.syscall(nr, 0xffffffff if nr == 135 else 0, 0, 0, 0, 0)
    print("syscall", name, r, ctypes.get_errno() if r < 0 else 0)'"#,
    );
    assert_eq!(out.exit_code, 0, "{out:?}");
    let stdout = out.stdout_lossy();
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let range = vec!["0".to_string(), base.to_string(), "65536".to_string()];
    assert_eq!(lines[0], range, "uid map: {stdout}");
    assert_eq!(lines[1], range, "gid map: {stdout}");
    assert_eq!(lines[2], ["0"], "root inside");
    assert_eq!(lines[3], ["0"]);
    for (key, want) in [
        ("CapEff:", "00000000a80425fb"),
        ("CapPrm:", "00000000a80425fb"),
        ("CapBnd:", "00000000a80425fb"),
        ("CapAmb:", "0000000000000000"),
        ("Seccomp:", "2"),
        ("NoNewPrivs:", "1"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [key, want]),
            "{key} {want}: {stdout}"
        );
    }
    // The filter, not a missing capability, refuses add_key (it needs none: without the filter
    // these arguments give EFAULT); clone3 is ENOSYS so libc falls back to clone, whose flags
    // the filter can see; the allowed personality query goes through.
    for want in [
        "syscall add_key -1 1",
        "syscall clone3 -1 38",
        "syscall personality 0 0",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
    // Init and the command run the same way.
    for pid in ["/proc/1/status", "/proc/2/status"] {
        assert!(
            stdout.contains(&format!("{pid}:CapEff:\t00000000a80425fb")),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("{pid}:Seccomp:\t2")), "{stdout}");
    }
    // On the host, init and the command are the unprivileged range's first uid.
    let init = m.running().wait_init_pid(LONG).unwrap().to_string();
    let uid = status_field(&init, "Uid:");
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        vec![base.to_string(); 4],
        "host uid of init"
    );
    assert!(base >= ferry_runtime::sandbox::FIRST_ID);
}

#[test]
fn sandbox_hides_the_host_files_namespaces_bpf_and_cgroups() {
    let m = sleeping_machine(limits());
    // Another machine's volume and ferry's state: plain host directories.
    let other_vol = m.dir.path().join("other-volume");
    std::fs::create_dir(&other_vol).unwrap();
    let secret_name = format!("secret-{}", m.id);
    std::fs::write(other_vol.join(&secret_name), "org A's secret\n").unwrap();
    let host_netns: Vec<_> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(!host_netns.is_empty(), "the test's own netns is there");
    let host_etc_file = Path::new("/etc").join(format!("escape-{}", m.id));
    let run_dir = m.run_dir();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();

    let script = format!(
        r#"cat {vol}/{secret} && echo READ-OTHER-VOLUME
find / -xdev -name {secret} 2>/dev/null | grep . && echo FOUND-SECRET
ls /run/netns && echo LISTED-NETNS
ls {run} && echo SAW-RUN-DIR
nsenter --net=/proc/1/ns/net true && echo SETNS-OK
unshare -n true && echo UNSHARE-OK
echo bpf=$(ls -A /sys/fs/bpf | wc -l)
python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); r=l.syscall(321, 5, 0, 0); print("bpf_syscall", r, ctypes.get_errno())'
echo cgroup=$(cat /proc/self/cgroup | grep '^0::')
echo $$ > /sys/fs/cgroup/../cgroup.procs && echo LEFT-CGROUP
echo $$ > /sys/fs/cgroup/cgroup.procs && echo MOVED-IN-CGROUP
echo max > /sys/fs/cgroup/memory.max && echo RAISED-MEMORY
ls /sys/fs/cgroup/memory 2>/dev/null && echo SAW-V1-MEMORY
mount -t tmpfs none /mnt && echo MOUNTED
mount --bind / /mnt && echo BOUND
echo written > {etc} && echo wrote-own-etc
mkdir -p {run} && echo x > {run}/escape && echo wrote-own-path
echo 1 > /proc/sys/kernel/sysrq && echo WROTE-PROC-SYS
hostname escaped && echo SET-HOSTNAME
echo escaped > /proc/sys/kernel/hostname && echo WROTE-HOSTNAME
echo net=$(ls /sys/class/net)
grep -c '{stage}' /proc/self/mountinfo
cat /proc/kcore | head -c1 | wc -c
echo done"#,
        vol = other_vol.display(),
        secret = secret_name,
        run = run_dir.display(),
        etc = host_etc_file.display(),
        stage = m.dir.path().display(),
    );
    let out = exec_sh(&m, &script);
    let stdout = out.stdout_lossy();
    assert!(stdout.ends_with("done\n"), "{out:?}");
    for escaped in [
        "READ-OTHER-VOLUME",
        "FOUND-SECRET",
        "LISTED-NETNS",
        "SAW-RUN-DIR",
        "SETNS-OK",
        "UNSHARE-OK",
        "LEFT-CGROUP",
        "MOVED-IN-CGROUP",
        "RAISED-MEMORY",
        "SAW-V1-MEMORY",
        "MOUNTED",
        "BOUND",
        "WROTE-PROC-SYS",
        "SET-HOSTNAME",
        "WROTE-HOSTNAME",
    ] {
        assert!(
            !stdout.contains(escaped),
            "{escaped}:\n{stdout}\n{}",
            out.stderr_lossy()
        );
    }
    assert!(stdout.contains("bpf=0\n"), "{stdout}");
    assert!(
        stdout.contains("bpf_syscall -1 1\n"),
        "bpf() is EPERM: {stdout}"
    );
    assert!(
        stdout.contains("cgroup=0::/\n"),
        "its own cgroup namespace: {stdout}"
    );
    // Writes to its own root filesystem work: they land in the machine's layer, not the host's.
    assert!(
        stdout.contains("wrote-own-etc") && stdout.contains("wrote-own-path"),
        "{stdout}"
    );
    // Its own sysfs: its network namespace's interfaces (the test's has only lo), not the
    // host's veths; no host path in its mount table; /proc/kcore is masked (reads nothing).
    assert!(stdout.contains("net=lo\n0\n0\ndone"), "{stdout}");

    // The host is unchanged.
    assert_eq!(
        std::fs::read_to_string(other_vol.join(&secret_name)).unwrap(),
        "org A's secret\n"
    );
    assert!(!host_etc_file.exists(), "host /etc untouched");
    assert!(!run_dir.join("escape").exists(), "host run dir untouched");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
        host_name
    );
    assert_eq!(m.cg.memory_limit_bytes(), Some(128 << 20));
    let init = m.running().wait_init_pid(LONG).unwrap();
    assert!(m.cg.pids().contains(&init), "init is still in its cgroup");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // The machine's root filesystem is built in its run dir, in its own mount namespace only.
    let stage = run_dir.join("sandbox");
    assert!(
        !mounts.contains(stage.to_str().unwrap()),
        "nothing of the machine is mounted on the host"
    );
}

#[test]
fn sandbox_cannot_signal_or_trace_host_processes() {
    let m = sleeping_machine(limits());
    let mut host_proc = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = host_proc.id();
    let host = Kill(&mut host_proc);
    let out = exec_sh(
        &m,
        &format!(
            r#"kill -9 {pid} && echo SIGNALLED
python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); r=l.ptrace(16, {pid}, 0, 0); print("ptrace", r, ctypes.get_errno())'
echo done
kill -9 -1"#
        ),
    );
    let stdout = out.stdout_lossy();
    assert!(stdout.contains("done"), "{out:?}");
    assert!(!stdout.contains("SIGNALLED"), "{stdout}");
    assert!(
        stdout.contains("ptrace -1 3\n"),
        "no such process in the machine: {stdout}"
    );
    // `kill -9 -1` took down what the machine may signal: its own processes, not ours.
    let exit = m
        .running()
        .wait_exit(LONG)
        .expect("the machine's command was killed");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(
        host.0.try_wait().unwrap().is_none(),
        "the host process survived"
    );
}

#[test]
fn sandbox_fork_bomb_stops_at_the_pids_limit() {
    let m = sleeping_machine(Limits {
        memory_mb: 256,
        cpus: 0.0,
        pids: 32,
    });
    assert_eq!(m.cg.pids_max(), Some(32));
    let out = exec_sh(
        &m,
        r#"python3 -c '
import os, time
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            os.close(1); os.close(2)
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print("stopped", n, e.errno)
'"#,
    );
    let stdout = out.stdout_lossy();
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"stopped"), "{out:?}");
    let forked: usize = words[1].parse().unwrap();
    assert!(forked < 32, "{stdout}");
    assert_eq!(words[2], "11", "EAGAIN: {stdout}");
    assert!(m.cg.pids().len() <= 32, "{:?}", m.cg.pids());
    // The host can still stop the machine.
    let out = stop(m.running(), Signal::SIGTERM, Duration::from_secs(1)).unwrap();
    assert!(out.exit.signal.is_some() || out.exit.exit_code.is_some());
}

#[test]
fn sandbox_volumes_keep_the_machines_own_owners_on_disk() {
    let vol_parent = tempfile::tempdir().unwrap();
    let vol = vol_parent.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let mount = MountSpec {
        host_path: vol.clone(),
        guest_path: "/data".into(),
    };
    // The first machine writes as root and as uid 1000.
    let mut a = TestMachine::new(limits());
    let mut spec = a.spec(&["sh", "-c", "touch /data/root-file /data/user-file && chown 1000:1000 /data/user-file && stat -c '%u:%g %n' /data/root-file /data/user-file"]);
    spec.mounts.push(mount.clone());
    let exit = a.start(&spec).wait_exit(LONG).unwrap();
    assert_eq!(exit.exit_code, Some(0), "{}", a.log());
    assert!(
        a.log()
            .contains("0:0 /data/root-file\n1000:1000 /data/user-file\n"),
        "{}",
        a.log()
    );
    // On disk: the machine's own IDs, not the host range it had.
    use std::os::unix::fs::MetadataExt;
    let meta = |f: &str| std::fs::metadata(vol.join(f)).unwrap();
    assert_eq!((meta("root-file").uid(), meta("root-file").gid()), (0, 0));
    assert_eq!(
        (meta("user-file").uid(), meta("user-file").gid()),
        (1000, 1000)
    );

    // Another machine, another range (as on a migration's destination), sees the same owners.
    let mut b = TestMachine::new(limits());
    let mut spec = b.spec(&[
        "sh",
        "-c",
        "stat -c '%u:%g %n' /data/root-file /data/user-file; echo more >> /data/root-file",
    ]);
    spec.mounts.push(mount);
    assert_ne!(
        spec.sandbox.as_ref().unwrap().id_base,
        a.running().spec().unwrap().sandbox.unwrap().id_base
    );
    let exit = b.start(&spec).wait_exit(LONG).unwrap();
    assert_eq!(exit.exit_code, Some(0), "{}", b.log());
    assert!(
        b.log()
            .contains("0:0 /data/root-file\n1000:1000 /data/user-file\n"),
        "{}",
        b.log()
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("root-file")).unwrap(),
        "more\n"
    );
}
