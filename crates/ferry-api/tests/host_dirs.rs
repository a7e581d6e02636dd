//! Directory volumes (`host_dir`) mount a host directory read-write into a machine, so the
//! server takes only directories below the roots its operator allowed; everything else is a 400
//! that creates nothing.

use ferry_api::server::router;
use ferry_core::Core;
use ferry_store::SqliteStore;
use std::sync::Arc;

async fn serve(ctx: Arc<Core>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(ctx)).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn only_directories_below_an_allowed_root_become_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("volumes");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
    let ctx = ferry_api::http_core(
        Arc::new(SqliteStore::in_memory().unwrap()),
        dir.path().into(),
    );
    let api = serve(ctx.clone()).await;
    let http = authed(&ctx);
    let create = |d: String| {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let r = http
                .post(format!("{api}/v1/volumes"))
                .json(&serde_json::json!({ "host_dir": d }))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let inside = root.join("data").display().to_string();

    // Off by default.
    let (s, e) = create(inside.clone()).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (400, Some("invalid_argument")),
        "{e}"
    );
    assert!(
        e["error"].as_str().unwrap().contains("--host-dir-root"),
        "{e}"
    );

    ctx.allow_host_dirs(vec![root.clone()]).unwrap();
    for bad in [
        "/etc".to_string(),
        "/".to_string(),
        root.display().to_string(), // the root itself is not a volume
        root.join("escape").display().to_string(), // a symlink out of it
        root.join("data/../../").display().to_string(),
        "relative/dir".to_string(),
    ] {
        let (s, e) = create(bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {e}");
    }
    let listed: serde_json::Value = http
        .get(format!("{api}/v1/volumes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, serde_json::json!([]), "a refusal created nothing");

    let (s, v) = create(inside.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["host_dir"], inside);
}

/// An HTTP client that sends a fresh admin token of `ctx`'s store with every request.
fn authed(ctx: &ferry_core::Core) -> reqwest::Client {
    let token = ferry_core::testing::admin_token(ctx);
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}
