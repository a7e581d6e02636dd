//! What the machine sandbox costs a start: spawn -> machine set up (`init.pid` written, i.e. the
//! root filesystem built, pivoted, in its user namespace with caps and seccomp applied) for
//! sandboxed and unsandboxed `ferry init`, alternated in the same run, each with a fresh network
//! namespace and cgroup like the agent's. Baseline in the same run: Debian's `runc run` of a
//! bundle with a user namespace and a read-only `/usr` bind running `true` (create, start, exit,
//! delete), when runc is installed.
//!   N=100 bench/sandbox.sh

use anyhow::{Context, Result};
use ferry_bench::pct;
use ferry_runtime::{
    claim_id_range, default_image, spawn_machine, stop, CgroupLayout, InitSpec, Limits,
    SandboxSpec, Signal,
};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn one(
    ferry: &Path,
    layout: &CgroupLayout,
    dir: &Path,
    id: &str,
    images: &Path,
    sandboxed: bool,
) -> Result<f64> {
    let ns = ferry_net::NetNs::create(id)?;
    let cg = layout.create_machine(
        id,
        Limits {
            memory_mb: 128,
            cpus: 0.0,
            pids: 4096,
        },
    )?;
    let res = (|| {
        let sandbox = if sandboxed {
            Some(SandboxSpec {
                id_base: claim_id_range(&cg.dirs()[0].1)?,
                layers: default_image(images)?,
            })
        } else {
            None
        };
        let spec = InitSpec {
            machine_id: id.into(),
            app: "bench".into(),
            private_ip: "fdaa::2".into(),
            region: "dev".into(),
            cmd: vec!["sleep".into(), "infinity".into()],
            env: Default::default(),
            mounts: Vec::new(),
            workdir: None,
            user: None,
            sandbox,
            // Output goes straight to the run dir's file in both cases, so only the sandbox differs.
            log: None,
            hold: false,
        };
        let run_dir = dir.join(id);
        let t = Instant::now();
        let r = spawn_machine(&run_dir, &ns.path(), &cg, &spec, ferry)?;
        let ready = r.wait_init_pid(Duration::from_secs(10)).is_some();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        stop(&r, Signal::SIGKILL, Duration::from_secs(2))?;
        anyhow::ensure!(ready, "machine {id} never got ready");
        Ok(ms)
    })();
    let _ = cg.remove();
    let _ = ns.delete();
    res
}

fn runc_bundle(dir: &Path) -> Result<std::path::PathBuf> {
    let b = dir.join("bundle");
    let root = b.join("rootfs");
    for d in ["usr", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(t, root.join(l))?;
    }
    let ok = Command::new("runc").arg("spec").current_dir(&b).status()?;
    anyhow::ensure!(ok.success(), "runc spec");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(b.join("config.json"))?)?;
    c["process"]["args"] = serde_json::json!(["true"]);
    c["process"]["terminal"] = false.into();
    c["root"]["readonly"] = false.into();
    c["mounts"].as_array_mut().context("mounts")?.push(
        serde_json::json!({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}),
    );
    let nss = c["linux"]["namespaces"].as_array_mut().context("ns")?;
    nss.push(serde_json::json!({"type": "user"}));
    nss.push(serde_json::json!({"type": "cgroup"}));
    let base = ferry_runtime::sandbox::FIRST_ID + 60_000 * ferry_runtime::sandbox::ID_COUNT;
    let map = serde_json::json!([{"containerID": 0, "hostID": base, "size": 65536}]);
    c["linux"]["uidMappings"] = map.clone();
    c["linux"]["gidMappings"] = map;
    std::fs::write(b.join("config.json"), serde_json::to_vec(&c)?)?;
    std::os::unix::fs::chown(&root, Some(base), Some(base))?;
    Ok(b)
}

fn main() -> Result<()> {
    // Absolute: the shim is spawned with `/` as its working directory.
    let ferry = std::fs::canonicalize(
        std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into()),
    )
    .context("FERRY_BIN")?;
    let n = ferry_bench::env_or("N", 100);
    let tag = std::process::id() & 0xffff;
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images");
    let t = Instant::now();
    default_image(&images)?;
    println!(
        "default image built once per agent: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let layout = CgroupLayout::discover()?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Alternate which goes first, so drift on the box hits both alike.
        for sandboxed in if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let id = format!("ferry-sb{tag:x}-{i}-{}", sandboxed as u8);
            let ms = one(&ferry, &layout, dir.path(), &id, &images, sandboxed)?;
            if sandboxed { &mut with } else { &mut without }.push(ms);
        }
    }
    let row = |what: &str, v: &[f64]| {
        println!(
            "{what:<44} p50 {:6.1} ms  p99 {:6.1} ms  (n={})",
            pct(v, 0.5),
            pct(v, 0.99),
            v.len()
        )
    };
    row("ferry init, sandboxed: spawn -> set up", &with);
    row("ferry init, no sandbox: spawn -> set up", &without);
    if Command::new("runc").arg("--version").output().is_ok() {
        let b = runc_bundle(dir.path())?;
        let mut runc = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            let st = Command::new("runc")
                .args(["run", "--bundle"])
                .arg(&b)
                .arg(format!("ferry-rb{tag:x}-{i}"))
                .status()?;
            anyhow::ensure!(st.success(), "runc run failed");
            runc.push(t.elapsed().as_secs_f64() * 1e3);
        }
        row("runc run (userns, ro /usr, `true`): whole", &runc);
    } else {
        println!("runc not installed: no bare-runtime baseline");
    }
    Ok(())
}
