//! OCI images: (1) create->started over N machines from a cached image against N machines of
//! the default image, alternated in the same run; (2) time to first start of a ~100 MB image
//! (nothing cached on the host) against `skopeo copy` of the same image from the same registry
//! to a local directory (the bare pull), alternated, R rounds.
//!
//! The registry is Debian's `docker-registry` on loopback, started here; images are built here
//! (a busybox-static root plus, for the big one, layers of incompressible bytes) and pushed
//! with `skopeo`.

use anyhow::{ensure, Context, Result};
use ferry_bench::{median, pct, BenchFleet};
use reqwest::Method;
use serde_json::json;
use sha2::Digest as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Registry {
    addr: String,
    child: Child,
    dir: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn registry() -> Result<Registry> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("ferry-bench-registry-{port}"));
    std::fs::create_dir_all(dir.join("storage"))?;
    std::fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("docker-registry (scripts/setup.sh installs it)")?;
    let r = Registry {
        addr: format!("127.0.0.1:{port}"),
        child,
        dir,
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if reqwest::blocking::get(format!("http://{}/v2/", r.addr))
            .is_ok_and(|x| x.status().is_success())
        {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the registry did not come up")
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn tar_of(files: &[(&str, &[u8], u32)], links: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append_data(&mut h, path, *data)?;
    }
    for (path, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, path, target)?;
    }
    Ok(b.into_inner()?)
}

/// An OCI layout with `layers` (tars, bottom first), pushed as `repo:1`; the pinned reference.
fn push(reg: &Registry, repo: &str, layers: Vec<Vec<u8>>) -> Result<(String, String)> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-oci-{repo}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let put = |b: &[u8]| -> Result<String> {
        let d = sha(b);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b)?;
        Ok(d)
    };
    let (mut descs, mut diff_ids) = (Vec::new(), Vec::new());
    for t in layers {
        diff_ids.push(sha(&t));
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&t)?;
        let gz = e.finish()?;
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&gz)?, "size": gz.len()}));
    }
    let arch = if std::env::consts::ARCH == "aarch64" {
        "arm64"
    } else {
        "amd64"
    };
    let cfg = serde_json::to_vec(&json!({"architecture": arch, "os": "linux",
        "config": {"Cmd": ["/bin/sleep", "3600"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}}))?;
    let man = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&cfg)?, "size": cfg.len()},
        "layers": descs}),
    )?;
    let md = put(&man)?;
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": man.len(),
         "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))?,
    )?;
    let tag = format!("{}/{repo}:1", reg.addr);
    let st = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", dir.display()))
        .arg(format!("docker://{tag}"))
        .status()?;
    ensure!(st.success(), "skopeo copy to the registry failed");
    std::fs::remove_dir_all(&dir)?;
    Ok((tag, format!("{}/{repo}@{md}", reg.addr)))
}

fn busybox_layer() -> Result<Vec<u8>> {
    let bb = std::fs::read("/bin/busybox").context("busybox-static")?;
    tar_of(
        &[("bin/busybox", &bb, 0o755)],
        &[("bin/sleep", "busybox"), ("bin/sh", "busybox")],
    )
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into());
    let n = ferry_bench::env_or("N", 200);
    let rounds = ferry_bench::env_or("R", 3);
    let big_mb = ferry_bench::env_or("BIG_MB", 100);
    let tag = std::process::id() & 0xffff;
    let reg = registry()?;
    let (small_tag, small) = push(&reg, "small", vec![busybox_layer()?])?;

    // (1) cached image vs default image, alternated.
    let dev = BenchFleet::start(&ferry, &format!("bi{tag:x}"), 2, &[])?;
    dev.call(Method::POST, "/v1/apps", json!({"app_name": "bench"}))?;
    for h in dev.get("/v1/hosts")?.as_array().unwrap() {
        let body = json!({"image": small, "host": h["id"]});
        let text = dev
            .http()
            .post(format!("{}/v1/images/pull", dev.api))
            .json(&body)
            .send()?
            .text()?;
        ensure!(text.contains("\"image\""), "prepull: {text}");
    }
    // Three kinds, interleaved: the default image; the cached image by digest (no registry
    // round trip); the cached image by tag (the host asks the registry where the tag points,
    // then finds every layer cached).
    let cfgs = [
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
        json!({"image": small}),
        json!({"image": small_tag}),
    ];
    let mut lat: [Vec<f64>; 3] = Default::default();
    let mut ids = Vec::new();
    for i in 0..3 * n {
        let k = i % 3;
        let t = Instant::now();
        let m = dev.call(
            Method::POST,
            "/v1/apps/bench/machines",
            json!({"config": cfgs[k]}),
        )?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(m["state"] == "started", "{m}");
        lat[k].push(ms);
        ids.push(m["id"].as_str().unwrap().to_owned());
    }
    println!("create->started, {n} machines each, interleaved, 2 hosts:");
    for (k, what) in [
        "default image",
        "cached image (digest)",
        "cached image (tag)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "  {what:<22} p50 {:.1} ms  p99 {:.1} ms  ratio to default p50 {:.2}",
            median(&lat[k]),
            pct(&lat[k], 0.99),
            median(&lat[k]) / median(&lat[0])
        );
    }
    println!("  (goal: cached image p50 within 1.2x of the default image)");
    for id in &ids {
        dev.call(
            Method::DELETE,
            &format!("/v1/apps/bench/machines/{id}?force=true"),
            json!({}),
        )?;
    }
    drop(dev);

    // (2) first start of a big image vs skopeo copy to a directory.
    let mut layers = vec![busybox_layer()?];
    let per = big_mb / 4;
    for i in 0..4 {
        layers.push(tar_of(
            &[(
                &format!("data/{i}"),
                &noise(per << 20, 0x9e37_79b9 + i as u64),
                0o644,
            )],
            &[],
        )?);
    }
    let (big_tag, _) = push(&reg, "big", layers)?;
    let dev = BenchFleet::start(&ferry, &format!("bj{tag:x}"), 1, &[])?;
    dev.call(Method::POST, "/v1/apps", json!({"app_name": "big"}))?;
    let (mut first, mut bare) = (Vec::new(), Vec::new());
    let out = std::env::temp_dir().join(format!("ferry-bench-skopeo-{tag}"));
    for _ in 0..rounds {
        let _ = std::fs::remove_dir_all(&out);
        let t = Instant::now();
        let st = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{big_tag}"))
            .arg(format!("dir:{}", out.display()))
            .status()?;
        ensure!(st.success(), "skopeo copy to a dir failed");
        bare.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&out);

        let t = Instant::now();
        let m = dev.call(
            Method::POST,
            "/v1/apps/big/machines",
            json!({"config": {"image": big_tag}}),
        )?;
        first.push(t.elapsed().as_secs_f64());
        ensure!(m["state"] == "started", "{m}");
        // Back to nothing cached: destroy, then remove the image (and so its layers).
        dev.call(
            Method::DELETE,
            &format!(
                "/v1/apps/big/machines/{}?force=true",
                m["id"].as_str().unwrap()
            ),
            json!({}),
        )?;
        dev.call(Method::POST, "/v1/images/remove", json!({"image": big_tag}))?;
    }
    println!("first start of a {big_mb} MB image (5 layers, nothing cached) vs skopeo copy to a dir, {rounds} rounds alternated:");
    println!(
        "  ferry create->started  median {:.2} s  ({:?})",
        median(&first),
        first.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>()
    );
    println!(
        "  skopeo copy            median {:.2} s  ({:?})",
        median(&bare),
        bare.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>()
    );
    println!(
        "  ratio ferry/skopeo {:.2} (goal <= 1.5)",
        median(&first) / median(&bare)
    );
    let _ = Path::new(&out);
    Ok(())
}
