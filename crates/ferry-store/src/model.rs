//! The fleet's durable records: orgs, apps, hosts, machines, events, leases and locks.
//!
//! Its job: plain data types that every layer (store, API, CLI, agent) shares, with their JSON
//! shape fixed by serde. It must never do I/O or hold behaviour beyond parsing and naming; the
//! rules about which changes are allowed live in the store and its callers.

use ferry_addr::{HostId, MachineField, NetworkId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A tenant. Its network ID is allocated on first use and never handed to another org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    pub name: String,
    pub network_id: NetworkId,
}

/// A named group of machines; names are unique across the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    pub org: String,
    pub network_id: NetworkId,
    pub created_at_ms: i64,
}

/// A Linux server running `ferry agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostId,
    pub region: String,
    /// How the server reaches this host's agent (e.g. a unix socket path or a URL).
    pub endpoint: String,
    /// A cordoned host gets no new machines (drain sets it).
    pub cordoned: bool,
    pub created_at_ms: i64,
    /// The host's address on the underlay (IPv6 or IPv4), which every other host routes this
    /// host's infra /48 to (docs/design.md#underlay). Empty for the hosts of a dev fleet whose
    /// fabric `ferry dev` wires itself.
    #[serde(default)]
    pub underlay: String,
}

/// A machine's lifecycle state (docs/design.md#machine-lifecycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Created,
    Starting,
    Started,
    Stopping,
    Stopped,
    Destroying,
    Destroyed,
    Failed,
    /// Terminal for an instance that moved to another host.
    Migrated,
}

impl MachineState {
    pub const ALL: [MachineState; 9] = [
        MachineState::Created,
        MachineState::Starting,
        MachineState::Started,
        MachineState::Stopping,
        MachineState::Stopped,
        MachineState::Destroying,
        MachineState::Destroyed,
        MachineState::Failed,
        MachineState::Migrated,
    ];

    /// The lowercase name used in JSON, in the database and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Destroying => "destroying",
            MachineState::Destroyed => "destroyed",
            MachineState::Failed => "failed",
            MachineState::Migrated => "migrated",
        }
    }

    /// No way out: the machine (or this instance of it) is gone. Listings skip these, and an
    /// app whose machines are all terminal may be deleted.
    pub fn is_terminal(self) -> bool {
        matches!(self, MachineState::Destroyed | MachineState::Migrated)
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`MachineState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown machine state {0:?}")]
pub struct ParseStateError(pub String);

impl FromStr for MachineState {
    type Err = ParseStateError;
    /// Lowercase names only, exactly as [`MachineState::as_str`] writes them.
    fn from_str(s: &str) -> Result<Self, ParseStateError> {
        MachineState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseStateError(s.to_owned()))
    }
}

/// One workload. `id` is stable for life (also across migrations); `instance_id` changes on every
/// new version or placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// 14 lowercase hex characters, see [`new_machine_id`].
    pub id: String,
    pub name: String,
    pub app: String,
    /// The app's org; the store always fills it from the app, never trusts a caller's copy.
    pub org: String,
    /// The org's network; filled from the app like `org`.
    pub network_id: NetworkId,
    /// Where the machine is placed, once it is.
    pub host: Option<HostId>,
    pub region: String,
    /// Allocated on `host` with [`crate::Store::allocate_machine_field`].
    pub machine_field: Option<MachineField>,
    /// The primary private address, in canonical text form.
    pub private_ip: Option<String>,
    /// A ULID, see [`new_instance_id`].
    pub instance_id: String,
    pub state: MachineState,
    /// The Fly-shaped machine config (docs/design.md#machine-config), validated by the API before it gets here.
    pub config: serde_json::Value,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What the fleet-wide readers that run on every change need of a machine: the DNS snapshot
/// and each agent watch's bridge gates. No config (only the one field of it DNS answers with):
/// those readers run three times per create over every machine, and parsing every machine's
/// config there made a create's latency grow with the number of machines
/// ([`crate::Store::list_machine_summaries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSummary {
    pub id: String,
    pub app: String,
    pub org: String,
    pub network_id: NetworkId,
    pub host: Option<HostId>,
    pub region: String,
    pub private_ip: Option<String>,
    pub state: MachineState,
    /// `config.metadata.process_group`, if the config has it as a string.
    pub process_group: Option<String>,
}

impl MachineSummary {
    /// The summary of a whole machine record (what the store's own read must equal).
    pub fn of(m: &Machine) -> MachineSummary {
        MachineSummary {
            id: m.id.clone(),
            app: m.app.clone(),
            org: m.org.clone(),
            network_id: m.network_id,
            host: m.host,
            region: m.region.clone(),
            private_ip: m.private_ip.clone(),
            state: m.state,
            process_group: m.config["metadata"]["process_group"]
                .as_str()
                .map(str::to_owned),
        }
    }
}

/// An event to record together with a change of its machine, in the same transaction (see
/// [`crate::Store::create_machine_placed`] and [`crate::Store::transition_recorded`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub r#type: String,
    pub status: String,
    pub source: String,
    pub request: serde_json::Value,
}

impl NewEvent {
    pub fn new(r#type: &str, status: &str, source: &str, request: serde_json::Value) -> Self {
        NewEvent {
            r#type: r#type.to_owned(),
            status: status.to_owned(),
            source: source.to_owned(),
            request,
        }
    }
}

/// One entry of a machine's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases with every event fleet-wide: the log's order.
    pub id: i64,
    pub machine_id: String,
    /// e.g. `launch`, `start`, `stop`, `exit`.
    #[serde(rename = "type")]
    pub r#type: String,
    pub status: String,
    /// e.g. `user`, `ferry`.
    pub source: String,
    pub timestamp_ms: i64,
    pub request: serde_json::Value,
}

/// An exclusive, expiring claim on a machine: mutating calls without its nonce are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub machine_id: String,
    pub nonce: String,
    pub owner: String,
    pub description: String,
    pub expires_at_ms: i64,
}

/// A named, expiring lock (e.g. the per-network migration lock): a coordinator that dies stops
/// holding it when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub name: String,
    pub nonce: String,
    pub owner: String,
    pub expires_at_ms: i64,
}

/// A fresh machine ID: 14 random lowercase hex characters (56 bits, like Fly's).
pub fn new_machine_id() -> String {
    hex(&rand::random::<[u8; 7]>())
}

/// A fresh instance ID: a ULID, so instance IDs sort by creation time.
pub fn new_instance_id() -> String {
    ulid::Ulid::generate().to_string()
}

/// Whether `s` has the shape of a machine ID.
pub fn is_machine_id(s: &str) -> bool {
    s.len() == 14 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A random nonce for leases and locks: 128 bits, so guessing one is hopeless.
pub(crate) fn new_nonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
