//! A machine's output over HTTP (the rules: [`logs`]).

use crate::doc::{BadRequest, Conflict, MachinePath, NotFound, Refused, ServerFailed};
use crate::server::{Auth, Path, Query, Shared};
use crate::ApiError;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use ferry_core::logs::{self, Follow, LogLine, LogRequest, LogsView};
use ferry_core::Error;
use serde::Deserialize;
use std::time::Duration;

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// How often a follower asks the machine's host for new lines. Logs are for people: a quarter
/// second is immediate to them and costs the agent four small reads a second per follower.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// A follower whose machine's host has not answered for this long ends its answer.
const FOLLOW_GIVE_UP: Duration = Duration::from_secs(120);

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines after this: a duration back from now (`90s`, `10m`, `2h`) or an RFC 3339 time.
    since: Option<String>,
    /// At most this many lines (the newest), 1..=10000 (default: all kept, up to 10000; with
    /// `follow`, 100 before the new ones).
    #[param(minimum = 1, maximum = 10000)]
    tail: Option<u32>,
    /// Keep the response open and send new lines as the machine writes them, across
    /// migrations and updates, until the machine is destroyed.
    #[serde(default)]
    follow: bool,
}

fn since_us(s: &str) -> Result<i64, Error> {
    let s = s.trim();
    let at = match humantime::parse_duration(s) {
        Ok(d) => std::time::SystemTime::now()
            .checked_sub(d)
            .unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            Error::invalid(format!(
                "since {s:?}: neither a duration (like 10m) nor an RFC 3339 time"
            ))
        })?,
    };
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64))
}

/// `GET /v1/apps/{app}/machines/{id}/logs`: the machine's stdout and stderr, from every host its
/// instances ran on; with `follow`, newline-delimited JSON that goes on as the machine writes.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/logs", operation_id = "machine_logs", tag = "machines", params(MachinePath, LogsQuery),
    responses(
        (status = 200, description = "The lines, oldest first, and the hosts that did not answer. With `follow=true`: newline-delimited JSON, one LogLine per line.", body = LogsView),
        BadRequest, NotFound, Conflict, Refused, ServerFailed))]
pub async fn machine_logs(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> Result<axum::response::Response> {
    ferry_core::auth::app(&ctx, &caller, &app)?;
    if q.tail.is_some_and(|t| !(1..=logs::MAX_LINES).contains(&t)) {
        return Err(Error::invalid(format!("tail must be 1..={}", logs::MAX_LINES)).into());
    }
    let req = LogRequest {
        since_us: q.since.as_deref().map(since_us).transpose()?,
        tail: q.tail.or(q.follow.then_some(100)),
    };
    let first = logs::read(&ctx, &app, &id, req).await?;
    if !q.follow {
        return Ok(Json(first).into_response());
    }
    let follow = Follow::start(&ctx, &app, &id, first.lines.last())?;
    let backlog: Vec<LogLine> = first.lines;
    let state = (ctx, app, id, follow, Some(backlog), false);
    let lines = futures::stream::unfold(state, |mut s| async move {
        let (ctx, app, id, follow, backlog, done) = &mut s;
        if let Some(b) = backlog.take() {
            return Some((Ok::<_, std::convert::Infallible>(ndjson(&b)), s));
        }
        if *done {
            return None;
        }
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            match follow.step(ctx, app, id).await {
                Ok(step) => {
                    failing_since = None;
                    *done = step.done;
                    if !step.lines.is_empty() || step.done {
                        return Some((Ok(ndjson(&step.lines)), s));
                    }
                }
                // The machine is gone from the store: nothing more will come.
                Err(e) if e.kind == ferry_core::Kind::NotFound => return None,
                // Its host's agent restarting, or the store briefly down: the lines are
                // still being kept (the shim writes them), so keep asking, for a while.
                Err(_) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > FOLLOW_GIVE_UP {
                        return None;
                    }
                }
            }
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

fn ndjson(lines: &[LogLine]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut out, l).expect("serializable");
        out.push(b'\n');
    }
    out
}
