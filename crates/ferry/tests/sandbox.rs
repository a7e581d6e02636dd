//! The machine sandbox end to end (docs/design.md#sandbox): from inside a machine of one app, nothing of
//! another machine, of ferry or of the host is reachable, and the host is unchanged afterwards.

mod support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

/// Finds a file named `name` below `dir` (the host's view).
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let ft = e.file_type().ok()?;
        if ft.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if e.file_name() == name {
            return Some(p);
        }
    }
    None
}

const CONNECT_PY: &str = r#"import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        print("REACHED", target)
    except OSError as e:
        print("refused", target, e.errno)
"#;

#[test]
fn a_machine_sees_only_itself() {
    let dev = Dev::start("sb", 1);
    let hosts = dev.hosts();
    let secret = format!("secret-{}", std::process::id());
    let vol = dev.ok("POST", "/v1/volumes", json!({"size_mb": 64}));
    let a = dev.machine(
        "sandbox-a",
        &hosts[0],
        json!({"init": {"cmd": ["sh", "-c", format!("echo org-a-data > /data/{secret}; sleep 600")]},
               "mounts": [{"volume": vol["id"], "path": "/data"}]}),
    );
    let b = dev.machine(
        "sandbox-b",
        &hosts[0],
        json!({"init": {"cmd": ["sleep", "600"]}}),
    );
    let mut on_host = None;
    assert!(eventually(Duration::from_secs(10), || {
        on_host = find(&dev.state, &secret);
        on_host.is_some()
    }));
    let on_host = on_host.unwrap();
    let agent_addr = std::fs::read_to_string(find(&dev.state, "agent.addr").unwrap()).unwrap();
    let agent = agent_addr.trim().trim_start_matches("https://").to_owned();
    let api = dev.api.trim_start_matches("http://").to_owned();
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&dev.name))
        .collect();
    assert!(netns.len() >= 3, "host, fabric and two machines: {netns:?}");

    let script = format!(
        r#"cat {file} && echo READ-OTHER-VOLUME
find / -xdev -name {secret} 2>/dev/null | grep . && echo FOUND-SECRET
ls /run/netns && echo LISTED-NETNS
nsenter --net=/run/netns/{ns} true && echo ENTERED-NETNS
ls {state} && echo SAW-STATE-DIR
ls -A /sys/fs/bpf | grep . && echo SAW-BPF
ip -6 route add default via fe80::1 dev eth0 && echo ROUTE-ADDED
python3 -c '{py}' {api} {agent} [fe80::1%eth0]:{api_port} [fe80::1%eth0]:{agent_port}
echo done"#,
        file = on_host.display(),
        ns = netns[0],
        state = dev.state.display(),
        py = CONNECT_PY,
        api_port = api.rsplit(':').next().unwrap(),
        agent_port = agent.rsplit(':').next().unwrap(),
    );
    let r = dev.exec(&b, &["sh", "-c", &script]);
    let out = r["stdout"].as_str().unwrap().to_owned();
    assert!(out.ends_with("done\n"), "{r}");
    for escaped in [
        "READ-OTHER-VOLUME",
        "FOUND-SECRET",
        "LISTED-NETNS",
        "ENTERED-NETNS",
        "SAW-STATE-DIR",
        "SAW-BPF",
        "ROUTE-ADDED",
        "REACHED",
    ] {
        assert!(!out.contains(escaped), "{escaped}: {r}");
    }
    assert_eq!(out.matches("refused").count(), 4, "{r}");

    // The machine that owns the volume reads it, as root, with the file's owner as written.
    let r = dev.exec(
        &a,
        &[
            "sh",
            "-c",
            &format!("cat /data/{secret}; stat -c %u /data/{secret}"),
        ],
    );
    assert_eq!(r["stdout"], "org-a-data\n0\n", "{r}");

    // The host is unchanged: the file, the API, the agent.
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), "org-a-data\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&on_host).unwrap().uid(), 0);
    assert_eq!(dev.hosts(), hosts);
    assert_eq!(dev.get_machine(&b)["state"], "started");
}
