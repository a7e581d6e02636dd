//! The machine sandbox (docs/design.md#sandbox): what a machine sees of the host is its own root filesystem,
//! its own user, pid, mount, uts and cgroup namespaces, a reduced capability set, a seccomp
//! filter and `no_new_privs`.
//!
//! `ferry init` (PID 1, still host root in namespaces owned by the host's user namespace) builds
//! the machine's view and then steps into the machine's user namespace:
//!
//! 1. a **user namespace** whose root is an unprivileged host ID range of 65,536 IDs, its own
//!    per machine ([`claim_id_range`]); a short-lived helper process creates it, init writes its
//!    maps and keeps a handle;
//! 2. the **root filesystem**: one overlayfs per [`Layer`] (read-only lower = an *idmapped* bind
//!    of the layer's host directory, so host-root files are the machine's root files; upper =
//!    a tmpfs that exists only for this run, charged to the machine's memory cgroup); the
//!    default image ([`default_image`]) is a skeleton with a copy of `/etc` plus the host's
//!    `/usr` (and `/bin`, `/lib*`, `/sbin` where they are not symlinks into it); OCI layers slot
//!    in as more lower directories later;
//! 3. `/proc` (own pid namespace; Docker's masked and read-only paths), a minimal `/dev`, a
//!    sysfs of its own (its network namespace's interfaces only, no host submounts such as
//!    `/sys/fs/bpf`), read-only, with the machine's own cgroup2 (cgroup namespace) at
//!    `/sys/fs/cgroup`; volumes as idmapped binds, so a file
//!    the machine's root writes is stored as uid 0 on disk and keeps meaning that after a
//!    migration to a host where the machine gets another range;
//! 4. `pivot_root` into it and detach the host's tree;
//! 5. join the user namespace as its root, then [`Lockdown::apply`]: `no_new_privs`, Docker's
//!    default capability set, Docker's default seccomp allowlist.
//!
//! Because every namespace except the user namespace is owned by the host's user namespace, root
//! in the machine can never mount, change its hostname, reconfigure its network or join another
//! namespace, even with a capability it holds.

use crate::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How many user and group IDs each machine gets (0..65535 inside).
pub const ID_COUNT: u32 = 65_536;
/// The first host ID handed to machines: far above any real account or subuid range.
pub const FIRST_ID: u32 = 0x1000_0000;
const MAX_SLOTS: u32 = (u32::MAX - FIRST_ID) / ID_COUNT - 1;
/// Where ID ranges are claimed, box-wide (several agents of a dev fleet share one kernel).
pub const ID_REGISTRY: &str = "/run/ferry-ids";

/// Docker's default capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID,
/// SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
pub const DEFAULT_CAPS: u64 = 0xa804_25fb;

/// One read-only layer of a machine's root filesystem: the host directory `source` appears at
/// `target` (an absolute guest path; `/` for a whole image layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub source: PathBuf,
    pub target: PathBuf,
    /// More read-only directories stacked below `source`, topmost first (an OCI image's layers:
    /// `source` is its top layer). Each is idmapped like `source`; overlayfs merges them and
    /// honours the whiteouts and opaque directories they hold.
    /// Image layers are untrusted: their symlinks may point anywhere, so every path ferry
    /// mounts on or writes to is resolved inside the machine's root (`in_root`) and the fixed
    /// mount points (`/proc`, `/dev`, `/sys`, `/etc`) are made real directories (`real_dir`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub below: Vec<PathBuf>,
}

/// How a machine is sandboxed (part of its [`InitSpec`](crate::InitSpec)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The host uid and gid that is root inside; the machine owns `id_base..id_base+ID_COUNT`.
    pub id_base: u32,
    /// The root filesystem, outermost first: the layer for `/` comes first.
    pub layers: Vec<Layer>,
}

impl SandboxSpec {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.id_base < FIRST_ID || self.id_base.checked_add(ID_COUNT).is_none() {
            return Err(RuntimeError::Invalid(format!(
                "sandbox id_base {}",
                self.id_base
            )));
        }
        // overlayfs' limit is 500 lower directories; the option string must fit a page.
        if self.layers.iter().any(|l| l.below.len() > 400) {
            return Err(RuntimeError::Invalid(
                "sandbox layers: more than 400 directories in one layer".into(),
            ));
        }
        if self.layers.first().map(|l| l.target.as_path()) != Some(Path::new("/")) {
            return Err(RuntimeError::Invalid(
                "sandbox layers: the first layer must be the root (/)".into(),
            ));
        }
        for l in &self.layers {
            if !l.source.is_absolute()
                || !l.target.is_absolute()
                || l.below.iter().any(|b| !b.is_absolute())
            {
                return Err(RuntimeError::Invalid(format!(
                    "sandbox layer {} -> {}: paths must be absolute",
                    l.source.display(),
                    l.target.display()
                )));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// ID ranges

/// Claims a host ID range for the machine whose liveness witness is `owner` (its cgroup
/// directory: the range is the machine's for as long as that directory exists). Returns the
/// range's first ID; the same owner gets the same range back.
///
/// Ranges are files `<slot>` in [`ID_REGISTRY`] naming their owner; a flock on the directory's
/// lock file serializes claims of every agent on the box. A range whose owner is gone is free.
pub fn claim_id_range(owner: &Path) -> Result<u32> {
    claim_id_range_in(Path::new(ID_REGISTRY), owner)
}

/// The registry's index from owner to slot: `by-owner/<FNV-1a of the owner's path>`.
const BY_OWNER: &str = "by-owner";
/// The registry's next-fit cursor: the slot the next search starts at.
const CURSOR: &str = "next";

/// FNV-1a (64 bits): a stable name for an owner's index entry (std's hasher may change between
/// builds, and agents of different builds share the registry).
fn owner_key(owner: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Finding a range costs O(1) however many machines hold one: the owner's own range through the
/// index, a new one by probing slots from the cursor on (next fit). It used to read every slot
/// file and stat every owner on each claim, ~1,000 files and cgroup lookups per machine start on
/// a host with 1,000 machines (BENCHMARKS.md, issue 17 item 4). A slot whose owner is gone is
/// taken over when the search reaches it, which keeps the registry as small as what runs plus
/// what died since the cursor last passed.
fn claim_id_range_in(registry: &Path, owner: &Path) -> Result<u32> {
    let io = |what: &str, e| RuntimeError::io(format!("{what} in {}", registry.display()), e);
    let index = registry.join(BY_OWNER);
    std::fs::create_dir_all(&index).map_err(|e| io("creating the id registry", e))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(registry.join(".lock"))
        .map_err(|e| io("opening the lock", e))?;
    // SAFETY: flock on an fd we own; the lock goes with the fd when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("locking", std::io::Error::last_os_error()));
    }
    let owner_s = owner.to_string_lossy().into_owned();
    let holder = |slot: u32| std::fs::read_to_string(registry.join(slot.to_string())).ok();
    // Already ours? (the index may be stale: the slot file is the truth.)
    let key = index.join(owner_key(&owner_s));
    if let Some(slot) = std::fs::read_to_string(&key)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        if holder(slot).as_deref() == Some(owner_s.as_str()) {
            return Ok(FIRST_ID + slot * ID_COUNT);
        }
    }
    let start = std::fs::read_to_string(registry.join(CURSOR))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|s| *s < MAX_SLOTS)
        .unwrap_or(0);
    let mut found = None;
    for i in 0..MAX_SLOTS {
        let slot = (start + i) % MAX_SLOTS;
        match holder(slot) {
            None => {}
            Some(h) if h.is_empty() || !Path::new(&h).exists() => {
                // Its machine is gone: the slot is free, and so is its index entry.
                let _ = std::fs::remove_file(index.join(owner_key(&h)));
            }
            Some(_) => continue,
        }
        found = Some(slot);
        break;
    }
    let slot = found
        .ok_or_else(|| RuntimeError::Invalid("sandbox: every host ID range is in use".into()))?;
    // The index first: a slot file that names an owner then always has the owner's index
    // entry pointing at it (a crash in between leaves an entry the check above disbelieves).
    crate::sys::write_atomic(&key, slot.to_string().as_bytes())?;
    crate::sys::write_atomic(&registry.join(slot.to_string()), owner_s.as_bytes())?;
    crate::sys::write_atomic(
        &registry.join(CURSOR),
        ((slot + 1) % MAX_SLOTS).to_string().as_bytes(),
    )?;
    Ok(FIRST_ID + slot * ID_COUNT)
}

// ---------------------------------------------------------------------------------------------
// The default image

/// Files of the host's `/etc` that the image's copy leaves out: password hashes and host keys
/// are the host's secrets, not the machine's.
fn etc_secret(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    matches!(
        s.as_ref(),
        "shadow" | "shadow-" | "gshadow" | "gshadow-" | "sudoers" | "machine-id"
    ) || (s.starts_with("ssh/ssh_host_") && s.ends_with("_key"))
        || s.starts_with("sudoers.d")
        || s.starts_with("ssl/private")
}

/// The host's system directories a default image is made of (each a layer unless it is a
/// symlink, e.g. `/bin -> usr/bin` on a merged-/usr host, which the skeleton copies).
const SYSTEM_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// The default image (no registry): a skeleton directory under `images_dir` (the root layer:
/// the usual empty top-level directories, the system dirs' symlinks and a copy of the host's
/// `/etc` without its secrets) plus one layer per host system directory. Built once per
/// `images_dir` (atomically: a half-built skeleton is never used) and reused afterwards.
pub fn default_image(images_dir: &Path) -> Result<Vec<Layer>> {
    let skel = images_dir.join("default");
    if !skel.join(".complete").exists() {
        let tmp = images_dir.join(format!("default.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        build_skeleton(&tmp)
            .map_err(|e| RuntimeError::io(format!("building the image in {}", tmp.display()), e))?;
        let _ = std::fs::remove_dir_all(&skel);
        match std::fs::rename(&tmp, &skel) {
            Ok(()) => {}
            // Another agent built it meanwhile: use theirs.
            Err(_) if skel.join(".complete").exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(RuntimeError::io("publishing the default image", e)),
        }
    }
    let mut layers = vec![Layer {
        source: skel,
        target: "/".into(),
        below: Vec::new(),
    }];
    for d in SYSTEM_DIRS {
        let host = Path::new("/").join(d);
        if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
            layers.push(Layer {
                source: host.clone(),
                target: host,
                below: Vec::new(),
            });
        }
    }
    Ok(layers)
}

fn build_skeleton(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for (d, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/cache", 0o755),
        ("home", 0o755),
        ("root", 0o700),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
    ] {
        let p = dir.join(d);
        std::fs::DirBuilder::new().mode(mode).create(&p)?;
        // The umask may have cleared bits (tmp's sticky, world-writable bits above all).
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    for d in SYSTEM_DIRS {
        let host = Path::new("/").join(d);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                std::os::unix::fs::symlink(std::fs::read_link(&host)?, dir.join(d))?
            }
            Ok(m) if m.is_dir() => std::fs::DirBuilder::new().mode(0o755).create(dir.join(d))?,
            _ => {}
        }
    }
    copy_tree(Path::new("/etc"), &dir.join("etc"), Path::new(""))?;
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(())
}

/// Copies `src` to `dst` keeping modes, owners and symlinks; `rel` is the path below `/etc`.
fn copy_tree(src: &Path, dst: &Path, rel: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if !rel.as_os_str().is_empty() && etc_secret(rel) {
        return Ok(());
    }
    if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        std::fs::create_dir(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_tree(
                &e.path(),
                &dst.join(e.file_name()),
                &rel.join(e.file_name()),
            )?;
        }
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        std::fs::copy(src, dst)?;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else {
        return Ok(()); // sockets, fifos, devices: nothing a machine needs from /etc
    }
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
}

// ---------------------------------------------------------------------------------------------
// Capabilities, no_new_privs, seccomp

/// The privileges every process of a machine is left with, prepared before any fork so that
/// [`apply`](Lockdown::apply) only makes raw syscalls (it runs between fork and exec in `exec`).
#[derive(Debug)]
pub(crate) struct Lockdown {
    filters: Vec<seccompiler::BpfProgram>,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

impl Lockdown {
    /// The one lockdown of this process, compiled on first use (exec and checks reuse it).
    pub(crate) fn get() -> Result<&'static Lockdown> {
        static LOCKDOWN: std::sync::OnceLock<Lockdown> = std::sync::OnceLock::new();
        if let Some(l) = LOCKDOWN.get() {
            return Ok(l);
        }
        let l = Lockdown {
            filters: seccomp_filters()?,
        };
        Ok(LOCKDOWN.get_or_init(|| l))
    }

    /// Drops every capability outside [`DEFAULT_CAPS`] (bounding, ambient, effective, permitted,
    /// inheritable), sets `no_new_privs` and installs the seccomp filters. Async-signal-safe.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        let last = || Err(std::io::Error::last_os_error());
        // SAFETY (whole block): prctl/capset/seccomp with plain values and pointers to live stack
        // data or to the filters, which outlive the calls.
        unsafe {
            for cap in 0..64u64 {
                if DEFAULT_CAPS & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && *libc::__errno_location() != libc::EINVAL
                {
                    return last();
                }
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return last();
            }
            let mut hdr = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            let lo = DEFAULT_CAPS as u32;
            let hi = (DEFAULT_CAPS >> 32) as u32;
            let data = [
                CapData {
                    effective: lo,
                    permitted: lo,
                    inheritable: lo,
                },
                CapData {
                    effective: hi,
                    permitted: hi,
                    inheritable: hi,
                },
            ];
            if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                return last();
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return last();
            }
            for f in &self.filters {
                let prog = libc::sock_fprog {
                    len: f.len() as u16,
                    filter: f.as_ptr() as *mut libc::sock_filter,
                };
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog,
                ) != 0
                {
                    return last();
                }
            }
        }
        Ok(())
    }
}

/// Namespace flags a machine may not pass to `clone` (Docker denies them without
/// CAP_SYS_ADMIN, which a machine never has).
const NS_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// Docker's default seccomp profile as two filters: an allowlist (anything else fails with
/// EPERM; `clone` only without namespace flags, `personality` only with the harmless
/// personas), and `clone3` failing with ENOSYS, as Docker does, so that libc falls back to
/// `clone`, whose flags the first filter can see. The kernel runs the newest filter first and
/// keeps the first of equally strong verdicts, so clone3's ENOSYS wins over the EPERM.
fn seccomp_filters() -> Result<Vec<seccompiler::BpfProgram>> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let err = |e: seccompiler::BackendError| RuntimeError::Invalid(format!("seccomp filter: {e}"));
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().map_err(|e| {
        RuntimeError::Invalid(format!("seccomp on {}: {e:?}", std::env::consts::ARCH))
    })?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = ALLOWED_SYSCALLS
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let cond = |op, v| SeccompCondition::new(0, SeccompCmpArgLen::Qword, op, v).map_err(err);
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(SeccompCmpOp::MaskedEq(NS_FLAGS), 0)?]).map_err(err)?],
    );
    // PER_LINUX, PER_LINUX32, UNAME26 variants and the query (0xffffffff), as Docker allows.
    let mut personas = Vec::new();
    for p in [0u64, 8, 0x20000, 0x20008, 0xffff_ffff] {
        personas.push(
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                p,
            )
            .map_err(err)?])
            .map_err(err)?,
        );
    }
    rules.insert(libc::SYS_personality, personas);
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    Ok(vec![
        allow.try_into().map_err(err)?,
        clone3.try_into().map_err(err)?,
    ])
}

/// Docker's default allowlist (moby `profiles/seccomp/default.json`, the unconditional part for
/// x86_64, the only architecture ferry builds machines for today), minus the entries that need a capability a machine lacks. Notably absent: mount and
/// the new mount API, unshare, setns, pivot_root, bpf, perf_event_open, kexec, module loading,
/// keyctl, add_key, request_key, reboot, swapon, the clock setters, open_by_handle_at, userfaultfd,
/// io_uring, and `clone` with namespace flags.
#[rustfmt::skip]
const ALLOWED_SYSCALLS: &[i64] = {
    use libc::*;
    &[
        SYS_accept, SYS_accept4, SYS_access, SYS_adjtimex, SYS_alarm, SYS_bind, SYS_brk,
        SYS_capget, SYS_capset, SYS_chdir, SYS_chmod, SYS_chown, SYS_clock_getres,
        SYS_clock_gettime, SYS_clock_nanosleep, SYS_close, SYS_close_range, SYS_connect,
        SYS_copy_file_range, SYS_creat, SYS_dup, SYS_dup2, SYS_dup3, SYS_epoll_create,
        SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_epoll_wait,
        SYS_eventfd, SYS_eventfd2, SYS_execve, SYS_execveat, SYS_exit, SYS_exit_group,
        SYS_faccessat, SYS_faccessat2, SYS_fadvise64, SYS_fallocate, SYS_fanotify_mark,
        SYS_fchdir, SYS_fchmod, SYS_fchmodat, SYS_fchown, SYS_fchownat, SYS_fcntl,
        SYS_fdatasync, SYS_fgetxattr, SYS_flistxattr, SYS_flock, SYS_fork, SYS_fremovexattr,
        SYS_fsetxattr, SYS_fstat, SYS_fstatfs, SYS_fsync, SYS_ftruncate, SYS_futex,
        SYS_futex_waitv, SYS_futimesat, SYS_getcpu, SYS_getcwd, SYS_getdents, SYS_getdents64,
        SYS_getegid, SYS_geteuid, SYS_getgid, SYS_getgroups, SYS_getitimer, SYS_getpeername,
        SYS_getpgid, SYS_getpgrp, SYS_getpid, SYS_getppid, SYS_getpriority, SYS_getrandom,
        SYS_getresgid, SYS_getresuid, SYS_getrlimit, SYS_get_robust_list, SYS_getrusage,
        SYS_getsid, SYS_getsockname, SYS_getsockopt, SYS_get_thread_area, SYS_gettid,
        SYS_gettimeofday, SYS_getuid, SYS_getxattr, SYS_inotify_add_watch, SYS_inotify_init,
        SYS_inotify_init1, SYS_inotify_rm_watch, SYS_io_cancel, SYS_ioctl, SYS_io_destroy,
        SYS_io_getevents, 333 /* io_pgetevents */, SYS_ioprio_get, SYS_ioprio_set, SYS_io_setup,
        SYS_io_submit, SYS_kill, SYS_landlock_add_rule, SYS_landlock_create_ruleset,
        SYS_landlock_restrict_self, SYS_lchown, SYS_lgetxattr, SYS_link, SYS_linkat, SYS_listen,
        SYS_listxattr, SYS_llistxattr, SYS_lremovexattr, SYS_lseek, SYS_lsetxattr, SYS_lstat,
        SYS_madvise, SYS_membarrier, SYS_memfd_create, SYS_memfd_secret, SYS_mincore, SYS_mkdir,
        SYS_mkdirat, SYS_mknod, SYS_mknodat, SYS_mlock, SYS_mlock2, SYS_mlockall, SYS_mmap,
        SYS_mprotect, SYS_mq_getsetattr, SYS_mq_notify, SYS_mq_open, SYS_mq_timedreceive,
        SYS_mq_timedsend, SYS_mq_unlink, SYS_mremap, SYS_msgctl, SYS_msgget, SYS_msgrcv,
        SYS_msgsnd, SYS_msync, SYS_munlock, SYS_munlockall, SYS_munmap, SYS_name_to_handle_at,
        SYS_nanosleep, SYS_newfstatat, SYS_open, SYS_openat, SYS_openat2, SYS_pause,
        SYS_pidfd_open, SYS_pidfd_send_signal, SYS_pipe, SYS_pipe2, SYS_pkey_alloc,
        SYS_pkey_free, SYS_pkey_mprotect, SYS_poll, SYS_ppoll, SYS_prctl, SYS_pread64,
        SYS_preadv, SYS_preadv2, SYS_prlimit64, SYS_process_mrelease, SYS_pselect6,
        SYS_pwrite64, SYS_pwritev, SYS_pwritev2, SYS_read, SYS_readahead, SYS_readlink,
        SYS_readlinkat, SYS_readv, SYS_recvfrom, SYS_recvmmsg, SYS_recvmsg,
        SYS_remap_file_pages, SYS_removexattr, SYS_rename, SYS_renameat, SYS_renameat2,
        SYS_restart_syscall, SYS_rmdir, SYS_rseq, SYS_rt_sigaction, SYS_rt_sigpending,
        SYS_rt_sigprocmask, SYS_rt_sigqueueinfo, SYS_rt_sigreturn, SYS_rt_sigsuspend,
        SYS_rt_sigtimedwait, SYS_rt_tgsigqueueinfo, SYS_sched_getaffinity, SYS_sched_getattr,
        SYS_sched_getparam, SYS_sched_get_priority_max, SYS_sched_get_priority_min,
        SYS_sched_getscheduler, SYS_sched_rr_get_interval, SYS_sched_setaffinity,
        SYS_sched_setattr, SYS_sched_setparam, SYS_sched_setscheduler, SYS_sched_yield,
        SYS_seccomp, SYS_select, SYS_semctl, SYS_semget, SYS_semop, SYS_semtimedop,
        SYS_sendfile, SYS_sendmmsg, SYS_sendmsg, SYS_sendto, SYS_setfsgid, SYS_setfsuid,
        SYS_setgid, SYS_setgroups, SYS_setitimer, SYS_setpgid, SYS_setpriority, SYS_setregid,
        SYS_setresgid, SYS_setresuid, SYS_setreuid, SYS_setrlimit, SYS_set_robust_list,
        SYS_setsid, SYS_setsockopt, SYS_set_thread_area, SYS_set_tid_address, SYS_setuid,
        SYS_setxattr, SYS_shmat, SYS_shmctl, SYS_shmdt, SYS_shmget, SYS_shutdown,
        SYS_sigaltstack, SYS_signalfd, SYS_signalfd4, SYS_socket, SYS_socketpair, SYS_splice,
        SYS_stat, SYS_statfs, SYS_statx, SYS_symlink, SYS_symlinkat, SYS_sync,
        SYS_sync_file_range, SYS_syncfs, SYS_sysinfo, SYS_tee, SYS_tgkill, SYS_time,
        SYS_timer_create, SYS_timer_delete, SYS_timer_getoverrun, SYS_timer_gettime,
        SYS_timer_settime, SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime,
        SYS_times, SYS_tkill, SYS_truncate, SYS_umask, SYS_uname, SYS_unlink, SYS_unlinkat,
        SYS_utime, SYS_utimensat, SYS_utimes, SYS_vfork, SYS_vmsplice, SYS_wait4, SYS_waitid,
        SYS_write, SYS_writev, SYS_arch_prctl, SYS_modify_ldt, SYS_ptrace,
        SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp, SYS_fchmodat2,
        // Newer than the libc crate's table (x86_64 numbers): cachestat, map_shadow_stack,
        // futex_wake, futex_wait, futex_requeue.
        451, 453, 454, 455, 456,
    ]
};

// ---------------------------------------------------------------------------------------------
// Building the machine's view (runs in init, PID 1, before the command starts)

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Invalid(format!("path {} contains NUL", p.display())))
}

fn errno(what: impl Into<String>) -> RuntimeError {
    RuntimeError::io(what, std::io::Error::last_os_error())
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> Result<()> {
    nix::mount::mount(src, target, fstype, flags, data).map_err(|e| {
        RuntimeError::sys(
            format!(
                "mounting {} on {}",
                fstype.or(src).unwrap_or("?"),
                target.display()
            ),
            e,
        )
    })
}

/// Creates the machine's user namespace (root = `base` on the host) and returns a handle on it.
/// A helper child unshares it (the shim and init must not: they still need the host's
/// privileges); the caller writes the maps as the helper's privileged parent, then lets it exit.
pub(crate) fn make_userns(base: u32) -> Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RuntimeError::sys("pipe2", e))?;
    let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RuntimeError::sys("pipe2", e))?;
    // SAFETY: init is single-threaded; the child only makes raw syscalls and _exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| RuntimeError::sys("fork", e))? {
        nix::unistd::ForkResult::Child => unsafe {
            drop(ready_r);
            drop(hold_w);
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                libc::_exit(1);
            }
            libc::write(ready_w.as_raw_fd(), b"u".as_ptr().cast(), 1);
            let mut b = 0u8;
            // Blocks until init closes its end: the namespace lives while init needs the pid.
            libc::read(hold_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            drop(hold_r);
            let res = (|| {
                let mut b = [0u8; 1];
                let n = std::fs::File::from(ready_r)
                    .read(&mut b)
                    .map_err(|e| RuntimeError::io("waiting for the userns helper", e))?;
                if n != 1 {
                    return Err(RuntimeError::Invalid(
                        "sandbox: the helper could not create a user namespace".into(),
                    ));
                }
                let map = format!("0 {base} {ID_COUNT}\n");
                for f in ["uid_map", "gid_map"] {
                    std::fs::write(format!("/proc/{child}/{f}"), &map)
                        .map_err(|e| RuntimeError::io(format!("writing {f}"), e))?;
                }
                let ns = std::fs::File::open(format!("/proc/{child}/ns/user"))
                    .map_err(|e| RuntimeError::io("opening the user namespace", e))?;
                Ok(OwnedFd::from(ns))
            })();
            drop(hold_w);
            let _ = nix::sys::wait::waitpid(child, None);
            res
        }
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Bind-mounts `src` at `dst` seen through the machine's user namespace: a file owned by uid N
/// on disk is owned by uid N inside the machine (host uid base+N).
fn idmapped_bind(src: &Path, dst: &Path, userns: &OwnedFd, read_only: bool) -> Result<()> {
    let (csrc, cdst) = (cstr(src)?, cstr(dst)?);
    let empty = c"";
    // SAFETY: raw mount-API syscalls on NUL-terminated strings and a live attr struct; the
    // returned fd is owned right away.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            csrc.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        );
        if fd < 0 {
            return Err(errno(format!("open_tree {}", src.display())));
        }
        let tree = OwnedFd::from_raw_fd(fd as i32);
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP
                | MOUNT_ATTR_NODEV
                | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        if libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) != 0
        {
            return Err(errno(format!("idmapping {}", src.display())));
        }
        if libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            cdst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) != 0
        {
            return Err(errno(format!(
                "mounting {} on {}",
                src.display(),
                dst.display()
            )));
        }
    }
    Ok(())
}

/// `guest` (an absolute path inside the machine) below `root`, with every symlink on the way
/// resolved as the machine would see it: an absolute target starts again at `root`, `..` stops
/// at `root`. An image's symlink (`/data -> /`, `/etc -> ../../../..`) can then never make init,
/// still host root in the host's tree, mount on or write to a host path. Nothing in the machine
/// runs yet, so what is resolved here is what gets used.
fn in_root(root: &Path, guest: &Path) -> Result<PathBuf> {
    use std::collections::VecDeque;
    use std::path::Component;
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<std::ffi::OsString> = guest
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let cand = root.join(&resolved).join(&c);
        match std::fs::symlink_metadata(&cand) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(RuntimeError::Invalid(format!(
                        "{}: too many symlinks in the image",
                        guest.display()
                    )));
                }
                let target = std::fs::read_link(&cand)
                    .map_err(|e| RuntimeError::io(format!("reading {}", cand.display()), e))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut front: VecDeque<std::ffi::OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                front.extend(pending);
                pending = front;
            }
            _ => resolved.push(c),
        }
    }
    Ok(root.join(resolved))
}

/// `root/name` as a real directory: whatever else an image put there (a symlink, a file) is
/// removed first (in the machine's own writable layer).
fn real_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let p = root.join(name);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => return Ok(p),
        Ok(_) => std::fs::remove_file(&p)
            .map_err(|e| RuntimeError::io(format!("replacing /{name}"), e))?,
        Err(_) => {}
    }
    make_mountpoint(&p, false)?;
    Ok(p)
}

/// Creates `path` (and its parents) as a directory, or as an empty file when `file`.
fn make_mountpoint(path: &Path, file: bool) -> Result<()> {
    let made = if file {
        path.parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(path)
                    .map(drop)
            })
    } else {
        std::fs::create_dir_all(path)
    };
    made.map_err(|e| RuntimeError::io(format!("creating {}", path.display()), e))
}

/// Docker's masked `/proc` paths (files get /dev/null, directories an empty read-only tmpfs)
/// and its read-only ones.
const PROC_MASKED: [&str; 10] = [
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
    "sysrq-trigger",
];
const PROC_READONLY: [&str; 4] = ["bus", "fs", "irq", "sys"];
const SYS_MASKED: [&str; 2] = ["firmware", "devices/virtual/powercap"];

fn mask(path: &Path, dev_null: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(()); // nothing there to hide
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=0,mode=555"),
        )
    } else {
        mount(
            Some(dev_null.to_str().unwrap_or("/dev/null")),
            path,
            None,
            MsFlags::MS_BIND,
            None,
        )
    }
}

fn bind_read_only(path: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    if !path.exists() {
        return Ok(());
    }
    let p = path.to_str().unwrap_or("");
    mount(
        Some(p),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mount(
        None,
        path,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Files the machine gets that the host does not give it: `/etc/resolv.conf` and `/etc/hosts`.
pub(crate) struct EtcFiles<'a> {
    pub resolv: &'a str,
    pub hosts: &'a str,
}

/// Builds the machine's view of the system below `stage` (a directory in the run dir), pivots
/// into it and becomes the machine's root with the machine's privileges only. Runs in init, in
/// its fresh mount namespace (already private), as host root.
pub(crate) fn enter(
    spec: &crate::InitSpec,
    sb: &SandboxSpec,
    userns: &OwnedFd,
    stage: &Path,
    etc: EtcFiles<'_>,
    lockdown: &Lockdown,
) -> Result<()> {
    use nix::mount::MsFlags;
    use std::os::unix::fs::PermissionsExt;
    let base = sb.id_base;

    make_mountpoint(stage, false)?;
    // Everything this run writes to its root filesystem lives in this tmpfs: fresh on every
    // start, gone with the mount namespace, and charged to the machine's memory cgroup.
    mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=700"),
    )?;
    let root = stage.join("root");
    make_mountpoint(&root, false)?;
    nix::unistd::chdir(stage).map_err(|e| RuntimeError::sys("chdir to the stage", e))?;
    for (i, layer) in sb.layers.iter().enumerate() {
        let low = stage.join(format!("l{i}"));
        let up = stage.join(format!("u{i}"));
        let work = stage.join(format!("w{i}"));
        for d in [&low, &up, &work] {
            make_mountpoint(d, false)?;
        }
        idmapped_bind(&layer.source, &low, userns, true)?;
        let mut lowers = format!("l{i}");
        for (j, b) in layer.below.iter().enumerate() {
            let name = format!("l{i}.{j}");
            let dir = stage.join(&name);
            make_mountpoint(&dir, false)?;
            idmapped_bind(b, &dir, userns, true)?;
            lowers.push(':');
            lowers.push_str(&name);
        }
        // The upper directory is the overlay's root directory: it must look like the layer's.
        let mode = std::fs::metadata(&low)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o755);
        let _ = std::fs::set_permissions(&up, std::fs::Permissions::from_mode(mode));
        std::os::unix::fs::chown(&up, Some(base), Some(base))
            .map_err(|e| RuntimeError::io("chown upper", e))?;
        let target = in_root(&root, &layer.target)?;
        make_mountpoint(&target, false)?;
        // Relative to the stage (init's working directory here): the options are shown in the
        // machine's /proc/self/mountinfo, and host paths (ferry's state dir) are none of its
        // business.
        let opts = format!("lowerdir={lowers},upperdir=u{i},workdir=w{i}");
        mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            MsFlags::empty(),
            Some(&opts),
        )?;
    }

    // /proc of the machine's pid namespace, with Docker's masks.
    let proc_ = real_dir(&root, "proc")?;
    mount(
        Some("proc"),
        &proc_,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;

    // A minimal /dev owned by the machine's root.
    let dev = real_dir(&root, "dev")?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!("mode=755,size=65536k,uid={base},gid={base}")),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        nix::sys::stat::mknod(
            &dev.join(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        )
        .map_err(|e| RuntimeError::sys(format!("mknod /dev/{name}"), e))?;
        let _ = std::fs::set_permissions(dev.join(name), std::fs::Permissions::from_mode(0o666));
    }
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let _ = std::os::unix::fs::symlink(to, dev.join(name));
    }
    let pts = dev.join("pts");
    make_mountpoint(&pts, false)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!(
            "newinstance,ptmxmode=0666,mode=0620,gid={}",
            base + 5
        )),
    )?;
    let shm = dev.join("shm");
    make_mountpoint(&shm, false)?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(&format!("mode=1777,size=65536k,uid={base},gid={base}")),
    )?;
    let dev_null = dev.join("null");
    for p in PROC_MASKED {
        mask(&proc_.join(p), &dev_null)?;
    }
    for p in PROC_READONLY {
        bind_read_only(&proc_.join(p))?;
    }

    // A sysfs of its own, read-only: init is still host root and in the machine's network
    // namespace (owned by the host's user namespace), so the kernel lets it mount one, and its
    // network class then shows the machine's interfaces only (a bind of the host's would list
    // every machine's veth). A fresh sysfs has none of the host's submounts (no /sys/fs/bpf, no
    // debugfs, no host cgroup trees); the machine's own cgroup (cgroup namespace) goes in it.
    let sys = real_dir(&root, "sys")?;
    mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    let cg = sys.join("fs/cgroup");
    if cg.is_dir() {
        if let Err(e) = mount(
            Some("cgroup2"),
            &cg,
            Some("cgroup2"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ) {
            eprintln!("ferry init: {e} (the machine has no /sys/fs/cgroup)");
        }
    }
    for p in SYS_MASKED {
        mask(&sys.join(p), &dev_null)?;
    }

    // /etc/resolv.conf and /etc/hosts: this run's, owned by the machine's root.
    let etc_dir = real_dir(&root, "etc")?;
    for (name, text) in [("resolv.conf", etc.resolv), ("hosts", etc.hosts)] {
        let p = etc_dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(RuntimeError::io(format!("replacing /etc/{name}"), e)),
        }
        // create_new: never through a symlink (the old file, whatever it was, is gone).
        let mut f = std::fs::File::create_new(&p)
            .map_err(|e| RuntimeError::io(format!("writing /etc/{name}"), e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| RuntimeError::io(format!("writing /etc/{name}"), e))?;
        let _ = f.set_permissions(std::fs::Permissions::from_mode(0o644));
        std::os::unix::fs::lchown(&p, Some(base), Some(base))
            .map_err(|e| RuntimeError::io(format!("chown /etc/{name}"), e))?;
    }

    // Volumes, seen with the machine's own IDs.
    for m in &spec.mounts {
        let meta = std::fs::metadata(&m.host_path)
            .map_err(|e| RuntimeError::io(format!("volume {}", m.host_path.display()), e))?;
        let target = in_root(&root, &m.guest_path)?;
        make_mountpoint(&target, !meta.is_dir())?;
        idmapped_bind(&m.host_path, &target, userns, false)?;
    }

    // pivot_root(".", "."): the old root ends up stacked on the new one and is detached at once,
    // taking every host mount with it.
    nix::unistd::chdir(&root).map_err(|e| RuntimeError::sys("chdir to the new root", e))?;
    let dot = c".";
    // SAFETY: pivot_root/umount2 with NUL-terminated strings.
    unsafe {
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(errno("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(errno("detaching the host's root"));
        }
    }
    nix::unistd::chdir("/").map_err(|e| RuntimeError::sys("chdir /", e))?;

    enter_userns(userns).map_err(|e| RuntimeError::io("entering the user namespace", e))?;
    lockdown
        .apply()
        .map_err(|e| RuntimeError::io("dropping privileges", e))
}

/// Joins the machine's user namespace as its root (uid and gid 0 inside, no supplementary
/// groups). Async-signal-safe (exec uses it between fork and exec).
pub(crate) fn enter_userns(fd: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: raw syscalls with plain values.
    unsafe {
        if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWUSER) != 0
            || libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Per-netns sysctls for a sandboxed machine (written by the shim, still host root, inside the
/// machine's network namespace): the namespace belongs to the host's user namespace, so root in
/// the machine is not "privileged" there; these let it bind ports below 1024 and use ICMP
/// sockets (ping) as before.
pub(crate) fn netns_sysctls() {
    for (file, value) in [
        ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
        ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
    ] {
        if let Err(e) = std::fs::write(file, value) {
            eprintln!("ferry init: writing {file}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_resolve_inside_the_root() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("/", r.join("to-root")).unwrap();
        symlink("../../../../..", r.join("climb")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        symlink("/etc/passwd", r.join("passwd")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();
        let check = |guest: &str, want: &str| {
            assert_eq!(
                in_root(r, Path::new(guest)).unwrap(),
                r.join(want),
                "{guest}"
            );
        };
        check("/to-root/etc", "etc");
        check("/climb/etc/shadow", "etc/shadow");
        check("/../../etc", "etc");
        check("/lib/x", "usr/lib/x");
        check("/passwd", "etc/passwd");
        check("/data", "data");
        assert!(in_root(r, Path::new("/loop1/x")).is_err());
    }

    #[test]
    fn id_ranges_are_per_owner_and_freed_with_it() {
        let reg = tempfile::tempdir().unwrap();
        let owners = tempfile::tempdir().unwrap();
        let (a, b) = (owners.path().join("a"), owners.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let ra = claim_id_range_in(reg.path(), &a).unwrap();
        let rb = claim_id_range_in(reg.path(), &b).unwrap();
        assert_eq!(ra, FIRST_ID);
        assert_eq!(rb, FIRST_ID + ID_COUNT);
        assert_eq!(claim_id_range_in(reg.path(), &a).unwrap(), ra, "stable");
        std::fs::remove_dir(&a).unwrap();
        let c = owners.path().join("c");
        std::fs::create_dir(&c).unwrap();
        assert_eq!(
            claim_id_range_in(reg.path(), &c).unwrap(),
            FIRST_ID + 2 * ID_COUNT,
            "next fit: the search goes on from the last claim"
        );
        assert_eq!(claim_id_range_in(reg.path(), &b).unwrap(), rb, "stable");
        // When the search comes round to a's slot (the cursor wraps at the last slot), it is
        // free again: its owner is gone.
        std::fs::write(reg.path().join(CURSOR), "0").unwrap();
        let d = owners.path().join("d");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(
            claim_id_range_in(reg.path(), &d).unwrap(),
            ra,
            "a's range is free again"
        );
        // An index entry whose slot another owner holds now (a crash between the two writes
        // of a claim) is not believed.
        let e = owners.path().join("e");
        std::fs::create_dir(&e).unwrap();
        let key = reg
            .path()
            .join(BY_OWNER)
            .join(owner_key(&e.to_string_lossy()));
        std::fs::write(key, "0").unwrap();
        assert_ne!(claim_id_range_in(reg.path(), &e).unwrap(), ra);
        assert_eq!(
            claim_id_range_in(reg.path(), &c).unwrap(),
            FIRST_ID + 2 * ID_COUNT,
            "stable"
        );
    }

    #[test]
    fn etc_secrets_are_left_out() {
        for s in [
            "shadow",
            "gshadow-",
            "ssh/ssh_host_ed25519_key",
            "sudoers.d/x",
        ] {
            assert!(etc_secret(Path::new(s)), "{s}");
        }
        for s in [
            "passwd",
            "group",
            "ssh/ssh_host_ed25519_key.pub",
            "hostname",
        ] {
            assert!(!etc_secret(Path::new(s)), "{s}");
        }
    }

    #[test]
    fn filters_compile() {
        let f = seccomp_filters().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
