//! The HTTP side of the core's side effects: [`HttpAgents`] (the one typed client of the hosts'
//! agents) and [`HttpWebhooks`].
//!
//! An agent's error answer keeps its code ([`Error::agent_code`]); a fork the agent calls
//! permanently impossible is `volume_unsupported` (never retried); an agent that cannot be
//! reached is `unavailable` (retried).

use ferry_core::agents::{AgentResult, Agents, Started, Webhooks};
use ferry_core::error::{ErrorBody, PERMANENT_VOLUME_ERROR};
use ferry_core::proto::{
    BridgeHit, BridgeSync, ExecRequest, ExecResult, ExitInfo, ImageInfo, ImagePull, ImageRemove,
    LogQuery, LogRecord, PullLine, RunMachine, SignalMachine, StopMachine, VolumeExpect,
    VolumeExpected, VolumeProgress, VolumeRemove, VolumeRound, VolumeSend,
};
use ferry_core::{Error, Kind};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The agents over HTTP/JSON.
pub struct HttpAgents {
    http: reqwest::Client,
}

impl HttpAgents {
    pub fn new(http: reqwest::Client) -> Self {
        HttpAgents { http }
    }

    async fn post<B: Serialize + ?Sized, R: serde::de::DeserializeOwned>(
        &self,
        url: String,
        body: &B,
    ) -> Result<R, Error> {
        answer(self.http.post(url).json(body).send().await).await
    }

    async fn get<R: serde::de::DeserializeOwned>(&self, url: String) -> Result<R, Error> {
        answer(self.http.get(url).send().await).await
    }

    /// A POST whose answer body the server does not need.
    async fn post_ignored<B: Serialize + ?Sized>(
        &self,
        url: String,
        body: &B,
    ) -> Result<(), Error> {
        let _: Ignored = self.post(url, body).await?;
        Ok(())
    }
}

fn unreachable(e: reqwest::Error) -> Error {
    Error::unavailable(format!("the host's agent did not answer: {e}"))
}

/// An error answer's status, sentence and code (the code empty if the body is not ours).
async fn error_body(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let (msg, code) = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| (b.error, b.code))
        .unwrap_or((text, String::new()));
    (status, msg, code)
}

/// Turns an agent's HTTP answer into the typed result (see the module doc for the rules).
pub async fn answer<R: serde::de::DeserializeOwned>(
    sent: reqwest::Result<reqwest::Response>,
) -> Result<R, Error> {
    let resp = sent.map_err(unreachable)?;
    if !resp.status().is_success() {
        let (_, msg, code) = error_body(resp).await;
        if code == PERMANENT_VOLUME_ERROR {
            // Not the agent's failure: the volume cannot be forked as it is. Never retried.
            return Err(Error::new(
                Kind::Unprocessable,
                PERMANENT_VOLUME_ERROR,
                format!("the host's agent refused: {msg}"),
            ));
        }
        let mut e = Error::new(
            Kind::Agent,
            "agent_error",
            format!("the host's agent failed: {msg}"),
        );
        e.agent_code = (!code.is_empty()).then_some(code);
        return Err(e);
    }
    resp.json()
        .await
        .map_err(|e| Error::internal(format!("agent reply: {e}")))
}

/// An answer whose body the server does not need.
#[derive(Deserialize)]
struct Ignored {}

impl Agents for HttpAgents {
    fn start<'a>(&'a self, ep: &'a str, run: &'a RunMachine) -> AgentResult<'a, Started> {
        Box::pin(self.post(format!("{ep}/v1/machines/{}/start", run.id), run))
    }
    fn prepare<'a>(&'a self, ep: &'a str, run: &'a RunMachine) -> AgentResult<'a, ()> {
        Box::pin(self.post_ignored(format!("{ep}/v1/machines/{}/prepare", run.id), run))
    }
    fn stage<'a>(&'a self, ep: &'a str, run: &'a RunMachine) -> AgentResult<'a, ()> {
        Box::pin(self.post_ignored(format!("{ep}/v1/machines/{}/stage", run.id), run))
    }
    fn stop<'a>(
        &'a self,
        ep: &'a str,
        machine: &'a str,
        params: &'a StopMachine,
    ) -> AgentResult<'a, ExitInfo> {
        Box::pin(self.post(format!("{ep}/v1/machines/{machine}/stop"), params))
    }
    fn destroy<'a>(&'a self, ep: &'a str, machine: &'a str) -> AgentResult<'a, ()> {
        Box::pin(async move {
            let url = format!("{ep}/v1/machines/{machine}/destroy");
            self.post_ignored(url, &serde_json::json!({})).await
        })
    }
    fn fence<'a>(&'a self, ep: &'a str, machine: &'a str) -> AgentResult<'a, ()> {
        Box::pin(async move {
            let url = format!("{ep}/v1/machines/{machine}/fence");
            self.post_ignored(url, &serde_json::json!({})).await
        })
    }
    fn exec<'a>(
        &'a self,
        ep: &'a str,
        machine: &'a str,
        req: &'a ExecRequest,
    ) -> AgentResult<'a, ExecResult> {
        Box::pin(self.post(format!("{ep}/v1/machines/{machine}/exec"), req))
    }
    fn signal<'a>(
        &'a self,
        ep: &'a str,
        machine: &'a str,
        req: &'a SignalMachine,
    ) -> AgentResult<'a, ()> {
        Box::pin(self.post_ignored(format!("{ep}/v1/machines/{machine}/signal"), req))
    }
    fn logs<'a>(
        &'a self,
        ep: &'a str,
        machine: &'a str,
        q: &'a LogQuery,
    ) -> AgentResult<'a, Vec<LogRecord>> {
        Box::pin(self.post(format!("{ep}/v1/machines/{machine}/logs"), q))
    }
    fn bridge_sync<'a>(&'a self, ep: &'a str, sync: &'a BridgeSync) -> AgentResult<'a, ()> {
        Box::pin(self.post_ignored(format!("{ep}/v1/bridge/sync"), sync))
    }
    fn bridge_hits<'a>(&'a self, ep: &'a str) -> AgentResult<'a, Vec<BridgeHit>> {
        Box::pin(self.get(format!("{ep}/v1/bridge/hits")))
    }
    fn volume_expect<'a>(
        &'a self,
        ep: &'a str,
        req: &'a VolumeExpect,
    ) -> AgentResult<'a, VolumeExpected> {
        Box::pin(self.post(format!("{ep}/v1/volumes/expect"), req))
    }
    fn volume_send<'a>(&'a self, ep: &'a str, req: &'a VolumeSend) -> AgentResult<'a, VolumeRound> {
        Box::pin(self.post(format!("{ep}/v1/volumes/send"), req))
    }
    fn volume_progress<'a>(
        &'a self,
        ep: &'a str,
        session: &'a str,
    ) -> AgentResult<'a, VolumeProgress> {
        Box::pin(self.get(format!("{ep}/v1/volumes/progress/{session}")))
    }
    fn volume_remove<'a>(&'a self, ep: &'a str, req: &'a VolumeRemove) -> AgentResult<'a, ()> {
        Box::pin(self.post_ignored(format!("{ep}/v1/volumes/remove"), req))
    }
    fn image_pull<'a>(
        &'a self,
        ep: &'a str,
        req: &'a ImagePull,
    ) -> AgentResult<'a, BoxStream<'static, PullLine>> {
        Box::pin(async move {
            let resp = self
                .http
                .post(format!("{ep}/v1/images/pull"))
                .json(req)
                .send()
                .await
                .map_err(unreachable)?;
            if !resp.status().is_success() {
                let (status, message, code) = error_body(resp).await;
                let code = if code.is_empty() {
                    "agent_error".into()
                } else {
                    code
                };
                let line = PullLine::Error {
                    status,
                    code,
                    message,
                };
                return Ok(futures::stream::once(async move { line }).boxed());
            }
            Ok(ndjson_lines(resp.bytes_stream()).boxed())
        })
    }
    fn image_list<'a>(&'a self, ep: &'a str) -> AgentResult<'a, Vec<ImageInfo>> {
        Box::pin(self.get(format!("{ep}/v1/images")))
    }
    fn image_remove<'a>(
        &'a self,
        ep: &'a str,
        req: &'a ImageRemove,
    ) -> AgentResult<'a, Vec<String>> {
        #[derive(Deserialize)]
        struct Removed {
            removed_layers: Vec<String>,
        }
        Box::pin(async move {
            let r: Removed = self.post(format!("{ep}/v1/images/remove"), req).await?;
            Ok(r.removed_layers)
        })
    }
}

/// Splits a streamed answer into pull lines as it arrives; a line that does not parse, or a body
/// that breaks off, becomes an `agent_error` line.
fn ndjson_lines(
    bytes: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
) -> impl futures::Stream<Item = PullLine> + Send + 'static {
    futures::stream::unfold(
        (Box::pin(bytes), Vec::<u8>::new(), false),
        |(mut bytes, mut buf, mut done)| async move {
            loop {
                if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    let parsed = serde_json::from_slice::<PullLine>(&line).unwrap_or_else(|e| {
                        PullLine::Error {
                            status: 502,
                            code: "agent_error".into(),
                            message: format!("the agent's answer is not a pull line: {e}"),
                        }
                    });
                    return Some((parsed, (bytes, buf, done)));
                }
                if done {
                    return None;
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        done = true;
                        buf.clear();
                        let l = PullLine::Error {
                            status: 502,
                            code: "agent_error".into(),
                            message: format!("the agent's answer broke off: {e}"),
                        };
                        return Some((l, (bytes, buf, done)));
                    }
                    None => {
                        done = true;
                        if buf.is_empty() {
                            return None;
                        }
                        buf.push(b'\n');
                    }
                }
            }
        },
    )
}

/// Webhooks over HTTP: 5 s per notice.
pub struct HttpWebhooks {
    http: reqwest::Client,
}

impl HttpWebhooks {
    pub fn new(http: reqwest::Client) -> Self {
        HttpWebhooks { http }
    }
}

impl Webhooks for HttpWebhooks {
    fn post<'a>(
        &'a self,
        url: &'a str,
        headers: &'a [(&'static str, String)],
        body: String,
    ) -> BoxFuture<'a, serde_json::Value> {
        Box::pin(async move {
            let mut req = self.http.post(url).timeout(Duration::from_secs(5));
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            match req.body(body).send().await {
                Ok(r) => serde_json::json!({"url": url, "status": r.status().as_u16()}),
                Err(e) => serde_json::json!({"url": url, "error": e.to_string()}),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiError;
    use axum::routing::post;
    use axum::Router;

    /// An agent's error code reaches the caller as a code (the driver decides by it), and a
    /// permanent volume error keeps its own kind.
    #[tokio::test]
    async fn agent_error_codes_reach_the_caller() {
        let agent = Router::new()
            .route(
                "/stop",
                post(|| async { ApiError::conflict("not_running", "machine x is not running") }),
            )
            .route(
                "/fork",
                post(|| async { ApiError::new(422, PERMANENT_VOLUME_ERROR, "dev") }),
            )
            .route(
                "/plain",
                post(|| async { (axum::http::StatusCode::BAD_GATEWAY, "proxy") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, agent).await });
        let http = reqwest::Client::new();
        let call = |p: &str| {
            let url = format!("{base}{p}");
            let http = http.clone();
            async move {
                answer::<serde_json::Value>(http.post(url).send().await)
                    .await
                    .unwrap_err()
            }
        };
        let e = call("/stop").await;
        assert_eq!((e.kind, e.code), (Kind::Agent, "agent_error"));
        assert_eq!(e.agent_code.as_deref(), Some("not_running"));
        let e = call("/fork").await;
        assert_eq!(
            (e.kind, e.code),
            (Kind::Unprocessable, PERMANENT_VOLUME_ERROR)
        );
        let e = call("/plain").await;
        assert_eq!((e.kind, e.agent_code), (Kind::Agent, None));
    }
}
