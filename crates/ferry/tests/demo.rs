//! The main job: `ferry dev --exit-after-demo` (what `scripts/dev.sh` runs) passes its own demo:
//! cross-host HTTP by name, another org blocked, then a migration after which the client still
//! reaches the server by name and by its old address.

use std::process::Command;
use std::time::{Duration, Instant};

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
    // Output to files, not pipes: a process the fleet left behind (an agent) would hold a pipe
    // open and a reader would wait forever; and the run itself is bounded.
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["dev", "--exit-after-demo", "--name", &name])
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", &format!("127.0.0.1:{}", port(0))])
        .args(["--dns-listen", &format!("127.0.0.1:{}", port(1))])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_dir_all(&state);
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "demo failed ({status:?}):\n{text}\n{err}"
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
