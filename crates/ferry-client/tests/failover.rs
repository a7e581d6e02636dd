//! Several server addresses: a call goes to one that can be connected to, and stays there.

use ferry_client::Client;
use ferry_core::views::CreateApp;
use std::sync::Arc;
use std::time::Duration;

/// A real API server (in-memory store) on its own runtime thread; its address and an admin
/// token of it.
fn server() -> (String, String, tokio::runtime::Runtime, tempfile::TempDir) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ferry_store::SqliteStore::in_memory().unwrap());
    let core = ferry_api::http_core(store, dir.path().into());
    let token = ferry_core::auth::issue(
        &core,
        ferry_core::auth::CreateToken {
            kind: "admin".into(),
            ..Default::default()
        },
    )
    .unwrap()
    .token;
    let app = ferry_api::server::router(core);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), token, rt, dir)
}

fn dead_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // bound and released: nothing listens there now
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_call_goes_to_a_server_that_answers() {
    let (live, token, _rt, _dir) = server();
    let dead = dead_address();
    let c = Client::new(&format!("{dead},{live}"), Duration::from_secs(10))
        .unwrap()
        .with_token(Some(&token));
    let a = c
        .create_app(&CreateApp {
            app_name: "web".into(),
            org_slug: None,
        })
        .unwrap();
    assert_eq!(a.name, "web");
    assert_eq!(
        c.base(),
        live,
        "the client stays with the server that answered"
    );
    assert_eq!(c.list_apps(None).unwrap().len(), 1);
    // An API error is an answer: no other server is tried for it.
    let e = c.get_app("nope").unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("not_found")));
    assert_eq!(c.base(), live);
}

#[test]
fn when_no_server_answers_the_error_names_them_all() {
    let (a, b) = (dead_address(), dead_address());
    let c = Client::new(&format!("{a},{b}"), Duration::from_secs(5)).unwrap();
    let e = c.list_hosts().unwrap_err().to_string();
    assert!(e.contains(&a) && e.contains(&b), "{e}");
}
