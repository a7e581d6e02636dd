//! The main job: `ferry dev --exit-after-demo` (what `scripts/dev.sh` runs) passes its own demo:
//! cross-host HTTP by name, another org blocked, then a migration after which the client still
//! reaches the server by name and by its old address.

use std::process::Command;

#[test]
fn dev_demo_runs_and_passes() {
    let name = format!("edemo{:x}", std::process::id() & 0xffff);
    let state = std::env::temp_dir().join(format!("ferry-test-{name}"));
    let _ = std::fs::remove_dir_all(&state);
    let port = |_: u8| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["dev", "--exit-after-demo", "--name", &name])
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", &format!("127.0.0.1:{}", port(0))])
        .args(["--dns-listen", &format!("127.0.0.1:{}", port(1))])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&state);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("migrated hello"), "{text}");
    assert!(text.contains("done (downtime"), "{text}");
    assert_eq!(
        text.matches("after the move: hello from machine").count(),
        2,
        "{text}"
    );
    assert!(
        text.contains("intruder (org acme) -> http://hello.internal:8080/: blocked"),
        "{text}"
    );
}
