//! What the API returns, and the request bodies it accepts besides the machine config.

use crate::config::MachineConfig;
use ferry_store::{Event, Machine};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachineView {
    pub id: String,
    pub name: String,
    pub state: String,
    pub app: String,
    pub org: String,
    /// Host ID in hex.
    pub host: Option<String>,
    pub region: String,
    pub instance_id: String,
    pub private_ip: Option<String>,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventView>>,
    /// Instances this machine had before (e.g. on the host it migrated from), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_instances: Vec<crate::migrate::InstanceRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub source: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

impl MachineView {
    pub fn new(m: &Machine, events: Option<Vec<Event>>) -> Self {
        MachineView {
            id: m.id.clone(),
            name: m.name.clone(),
            state: m.state.as_str().to_owned(),
            app: m.app.clone(),
            org: m.org.clone(),
            host: m.host.map(|h| format!("{:x}", h.get())),
            region: m.region.clone(),
            instance_id: m.instance_id.clone(),
            private_ip: m.private_ip.clone(),
            config: m.config.clone(),
            created_at: rfc3339(m.created_at_ms),
            updated_at: rfc3339(m.updated_at_ms),
            events: events.map(|v| v.iter().rev().map(EventView::from).collect()),
            previous_instances: Vec::new(),
        }
    }
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> Self {
        EventView {
            kind: e.r#type.clone(),
            status: e.status.clone(),
            source: e.source.clone(),
            timestamp: e.timestamp_ms,
            request: e.request.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// Unique across the fleet: 1-63 lowercase letters, digits and '-', not at either end.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub app_name: String,
    /// The org (tenant); created, with its network, on first use. Default "personal".
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub org_slug: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppView {
    pub name: String,
    pub org: String,
    pub network_id: u32,
    /// The org's /48: `fdaa:NNNN:NNNN::/48`.
    pub network: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachine {
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
    /// Place on this host (hex ID); default: the least-loaded host.
    #[serde(default)]
    pub host: Option<String>,
    pub config: MachineConfig,
    /// Create without starting.
    #[serde(default)]
    pub skip_launch: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    #[serde(default)]
    pub signal: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `POST .../signal` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2, SIGKILL or SIGSTOP (the `SIG` prefix and
    /// case are optional).
    pub signal: String,
}

/// `POST /v1/apps/{app}/machines/{id}` body: the machine's new config (all of it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMachine {
    pub config: MachineConfig,
    /// Record the new config without starting a running machine again (it stays stopped).
    #[serde(default)]
    pub skip_launch: bool,
}

/// A machine's metadata (`config.metadata`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MetadataView {
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// `POST .../metadata/{key}` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetadataValue {
    pub value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub cmd: Vec<String>,
    /// Seconds, default 30, at most 600.
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecView {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Seconds, default 30, at most 3600.
    #[serde(default)]
    pub ttl: Option<u64>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseView {
    pub nonce: String,
    pub expires_at: i64,
    pub owner: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: String,
    pub region: String,
    pub endpoint: String,
    pub cordoned: bool,
    /// The host's infra /48 (its one route on every other host).
    pub infra_prefix: String,
    /// Its underlay address, which the other hosts route that /48 to (empty on a dev fleet,
    /// whose fabric `ferry dev` wires).
    pub underlay: String,
    pub machines: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Size in MiB of a new, empty volume (1..=1048576).
    #[serde(default)]
    pub size_mb: Option<u64>,
    /// Or: an existing host directory to use as the volume (dev fleets).
    #[serde(default)]
    pub host_dir: Option<String>,
    /// The org whose machines may mount it: an org token's own (the default); an admin's
    /// choice, or none (then any org's machine may mount it).
    #[serde(default)]
    pub org_slug: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    pub id: String,
    /// The org whose machines may mount it (none: made by an admin for any org).
    #[serde(default)]
    pub org: Option<String>,
    /// Where its files are on its host: for a size-limited volume, the agent's mount of its
    /// file system (empty until a machine first uses it, which places it on that machine's
    /// host).
    pub host_dir: String,
    /// A size that holds: the volume is an ext4 file system of this size, kept by its host's
    /// agent; writes past it fail with ENOSPC inside the machine.
    pub size_mb: Option<u64>,
    /// Kept by an agent as an image of `size_mb` (every volume created with a size; not an
    /// operator's `host_dir`, nor a volume an older server made in its own directory).
    #[serde(default)]
    pub kept_by_agent: bool,
    pub created_at: String,
    /// The host holding it (hex); none for volumes in the server's own directory (dev fleets).
    #[serde(default)]
    pub host: Option<String>,
    /// `active`, `pending_destroy` (a migrated machine's source, kept until `destroy_after`), or
    /// `destroyed`.
    #[serde(default = "active")]
    pub state: String,
    /// The volume this one was forked from by a migration.
    #[serde(default)]
    pub forked_from: Option<String>,
    #[serde(default)]
    pub destroy_after: Option<String>,
    /// Milliseconds since the epoch, for `destroy_after`.
    #[serde(default)]
    pub destroy_after_ms: Option<i64>,
    /// The store revision this copy was read at (0: not stored yet); see `put_volume`.
    #[serde(skip)]
    pub revision: u64,
}

impl VolumeView {
    /// The size of the image its host's agent keeps for it; `None` for a directory volume.
    pub fn agent_size_mb(&self) -> Option<u64> {
        self.size_mb.filter(|_| self.kept_by_agent)
    }
}

fn active() -> String {
    "active".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WaitView {
    pub ok: bool,
    pub state: String,
}

/// The answer of a route that has nothing else to say.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OkView {
    pub ok: bool,
}

/// A host's cordon, after `cordon` or `uncordon`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CordonView {
    /// The host's ID (hex).
    pub host: String,
    pub cordoned: bool,
}
