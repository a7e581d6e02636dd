//! Per-machine cgroups, laid out below the cgroup ferry itself runs in.
//!
//! Nothing here is hard-coded: [`CgroupLayout::discover`] reads `/proc/self/mountinfo` and
//! `/proc/self/cgroup` and finds
//!
//! * on a **hybrid** host, the cgroup v1 `memory` and `cpu` hierarchies (wherever they are
//!   mounted, co-mounted with other controllers or not) plus the v2 tree (usually
//!   `/sys/fs/cgroup/unified`, no controllers, but it is where cgroup eBPF programs attach);
//! * on a **pure v2** host, the single v2 tree, where `memory` and `cpu` are v2 controllers.
//!
//! In each relevant hierarchy the machine's cgroup is `<own>/ferry/<machine id>`, where `<own>`
//! is ferry's own cgroup in that hierarchy: ferry never creates anything above where it was
//! put, so a supervisor (systemd, a container runtime) keeps accounting for everything.
//!
//! **The v2 "no internal processes" rule.** A v2 cgroup other than the root cannot both contain
//! processes and enable controllers for its children. Ferry runs *in* `<own>`, so it enables
//! `+memory +cpu` on `<own>/ferry` only (which never holds processes). That works when `<own>`
//! already delegates those controllers (its `cgroup.subtree_control` lists them, as systemd does
//! for `Delegate=yes` units) or when `<own>` is the root of the tree; otherwise ferry tries to
//! enable them on `<own>` and, when the kernel refuses (`EBUSY`), the limits are **skipped with
//! a warning** instead of failing the machine: it still gets its own cgroup (for accounting,
//! killing and eBPF), just without memory/cpu limits. Running ferry in a delegated unit (or a
//! leaf cgroup of its own) avoids the limitation.

use crate::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directory created in each hierarchy below ferry's own cgroup.
pub const FERRY_CGROUP: &str = "ferry";

/// Which hierarchy a cgroup directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CgroupKind {
    /// cgroup v1 hierarchy carrying the `memory` controller.
    V1Memory,
    /// cgroup v1 hierarchy carrying the `cpu` controller.
    V1Cpu,
    /// cgroup v1 hierarchy carrying the `pids` controller (the machine's process limit).
    V1Pids,
    /// The unified (v2) tree.
    V2,
}

/// Resource limits for one machine. `memory_mb == 0`, `cpus <= 0` and `pids == 0` mean "no
/// limit".
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_mb: u64,
    pub cpus: f64,
    /// At most this many processes and threads (the shim and init included): a fork bomb stops
    /// here instead of taking the host's pid space.
    #[serde(default)]
    pub pids: u64,
}

/// Where ferry's own cgroups are in each relevant hierarchy on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    v1_memory: Option<PathBuf>,
    v1_cpu: Option<PathBuf>,
    v1_pids: Option<PathBuf>,
    v2: Option<PathBuf>,
}

/// One cgroup mount from mountinfo.
#[derive(Debug)]
struct CgMount {
    v2: bool,
    controllers: Vec<String>,
    root: String,
    mountpoint: PathBuf,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<CgMount> {
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (fstype, superopts) = (post[0], post[2]);
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            superopts.split(',').map(str::to_owned).collect()
        };
        v.push(CgMount {
            v2,
            controllers,
            root: unescape_mountinfo(pre[3]),
            mountpoint: PathBuf::from(unescape_mountinfo(pre[4])),
        });
    }
    v
}

/// The directory of cgroup `path` (as in /proc/self/cgroup) inside `m`, if `m` shows it.
fn dir_in_mount(m: &CgMount, path: &str) -> Option<PathBuf> {
    let root = m.root.trim_end_matches('/');
    // The mount shows the subtree at `root`; `path` must be inside it (a whole component match,
    // so root "/a" does not claim "/ab").
    let rest = path.strip_prefix(root)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    let rel = rest.trim_start_matches('/');
    Some(if rel.is_empty() {
        m.mountpoint.clone()
    } else {
        m.mountpoint.join(rel)
    })
}

impl CgroupLayout {
    /// Reads this process's mounts and cgroup membership and works out the layout.
    pub fn discover() -> Result<CgroupLayout> {
        let mi = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| RuntimeError::io("reading /proc/self/mountinfo", e))?;
        let cg = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| RuntimeError::io("reading /proc/self/cgroup", e))?;
        Self::parse(&mi, &cg)
    }

    /// [`discover`](Self::discover) on given file contents (for tests and other hosts' dumps).
    pub fn parse(mountinfo: &str, self_cgroup: &str) -> Result<CgroupLayout> {
        let mounts = parse_mountinfo(mountinfo);
        let mut layout = CgroupLayout {
            v1_memory: None,
            v1_cpu: None,
            v1_pids: None,
            v2: None,
        };
        for line in self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && ctrls.is_empty() {
                layout.v2 = mounts
                    .iter()
                    .filter(|m| m.v2)
                    .find_map(|m| dir_in_mount(m, path));
                continue;
            }
            let ctrls: Vec<&str> = ctrls.split(',').collect();
            let find = |c: &str| {
                mounts
                    .iter()
                    .filter(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
                    .find_map(|m| dir_in_mount(m, path))
            };
            if ctrls.contains(&"memory") {
                layout.v1_memory = find("memory");
            }
            if ctrls.contains(&"cpu") {
                layout.v1_cpu = find("cpu");
            }
            if ctrls.contains(&"pids") {
                layout.v1_pids = find("pids");
            }
        }
        if layout.v1_memory.is_none() && layout.v1_cpu.is_none() && layout.v2.is_none() {
            return Err(RuntimeError::Cgroup(
                "no cgroup v1 memory/cpu hierarchy and no cgroup v2 tree is mounted".into(),
            ));
        }
        Ok(layout)
    }

    /// True on a hybrid host (memory or cpu is a v1 controller).
    pub fn is_hybrid(&self) -> bool {
        self.v1_memory.is_some() || self.v1_cpu.is_some()
    }

    /// Ferry's own cgroup directory in each relevant hierarchy.
    pub fn own_dirs(&self) -> Vec<(CgroupKind, &Path)> {
        let mut v = Vec::new();
        if let Some(p) = &self.v1_memory {
            v.push((CgroupKind::V1Memory, p.as_path()));
        }
        // Co-mounted memory+cpu would be the same directory: join it once.
        if let Some(p) = &self.v1_cpu {
            if self.v1_memory.as_ref() != Some(p) {
                v.push((CgroupKind::V1Cpu, p.as_path()));
            }
        }
        if let Some(p) = &self.v1_pids {
            if self.v1_memory.as_ref() != Some(p) && self.v1_cpu.as_ref() != Some(p) {
                v.push((CgroupKind::V1Pids, p.as_path()));
            }
        }
        if let Some(p) = &self.v2 {
            v.push((CgroupKind::V2, p.as_path()));
        }
        v
    }

    /// The v2 tree's own directory, if there is a v2 tree.
    pub fn v2_own(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    /// `<own>/ferry/<id>` for each hierarchy.
    fn machine_dirs(&self, machine_id: &str) -> Vec<(CgroupKind, PathBuf)> {
        self.own_dirs()
            .into_iter()
            .map(|(k, own)| (k, own.join(FERRY_CGROUP).join(machine_id)))
            .collect()
    }

    /// Machine IDs that have a cgroup in any hierarchy (for cleaning up after a crash).
    pub fn machine_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .own_dirs()
            .into_iter()
            .flat_map(|(_, own)| {
                std::fs::read_dir(own.join(FERRY_CGROUP))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| e.file_name().into_string().ok())
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The file that counts how many times the kernel OOM-killed a process in *this process's
    /// own* memory cgroup (the shim's fallback when it has no cgroup record: it lives in its
    /// machine's cgroup). `None` without a memory controller.
    pub fn own_oom_kill_file(&self) -> Option<PathBuf> {
        match (&self.v1_memory, &self.v2) {
            (Some(d), _) => Some(d.join("memory.oom_control")),
            (None, Some(d)) => Some(d.join("memory.events")),
            _ => None,
        }
    }

    /// Creates (or reuses) the machine's cgroups and applies `limits`.
    pub fn create_machine(&self, machine_id: &str, limits: Limits) -> Result<MachineCgroup> {
        validate_id(machine_id)?;
        let dirs = self.machine_dirs(machine_id);
        let mut created: Vec<PathBuf> = Vec::new();
        let res = (|| {
            for (kind, dir) in &dirs {
                let parent = dir.parent().expect("machine dir has a parent");
                std::fs::create_dir_all(parent)
                    .map_err(|e| RuntimeError::io(format!("creating {}", parent.display()), e))?;
                if *kind == CgroupKind::V2 {
                    delegate_v2(parent, self.is_hybrid());
                }
                match std::fs::create_dir(dir) {
                    Ok(()) => created.push(dir.clone()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(RuntimeError::io(format!("creating {}", dir.display()), e))
                    }
                }
            }
            let cg = MachineCgroup {
                machine_id: machine_id.to_owned(),
                dirs: dirs.clone(),
            };
            cg.apply_limits(limits)?;
            Ok(cg)
        })();
        if res.is_err() {
            for d in created {
                let _ = std::fs::remove_dir(d);
            }
        }
        res
    }
}

/// Makes `memory` and `cpu` available to the children of `<own>/ferry` on a pure v2 host (see
/// the module docs for why only there). Failures only mean "no limits", so they are warnings.
fn delegate_v2(ferry_dir: &Path, hybrid: bool) {
    if hybrid {
        // On a hybrid host memory/cpu are bound to v1 and cannot be enabled in the v2 tree.
        return;
    }
    let own = ferry_dir.parent().expect("ferry dir has a parent");
    let list = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    for c in ["memory", "cpu", "pids"] {
        if !list(&own.join("cgroup.controllers")).iter().any(|x| x == c) {
            tracing::warn!(controller = c, own = %own.display(),
                "cgroup v2 controller not available to ferry's cgroup; machine limits skipped");
            continue;
        }
        if !list(&own.join("cgroup.subtree_control"))
            .iter()
            .any(|x| x == c)
        {
            if let Err(e) = std::fs::write(own.join("cgroup.subtree_control"), format!("+{c}")) {
                tracing::warn!(controller = c, own = %own.display(), error = %e,
                    "cannot enable the controller below ferry's own cgroup (it holds processes: \
                     cgroup v2 no-internal-process rule); machine limits skipped");
                continue;
            }
        }
        let sub = ferry_dir.join("cgroup.subtree_control");
        if !list(&sub).iter().any(|x| x == c) {
            if let Err(e) = std::fs::write(&sub, format!("+{c}")) {
                tracing::warn!(controller = c, dir = %ferry_dir.display(), error = %e,
                    "cannot enable the controller for machines; machine limits skipped");
            }
        }
    }
}

pub(crate) fn read_oom_kill(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Machine IDs become directory names (cgroups, run dirs) and hostnames: keep them to a safe
/// alphabet so no ID can escape its parent directory.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && !id.starts_with('.')
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!("machine id {id:?}")))
    }
}

/// One machine's cgroup directories (one per relevant hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineCgroup {
    machine_id: String,
    dirs: Vec<(CgroupKind, PathBuf)>,
}

impl MachineCgroup {
    /// Finds a machine's existing cgroups (after an agent restart). `None` if there are none.
    pub fn open(layout: &CgroupLayout, machine_id: &str) -> Result<Option<MachineCgroup>> {
        validate_id(machine_id)?;
        let dirs: Vec<_> = layout
            .machine_dirs(machine_id)
            .into_iter()
            .filter(|(_, d)| d.is_dir())
            .collect();
        Ok((!dirs.is_empty()).then(|| MachineCgroup {
            machine_id: machine_id.to_owned(),
            dirs,
        }))
    }

    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// Each hierarchy's directory for this machine.
    pub fn dirs(&self) -> &[(CgroupKind, PathBuf)] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process writes its pid into to join the machine (all of them:
    /// on a hybrid host a process belongs to one cgroup per hierarchy).
    pub fn join_paths(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// The v2 directory, for attaching cgroup eBPF programs. `None` if the host has no v2 tree.
    pub fn v2_dir(&self) -> Option<&Path> {
        self.dir(CgroupKind::V2)
    }

    fn dir(&self, kind: CgroupKind) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d.as_path())
    }

    /// The cgroup directory that carries the memory controller, and whether it is v1.
    fn memory_dir(&self) -> Option<(&Path, bool)> {
        if let Some(d) = self.dir(CgroupKind::V1Memory) {
            return Some((d, true));
        }
        self.dir(CgroupKind::V2)
            .filter(|d| d.join("memory.max").exists())
            .map(|d| (d, false))
    }

    fn apply_limits(&self, limits: Limits) -> Result<()> {
        let write = |p: PathBuf, v: String| {
            std::fs::write(&p, &v)
                .map_err(|e| RuntimeError::io(format!("writing {v:?} to {}", p.display()), e))
        };
        let bytes = limits.memory_mb.saturating_mul(1024 * 1024);
        match self.memory_dir() {
            Some((d, true)) => write(
                d.join("memory.limit_in_bytes"),
                if bytes == 0 {
                    "-1".into()
                } else {
                    bytes.to_string()
                },
            )?,
            Some((d, false)) => write(
                d.join("memory.max"),
                if bytes == 0 {
                    "max".into()
                } else {
                    bytes.to_string()
                },
            )?,
            None => {
                if bytes != 0 {
                    tracing::warn!(machine = %self.machine_id, "no memory controller; memory limit skipped");
                }
            }
        }
        const PERIOD: u64 = 100_000;
        // The kernel's minimum quota is 1ms; anything smaller would be rejected.
        let quota = (limits.cpus > 0.0).then(|| ((limits.cpus * PERIOD as f64) as u64).max(1000));
        if let Some(d) = self.dir(CgroupKind::V1Cpu).or_else(|| {
            // cpu co-mounted with memory in one v1 hierarchy.
            self.dir(CgroupKind::V1Memory)
                .filter(|d| d.join("cpu.cfs_quota_us").exists())
        }) {
            // Period first: the kernel checks quota against the current period.
            write(d.join("cpu.cfs_period_us"), PERIOD.to_string())?;
            write(
                d.join("cpu.cfs_quota_us"),
                quota.map_or("-1".into(), |q| q.to_string()),
            )?;
        } else if let Some(d) = self
            .dir(CgroupKind::V2)
            .filter(|d| d.join("cpu.max").exists())
        {
            write(
                d.join("cpu.max"),
                format!("{} {PERIOD}", quota.map_or("max".into(), |q| q.to_string())),
            )?;
        } else if quota.is_some() {
            tracing::warn!(machine = %self.machine_id, "no cpu controller; cpu limit skipped");
        }
        let pids = if limits.pids == 0 {
            "max".to_owned()
        } else {
            limits.pids.to_string()
        };
        match self.pids_file() {
            Some(f) => write(f, pids)?,
            None if limits.pids != 0 => {
                tracing::warn!(machine = %self.machine_id, "no pids controller; pids limit skipped")
            }
            None => {}
        }
        Ok(())
    }

    /// The `pids.max` file of the machine (v1 `pids` hierarchy, or the v2 tree on a pure v2
    /// host), if the host has the controller.
    fn pids_file(&self) -> Option<PathBuf> {
        // pids may be co-mounted with memory or cpu in one v1 hierarchy.
        [
            CgroupKind::V1Pids,
            CgroupKind::V1Memory,
            CgroupKind::V1Cpu,
            CgroupKind::V2,
        ]
        .into_iter()
        .filter_map(|k| self.dir(k))
        .map(|d| d.join("pids.max"))
        .find(|f| f.exists())
    }

    /// The pids limit in force (`None`: unlimited or no pids controller).
    pub fn pids_max(&self) -> Option<u64> {
        std::fs::read_to_string(self.pids_file()?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The memory limit currently in force, read back from the kernel (`None`: no memory
    /// controller or unlimited).
    pub fn memory_limit_bytes(&self) -> Option<u64> {
        let (d, v1) = self.memory_dir()?;
        let file = if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        let v: u64 = std::fs::read_to_string(d.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // v1 reports "unlimited" as a huge page-rounded number.
        (v < (1u64 << 62)).then_some(v)
    }

    /// The CPU quota currently in force as `(quota_us, period_us)` (`None`: unlimited or no
    /// cpu controller).
    pub fn cpu_quota(&self) -> Option<(u64, u64)> {
        if let Some(d) = self.dir(CgroupKind::V1Cpu) {
            let q: i64 = std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let p: u64 = std::fs::read_to_string(d.join("cpu.cfs_period_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            return (q > 0).then_some((q as u64, p));
        }
        let text = std::fs::read_to_string(self.v2_dir()?.join("cpu.max")).ok()?;
        let mut it = text.split_whitespace();
        let q = it.next()?.parse().ok()?;
        let p = it.next()?.parse().ok()?;
        Some((q, p))
    }

    /// Kernel OOM kills in this machine's memory cgroup so far.
    pub fn oom_kills(&self) -> Option<u64> {
        let (d, v1) = self.memory_dir()?;
        read_oom_kill(&d.join(if v1 {
            "memory.oom_control"
        } else {
            "memory.events"
        }))
    }

    /// Every pid in the machine's cgroups (the union over hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .join_paths()
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// SIGKILLs everything in the machine's cgroups: `cgroup.kill` where the kernel has it (v2,
    /// atomic even against forks), and pid by pid from `cgroup.procs` otherwise.
    pub fn kill_all(&self) {
        if let Some(d) = self.v2_dir() {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        for pid in self.pids() {
            crate::sys::kill_quiet(pid, libc::SIGKILL);
        }
    }

    /// Removes the machine's cgroups. A cgroup can only be removed once it is empty, so this
    /// kills whatever is left and retries for up to two seconds while the processes drain.
    pub fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut left: Vec<&PathBuf> = self.dirs.iter().map(|(_, d)| d).collect();
        loop {
            let mut busy = Vec::new();
            for d in left {
                match std::fs::remove_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy.push(d),
                    Err(e) => return Err(RuntimeError::io(format!("removing {}", d.display()), e)),
                }
            }
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::Cgroup(format!(
                    "{} still has processes after 2s",
                    busy[0].display()
                )));
            }
            self.kill_all();
            std::thread::sleep(Duration::from_millis(20));
            left = busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MI: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CG: &str = "\
9:name=systemd:/
4:memory:/process_api/ab00
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn hybrid_layout() {
        let l = CgroupLayout::parse(HYBRID_MI, HYBRID_CG).unwrap();
        assert!(l.is_hybrid());
        assert_eq!(
            l.own_dirs(),
            vec![
                (
                    CgroupKind::V1Memory,
                    Path::new("/sys/fs/cgroup/memory/process_api/ab00")
                ),
                (CgroupKind::V1Cpu, Path::new("/sys/fs/cgroup/cpu")),
                (CgroupKind::V2, Path::new("/sys/fs/cgroup/unified")),
            ]
        );
        let dirs = l.machine_dirs("m1");
        assert_eq!(
            dirs[0].1,
            Path::new("/sys/fs/cgroup/memory/process_api/ab00/ferry/m1")
        );
    }

    #[test]
    fn pure_v2_layout_and_comounted_v1() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = CgroupLayout::parse(mi, "0::/system.slice/ferry.service\n").unwrap();
        assert!(!l.is_hybrid());
        assert_eq!(
            l.own_dirs(),
            vec![(
                CgroupKind::V2,
                Path::new("/sys/fs/cgroup/system.slice/ferry.service")
            )]
        );

        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  33 31 0:30 /docker/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let cg = "3:cpu,cpuacct:/a/b\n2:memory:/docker/x/y\n";
        let l = CgroupLayout::parse(mi, cg).unwrap();
        assert_eq!(
            l.own_dirs(),
            vec![
                (CgroupKind::V1Memory, Path::new("/sys/fs/cgroup/memory/y")),
                (
                    CgroupKind::V1Cpu,
                    Path::new("/sys/fs/cgroup/cpu,cpuacct/a/b")
                ),
            ]
        );
        assert!(CgroupLayout::parse("", "0::/\n").is_err());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/a\\"), r"/a\\");
    }

    #[test]
    fn ids() {
        assert!(validate_id("e2865013d4e168").is_ok());
        for bad in ["", "..", "a/b", "-x", ".x", &"a".repeat(64)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}
