//! A host that registers gets the bridge state at once: a new host must know every mapping of
//! the fleet before its first machine dials an old address, without waiting for the next change.
//!
//! The server is the real router over a real (in-memory SQLite) store; the "agent" is a real
//! HTTP listener that records what the server pushes to it.

use axum::routing::post;
use axum::Json;
use ferry_api::agent_api::Peer;
use ferry_api::server::router;
use ferry_core::proto::BridgeSync;
use ferry_store::{SqliteStore, Store};
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registering_host_receives_every_mapping() {
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let org = store.ensure_org("acme").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = ferry_api::http_core(store.clone(), dir.path().to_path_buf());
    let http = authed(&ctx);
    let api = serve(router(ctx.clone())).await;
    // The agent listener, its TLS left out: every request comes as host 80000002's certificate
    // would (the binary's listener sets the peer from the certificate; ferry/tests/mtls.rs).
    let ca = Arc::new(ferry_pki::Ca::load_or_create(&dir.path().join("tls")).unwrap());
    let agents_api = serve(ferry_api::agent_api::router(ctx, ca).layer(axum::Extension(
        Peer::Host(ferry_addr::HostId::new(0x8000_0002).unwrap()),
    )))
    .await;

    // A mapping made while no host is registered: nobody to push it to yet.
    let addr = |host: u32, m: u32| {
        ferry_addr::FleetAddr::new(
            org.network_id,
            ferry_addr::HostId::new(host).unwrap(),
            ferry_addr::MachineField(m),
            2,
        )
        .to_string()
    };
    let (old, new) = (addr(0x8000_0000, 1), addr(0x8000_0001, 1));
    let r = http
        .post(format!("{api}/v1/bridge"))
        .json(&serde_json::json!({"old": old, "new": new}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // The host's agent: records every bridge push it gets.
    let got: Arc<Mutex<Vec<BridgeSync>>> = Arc::default();
    let g = got.clone();
    let agent = serve(axum::Router::new().route(
        "/v1/bridge/sync",
        post(move |Json(s): Json<BridgeSync>| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(s);
                Json(serde_json::json!({}))
            }
        }),
    ))
    .await;
    let r = http
        .post(format!("{agents_api}/internal/v1/hosts"))
        .json(&serde_json::json!({
            "host_id": 0x8000_0002u32, "region": "ord", "endpoint": agent, "running": []
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = got.lock().unwrap().first() {
            assert_eq!(s.mappings.len(), 1, "{:?}", s.mappings);
            assert_eq!(
                (s.mappings[0].old.as_str(), s.mappings[0].new.as_str()),
                (old.as_str(), new.as_str())
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registered host got no bridge state within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.list_hosts().unwrap().len(), 1);
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
