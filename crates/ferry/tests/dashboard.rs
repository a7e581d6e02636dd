//! The dashboard in a real browser: headless Chromium (Debian's), driven by playwright-core
//! from `tests/ui/dashboard.mjs`, against a dev fleet. The script checks every page against the
//! API and follows a machine started, stopped and migrated while the page stays open. Its
//! screenshots are kept in `<target>/tmp/dashboard/`.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn dashboard_pages_show_the_api_and_follow_a_machine_live_in_chromium() {
    let dev = Dev::start("ui", 2);
    // The typed client reads what the page reads: the snapshot and the change notices.
    let c = ferry_client::Client::new(&dev.api, Duration::from_secs(30))
        .unwrap()
        .with_token(Some(&dev.token));
    let snap = c.dashboard(None).unwrap();
    assert_eq!(snap.hosts.len(), 2);
    assert!(snap.hosts.iter().all(|h| h.routes.len() == 1));
    let mut first = None;
    c.dashboard_events(|e| {
        first = Some(e);
        Ok(false)
    })
    .unwrap();
    let first = first.expect("a first event at once");
    assert_eq!((first.event.as_str(), first.data), ("change", 1));
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    assert!(
        ui.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/setup.sh"
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&out);
    let mut child = Command::new("node")
        .arg(ui.join("dashboard.mjs"))
        .arg(&dev.api)
        .arg(&out)
        .arg(&dev.token)
        .current_dir(&ui)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running node");
    // Bounded: the script's own waits are 60 s each; the whole run gets 5 minutes.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the browser test failed (screenshots in {}):\n{log}",
        out.display()
    );
    for page in [
        "hosts",
        "machines",
        "migrations",
        "bridge",
        "machine",
        "org-acme",
    ] {
        let png = std::fs::read(out.join(format!("{page}.png"))).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 4096,
            "no screenshot of {page}"
        );
    }
}
