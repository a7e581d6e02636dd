//! Doubles of the core's side effects, for tests of the core without kernels or processes
//! (feature `testing`): [`Double`], a recording fleet of agents that keeps what real agents would
//! (which host runs which machine), records every call and notes every broken invariant.

use crate::agents::{AgentResult, Agents, Started};
use crate::proto::*;
use crate::{Error, Kind};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

#[derive(Default)]
struct Fleet {
    /// machine -> the endpoint of the host it runs on.
    running: BTreeMap<String, String>,
    calls: Vec<String>,
    /// Starts on these endpoints fail (an agent error).
    failing: BTreeSet<String>,
    /// Anything that breaks an invariant, as it happened.
    violations: Vec<String>,
    /// The next start answers only once this is released (see [`Double::hold_next_start`]).
    hold: Option<tokio::sync::oneshot::Receiver<()>>,
}

#[derive(Default)]
pub struct Double(Mutex<Fleet>);

impl Double {
    /// Every call so far, as `"<op> <machine> <endpoint>"`.
    pub fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().calls.clone()
    }
    /// machine -> the endpoint of the host it runs on.
    pub fn running(&self) -> BTreeMap<String, String> {
        self.0.lock().unwrap().running.clone()
    }
    /// What broke an invariant (a machine started on a second host while running), in order.
    pub fn violations(&self) -> Vec<String> {
        self.0.lock().unwrap().violations.clone()
    }
    /// From now on, starts on `endpoint` fail as that agent would (`agent_error`, code
    /// `internal`).
    pub fn fail_starts_on(&self, endpoint: &str) {
        self.0.lock().unwrap().failing.insert(endpoint.to_owned());
    }
    /// The next start runs the machine at once but answers the server only when the returned
    /// sender is used (or dropped): the window in which the server still has it `starting`.
    pub fn hold_next_start(&self) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.lock().unwrap().hold = Some(rx);
        tx
    }
}

fn ready<'a, T: Send + 'a>(v: Result<T, Error>) -> AgentResult<'a, T> {
    Box::pin(async move { v })
}

fn agent_error(code: &str, msg: String) -> Error {
    let mut e = Error::new(Kind::Agent, "agent_error", msg);
    e.agent_code = Some(code.into());
    e
}

impl Agents for Double {
    fn start<'a>(&'a self, ep: &'a str, run: &'a RunMachine) -> AgentResult<'a, Started> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("start {} {ep}", run.id));
        if f.failing.contains(ep) {
            return ready(Err(agent_error("internal", format!("{ep} cannot start"))));
        }
        if let Some(other) = f.running.get(&run.id).filter(|o| *o != ep) {
            let v = format!("{} started on {ep} while running on {other}", run.id);
            f.violations.push(v);
        }
        f.running.insert(run.id.clone(), ep.to_owned());
        match f.hold.take() {
            Some(rx) => Box::pin(async move {
                let _ = rx.await;
                Ok(Started::default())
            }),
            None => ready(Ok(Started::default())),
        }
    }
    /// Runs nothing: recorded only.
    fn prepare<'a>(&'a self, ep: &'a str, run: &'a RunMachine) -> AgentResult<'a, ()> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("prepare {} {ep}", run.id));
        ready(Ok(()))
    }
    /// Runs nothing: recorded only.
    fn stage<'a>(&'a self, ep: &'a str, run: &'a RunMachine) -> AgentResult<'a, ()> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("stage {} {ep}", run.id));
        ready(Ok(()))
    }
    fn stop<'a>(
        &'a self,
        ep: &'a str,
        m: &'a str,
        _: &'a StopMachine,
    ) -> AgentResult<'a, ExitInfo> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("stop {m} {ep}"));
        if f.running.get(m).map(String::as_str) != Some(ep) {
            return ready(Err(agent_error(
                "not_running",
                format!("{m} is not running"),
            )));
        }
        f.running.remove(m);
        ready(Ok(ExitInfo {
            signal: Some(15),
            requested_stop: true,
            ..Default::default()
        }))
    }
    fn destroy<'a>(&'a self, ep: &'a str, m: &'a str) -> AgentResult<'a, ()> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("destroy {m} {ep}"));
        if f.running.get(m).map(String::as_str) == Some(ep) {
            f.running.remove(m);
        }
        ready(Ok(()))
    }
    /// Kills the machine if it runs there; later starts of it there are not refused here (the
    /// double does not track instances), but the order of calls is recorded.
    fn fence<'a>(&'a self, ep: &'a str, m: &'a str) -> AgentResult<'a, ()> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("fence {m} {ep}"));
        if f.running.get(m).map(String::as_str) == Some(ep) {
            f.running.remove(m);
        }
        ready(Ok(()))
    }
    /// Runs nothing: a running machine answers exit 0 with its command echoed.
    fn exec<'a>(
        &'a self,
        ep: &'a str,
        m: &'a str,
        req: &'a ExecRequest,
    ) -> AgentResult<'a, ExecResult> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("exec {m} {ep}"));
        if f.running.get(m).map(String::as_str) != Some(ep) {
            return ready(Err(agent_error(
                "not_running",
                format!("{m} is not running"),
            )));
        }
        ready(Ok(ExecResult {
            exit_code: 0,
            stdout: format!("{:?}\n", req),
            stderr: String::new(),
        }))
    }
    fn signal<'a>(
        &'a self,
        ep: &'a str,
        m: &'a str,
        req: &'a SignalMachine,
    ) -> AgentResult<'a, ()> {
        let mut f = self.0.lock().unwrap();
        f.calls.push(format!("signal {m} {ep} {}", req.signal));
        if f.running.get(m).map(String::as_str) != Some(ep) {
            return ready(Err(agent_error(
                "not_running",
                format!("{m} is not running"),
            )));
        }
        ready(Ok(()))
    }
    /// The double runs no processes, so no machine ever wrote a line.
    fn logs<'a>(
        &'a self,
        ep: &'a str,
        m: &'a str,
        _: &'a LogQuery,
    ) -> AgentResult<'a, Vec<LogRecord>> {
        self.0.lock().unwrap().calls.push(format!("logs {m} {ep}"));
        ready(Ok(vec![]))
    }
    fn bridge_sync<'a>(&'a self, ep: &'a str, s: &'a BridgeSync) -> AgentResult<'a, ()> {
        let mut f = self.0.lock().unwrap();
        f.calls
            .push(format!("bridge_sync {ep} {}", s.mappings.len()));
        ready(Ok(()))
    }
    fn bridge_hits<'a>(&'a self, _: &'a str) -> AgentResult<'a, Vec<BridgeHit>> {
        ready(Ok(vec![]))
    }
    fn volume_expect<'a>(
        &'a self,
        _: &'a str,
        _: &'a VolumeExpect,
    ) -> AgentResult<'a, VolumeExpected> {
        ready(Err(Error::internal("no volumes here")))
    }
    fn volume_send<'a>(&'a self, _: &'a str, _: &'a VolumeSend) -> AgentResult<'a, VolumeRound> {
        ready(Err(Error::internal("no volumes here")))
    }
    fn volume_progress<'a>(&'a self, _: &'a str, _: &'a str) -> AgentResult<'a, VolumeProgress> {
        ready(Err(Error::internal("no volumes here")))
    }
    fn volume_remove<'a>(&'a self, _: &'a str, _: &'a VolumeRemove) -> AgentResult<'a, ()> {
        ready(Ok(()))
    }
    fn image_pull<'a>(
        &'a self,
        _: &'a str,
        _: &'a ImagePull,
    ) -> AgentResult<'a, futures::stream::BoxStream<'static, PullLine>> {
        ready(Err(Error::internal("no images here")))
    }
    fn image_list<'a>(&'a self, _: &'a str) -> AgentResult<'a, Vec<ImageInfo>> {
        ready(Ok(vec![]))
    }
    fn image_remove<'a>(&'a self, _: &'a str, _: &'a ImageRemove) -> AgentResult<'a, Vec<String>> {
        ready(Ok(vec![]))
    }
}

/// Webhooks that go nowhere: each post answers that nothing was sent.
#[derive(Default)]
pub struct NoWebhooks;

impl crate::agents::Webhooks for NoWebhooks {
    fn post<'a>(
        &'a self,
        _: &'a str,
        _: &'a [(&'static str, String)],
        _: String,
    ) -> futures::future::BoxFuture<'a, serde_json::Value> {
        Box::pin(async { serde_json::json!({"sent": false}) })
    }
}

/// A fresh admin token of `core`'s store (`<id>.<secret>`), for tests that call the API.
pub fn admin_token(core: &crate::Core) -> String {
    crate::auth::issue(
        core,
        crate::auth::CreateToken {
            kind: "admin".into(),
            description: Some("tests".into()),
            ..Default::default()
        },
    )
    .expect("an admin token")
    .token
}
