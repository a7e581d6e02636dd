//! A typed client of ferry's public API (`openapi.json`), blocking, for the CLI, the benchmarks
//! and the tests.
//!
//! Every method names its operation in [`OPERATIONS`] (operation ID, method, path template,
//! request and response schema); `tests/document.rs` checks that table against the checked-in
//! OpenAPI document, both ways, so the client cannot call a route the document does not have, nor
//! miss one it has. Each call also checks (in debug builds) that the Rust types it sends and
//! parses are the ones its table row names, so the table cannot drift from the methods.
//!
//! The request and response types are the server's own (`ferry_api`), so the bytes agree by
//! construction; what the table guards is the routing: methods, paths and parameters.

use ferry_core::auth::{CreateToken, CreatedToken, TokenView};
use ferry_core::bridge::{GateRequest, Gates, MapRequest, MappingView, ReportLine, RetireRequest};
use ferry_core::dashboard::{Dashboard, DashboardEvent};
use ferry_core::images::{PullRequest, RegistrySettings, RegistryView, RemoveRequest, RemovedView};
use ferry_core::logs::{LogLine, LogsView};
use ferry_core::migrate::preview::MovePlan;
use ferry_core::migrate::{DrainView, MigratePolicy, MigrateRequest, Migration, PolicyUpdate};
use ferry_core::proto::{ImageInfo, PullLine};
use ferry_core::views::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a call can end in besides its answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error: its status, stable code and sentence.
    #[error("{message} ({code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// Nothing answered at the address.
    #[error(
        "cannot reach the ferry API at {base} ({source}); is it running? (`ferry dev` starts \
         one; set --api or FERRY_API)"
    )]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that is not what the document promises (a proxy in between, another server).
    #[error("unexpected answer from the API (HTTP {status}): {detail}")]
    Unexpected { status: u16, detail: String },
    /// An argument that cannot be put into a URL.
    #[error("{0}")]
    BadArgument(String),
}

impl ClientError {
    /// The API's status, if the API answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
    /// The API's error code (`not_found`, `illegal_transition`, ...), if the API answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// One documented operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    pub id: &'static str,
    pub method: &'static str,
    /// The path template, parameters in braces as in the document.
    pub path: &'static str,
    /// The request body's schema name, if the operation takes one.
    pub request: Option<&'static str>,
    /// The success answer's schema: a name, or `[Name]` for an array of them.
    pub response: &'static str,
}

macro_rules! operations {
    ($($konst:ident = $id:literal $method:literal $path:literal $req:tt -> $resp:literal;)*) => {
        mod op {
            use super::Operation;
            $(pub const $konst: Operation = Operation {
                id: $id,
                method: $method,
                path: $path,
                request: operations!(@req $req),
                response: $resp,
            };)*
        }
        /// Every operation this client calls.
        pub const OPERATIONS: &[Operation] = &[$(op::$konst),*];
    };
    (@req -) => { None };
    (@req $r:literal) => { Some($r) };
}

operations! {
    CREATE_APP = "create_app" "POST" "/v1/apps" "CreateApp" -> "AppView";
    LIST_APPS = "list_apps" "GET" "/v1/apps" - -> "[AppView]";
    GET_APP = "get_app" "GET" "/v1/apps/{app}" - -> "AppView";
    DELETE_APP = "delete_app" "DELETE" "/v1/apps/{app}" - -> "OkView";
    LIST_MACHINES = "list_machines" "GET" "/v1/apps/{app}/machines" - -> "[MachineView]";
    CREATE_MACHINE = "create_machine" "POST" "/v1/apps/{app}/machines" "CreateMachine" -> "MachineView";
    GET_MACHINE = "get_machine" "GET" "/v1/apps/{app}/machines/{id}" - -> "MachineView";
    DESTROY_MACHINE = "destroy_machine" "DELETE" "/v1/apps/{app}/machines/{id}" - -> "MachineView";
    STOP_MACHINE = "stop_machine" "POST" "/v1/apps/{app}/machines/{id}/stop" "StopRequest" -> "MachineView";
    START_MACHINE = "start_machine" "POST" "/v1/apps/{app}/machines/{id}/start" - -> "MachineView";
    WAIT_MACHINE = "wait_machine" "GET" "/v1/apps/{app}/machines/{id}/wait" - -> "WaitView";
    MACHINE_EVENTS = "machine_events" "GET" "/v1/apps/{app}/machines/{id}/events" - -> "[EventView]";
    ACQUIRE_LEASE = "acquire_lease" "POST" "/v1/apps/{app}/machines/{id}/lease" "LeaseRequest" -> "LeaseView";
    GET_LEASE = "get_lease" "GET" "/v1/apps/{app}/machines/{id}/lease" - -> "LeaseView";
    RELEASE_LEASE = "release_lease" "DELETE" "/v1/apps/{app}/machines/{id}/lease" - -> "OkView";
    EXEC_MACHINE = "exec_machine" "POST" "/v1/apps/{app}/machines/{id}/exec" "ExecBody" -> "ExecView";
    UPDATE_MACHINE = "update_machine" "POST" "/v1/apps/{app}/machines/{id}" "UpdateMachine" -> "MachineView";
    RESTART_MACHINE = "restart_machine" "POST" "/v1/apps/{app}/machines/{id}/restart" "StopRequest" -> "MachineView";
    DASHBOARD = "dashboard" "GET" "/v1/dashboard" - -> "Dashboard";
    DASHBOARD_EVENTS = "dashboard_events" "GET" "/v1/dashboard/events" - -> "DashboardEvent";
    MACHINE_LOGS = "machine_logs" "GET" "/v1/apps/{app}/machines/{id}/logs" - -> "LogsView";
    SIGNAL_MACHINE = "signal_machine" "POST" "/v1/apps/{app}/machines/{id}/signal" "SignalRequest" -> "OkView";
    GET_METADATA = "get_metadata" "GET" "/v1/apps/{app}/machines/{id}/metadata" - -> "MetadataView";
    SET_METADATA = "set_metadata" "POST" "/v1/apps/{app}/machines/{id}/metadata/{key}" "MetadataValue" -> "MetadataView";
    DELETE_METADATA = "delete_metadata" "DELETE" "/v1/apps/{app}/machines/{id}/metadata/{key}" - -> "MetadataView";
    MIGRATE_MACHINE = "migrate_machine" "POST" "/v1/apps/{app}/machines/{id}/migrate" "MigrateRequest" -> "Migration";
    MIGRATE_PLAN = "migrate_plan" "GET" "/v1/apps/{app}/machines/{id}/migrate/plan" - -> "MovePlan";
    DRAIN_PLAN = "drain_plan" "GET" "/v1/hosts/{id}/drain/plan" - -> "MovePlan";
    GET_POLICY = "get_policy" "GET" "/v1/apps/{app}/policy" - -> "MigratePolicy";
    SET_POLICY = "set_policy" "POST" "/v1/apps/{app}/policy" "PolicyUpdate" -> "MigratePolicy";
    LIST_HOSTS = "list_hosts" "GET" "/v1/hosts" - -> "[HostView]";
    DRAIN = "drain" "POST" "/v1/hosts/{id}/drain" - -> "DrainView";
    REMOVE_HOST = "remove_host" "DELETE" "/v1/hosts/{id}" - -> "HostView";
    CORDON = "cordon" "POST" "/v1/hosts/{id}/cordon" - -> "CordonView";
    UNCORDON = "uncordon" "POST" "/v1/hosts/{id}/uncordon" - -> "CordonView";
    LIST_MIGRATIONS = "list_migrations" "GET" "/v1/migrations" - -> "[Migration]";
    GET_MIGRATION = "get_migration" "GET" "/v1/migrations/{id}" - -> "Migration";
    CREATE_VOLUME = "create_volume" "POST" "/v1/volumes" "CreateVolume" -> "VolumeView";
    LIST_VOLUMES = "list_volumes" "GET" "/v1/volumes" - -> "[VolumeView]";
    LIST_BRIDGE_MAPPINGS = "list_bridge_mappings" "GET" "/v1/bridge" - -> "[MappingView]";
    MAP_ADDRESS = "map_address" "POST" "/v1/bridge" "MapRequest" -> "MappingView";
    BRIDGE_REPORT = "bridge_report" "GET" "/v1/bridge/report" - -> "[ReportLine]";
    RETIRE_BRIDGE_MAPPINGS = "retire_bridge_mappings" "POST" "/v1/bridge/retire" "RetireRequest" -> "[MappingView]";
    SET_BRIDGE_GATE = "set_bridge_gate" "POST" "/v1/bridge/gate" "GateRequest" -> "Gates";
    LIST_IMAGES = "list_images" "GET" "/v1/images" - -> "[ImageInfo]";
    PULL_IMAGE = "pull_image" "POST" "/v1/images/pull" "PullRequest" -> "PullLine";
    REMOVE_IMAGE = "remove_image" "POST" "/v1/images/remove" "RemoveRequest" -> "[RemovedView]";
    LIST_REGISTRIES = "list_registries" "GET" "/v1/registries" - -> "[RegistryView]";
    PUT_REGISTRY = "put_registry" "PUT" "/v1/registries/{registry}" "RegistrySettings" -> "RegistryView";
    DELETE_REGISTRY = "delete_registry" "DELETE" "/v1/registries/{registry}" - -> "RegistryView";
    CREATE_TOKEN = "create_token" "POST" "/v1/tokens" "CreateToken" -> "CreatedToken";
    LIST_TOKENS = "list_tokens" "GET" "/v1/tokens" - -> "[TokenView]";
    REVOKE_TOKEN = "revoke_token" "DELETE" "/v1/tokens/{id}" - -> "TokenView";
}

/// Hands each line of a newline-delimited JSON answer to `each`, as it arrives.
fn read_ndjson<T: DeserializeOwned>(
    resp: reqwest::blocking::Response,
    mut each: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    use std::io::BufRead;
    for line in std::io::BufReader::new(resp).lines() {
        let line = line.map_err(|e| ClientError::Unexpected {
            status: 200,
            detail: format!("the answer broke off: {e}"),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        each(
            serde_json::from_str(&line).map_err(|e| ClientError::Unexpected {
                status: 200,
                detail: format!("{e}: {line}"),
            })?,
        )?;
    }
    Ok(())
}

fn logs_query(since: Option<&str>, tail: Option<u32>, follow: bool) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(s) = since {
        q.push(("since", s.to_owned()));
    }
    if let Some(t) = tail {
        q.push(("tail", t.to_string()));
    }
    if follow {
        q.push(("follow", "true".to_owned()));
    }
    q
}

/// The schema name of a Rust type as the document spells it: `Vec<T>` is `[T]`.
fn schema_name<T: ?Sized>() -> String {
    fn last(path: &str) -> &str {
        path.rsplit("::").next().unwrap_or(path)
    }
    let full = std::any::type_name::<T>();
    match full
        .strip_prefix("alloc::vec::Vec<")
        .and_then(|s| s.strip_suffix('>'))
    {
        Some(inner) => format!("[{}]", last(inner)),
        None => last(full).to_owned(),
    }
}

/// No body.
#[derive(Serialize)]
struct NoBody;

/// The lease header of the Machines API.
const LEASE_HEADER: &str = ferry_api::LEASE_HEADER;

/// A client of a ferry API: one server, or several that serve the same fleet.
#[derive(Clone)]
pub struct Client {
    /// Every server address, in the order given.
    bases: Arc<Vec<reqwest::Url>>,
    /// The one that answered last: calls start there.
    current: Arc<AtomicUsize>,
    http: reqwest::blocking::Client,
    lease: Option<String>,
    /// Sent as `Authorization: Bearer ...` on every call.
    token: Option<Arc<str>>,
}

impl Client {
    /// A client of the API at `base`: one address (`http://127.0.0.1:4280`) or several,
    /// comma-separated, of servers of one fleet. A call goes to the server that answered last;
    /// when it cannot be connected to, the call goes to the next (only then: a request a server
    /// may have received is never sent twice). Calls time out after `timeout` (a wait or an exec
    /// may take minutes: choose above the longest you make).
    pub fn new(base: &str, timeout: Duration) -> Result<Self> {
        Self::with_ca(base, timeout, None)
    }

    /// [`Client::new`] for servers whose certificates `ca_pem` (a PEM CA certificate, the
    /// fleet's `ferry server init` CA) signed: `https://` addresses are trusted through it
    /// alone, never the system's roots.
    pub fn with_ca(base: &str, timeout: Duration, ca_pem: Option<&[u8]>) -> Result<Self> {
        let mut bases = Vec::new();
        for b in base.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            let url = reqwest::Url::parse(b)
                .map_err(|e| ClientError::BadArgument(format!("API address {b:?}: {e}")))?;
            if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
                return Err(ClientError::BadArgument(format!(
                    "API address {url}: use http://HOST:PORT or https://HOST:PORT"
                )));
            }
            bases.push(url);
        }
        if bases.is_empty() {
            return Err(ClientError::BadArgument("no API address given".into()));
        }
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .use_rustls_tls();
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientError::BadArgument(format!("the CA certificate: {e}")))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::BadArgument(format!("HTTP client: {e}")))?;
        Ok(Client {
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            http,
            lease: None,
            token: None,
        })
    }

    /// The same client, sending `token` (`<id>.<secret>`) as its bearer token on every call.
    pub fn with_token(self, token: Option<&str>) -> Self {
        Client {
            token: token.map(Arc::from),
            ..self
        }
    }

    /// The same client, sending `nonce` as the machine lease on every call.
    pub fn with_lease(&self, nonce: Option<&str>) -> Self {
        Client {
            lease: nonce.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The address calls go to now.
    pub fn base(&self) -> &str {
        self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
            .as_str()
            .trim_end_matches('/')
    }

    /// Builds the URL of `op` on `base` with `args` for its path parameters, in order (each one
    /// encoded as one path segment, so a name can never change which route is called).
    fn url(
        &self,
        base: &reqwest::Url,
        op: &Operation,
        args: &[&str],
        query: &[(&str, String)],
    ) -> Result<reqwest::Url> {
        let mut url = base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| ClientError::BadArgument("API address cannot take a path".into()))?;
            segs.pop_if_empty();
            let mut args = args.iter();
            for seg in op.path.trim_start_matches('/').split('/') {
                if seg.starts_with('{') {
                    let a = args.next().expect("an argument per path parameter");
                    if a.is_empty() {
                        return Err(ClientError::BadArgument(format!(
                            "{}: the {seg} parameter is empty",
                            op.id
                        )));
                    }
                    segs.push(a);
                } else {
                    segs.push(seg);
                }
            }
            debug_assert!(args.next().is_none(), "{}: too many arguments", op.id);
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        op: &Operation,
        args: &[&str],
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<R> {
        debug_assert_eq!(schema_name::<R>(), op.response, "{}: response type", op.id);
        let (status, text) = self.send(op, args, query, body, |r| {
            let status = r.status().as_u16();
            r.text()
                .map(|t| (status, t))
                .map_err(|e| ClientError::Unexpected {
                    status,
                    detail: e.to_string(),
                })
        })?;
        serde_json::from_str(&text).map_err(|e| ClientError::Unexpected {
            status,
            detail: format!("{e}: {text}"),
        })
    }

    /// Sends the request (failing over between servers) and hands a successful answer to
    /// `read`; an error answer becomes [`ClientError::Api`].
    fn send<B: Serialize, T>(
        &self,
        op: &Operation,
        args: &[&str],
        query: &[(&str, String)],
        body: Option<&B>,
        read: impl FnOnce(reqwest::blocking::Response) -> Result<T>,
    ) -> Result<T> {
        debug_assert_eq!(
            body.map(|_| schema_name::<B>()).as_deref(),
            op.request,
            "{}: request type",
            op.id
        );
        let method = reqwest::Method::from_bytes(op.method.as_bytes()).expect("a method");
        let first = self.current.load(Ordering::Relaxed);
        let mut tried = 0;
        let resp = loop {
            let i = (first + tried) % self.bases.len();
            let base = &self.bases[i];
            let mut req = self
                .http
                .request(method.clone(), self.url(base, op, args, query)?);
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(n) = &self.lease {
                req = req.header(LEASE_HEADER, n);
            }
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send() {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    break r;
                }
                // Not connected: this server never saw the request, the next one may answer.
                Err(e) if e.is_connect() && tried + 1 < self.bases.len() => tried += 1,
                Err(source) => {
                    return Err(ClientError::Unreachable {
                        base: self
                            .bases
                            .iter()
                            .map(|b| b.as_str().trim_end_matches('/'))
                            .collect::<Vec<_>>()
                            .join(","),
                        source,
                    })
                }
            }
        };
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.text().unwrap_or_default();
            return Err(
                match serde_json::from_str::<ferry_core::error::ErrorBody>(&text) {
                    Ok(b) => ClientError::Api {
                        status,
                        code: b.code,
                        message: b.error,
                    },
                    Err(_) => ClientError::Unexpected {
                        status,
                        detail: text,
                    },
                },
            );
        }
        read(resp)
    }

    fn get<R: DeserializeOwned>(&self, op: &Operation, args: &[&str]) -> Result<R> {
        self.call::<NoBody, R>(op, args, &[], None)
    }

    // ---- apps -----------------------------------------------------------------------------

    pub fn create_app(&self, req: &CreateApp) -> Result<AppView> {
        self.call(&op::CREATE_APP, &[], &[], Some(req))
    }
    pub fn list_apps(&self, org: Option<&str>) -> Result<Vec<AppView>> {
        let q: Vec<_> = org
            .map(|o| ("org_slug", o.to_owned()))
            .into_iter()
            .collect();
        self.call::<NoBody, _>(&op::LIST_APPS, &[], &q, None)
    }
    pub fn get_app(&self, app: &str) -> Result<AppView> {
        self.get(&op::GET_APP, &[app])
    }
    pub fn delete_app(&self, app: &str) -> Result<OkView> {
        self.call::<NoBody, _>(&op::DELETE_APP, &[app], &[], None)
    }

    // ---- machines -------------------------------------------------------------------------

    pub fn list_machines(&self, app: &str, include_deleted: bool) -> Result<Vec<MachineView>> {
        let q: Vec<_> = include_deleted
            .then(|| ("include_deleted", "true".to_owned()))
            .into_iter()
            .collect();
        self.call::<NoBody, _>(&op::LIST_MACHINES, &[app], &q, None)
    }
    pub fn create_machine(&self, app: &str, req: &CreateMachine) -> Result<MachineView> {
        self.call(&op::CREATE_MACHINE, &[app], &[], Some(req))
    }
    pub fn get_machine(&self, app: &str, id: &str) -> Result<MachineView> {
        self.get(&op::GET_MACHINE, &[app, id])
    }
    pub fn destroy_machine(&self, app: &str, id: &str, force: bool) -> Result<MachineView> {
        let q = [("force", force.to_string())];
        self.call::<NoBody, _>(&op::DESTROY_MACHINE, &[app, id], &q, None)
    }
    pub fn stop_machine(&self, app: &str, id: &str, req: &StopRequest) -> Result<MachineView> {
        self.call(&op::STOP_MACHINE, &[app, id], &[], Some(req))
    }
    pub fn start_machine(&self, app: &str, id: &str) -> Result<MachineView> {
        self.call::<NoBody, _>(&op::START_MACHINE, &[app, id], &[], None)
    }
    /// Waits (server side) until the machine is in `state`, at most `timeout_s` (0..=300).
    pub fn wait_machine(
        &self,
        app: &str,
        id: &str,
        state: &str,
        timeout_s: u64,
    ) -> Result<WaitView> {
        let q = [
            ("state", state.to_owned()),
            ("timeout", timeout_s.to_string()),
        ];
        self.call::<NoBody, _>(&op::WAIT_MACHINE, &[app, id], &q, None)
    }
    pub fn machine_events(&self, app: &str, id: &str) -> Result<Vec<EventView>> {
        self.get(&op::MACHINE_EVENTS, &[app, id])
    }
    pub fn acquire_lease(&self, app: &str, id: &str, req: &LeaseRequest) -> Result<LeaseView> {
        self.call(&op::ACQUIRE_LEASE, &[app, id], &[], Some(req))
    }
    pub fn get_lease(&self, app: &str, id: &str) -> Result<LeaseView> {
        self.get(&op::GET_LEASE, &[app, id])
    }
    /// Releases the lease whose nonce this client carries ([`Client::with_lease`]).
    pub fn release_lease(&self, app: &str, id: &str) -> Result<OkView> {
        self.call::<NoBody, _>(&op::RELEASE_LEASE, &[app, id], &[], None)
    }
    pub fn exec_machine(&self, app: &str, id: &str, req: &ExecBody) -> Result<ExecView> {
        self.call(&op::EXEC_MACHINE, &[app, id], &[], Some(req))
    }
    /// Replaces the machine's config (a new instance; restarted if it ran).
    pub fn update_machine(&self, app: &str, id: &str, req: &UpdateMachine) -> Result<MachineView> {
        self.call(&op::UPDATE_MACHINE, &[app, id], &[], Some(req))
    }
    pub fn restart_machine(&self, app: &str, id: &str, req: &StopRequest) -> Result<MachineView> {
        self.call(&op::RESTART_MACHINE, &[app, id], &[], Some(req))
    }
    pub fn signal_machine(&self, app: &str, id: &str, req: &SignalRequest) -> Result<OkView> {
        self.call(&op::SIGNAL_MACHINE, &[app, id], &[], Some(req))
    }
    /// The machine's output from every host it ran on: lines after `since` (a duration back
    /// from now like `10m`, or an RFC 3339 time), at most the newest `tail`.
    pub fn machine_logs(
        &self,
        app: &str,
        id: &str,
        since: Option<&str>,
        tail: Option<u32>,
    ) -> Result<LogsView> {
        let q = logs_query(since, tail, false);
        self.call::<NoBody, _>(&op::MACHINE_LOGS, &[app, id], &q, None)
    }
    /// Like [`Client::machine_logs`], then every new line as the machine writes it (across
    /// migrations and updates), each handed to `each`, until the machine is destroyed, `each`
    /// fails or the connection ends. This call has no timeout: it lasts as long as the machine.
    pub fn follow_logs(
        &self,
        app: &str,
        id: &str,
        since: Option<&str>,
        tail: Option<u32>,
        each: impl FnMut(LogLine) -> Result<()>,
    ) -> Result<()> {
        let q = logs_query(since, tail, true);
        let c = self.without_timeout()?;
        c.send::<NoBody, _>(&op::MACHINE_LOGS, &[app, id], &q, None, |resp| {
            read_ndjson(resp, each)
        })
    }
    /// What the dashboard shows: the fleet (or, for an admin, one org of it) in one read.
    pub fn dashboard(&self, org: Option<&str>) -> Result<Dashboard> {
        let q: Vec<(&str, String)> = org.map(|o| ("org", o.to_owned())).into_iter().collect();
        self.call::<NoBody, _>(&op::DASHBOARD, &[], &q, None)
    }
    /// The dashboard's change notices, each handed to `each` as it arrives, until `each`
    /// answers `false` or fails (the stream itself never ends). No timeout on this call.
    pub fn dashboard_events(
        &self,
        mut each: impl FnMut(DashboardEvent) -> Result<bool>,
    ) -> Result<()> {
        let c = self.without_timeout()?;
        c.send::<NoBody, _>(&op::DASHBOARD_EVENTS, &[], &[], None, |resp| {
            use std::io::BufRead;
            let mut event = DashboardEvent {
                event: String::new(),
                data: 0,
            };
            for line in std::io::BufReader::new(resp).lines() {
                let line = line.map_err(|e| ClientError::Unexpected {
                    status: 200,
                    detail: format!("the event stream broke off: {e}"),
                })?;
                if let Some(v) = line.strip_prefix("event:") {
                    event.event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    event.data = v.trim().parse().map_err(|_| ClientError::Unexpected {
                        status: 200,
                        detail: format!("not an event counter: {line}"),
                    })?;
                } else if line.is_empty() && !event.event.is_empty() {
                    let done = !each(std::mem::replace(
                        &mut event,
                        DashboardEvent {
                            event: String::new(),
                            data: 0,
                        },
                    ))?;
                    if done {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }
    /// The same client with no time limit on a call (for answers that stream indefinitely).
    fn without_timeout(&self) -> Result<Self> {
        let http = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .map_err(|e| ClientError::BadArgument(format!("HTTP client: {e}")))?;
        Ok(Client {
            http,
            ..self.clone()
        })
    }
    pub fn get_metadata(&self, app: &str, id: &str) -> Result<MetadataView> {
        self.get(&op::GET_METADATA, &[app, id])
    }
    pub fn set_metadata(
        &self,
        app: &str,
        id: &str,
        key: &str,
        req: &MetadataValue,
    ) -> Result<MetadataView> {
        self.call(&op::SET_METADATA, &[app, id, key], &[], Some(req))
    }
    pub fn delete_metadata(&self, app: &str, id: &str, key: &str) -> Result<MetadataView> {
        self.call::<NoBody, _>(&op::DELETE_METADATA, &[app, id, key], &[], None)
    }

    // ---- migrations and hosts -------------------------------------------------------------

    pub fn migrate_machine(&self, app: &str, id: &str, req: &MigrateRequest) -> Result<Migration> {
        self.call(&op::MIGRATE_MACHINE, &[app, id], &[], Some(req))
    }
    pub fn list_migrations(
        &self,
        machine: Option<&str>,
        drain: Option<&str>,
    ) -> Result<Vec<Migration>> {
        let mut q = Vec::new();
        if let Some(m) = machine {
            q.push(("machine", m.to_owned()));
        }
        if let Some(d) = drain {
            q.push(("drain", d.to_owned()));
        }
        self.call::<NoBody, _>(&op::LIST_MIGRATIONS, &[], &q, None)
    }
    /// What migrating the machine would do (to `to`, or placement's choice); changes nothing.
    pub fn migrate_plan(&self, app: &str, id: &str, to: Option<&str>) -> Result<MovePlan> {
        let q: Vec<(&str, String)> = to.map(|t| ("to", t.to_owned())).into_iter().collect();
        self.call::<NoBody, _>(&op::MIGRATE_PLAN, &[app, id], &q, None)
    }
    /// What draining the host would do; changes nothing.
    pub fn drain_plan(&self, host: &str) -> Result<MovePlan> {
        self.get(&op::DRAIN_PLAN, &[host])
    }
    pub fn get_migration(&self, id: &str) -> Result<Migration> {
        self.get(&op::GET_MIGRATION, &[id])
    }
    pub fn get_policy(&self, app: &str) -> Result<MigratePolicy> {
        self.get(&op::GET_POLICY, &[app])
    }
    pub fn set_policy(&self, app: &str, req: &PolicyUpdate) -> Result<MigratePolicy> {
        self.call(&op::SET_POLICY, &[app], &[], Some(req))
    }
    pub fn list_hosts(&self) -> Result<Vec<HostView>> {
        self.get(&op::LIST_HOSTS, &[])
    }
    pub fn drain(&self, host: &str) -> Result<DrainView> {
        self.call::<NoBody, _>(&op::DRAIN, &[host], &[], None)
    }
    /// The host leaves the fleet (refused while machines are placed on it).
    pub fn remove_host(&self, host: &str) -> Result<HostView> {
        self.call::<NoBody, _>(&op::REMOVE_HOST, &[host], &[], None)
    }
    pub fn cordon(&self, host: &str) -> Result<CordonView> {
        self.call::<NoBody, _>(&op::CORDON, &[host], &[], None)
    }
    pub fn uncordon(&self, host: &str) -> Result<CordonView> {
        self.call::<NoBody, _>(&op::UNCORDON, &[host], &[], None)
    }

    // ---- volumes --------------------------------------------------------------------------

    pub fn create_volume(&self, req: &CreateVolume) -> Result<VolumeView> {
        self.call(&op::CREATE_VOLUME, &[], &[], Some(req))
    }
    pub fn list_volumes(&self) -> Result<Vec<VolumeView>> {
        self.get(&op::LIST_VOLUMES, &[])
    }

    // ---- bridge ---------------------------------------------------------------------------

    pub fn list_bridge_mappings(&self) -> Result<Vec<MappingView>> {
        self.get(&op::LIST_BRIDGE_MAPPINGS, &[])
    }
    pub fn map_address(&self, req: &MapRequest) -> Result<MappingView> {
        self.call(&op::MAP_ADDRESS, &[], &[], Some(req))
    }
    pub fn bridge_report(&self) -> Result<Vec<ReportLine>> {
        self.get(&op::BRIDGE_REPORT, &[])
    }
    pub fn retire_bridge_mappings(&self, req: &RetireRequest) -> Result<Vec<MappingView>> {
        self.call(&op::RETIRE_BRIDGE_MAPPINGS, &[], &[], Some(req))
    }
    pub fn set_bridge_gate(&self, req: &GateRequest) -> Result<Gates> {
        self.call(&op::SET_BRIDGE_GATE, &[], &[], Some(req))
    }

    // ---- images ---------------------------------------------------------------------------

    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        self.get(&op::LIST_IMAGES, &[])
    }
    /// Pulls an image, handing each line of the answer (progress, then per host the image or
    /// an error) to `each` as it arrives.
    pub fn pull_image(
        &self,
        req: &PullRequest,
        each: impl FnMut(PullLine) -> Result<()>,
    ) -> Result<()> {
        debug_assert_eq!(schema_name::<PullLine>(), op::PULL_IMAGE.response);
        self.send(&op::PULL_IMAGE, &[], &[], Some(req), |resp| {
            read_ndjson(resp, each)
        })
    }
    pub fn remove_image(&self, req: &RemoveRequest) -> Result<Vec<RemovedView>> {
        self.call(&op::REMOVE_IMAGE, &[], &[], Some(req))
    }
    pub fn list_registries(&self) -> Result<Vec<RegistryView>> {
        self.get(&op::LIST_REGISTRIES, &[])
    }
    pub fn put_registry(&self, registry: &str, req: &RegistrySettings) -> Result<RegistryView> {
        self.call(&op::PUT_REGISTRY, &[registry], &[], Some(req))
    }
    pub fn delete_registry(&self, registry: &str) -> Result<RegistryView> {
        self.call::<NoBody, _>(&op::DELETE_REGISTRY, &[registry], &[], None)
    }

    // ---- tokens (an admin's) ----------------------------------------------------------------

    pub fn create_token(&self, req: &CreateToken) -> Result<CreatedToken> {
        self.call(&op::CREATE_TOKEN, &[], &[], Some(req))
    }
    pub fn list_tokens(&self) -> Result<Vec<TokenView>> {
        self.get(&op::LIST_TOKENS, &[])
    }
    pub fn revoke_token(&self, id: &str) -> Result<TokenView> {
        self.call::<NoBody, _>(&op::REVOKE_TOKEN, &[id], &[], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_follow_the_document() {
        assert_eq!(schema_name::<AppView>(), "AppView");
        assert_eq!(schema_name::<Vec<MachineView>>(), "[MachineView]");
        assert_eq!(schema_name::<Migration>(), "Migration");
    }

    #[test]
    fn a_parameter_is_one_encoded_segment() {
        let c = Client::new("http://127.0.0.1:1/", Duration::from_secs(1)).unwrap();
        let b = &c.bases[0];
        let u = c.url(b, &op::GET_MACHINE, &["a/../b", "x?y"], &[]).unwrap();
        assert_eq!(u.path(), "/v1/apps/a%2F..%2Fb/machines/x%3Fy");
        let u = c
            .url(b, &op::LIST_APPS, &[], &[("org_slug", "a&b".into())])
            .unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:1/v1/apps?org_slug=a%26b");
        assert!(c.url(b, &op::GET_APP, &[""], &[]).is_err());
        assert!(Client::new(" , ", Duration::from_secs(1)).is_err());
        assert!(Client::new("http://a:1,ftp://b", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn an_unreachable_api_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // bound and released: nothing listens there now
        let c = Client::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5)).unwrap();
        let e = c.list_apps(None).unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert!(e.to_string().contains("cannot reach the ferry API"), "{e}");
    }
}
