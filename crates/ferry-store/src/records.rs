//! The control plane's records beyond machines: volumes, migrations, per-app migration policies,
//! instance histories, bridge mappings and bridge gates.
//!
//! Its job: typed records whose fields the store queries (state, machine, network, ...) are
//! columns or index keys; what the store never queries (the API's nested views) travels as a
//! `detail` JSON body. Records that are changed by read-modify-write carry a `revision`: an update
//! names the revision it read and fails with [`crate::StoreError::StaleRevision`] if someone
//! changed the record in between, so no update is ever lost. It must never know the API's types:
//! the store depends on nobody above it.

use serde::{Deserialize, Serialize};

/// A volume. Indexed by `state` (expiry scans `pending_destroy`) and `host`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    /// `active`, `pending_destroy` or `destroyed` (the API's words; the store only indexes it).
    pub state: String,
    /// The host holding it, as the API names hosts; `None` until placed.
    pub host: Option<String>,
    /// When a `pending_destroy` volume may be destroyed (ms since the epoch).
    pub destroy_after_ms: Option<i64>,
    /// The rest of the API's view of the volume.
    pub detail: serde_json::Value,
    /// 1 on create, +1 on every update. Set by the store; an update passes the one it read.
    pub revision: u64,
    /// Set by the store.
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One migration of one machine. Indexed by machine, app, network, drain and `finished`; at
/// most one unfinished migration per machine (the "active" index, kept in the same transaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub machine_id: String,
    pub app: String,
    pub network_id: u32,
    /// The driver's phase name (the API's enum; the store only records it).
    pub phase: String,
    /// Done or rolled back: the machine may migrate again. Once true it never goes back.
    pub finished: bool,
    /// The host being drained, if this migration is part of a drain.
    pub drain: Option<String>,
    /// The rest of the API's record (hosts, addresses, volume forks, stats, errors...).
    pub detail: serde_json::Value,
    pub revision: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What the lister of migrations asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationFilter<'a> {
    All,
    /// Every migration of one machine, finished ones included.
    Machine(&'a str),
    App(&'a str),
    Network(u32),
    /// The migrations of one drain (its host as the API names it).
    Drain(&'a str),
    /// Not finished: what a restarted server must resume.
    Unfinished,
}

/// An app's migration policy (the API's `MigratePolicy`, webhook secret included, as `detail`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub app: String,
    pub detail: serde_json::Value,
    pub revision: u64,
}

/// One past instance of a machine (a migration's source, or a destination a rollback left).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub machine_id: String,
    pub instance_id: String,
    pub host: String,
    pub private_ip: String,
    /// `migrated`, or `rolled_back`.
    pub state: String,
    /// RFC 3339, as the API shows it.
    pub ended_at: String,
    /// The migration that ended it.
    pub migration: String,
}

/// One bridge mapping: in network `network_id`, connections to `old` go to `new`. Keyed by
/// (network, old): one old address has at most one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeMapping {
    pub network_id: u32,
    pub old: String,
    pub new: String,
    pub retired: bool,
    pub created_at_ms: i64,
}

/// All mappings of one network and the network's revision, which every change of one of its
/// mappings bumps: a batch planned on this view ([`crate::Store::update_bridge_network`]) fails
/// if anything in the network changed since. Other networks never conflict with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeNetwork {
    pub network_id: u32,
    /// 0 for a network that never had a mapping.
    pub revision: u64,
    /// By old address.
    pub mappings: Vec<BridgeMapping>,
}

/// What a bridge gate switches off: an org's machines or an app's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateScope {
    Org,
    App,
}

impl GateScope {
    pub fn as_str(self) -> &'static str {
        match self {
            GateScope::Org => "org",
            GateScope::App => "app",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<GateScope> {
        match s {
            "org" => Some(GateScope::Org),
            "app" => Some(GateScope::App),
            _ => None,
        }
    }
}

/// What an API token may do (docs/design.md#tokens): the store only keeps it; the core decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Everything, every org: hosts, drains, cross-org views, tokens.
    Admin,
    /// One org's apps, machines, volumes, bridge mappings and migrations.
    Org,
    /// Hosts joining the fleet: the agents' `/internal` routes only.
    Join,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Org => "org",
            TokenKind::Join => "join",
        }
    }

    pub fn parse(s: &str) -> Option<TokenKind> {
        match s {
            "admin" => Some(TokenKind::Admin),
            "org" => Some(TokenKind::Org),
            "join" => Some(TokenKind::Join),
            _ => None,
        }
    }
}

/// An API token. The store keeps only a hash of its secret: whoever reads the store (a backup,
/// an etcd member) learns no credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public: shown by `ferry token list`, recorded in events.
    pub id: String,
    pub kind: TokenKind,
    /// The org of an [`TokenKind::Org`] token; `None` for the others.
    pub org: Option<String>,
    /// Hex of the hash of the secret (the caller chooses the hash; the store only compares
    /// nothing and keeps it).
    pub secret_hash: String,
    pub description: String,
    /// Set by the store.
    pub created_at_ms: i64,
    /// `None`: never expires.
    pub expires_at_ms: Option<i64>,
    /// Once true it never goes back.
    pub revoked: bool,
}

/// The rules both backends check before recording a token.
pub(crate) fn check_token(t: &TokenRecord) -> crate::Result<()> {
    let bad = |reason: &str| {
        Err(crate::StoreError::Invalid {
            reason: format!("token {:?}: {reason}", t.id),
        })
    };
    if t.id.is_empty() || t.secret_hash.is_empty() {
        return bad("a token needs an ID and a secret hash");
    }
    match (t.kind, &t.org) {
        (TokenKind::Org, None) => bad("an org token names its org"),
        (TokenKind::Org, Some(o)) if o.is_empty() => bad("an org token names its org"),
        (TokenKind::Admin | TokenKind::Join, Some(_)) => bad("only an org token has an org"),
        _ => Ok(()),
    }
}
