//! A real OCI registry on loopback (Debian's `docker-registry`) started by the test, and images
//! the test builds itself: layers are tar streams made here (a busybox-static root, whiteouts,
//! or hostile entries), written as an OCI image layout and pushed with `skopeo copy`. The
//! registry process and its storage go away on drop, even when the test panics.

use serde_json::{json, Value};
use sha2::Digest as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    child: Option<Child>,
    pub dir: PathBuf,
    /// `user:password` when the registry wants basic auth.
    creds: Option<String>,
}

impl Registry {
    /// Starts a registry on a free loopback port and waits (bounded) until it answers.
    pub fn start() -> Registry {
        Registry::start_auth(None)
    }

    /// Like [`Registry::start`], requiring HTTP basic auth as `user` with `password` (an
    /// htpasswd file with a bcrypt hash, made by Python's crypt module).
    pub fn start_auth(auth: Option<(&str, &str)>) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("ferry-registry-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let cfg = dir.join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        if let Some((user, password)) = auth {
            let out = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let hash = String::from_utf8(out.stdout).unwrap();
            std::fs::write(dir.join("htpasswd"), format!("{user}:{}\n", hash.trim())).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: ferry-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        std::fs::write(&cfg, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("docker-registry (bash scripts/setup.sh installs it)");
        let r = Registry {
            addr: format!("127.0.0.1:{port}"),
            child: Some(child),
            dir,
            creds: auth.map(|(u, p)| format!("{u}:{p}")),
        };
        let url = format!("http://{}/v2/", r.addr);
        assert!(
            super::eventually(Duration::from_secs(20), || {
                // Up means answering: 200, or 401 when it wants credentials.
                reqwest::blocking::get(&url)
                    .is_ok_and(|x| x.status().is_success() || x.status().as_u16() == 401)
            }),
            "the registry did not come up: {}",
            std::fs::read_to_string(r.dir.join("log")).unwrap_or_default()
        );
        r
    }

    /// Pushes the OCI layout `layout` (tag `tag` in it) as `<repo>:<tag>`; `all` keeps an index
    /// as it is (every platform). Returns `addr/repo:tag`.
    pub fn push(&self, layout: &Path, repo: &str, tag: &str, all: bool) -> String {
        let dest = format!("{}/{repo}:{tag}", self.addr);
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        if let Some(c) = &self.creds {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .expect("skopeo (bash scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dest
    }

    /// Where the registry keeps a blob's bytes (its filesystem driver's layout).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Stops the registry now (a test of "registry down").
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A tar stream built entry by entry (raw names: hostile layers need `..` and absolute links).
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, path: &str, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        let name = path.as_bytes();
        h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        h
    }

    pub fn file(self, path: &str, data: &[u8]) -> Layer {
        self.file_mode(path, data, 0o644)
    }

    pub fn file_mode(mut self, path: &str, data: &[u8], mode: u32) -> Layer {
        let h = Self::header(tar::EntryType::Regular, path, data.len() as u64, mode);
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn dir(self, path: &str) -> Layer {
        self.dir_mode(path, 0o755)
    }

    pub fn dir_mode(mut self, path: &str, mode: u32) -> Layer {
        let h = Self::header(tar::EntryType::Directory, path, 0, mode);
        self.0.append(&h, &[][..]).unwrap();
        self
    }

    pub fn symlink(self, path: &str, target: &str) -> Layer {
        self.link(tar::EntryType::Symlink, path, target)
    }

    pub fn hardlink(self, path: &str, target: &str) -> Layer {
        self.link(tar::EntryType::Link, path, target)
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Layer {
        let mut h = Self::header(kind, path, 0, 0o777);
        let t = target.as_bytes();
        h.as_ustar_mut().unwrap().linkname[..t.len()].copy_from_slice(t);
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }

    /// A whiteout of `path` (OCI's `.wh.` marker file).
    pub fn whiteout(self, path: &str) -> Layer {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let p = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&p, b"")
    }

    /// Marks `dir` opaque: nothing of lower layers shows in it.
    pub fn opaque(self, dir: &str) -> Layer {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    pub fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A root filesystem with the host's static busybox and the applets tests use, a passwd with
/// user `web` (1000:1000) and a group `staff` (50).
pub fn busybox_layer() -> Layer {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/setup.sh)");
    let mut l = Layer::new()
        .dir("bin/")
        .dir("etc/")
        .dir_mode("tmp/", 0o1777)
        .file_mode("bin/busybox", &busybox, 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/home/web:/bin/sh\n",
        )
        .file("etc/group", b"root:x:0:\nstaff:x:50:\nweb:x:1000:\n");
    for applet in [
        "sh", "cat", "echo", "sleep", "ls", "id", "env", "pwd", "wget", "nc", "test", "touch",
        "mkdir", "stat", "readlink", "httpd", "nslookup", "true", "false", "head", "dd", "sed",
        "tail", "grep",
    ] {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// An OCI image layout on disk.
pub struct Layout {
    pub dir: PathBuf,
    /// Digests of the layer blobs (compressed), bottom first.
    pub layer_digests: Vec<String>,
    /// The image manifest's digest.
    pub manifest_digest: String,
}

impl Drop for Layout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    std::fs::write(dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
    d
}

/// The host's architecture in OCI's words.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

/// Writes an image layout tagged `tag`: `layers` (bottom first, gzip-compressed), the run
/// config `run` (Docker's `config` object: Entrypoint, Cmd, Env, User, WorkingDir), for
/// `arch`; with `index`, the tag names an index (manifest list) holding the manifest.
pub fn layout(tag: &str, layers: Vec<Layer>, run: Value, arch: &str, index: bool) -> Layout {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferry-oci-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_digests = Vec::new();
    for l in layers {
        let tar = l.tar();
        diff_ids.push(sha(&tar));
        let gz = gzip(&tar);
        let d = put_blob(&dir, &gz);
        layer_digests.push(d.clone());
        descs.push(
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                          "digest": d, "size": gz.len()}),
        );
    }
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux", "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = put_blob(&dir, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let md = put_blob(&dir, &manifest);
    let mdesc = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": md, "size": manifest.len(),
                       "platform": {"architecture": arch, "os": "linux"}});
    let top = if index {
        let idx = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [mdesc],
        }))
        .unwrap();
        let id = put_blob(&dir, &idx);
        json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": idx.len()})
    } else {
        mdesc
    };
    let mut top = top;
    top["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    Layout {
        dir,
        layer_digests,
        manifest_digest: md,
    }
}
