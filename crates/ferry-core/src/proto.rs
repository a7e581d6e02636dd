//! What the server and the agents say to each other (JSON over loopback HTTP). Internal: not part
//! of the public API document.

use crate::config::MachineConfig;
use serde::{Deserialize, Serialize};

/// Start (or restart) a machine on the agent's host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMachine {
    pub id: String,
    pub app: String,
    pub instance_id: String,
    pub network_id: u32,
    pub machine_field: u32,
    pub private_ip: String,
    pub region: String,
    pub config: MachineConfig,
    /// Host directory backing each mount, in the order of `config.mounts` (for a volume the
    /// agent keeps, see `volumes`, the agent's own path is used instead).
    pub volume_dirs: Vec<String>,
    /// The volume of each mount, in the order of `config.mounts`.
    #[serde(default)]
    pub volumes: Vec<VolumeRef>,
    /// The bridge's feature gate for this machine (its org's and app's setting).
    #[serde(default = "yes")]
    pub bridge_enabled: bool,
}

/// A mount's volume as the agent needs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRef {
    pub id: String,
    /// Set for a size-limited volume the agent keeps (an ext4 image it makes on first use and
    /// mounts); `None` for an operator's host directory.
    pub size_mb: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopMachine {
    pub signal: String,
    pub timeout_ms: u64,
}

/// How a machine's process ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The stop timeout ran out and the agent sent SIGKILL.
    #[serde(default)]
    pub escalated_to_sigkill: bool,
    /// The process ended because ferry asked it to (stop, destroy), not by itself.
    #[serde(default)]
    pub requested_stop: bool,
}

/// A signal for a running machine's command (the runtime's allowed set; validated by the
/// control plane and again by the agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalMachine {
    pub signal: String,
}

/// Which lines of a machine's output an agent should return: of one instance (or, without one,
/// of every instance of the machine this host kept), those after the cursor (`after_us`, and the
/// first `after_seen` lines stamped exactly `after_us`), at most the last `tail` of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub after_us: i64,
    #[serde(default)]
    pub after_seen: u32,
    #[serde(default)]
    pub tail: Option<u32>,
}

/// One line a machine wrote, as its host's agent kept it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub instance_id: String,
    /// Microseconds since the Unix epoch, when the machine's shim read the line.
    pub ts_us: i64,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Something that happened to a machine on its host without the server asking.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReport {
    pub machine_id: String,
    pub instance_id: String,
    /// "exit", "restart", "check", "reattach".
    pub kind: String,
    /// The machine's state as the agent sees it now: "started", "stopped", "failed".
    pub state: String,
    #[serde(default)]
    pub exit: Option<ExitInfo>,
    #[serde(default)]
    pub detail: serde_json::Value,
    /// Unique per report: the server records a report it receives again (the agent re-sends to
    /// another server when the first died before answering) only once.
    #[serde(default)]
    pub report_id: String,
}

/// An agent announcing itself (at start and after a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterHost {
    pub host_id: u32,
    pub region: String,
    pub endpoint: String,
    /// Machines the agent found running on its host (reattached).
    pub running: Vec<String>,
    /// The host's underlay address, when its agent wires the fabric itself (a real host:
    /// `ferry agent --underlay`); empty on a dev fleet's hosts, whose fabric `ferry dev` wires.
    #[serde(default)]
    pub underlay: String,
}

/// Another host as an agent routes to it: its infra /48 goes to `underlay`
/// (docs/design.md#underlay). Sent on the watch whenever the fleet's hosts change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHost {
    pub id: u32,
    pub underlay: String,
}

/// A machine as its agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalMachine {
    pub id: String,
    pub instance_id: String,
    pub running: bool,
    pub pid: Option<i32>,
}

/// One old -> new mapping of the bridge (docs/design.md#bridge-mappings), per network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BridgeMapping {
    pub network_id: u32,
    pub old: String,
    pub new: String,
    #[serde(default)]
    pub retired: bool,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub created_at: i64,
}

/// The whole bridge state an agent should hold: every mapping, and whether the gate is on for
/// each of its machines. Sent whole (not as deltas) so a restarted or new agent converges.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BridgeSync {
    pub mappings: Vec<BridgeMapping>,
    /// machine ID -> gate on.
    pub gates: std::collections::BTreeMap<String, bool>,
    /// The server that read this state ([`crate::Core::server_id`]); empty: unordered.
    #[serde(default)]
    pub origin: String,
    /// That server's count when it began reading the state ([`crate::Core::bridge_generation`]).
    /// One server's syncs reach an agent by three paths (the push after a change, the push to a
    /// host that registers, the watch) that do not keep their order: a state read before a
    /// retirement can arrive after the push read after it. The agent skips a sync older than one
    /// it applied from the same origin ([`BridgeSync::supersedes`]).
    #[serde(default)]
    pub generation: u64,
}

impl BridgeSync {
    /// Whether this state may replace one whose origin applied `last` (the highest generation
    /// applied from `self.origin`, if any): not when it was read before that one.
    pub fn supersedes(&self, last: Option<u64>) -> bool {
        self.origin.is_empty() || last.is_none_or(|g| self.generation >= g)
    }
}

/// Uses of an old address by one calling machine, as counted on its host.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BridgeHit {
    pub network_id: u32,
    pub old: String,
    pub machine_id: String,
    pub count: u64,
    /// Milliseconds since the epoch.
    pub first_use: i64,
    pub last_use: i64,
}

/// Server -> destination agent: accept one volume-copy session into a directory of this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeExpect {
    pub session: String,
    /// A random secret; the sender must present it (the fabric is shared by every host).
    pub token: String,
    /// The volume this copy becomes; the agent keeps it in its own volumes directory.
    pub volume_id: String,
    /// Receive into this existing directory instead (a rollback copying back to the source).
    #[serde(default)]
    pub dir: Option<String>,
    /// The size of the volume to make (a size-limited volume: a fork has its source's size).
    #[serde(default)]
    pub size_mb: Option<u64>,
}

/// Destination agent's answer: where the bytes go and where to send them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeExpected {
    pub dir: String,
    /// `[addr]:port` inside the destination host's network (over the fabric).
    pub addr: String,
}

/// Server -> source agent: run one copy round of `src_dir` to `addr`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeSend {
    pub session: String,
    pub token: String,
    pub src_dir: String,
    pub addr: String,
    /// Name of the destination volume (what the receiver was told to expect).
    pub target: String,
}

/// What one copy round did (the source agent's report).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeRound {
    pub entries: u64,
    pub bytes_total: u64,
    pub chunks_total: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub chunks_resent: u64,
    pub files_rehashed: u64,
    /// BLAKE3 root of the whole volume as the sender scanned it.
    pub root: String,
    /// The receiver's root, computed from the chunks it checked and wrote, equals `root`.
    pub verified: bool,
    pub scan_ms: u64,
    pub transfer_ms: u64,
}

/// A copy round in flight, as its source agent sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeProgress {
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Server -> agent: delete a volume directory this agent holds (a discarded or expired copy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRemove {
    pub dir: String,
}

/// Registry credentials as the API and agents carry them. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum RegistryCredentials {
    /// HTTP basic auth (also what token servers are asked with).
    Basic { username: String, password: String },
    /// A bearer token sent as it is.
    Bearer { token: String },
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryCredentials::Basic { username, .. } => {
                write!(f, "Basic({username}, <redacted>)")
            }
            RegistryCredentials::Bearer { .. } => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Server -> agent: make sure this host has the image (pull what it lacks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagePull {
    pub reference: String,
    /// Plain HTTP (loopback registries and those the operator marked insecure).
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub credentials: Option<RegistryCredentials>,
}

/// An image on one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageInfo {
    /// The image manifest's digest (`sha256:...`).
    pub digest: String,
    /// `registry/repository@digest`: what a machine's config records.
    pub pinned: String,
    /// References it was pulled as.
    pub names: Vec<String>,
    pub layers: usize,
    /// Compressed bytes of its layers.
    pub size: u64,
    pub pulled_at_ms: i64,
    /// Machines on the host that use it (it cannot be removed while any does).
    #[serde(default)]
    pub machines: Vec<String>,
    /// The host (hex); set by the server when it lists a fleet's images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One line of a pull's answer (newline-delimited JSON): progress lines, then exactly one
/// `image` or `error` line.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullLine {
    /// A step: `{"kind":"resolved"|"layer"|"unpacked", ...}`.
    #[schema(value_type = Object)]
    Progress(serde_json::Value),
    Image(ImageInfo),
    Error {
        status: u16,
        code: String,
        message: String,
    },
}

/// Server -> agent: remove an image (by digest, pinned reference or pulled name) and the layers
/// no other image uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRemove {
    pub reference: String,
}

/// The status an error of `kind` has on the agent protocol's lines (the inverse of
/// [`crate::Kind::from_wire`]).
pub fn wire_status(kind: crate::Kind) -> u16 {
    use crate::Kind as K;
    match kind {
        K::Invalid => 400,
        K::NotFound => 404,
        K::Timeout => 408,
        K::Conflict => 409,
        K::Unprocessable => 422,
        K::Internal => 500,
        K::Agent => 502,
        K::Unavailable => 503,
        K::Unauthorized => 401,
        K::Forbidden => 403,
        K::UpstreamTimeout => 504,
    }
}

#[cfg(test)]
mod tests {
    use super::BridgeSync;

    fn sync(origin: &str, generation: u64) -> BridgeSync {
        BridgeSync {
            origin: origin.into(),
            generation,
            ..Default::default()
        }
    }

    #[test]
    fn a_bridge_state_read_earlier_never_replaces_a_later_one() {
        assert!(sync("s1", 5).supersedes(None), "the first from a server");
        assert!(
            sync("s1", 5).supersedes(Some(5)),
            "the same read, to another path"
        );
        assert!(sync("s1", 6).supersedes(Some(5)));
        assert!(
            !sync("s1", 4).supersedes(Some(5)),
            "read before the one applied"
        );
        assert!(
            sync("", 0).supersedes(Some(5)),
            "no origin: unordered, applied"
        );
    }
}
