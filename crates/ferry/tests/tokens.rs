//! Tokens end to end: `ferry dev` writes its admin token where the CLI finds it, `ferry token`
//! makes and revokes org tokens, an org token's CLI sees its org only, and calls without a
//! valid token are refused and change nothing.

mod support;

use serde_json::json;
use std::process::Command;
use support::{Dev, FERRY};

/// The CLI as a user of this fleet: `FERRY_API` set, the token only if given (else the CLI
/// looks in `FERRY_CONFIG_DIR`, where the fleet's `ferry dev` wrote its admin token).
fn cli(dev: &Dev, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(FERRY);
    c.args(args)
        .env("FERRY_API", &dev.api)
        .env("FERRY_CONFIG_DIR", dev.state.join("cli"))
        .env_remove("FERRY_TOKEN");
    if let Some(t) = token {
        c.env("FERRY_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn org_tokens_see_their_org_only_and_revoked_ones_nothing() {
    let dev = Dev::start("tok", 1);

    // No FERRY_TOKEN: the CLI finds the admin token `ferry dev` wrote for this address.
    let (ok, out, err) = cli(&dev, None, &["token", "create", "--org", "acme"]);
    assert!(ok, "{out}{err}");
    let acme = out.trim().to_owned();
    let (ok, out, err) = cli(
        &dev,
        None,
        &["token", "create", "--org", "other", "--ttl", "1h"],
    );
    assert!(ok, "{out}{err}");
    let other = out.trim().to_owned();

    // Each org makes its app (in its own org, without naming it) and a machine.
    for (t, app) in [(&acme, "acme-web"), (&other, "other-web")] {
        let (ok, out, err) = cli(&dev, Some(t), &["app", "create", app]);
        assert!(ok, "{out}{err}");
        let (ok, out, err) = cli(
            &dev,
            Some(t),
            &["machine", "run", "--app", app, "--", "sleep", "inf"],
        );
        assert!(ok, "{out}{err}");
    }
    let apps = |t: Option<&str>| {
        let (ok, out, err) = cli(&dev, t, &["app", "list", "--json"]);
        assert!(ok, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(apps(Some(&acme)), ["acme-web"]);
    assert_eq!(apps(Some(&other)), ["other-web"]);
    assert_eq!(apps(None), ["acme-web", "other-web"], "the admin sees both");

    // Another org's app is one that does not exist.
    let (ok, _, err_foreign) = cli(
        &dev,
        Some(&acme),
        &["machine", "list", "--app", "other-web"],
    );
    assert!(!ok);
    let (_, _, err_missing) = cli(&dev, Some(&acme), &["machine", "list", "--app", "nope-web"]);
    assert_eq!(err_foreign.replace("other-web", "nope-web"), err_missing);
    // Hosts are an admin's.
    let (ok, _, err) = cli(&dev, Some(&acme), &["host", "list"]);
    assert!(!ok && err.contains("forbidden"), "{err}");

    // Nothing changes for a caller without a valid token: a bad one, or a revoked one.
    let before = dev.call("GET", "/v1/apps/acme-web/machines", None).1;
    let (ok, _, err) = cli(
        &dev,
        Some("tok_0000000000000000.nope"),
        &["app", "destroy", "acme-web"],
    );
    assert!(!ok && err.contains("unauthenticated"), "{err}");
    let id = acme.split_once('.').unwrap().0.to_owned();
    let (ok, out, err) = cli(&dev, None, &["token", "revoke", &id]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&dev, Some(&acme), &["machine", "list", "--app", "acme-web"]);
    assert!(!ok && err.contains("unauthenticated"), "{err}");
    assert_eq!(
        dev.call("GET", "/v1/apps/acme-web/machines", None).1,
        before
    );

    // The list shows kinds and revocation, never a secret.
    let (ok, out, err) = cli(&dev, None, &["token", "list", "--json"]);
    assert!(ok, "{out}{err}");
    assert!(!out.contains(acme.split_once('.').unwrap().1));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let t = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap();
    assert_eq!(
        (t["kind"].clone(), t["revoked"].clone()),
        (json!("org"), json!(true))
    );

    // The agents' routes are not on the operator API at all (they are on the agent listener,
    // behind hosts' certificates): no token registers a host there.
    for t in [&other, &dev.token] {
        let r = support::authed_client(t)
            .post(format!("{}/internal/v1/hosts", dev.api))
            .json(&json!({"host_id": 0x8fff_0000u32, "region": "x", "endpoint": "http://127.0.0.1:1", "running": []}))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
    }
    assert_eq!(dev.hosts().len(), 1);
}
