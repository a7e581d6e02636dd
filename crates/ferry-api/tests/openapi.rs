//! The API contract: the document served at `/openapi.json` is the one checked in at
//! `openapi.json` (the root of the repository), so a change to a route shows in review as a
//! change to the document. `FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-api --test openapi`
//! rewrites the file after a deliberate change.

use ferry_api::server::router;
use ferry_store::SqliteStore;
use std::path::PathBuf;
use std::sync::Arc;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json")
}

/// The document as a real client sees it: over HTTP from a running server.
async fn served() -> serde_json::Value {
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let app = router(ferry_api::http_core(store, dir.path().to_path_buf()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let resp = reqwest::get(format!("http://{addr}/openapi.json"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let doc = resp.json().await.unwrap();
    server.abort();
    doc
}

#[tokio::test]
async fn the_served_document_is_the_checked_in_one() {
    let served = served().await;
    let pretty = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if std::env::var_os("FERRY_UPDATE_OPENAPI").is_some() {
        std::fs::write(checked_in(), &pretty).unwrap();
    }
    let on_disk = std::fs::read_to_string(checked_in()).expect("openapi.json is checked in");
    let on_disk: serde_json::Value = serde_json::from_str(&on_disk).unwrap();
    assert!(
        on_disk == served,
        "the served OpenAPI document differs from openapi.json; if the change is deliberate, \
         run FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-api --test openapi and commit the file"
    );
}

/// Every path parameter a route's template names is declared, with the same name (a generated
/// client cannot call an operation otherwise), and every operation documents its errors.
#[tokio::test]
async fn every_operation_declares_its_path_parameters_and_errors() {
    let doc = served().await;
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{} paths", paths.len());
    for (path, item) in paths {
        let wanted: Vec<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            for w in &wanted {
                assert!(
                    declared.contains(w),
                    "{method} {path}: path parameter {w} is not declared"
                );
            }
            let responses = op["responses"].as_object().unwrap();
            for status in ["500", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: no {status}"
                );
            }
            if !wanted.is_empty() || op.get("requestBody").is_some() {
                assert!(responses.contains_key("400"), "{method} {path}: no 400");
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &r["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {status}: errors are ErrorBody"
                    );
                }
            }
        }
    }
    for p in [
        "/v1/bridge",
        "/v1/bridge/report",
        "/v1/bridge/retire",
        "/v1/bridge/gate",
    ] {
        assert!(paths.contains_key(p), "{p} is not documented");
    }
}
