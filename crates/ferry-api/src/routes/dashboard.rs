//! The web dashboard: its static page at `/ui` and the two reads it makes (the rules:
//! [`dashboard`]).

use crate::doc::{Refused, ServerFailed};
use crate::server::{Auth, Query, Shared};
use crate::ApiError;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use ferry_core::dashboard::{self, Dashboard, DashboardEvent};
use serde::Deserialize;
use std::time::Duration;

type Result<T, E = ApiError> = std::result::Result<T, E>;

// The page is three small files, compiled in: the server needs nothing on disk to serve it.
const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/style.css");
const ICON: &str = include_str!("../../ui/favicon.svg");

/// A change notice goes out at most this often per viewer: a burst of changes (a drain) becomes
/// one read of the fleet, not one per change.
const COALESCE: Duration = Duration::from_millis(100);
/// While a migration is under way its progress (phase, bytes copied) is looked at this often:
/// migration records are not part of the store's change feed.
const MIGRATION_POLL: Duration = Duration::from_millis(500);
/// A comment line this often keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

pub async fn index() -> impl IntoResponse {
    static_file("text/html; charset=utf-8", INDEX)
}
pub async fn app_js() -> impl IntoResponse {
    static_file("text/javascript; charset=utf-8", APP_JS)
}
pub async fn style() -> impl IntoResponse {
    static_file("text/css; charset=utf-8", STYLE)
}
pub async fn icon() -> impl IntoResponse {
    static_file("image/svg+xml", ICON)
}

fn static_file(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            // The page only talks to this server and runs only its own script.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'",
            ),
        ],
        body,
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DashboardQuery {
    /// Only this org's apps, machines, migrations and bridge mappings (hosts count only its
    /// machines). An org token always gets its own org.
    org: Option<String>,
}

/// `GET /v1/dashboard`: the fleet in one read, as the dashboard shows it.
#[utoipa::path(get, path = "/v1/dashboard", operation_id = "dashboard", tag = "dashboard", params(DashboardQuery),
    responses((status = 200, description = "Hosts, apps, live machines, recent migrations and bridge mappings.", body = Dashboard), Refused, ServerFailed))]
pub async fn snapshot(
    State(ctx): Shared,
    Auth(caller): Auth,
    Query(q): Query<DashboardQuery>,
) -> Result<Json<Dashboard>> {
    Ok(Json(
        dashboard::snapshot(&ctx, &caller, q.org.as_deref()).await?,
    ))
}

/// `GET /v1/dashboard/events`: server-sent events, one `change` each time the fleet changed
/// (coalesced), so the page reads `/v1/dashboard` again. The first comes at once.
#[utoipa::path(get, path = "/v1/dashboard/events", operation_id = "dashboard_events", tag = "dashboard",
    responses((status = 200, description = "text/event-stream: `event: change` with a counter as data, and keepalive comments.", content_type = "text/event-stream", body = DashboardEvent), Refused, ServerFailed))]
pub async fn events(State(ctx): Shared, Auth(caller): Auth) -> Result<axum::response::Response> {
    // A notice says only "something changed", never what: any user may have them.
    caller.require_user()?;
    let changes = ctx.changes.subscribe();
    let store = ctx.store_changes();
    let state = (ctx, changes, store, 0u64, None::<(usize, i64)>);
    let stream = futures::stream::unfold(state, |mut s| async move {
        let (ctx, changes, store, n, migrations) = &mut s;
        if *n > 0 {
            let keepalive = tokio::time::sleep(KEEPALIVE);
            tokio::pin!(keepalive);
            loop {
                let store_changed = async {
                    match store.as_mut() {
                        Some(sub) => sub.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = changes.changed() => { if r.is_err() { return None; } break; }
                    ok = store_changed => { if !ok { *store = None; } break; }
                    _ = tokio::time::sleep(MIGRATION_POLL) => {
                        let now = migration_mark(ctx);
                        let moved = now.is_some() && now != *migrations;
                        let ending = migrations.is_some() && now.is_none();
                        *migrations = now;
                        if moved || ending { break; }
                    }
                    _ = &mut keepalive => {
                        return Some((Ok::<_, std::convert::Infallible>(": keepalive\n\n".to_owned()), s));
                    }
                }
            }
            tokio::time::sleep(COALESCE).await;
            changes.borrow_and_update();
        }
        *n += 1;
        let line = format!("event: change\ndata: {n}\n\n");
        Some((Ok(line), s))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// How many migrations are unfinished and when one last changed; `None` when none runs.
fn migration_mark(ctx: &ferry_core::Core) -> Option<(usize, i64)> {
    let all =
        ferry_core::migrate::list(ctx, &ferry_core::auth::Caller::server(), None, None).ok()?;
    let running: Vec<_> = all.iter().filter(|m| m.finished_at_ms.is_none()).collect();
    (!running.is_empty()).then(|| {
        (
            running.len(),
            running.iter().map(|m| m.updated_at_ms).max().unwrap_or(0),
        )
    })
}
