//! The core's side effects outside the store, each behind a narrow trait: [`Agents`] (every call
//! the control plane makes to a host's agent) and [`Webhooks`] (migration notices). The core,
//! placement and the migration driver only ever reach hosts and the outside through them, so
//! unit tests drive them with recording doubles (see `tests/driver.rs`) while the real-kernel
//! tests use the HTTP implementations in `ferry-api`.
//!
//! Errors are typed: an agent's answer keeps its code ([`Error::agent_code`]); a fork the agent
//! calls permanently impossible is [`Kind::Unprocessable`] `volume_unsupported` (never
//! retried); an agent that cannot be reached is [`Kind::Unavailable`] (retried).

#[allow(unused_imports)] // named by the docs above
use crate::error::{Error, Kind};
use crate::proto::{
    BridgeHit, BridgeSync, ExecRequest, ExecResult, ExitInfo, ImageInfo, ImagePull, ImageRemove,
    LogQuery, LogRecord, PullLine, RunMachine, SignalMachine, StopMachine, VolumeExpect,
    VolumeExpected, VolumeProgress, VolumeRemove, VolumeRound, VolumeSend,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub type AgentResult<'a, T> = BoxFuture<'a, Result<T, Error>>;

/// What an agent answers to a start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Started {
    #[serde(default)]
    pub pid: Option<u32>,
    /// The host directory of each mount, in order (where a new volume was made).
    #[serde(default)]
    pub volume_dirs: Vec<String>,
    /// Seconds the agent spent in each phase of the start (`netns`, `cgroup`, `bridge`,
    /// `files`, `spawn`, `init`): where a start's time goes, per host, in the server's metrics.
    #[serde(default)]
    pub phases: std::collections::BTreeMap<String, f64>,
}

/// Every call the server makes to an agent. `endpoint` is the agent's base URL as it registered.
pub trait Agents: Send + Sync {
    fn start<'a>(&'a self, endpoint: &'a str, run: &'a RunMachine) -> AgentResult<'a, Started>;
    /// Builds the machine's network namespace and cgroups ahead of a start of `run` (a
    /// migration's destination, while the volumes copy); runs nothing. `destroy` undoes it.
    fn prepare<'a>(&'a self, endpoint: &'a str, run: &'a RunMachine) -> AgentResult<'a, ()>;
    /// [`Agents::prepare`], and the machine set up and held, so that a start of the same `run`
    /// only releases it (a migration's destination, once the volumes are copied but the final
    /// round); runs nothing of the machine's own. `destroy` undoes it.
    fn stage<'a>(&'a self, endpoint: &'a str, run: &'a RunMachine) -> AgentResult<'a, ()>;
    fn stop<'a>(
        &'a self,
        endpoint: &'a str,
        machine: &'a str,
        params: &'a StopMachine,
    ) -> AgentResult<'a, ExitInfo>;
    /// Removes the machine's local state (process, namespace, cgroup, run directory).
    fn destroy<'a>(&'a self, endpoint: &'a str, machine: &'a str) -> AgentResult<'a, ()>;
    /// The machine's instance on that host moved away: it must never run there again (a quick,
    /// durable mark; its namespace and cgroup stay until a `destroy`).
    fn fence<'a>(&'a self, endpoint: &'a str, machine: &'a str) -> AgentResult<'a, ()>;
    fn exec<'a>(
        &'a self,
        endpoint: &'a str,
        machine: &'a str,
        req: &'a ExecRequest,
    ) -> AgentResult<'a, ExecResult>;
    /// Sends a signal to the machine's command.
    fn signal<'a>(
        &'a self,
        endpoint: &'a str,
        machine: &'a str,
        req: &'a SignalMachine,
    ) -> AgentResult<'a, ()>;
    /// Lines of the machine's output that this host kept (see [`LogQuery`]).
    fn logs<'a>(
        &'a self,
        endpoint: &'a str,
        machine: &'a str,
        q: &'a LogQuery,
    ) -> AgentResult<'a, Vec<LogRecord>>;
    fn bridge_sync<'a>(&'a self, endpoint: &'a str, sync: &'a BridgeSync) -> AgentResult<'a, ()>;
    fn bridge_hits<'a>(&'a self, endpoint: &'a str) -> AgentResult<'a, Vec<BridgeHit>>;
    fn volume_expect<'a>(
        &'a self,
        endpoint: &'a str,
        req: &'a VolumeExpect,
    ) -> AgentResult<'a, VolumeExpected>;
    fn volume_send<'a>(
        &'a self,
        endpoint: &'a str,
        req: &'a VolumeSend,
    ) -> AgentResult<'a, VolumeRound>;
    fn volume_progress<'a>(
        &'a self,
        endpoint: &'a str,
        session: &'a str,
    ) -> AgentResult<'a, VolumeProgress>;
    fn volume_remove<'a>(&'a self, endpoint: &'a str, req: &'a VolumeRemove)
        -> AgentResult<'a, ()>;
    /// Starts a pull; its answer lines as they come (progress, then the image or an error). An
    /// agent that refuses the pull answers one error line; only an unreachable agent is `Err`.
    fn image_pull<'a>(
        &'a self,
        endpoint: &'a str,
        req: &'a ImagePull,
    ) -> AgentResult<'a, BoxStream<'static, PullLine>>;
    fn image_list<'a>(&'a self, endpoint: &'a str) -> AgentResult<'a, Vec<ImageInfo>>;
    /// Removes an image; the layers that went with it.
    fn image_remove<'a>(
        &'a self,
        endpoint: &'a str,
        req: &'a ImageRemove,
    ) -> AgentResult<'a, Vec<String>>;
}

/// Sends a migration's notice to its app's webhook. The answer (status or failure) is recorded
/// in the migration's event; a failing webhook never stops a migration.
pub trait Webhooks: Send + Sync {
    /// POSTs `body` to `url` with `headers`; what happened, as JSON for the event.
    fn post<'a>(
        &'a self,
        url: &'a str,
        headers: &'a [(&'static str, String)],
        body: String,
    ) -> BoxFuture<'a, serde_json::Value>;
}
