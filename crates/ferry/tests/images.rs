//! OCI images end to end, against a real registry on loopback (`docker-registry`) and images
//! this test builds (a busybox-static root plus layers of its own, pushed with `skopeo`):
//! machines run an image's layers with its config honoured, layers are shared, whiteouts and
//! opaque directories apply, bad images are refused with a clear error and create nothing,
//! and a migration moves the digest, not the tag.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::oci::{busybox_layer, host_arch, layout, Layer, Registry};
use support::*;

/// The agent state of `host` in `dev`'s fleet: its image store.
fn store_dir(dev: &Dev, host: &str) -> PathBuf {
    dev.state.join("hosts").join(host).join("images/oci")
}

fn layer_dirs(dev: &Dev, host: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store_dir(dev, host).join("layers"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn sh(dev: &Dev, m: &Value, script: &str) -> String {
    let r = dev.exec(m, &["/bin/sh", "-c", script]);
    assert_eq!(r["exit_code"], 0, "{script}: {r}");
    r["stdout"].as_str().unwrap().to_string()
}

/// Waits until `path` inside the machine has content; returns it.
fn file_in(dev: &Dev, m: &Value, path: &str) -> String {
    let mut out = String::new();
    assert!(
        eventually(Duration::from_secs(15), || {
            let r = dev.exec(m, &["/bin/cat", path]);
            out = r["stdout"].as_str().unwrap_or_default().to_string();
            r["exit_code"] == 0 && !out.is_empty()
        }),
        "{path} never appeared in machine {}",
        m["id"]
    );
    out
}

/// The base every test image shares: busybox, a world-writable /tmp, files a later layer
/// hides.
fn base() -> Layer {
    busybox_layer()
        .dir("opt/")
        .file("opt/a", b"a")
        .file("opt/b", b"b")
        .file("etc/old-file", b"old")
        .dir("srv/")
        .dir("srv/www/")
}

fn app_layer() -> Layer {
    Layer::new()
        .file("srv/www/index.html", b"hello from the image\n")
        .whiteout("etc/old-file")
        .opaque("opt")
        .file("opt/c", b"c")
}

const RUN: &str = "echo \"$GREETING from $(id -u):$(id -g) in $(pwd)\" > /tmp/out; sleep 600";

#[test]
fn machines_run_images_with_their_config_and_share_layers() {
    let reg = Registry::start();
    let dev = Dev::start("img", 2);
    let hosts = dev.hosts();
    let (h0, h1) = (&hosts[0], &hosts[1]);

    let app = layout(
        "1",
        vec![base(), app_layer()],
        json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": [RUN],
               "Env": ["GREETING=hi", "PATH=/bin"], "User": "web", "WorkingDir": "/srv/www"}),
        host_arch(),
        false,
    );
    let app_ref = reg.push(&app.dir, "shop/app", "1", false);
    // A second image on the same base (same bytes, so the same layer digest).
    let other = layout(
        "1",
        vec![base(), Layer::new().file("srv/www/index.html", b"other\n")],
        json!({"Cmd": ["/bin/sleep", "600"], "Env": ["PATH=/bin"]}),
        host_arch(),
        true, // behind an index: resolved to this platform's manifest
    );
    let other_ref = reg.push(&other.dir, "shop/other", "1", true);
    assert_eq!(app.layer_digests[0], other.layer_digests[0]);

    // 1. The image's command, env, user and workdir.
    let a = dev.machine("shop", h0, json!({"image": app_ref}));
    assert_eq!(
        a["config"]["image"],
        format!("{}/shop/app@{}", reg.addr, app.manifest_digest),
        "the machine records the digest, not the tag"
    );
    assert_eq!(
        file_in(&dev, &a, "/tmp/out"),
        "hi from 1000:1000 in /srv/www\n"
    );

    // 2. A command of the machine replaces Cmd (the entrypoint stays); its env wins.
    let b = dev.machine(
        "shop",
        h0,
        json!({"image": app_ref, "env": {"GREETING": "bye"},
               "init": {"cmd": ["echo \"$GREETING $(id -un)\" > /tmp/out; sleep 600"]}}),
    );
    assert_eq!(file_in(&dev, &b, "/tmp/out"), "bye web\n");

    // 3. The layers as one root: whiteout and opaque dir applied, ferry's files present.
    assert_eq!(
        sh(&dev, &a, "cat /srv/www/index.html"),
        "hello from the image\n"
    );
    assert_eq!(
        sh(
            &dev,
            &a,
            "test -e /etc/old-file && echo present || echo gone"
        ),
        "gone\n"
    );
    assert_eq!(sh(&dev, &a, "ls /opt"), "c\n");
    assert!(sh(&dev, &a, "cat /etc/resolv.conf").contains("fdaa::3"));
    // Writes go to the machine's own layer, never to the shared one.
    sh(&dev, &a, "echo changed > /srv/www/index.html");
    assert_eq!(
        sh(&dev, &b, "cat /srv/www/index.html"),
        "hello from the image\n"
    );

    // 4. Layers are unpacked once per host and shared: base + app + other's top = 3.
    let c = dev.machine("shop", h0, json!({"image": other_ref}));
    assert_eq!(sh(&dev, &c, "cat /srv/www/index.html"), "other\n");
    let mut want: Vec<String> = app
        .layer_digests
        .iter()
        .chain(&other.layer_digests[1..])
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect();
    want.sort();
    assert_eq!(layer_dirs(&dev, h0), want);
    assert!(layer_dirs(&dev, h1).is_empty(), "h1 pulled nothing yet");

    // 5. A two-machine app from images that talks by name: busybox httpd serves, and a client
    // on the other host resolves <id>.vm.shop.internal through fdaa::3 and fetches.
    let web = dev.machine(
        "shop",
        h0,
        json!({"image": app_ref, "init": {"cmd": ["exec httpd -f -p 8080 -h /srv/www"]}}),
    );
    let name = format!("{}.vm.shop.internal", web["id"].as_str().unwrap());
    let client = dev.machine(
        "shop",
        h1,
        json!({"image": app_ref, "init": {"cmd": ["sleep 600"]}}),
    );
    let script = format!(
        "ip=$(nslookup -type=AAAA {name} fdaa::3 | sed -n 's/^Address: *//p' | tail -n 1); \
         wget -q -O - \"http://[$ip]:8080/index.html\""
    );
    let mut got = String::new();
    assert!(
        eventually(Duration::from_secs(20), || {
            let r = dev.exec(&client, &["/bin/sh", "-c", &script]);
            got = format!("{r}");
            r["stdout"] == "hello from the image\n"
        }),
        "client could not fetch from {name}: {got}"
    );

    // 6. The CLI: list (JSON), rm refused while machines use the image, then allowed.
    let out = dev.cli(&["image", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let on_h0 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["digest"] == app.manifest_digest.as_str() && i["host"] == h0.as_str())
        .expect("the image on h0");
    assert_eq!(on_h0["machines"].as_array().unwrap().len(), 3);
    let out = dev.cli(&["image", "rm", &other_ref]);
    assert!(!out.status.success(), "rm of an image in use must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use")
            || String::from_utf8_lossy(&out.stderr).contains("used by")
    );
    assert_eq!(layer_dirs(&dev, h0).len(), 3);
    let (s, _) = dev.call(
        "DELETE",
        &format!(
            "/v1/apps/shop/machines/{}?force=true",
            c["id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(s, 200);
    let out = dev.cli(&["image", "rm", &other_ref]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only other's own top layer goes: the base is still app's.
    let mut left: Vec<String> = app
        .layer_digests
        .iter()
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect();
    left.sort();
    assert_eq!(layer_dirs(&dev, h0), left);

    // 7. A pull ahead of time: the API streams progress, the CLI says where the image landed.
    let resp = dev
        .http()
        .post(format!("{}/v1/images/pull", dev.api))
        .json(&json!({"image": other_ref, "host": h1}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let lines: Vec<Value> = resp
        .text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l["progress"]["kind"] == "layer"),
        "no layer progress: {lines:?}"
    );
    assert_eq!(
        lines.last().unwrap()["image"]["host"],
        h1.as_str(),
        "{lines:?}"
    );
    // h1 had app's two layers (the client machine); other shares the base: one more.
    assert_eq!(layer_dirs(&dev, h1).len(), 3);
    assert!(
        lines
            .iter()
            .any(|l| l["progress"]["kind"] == "resolved" && l["progress"]["cached"] == 1),
        "the shared base is not downloaded again: {lines:?}"
    );
    let out = dev.cli(&["image", "pull", &app_ref, "--host", h1, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        res[0]["image"]["digest"],
        app.manifest_digest.as_str(),
        "{res}"
    );
    assert_eq!(layer_dirs(&dev, h1).len(), 3, "app was all there already");

    // The API document describes the image and registry routes.
    let doc = dev.call("GET", "/openapi.json", None).1;
    for (path, method) in [
        ("/v1/images", "get"),
        ("/v1/images/pull", "post"),
        ("/v1/images/remove", "post"),
        ("/v1/registries/{registry}", "put"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{path}: {}",
            doc["paths"]
        );
    }
    drop(reg);
}

/// Every bad image is refused with its own status and code, and leaves no machine, no image
/// and no layer behind (the agent's limit here: 2 MiB per layer).
#[test]
fn bad_images_are_refused_and_create_nothing() {
    let mut reg = Registry::start();
    let dev = Dev::start_with("imgbad", 1, &["--image-max-layer-mb", "2"]);
    let host = dev.hosts()[0].clone();
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "bad"}).to_string()),
    );
    let run_json = |image: &str| {
        dev.call(
            "POST",
            "/v1/apps/bad/machines",
            Some(&json!({"host": host, "config": {"image": image}}).to_string()),
        )
    };
    let check = |image: &str, status: u16, code: &str| {
        let (s, v) = run_json(image);
        assert_eq!(
            (s, v["code"].as_str().unwrap_or("")),
            (status, code),
            "{image}: {v}"
        );
        v["error"].as_str().unwrap().to_string()
    };
    let run = json!({"Cmd": ["/bin/sleep", "600"], "Env": ["PATH=/bin"]});

    // No such image / repository.
    check(
        &format!("{}/nothing/here:1", reg.addr),
        404,
        "image_not_found",
    );
    // A reference that is not one.
    let (s, v) = run_json("Not A Ref");
    assert_eq!(s, 400, "{v}");

    // A layer that climbs out with '..'.
    let outside =
        TempDir(std::env::temp_dir().join(format!("ferry-img-escape-{}", std::process::id())));
    let outside = &outside.0;
    let _ = std::fs::remove_dir_all(outside);
    std::fs::create_dir_all(outside).unwrap();
    let o = outside.display().to_string();
    let dotdot = layout(
        "1",
        vec![busybox_layer().file("../../../../../../../../tmp/pwned-dotdot", b"x")],
        run.clone(),
        host_arch(),
        false,
    );
    let r = reg.push(&dotdot.dir, "bad/dotdot", "1", false);
    let msg = check(&r, 422, "image_layer_escape");
    assert!(msg.contains(".."), "{msg}");
    assert!(!Path::new("/tmp/pwned-dotdot").exists());
    // An absolute symlink, then a write through it.
    let through = layout(
        "1",
        vec![busybox_layer().symlink("evil", &o).file("evil/pwned", b"x")],
        run.clone(),
        host_arch(),
        false,
    );
    let r = reg.push(&through.dir, "bad/symlink", "1", false);
    check(&r, 422, "image_layer_escape");
    assert!(!outside.join("pwned").exists());
    // A hard link to a host file (the layer has no /etc/shadow; the host does). A link to the
    // layer's own /etc/passwd would be fine: absolute link names are inside the layer.
    let hard = layout(
        "1",
        vec![busybox_layer().hardlink("shadow", "/etc/shadow")],
        run.clone(),
        host_arch(),
        false,
    );
    let r = reg.push(&hard.dir, "bad/hardlink", "1", false);
    check(&r, 422, "image_layer_escape");

    // The wrong platform: an index with only s390x, and a plain s390x manifest.
    let other_arch = if host_arch() == "s390x" {
        "riscv64"
    } else {
        "s390x"
    };
    let foreign = layout("1", vec![busybox_layer()], run.clone(), other_arch, true);
    let r = reg.push(&foreign.dir, "bad/platform", "1", true);
    let msg = check(&r, 422, "image_platform");
    assert!(msg.contains(other_arch), "{msg}");
    let foreign1 = layout("1", vec![busybox_layer()], run.clone(), other_arch, false);
    let r = reg.push(&foreign1.dir, "bad/platform1", "1", false);
    check(&r, 422, "image_platform");

    // A layer over the limit (incompressible: 3 MiB of pseudo-random bytes).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let big = layout(
        "1",
        vec![Layer::new().file("noise", &noise)],
        run.clone(),
        host_arch(),
        false,
    );
    let r = reg.push(&big.dir, "bad/big", "1", false);
    check(&r, 422, "image_too_big");

    // A blob whose bytes are not what its digest says (flipped in the registry's storage).
    let good = layout(
        "1",
        vec![busybox_layer(), Layer::new().file("x", b"x")],
        run.clone(),
        host_arch(),
        false,
    );
    let r = reg.push(&good.dir, "bad/corrupt", "1", false);
    let blob = reg.blob_file(&good.layer_digests[1]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    check(&r, 422, "image_digest_mismatch");

    // Nothing was created: no machine, no image, no layer, nothing half-unpacked.
    let (_, machines) = dev.call("GET", "/v1/apps/bad/machines", None);
    assert_eq!(machines.as_array().unwrap().len(), 0, "{machines}");
    let (_, images) = dev.call("GET", "/v1/images", None);
    assert_eq!(images.as_array().unwrap().len(), 0, "{images}");
    assert!(
        layer_dirs(&dev, &host).is_empty(),
        "{:?}",
        layer_dirs(&dev, &host)
    );
    let tmp: Vec<_> = std::fs::read_dir(store_dir(&dev, &host).join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");

    // The registry down: a clear 504, still nothing created.
    let addr = reg.addr.clone();
    reg.kill();
    check(
        &format!("{addr}/bad/corrupt:1"),
        504,
        "registry_unreachable",
    );
    let (_, machines) = dev.call("GET", "/v1/apps/bad/machines", None);
    assert_eq!(machines.as_array().unwrap().len(), 0);
}

/// A migration moves the image's digest: the destination pulls that exact image (even after
/// the tag moved to another one) before the source stops; with the registry down, a host that
/// has the image takes the machine, and one that lacks it leaves the machine running where it
/// is.
#[test]
fn migration_moves_the_digest_and_pulls_before_the_stop() {
    let mut reg = Registry::start();
    let dev = Dev::start("imgmig", 3);
    let hosts = dev.hosts();
    let run = json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["sleep 600"], "Env": ["PATH=/bin"]});
    let v1 = layout(
        "1",
        vec![busybox_layer(), Layer::new().file("version", b"v1\n")],
        run.clone(),
        host_arch(),
        false,
    );
    let r = reg.push(&v1.dir, "mig/app", "1", false);
    let m = dev.machine("mig", &hosts[0], json!({"image": r}));
    assert_eq!(file_in(&dev, &m, "/version"), "v1\n");
    // The tag moves to another image.
    let v2 = layout(
        "1",
        vec![busybox_layer(), Layer::new().file("version", b"v2\n")],
        run,
        host_arch(),
        false,
    );
    reg.push(&v2.dir, "mig/app", "1", false);

    let mig = migrate(&dev, &m, json!({"to": hosts[1]}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(90));
    assert_eq!(done["phase"], "done", "{done}");
    let m = dev.get_machine(&m);
    assert_eq!(m["host"], hosts[1].as_str());
    assert_eq!(
        file_in(&dev, &m, "/version"),
        "v1\n",
        "the digest moved, not the tag"
    );
    // The destination pulled the image before the stop and staged the machine on it: its
    // start released what was set up (the agents' start phases, as the server counts them).
    let counts = dev.start_phase_counts();
    assert!(
        counts
            .iter()
            .any(|l| l.starts_with("ferry_machine_start_phase_seconds_count{phase=\"release\"} 1")),
        "the move's start did not release a staged machine: {counts:?}"
    );

    // Registry down: back to h0, which has the image, works.
    reg.kill();
    let mig = migrate(&dev, &m, json!({"to": hosts[0]}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(90));
    assert_eq!(done["phase"], "done", "{done}");
    let m = dev.get_machine(&m);
    assert_eq!(m["host"], hosts[0].as_str());
    let instance = m["instance_id"].clone();

    // Registry down, to h2, which never had it: rolled back, and the machine never stopped.
    let mig = migrate(&dev, &m, json!({"to": hosts[2]}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(done["phase"], "rolled_back", "{done}");
    assert!(
        done["error"].as_str().unwrap_or_default().contains("reach")
            || done["error"]
                .as_str()
                .unwrap_or_default()
                .contains("unreachable"),
        "{done}"
    );
    let after = dev.get_machine(&m);
    assert_eq!(after["host"], hosts[0].as_str());
    assert_eq!(after["state"], "started");
    assert_eq!(after["instance_id"], instance, "the source kept running");
    assert!(done["stats"]["stopped_at_ms"].is_null(), "{done}");
}

/// A registry that wants credentials: without them a clear 401 and nothing created; with basic
/// credentials set through the API the machine runs; the API never shows the password.
#[test]
fn registry_credentials_come_from_the_api_and_are_never_shown() {
    let password = format!("pw-{}", std::process::id());
    let reg = Registry::start_auth(Some(("ci", &password)));
    let dev = Dev::start("imgauth", 1);
    let host = dev.hosts()[0].clone();
    let img = layout(
        "1",
        vec![busybox_layer()],
        json!({"Cmd": ["/bin/sleep", "600"], "Env": ["PATH=/bin"]}),
        host_arch(),
        false,
    );
    let r = reg.push(&img.dir, "private/app", "1", false);
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "priv"}).to_string()),
    );
    let create = || {
        dev.call(
            "POST",
            "/v1/apps/priv/machines",
            Some(&json!({"host": host, "config": {"image": r}}).to_string()),
        )
    };
    let (s, v) = create();
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (401, "registry_unauthorized"),
        "{v}"
    );
    let (_, machines) = dev.call("GET", "/v1/apps/priv/machines", None);
    assert_eq!(machines.as_array().unwrap().len(), 0);

    // Wrong password: still refused.
    let put = |pw: &str| {
        let url = format!("{}/v1/registries/{}", dev.api, reg.addr);
        let resp = dev
            .http()
            .put(url)
            .json(&json!({"credentials": {"username": "ci", "password": pw}}))
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    let (s, body) = put("wrong");
    assert_eq!(s, 200, "{body}");
    let (s, v) = create();
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (401, "registry_unauthorized"),
        "{v}"
    );

    let (s, body) = put(&password);
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains(&password), "{body}");
    let (s, v) = create();
    assert_eq!(s, 200, "{v}");
    assert_eq!(sh(&dev, &v, "echo in"), "in\n");

    // Listing shows the kind of auth and the user, never the secret.
    let out = dev.cli(&["image", "registry", "list", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("basic") && text.contains("\"ci\""), "{text}");
    assert!(!text.contains(&password), "{text}");
    let (_, list) = dev.call("GET", "/v1/registries", None);
    assert!(!list.to_string().contains(&password));
}

/// An image whose /etc, /proc and /data are symlinks to host paths: ferry init (host root while
/// it builds the machine) resolves them inside the machine's root, so nothing is written or
/// mounted on the host, and the machine still gets its resolv.conf and its volume.
#[test]
fn image_symlinks_never_lead_ferry_onto_the_host() {
    let reg = Registry::start();
    let dev = Dev::start("imgln", 1);
    let host = dev.hosts()[0].clone();
    let bait = TempDir(std::env::temp_dir().join(format!("ferry-img-bait-{}", std::process::id())));
    let bait = &bait.0;
    let _ = std::fs::remove_dir_all(bait);
    for d in ["etc", "proc", "data"] {
        std::fs::create_dir_all(bait.join(d)).unwrap();
    }
    let b = bait.display().to_string();
    let img = layout(
        "1",
        vec![Layer::new()
            .dir("bin/")
            .file_mode(
                "bin/busybox",
                &std::fs::read("/bin/busybox").unwrap(),
                0o755,
            )
            .symlink("bin/sh", "busybox")
            .symlink("bin/cat", "busybox")
            .symlink("bin/ls", "busybox")
            .symlink("bin/sleep", "busybox")
            .symlink("etc", &format!("{b}/etc"))
            .symlink("proc", &format!("{b}/proc"))
            .symlink("data", &format!("{b}/data"))],
        json!({"Cmd": ["/bin/sleep", "600"], "Env": ["PATH=/bin"]}),
        host_arch(),
        false,
    );
    let r = reg.push(&img.dir, "ln/app", "1", false);
    let vol = dev.ok("POST", "/v1/volumes", json!({"size_mb": 16}));
    let m = dev.machine(
        "ln",
        &host,
        json!({"image": r, "mounts": [{"volume": vol["id"], "path": "/data"}]}),
    );
    assert!(sh(&dev, &m, "cat /etc/resolv.conf").contains("fdaa::3"));
    assert!(sh(&dev, &m, "cat /proc/self/status").contains("Pid:"));
    sh(&dev, &m, "echo kept > /data/f");
    for d in ["etc", "proc", "data"] {
        let left: Vec<_> = std::fs::read_dir(bait.join(d)).unwrap().flatten().collect();
        assert!(left.is_empty(), "{d} on the host got {left:?}");
    }
}

/// A directory removed on drop (also when the test panics).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Credentials from `ferry dev --registry-auth FILE`.
#[test]
fn registry_credentials_from_a_file() {
    let password = format!("file-pw-{}", std::process::id());
    let reg = Registry::start_auth(Some(("ops", &password)));
    let file = TempDir(std::env::temp_dir().join(format!("ferry-img-auth-{}", std::process::id())));
    std::fs::create_dir_all(&file.0).unwrap();
    let path = file.0.join("auth.json");
    std::fs::write(
        &path,
        json!({reg.addr.clone(): {"username": "ops", "password": password}}).to_string(),
    )
    .unwrap();
    let dev = Dev::start_with("imgfile", 1, &["--registry-auth", path.to_str().unwrap()]);
    let img = layout(
        "1",
        vec![busybox_layer()],
        json!({"Cmd": ["/bin/sleep", "600"], "Env": ["PATH=/bin"]}),
        host_arch(),
        false,
    );
    let r = reg.push(&img.dir, "private/file", "1", false);
    let m = dev.machine("filecred", &dev.hosts()[0], json!({"image": r}));
    assert_eq!(sh(&dev, &m, "echo ok"), "ok\n");
    let (_, list) = dev.call("GET", "/v1/registries", None);
    assert_eq!(list[0]["auth"], "basic", "{list}");
    assert!(!list.to_string().contains(&password));
}

/// `ferry dev --registry ADDR --demo-image REF --exit-after-demo`: the demo also runs a machine
/// from the image, and passes.
#[test]
fn dev_demo_runs_a_machine_from_an_image() {
    let reg = Registry::start();
    let img = layout(
        "1",
        vec![busybox_layer()],
        json!({"Cmd": ["/bin/sleep", "600"], "Env": ["PATH=/bin"]}),
        host_arch(),
        false,
    );
    let r = reg.push(&img.dir, "demo/app", "1", false);
    let name = format!("eimgdemo{:x}", std::process::id() & 0xffff);
    let state = TempDir(std::env::temp_dir().join(format!("ferry-test-{name}")));
    let logs = TempDir(std::env::temp_dir().join(format!("ferry-test-{name}-logs")));
    std::fs::create_dir_all(&logs.0).unwrap();
    let (out_path, err_path) = (logs.0.join("stdout"), logs.0.join("stderr"));
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    // Output to files, not pipes (an agent left behind would hold a pipe open); bounded run.
    let mut child = std::process::Command::new(FERRY)
        .args(["dev", "--exit-after-demo", "--name", &name])
        .arg("--state-dir")
        .arg(&state.0)
        .args(["--listen", &format!("127.0.0.1:{}", port())])
        .args(["--dns-listen", &format!("127.0.0.1:{}", port())])
        .args(["--registry", &reg.addr, "--demo-image", &r])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "demo failed ({status:?}):\n{text}\n{err}"
    );
    let want = format!(
        "from {}/demo/app@{} is started",
        reg.addr, img.manifest_digest
    );
    assert!(text.contains(&want), "{want:?} not in:\n{text}");
}
