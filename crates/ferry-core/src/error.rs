//! The core's errors: a [`Kind`] (what the caller can do about it), a stable machine-readable
//! code, and one human sentence. The HTTP layer (`ferry-api`) maps a kind to a status; nothing
//! here knows about HTTP.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What kind of failure an [`Error`] is. Decisions (answer, retry, roll back) are made on it and
/// on the code, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The input is wrong; nothing changed.
    Invalid,
    /// No such thing (or one the caller may not see: the same answer).
    NotFound,
    /// A wait ran out of time.
    Timeout,
    /// The current state refuses it (a transition, a lease, a lock, a running machine).
    Conflict,
    /// Well-formed but impossible as things are (a volume that cannot be forked).
    Unprocessable,
    /// A bug or a record that cannot be read.
    Internal,
    /// A host's agent answered with an error (its own code in [`Error::agent_code`]).
    Agent,
    /// A dependency is down or busy (the store, an agent that does not answer); may pass.
    Unavailable,
    /// Credentials refused: the caller's API token (missing, unknown, revoked, expired), or
    /// ours somewhere upstream of a host (a registry).
    Unauthorized,
    /// A valid token whose scope does not reach the operation (an org token on an admin route).
    Forbidden,
    /// Something upstream of a host could not be reached in time (a registry); may pass.
    UpstreamTimeout,
}

impl Kind {
    /// A failure that may pass by itself: the migration driver retries these and rolls back
    /// on every other kind.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Kind::Internal | Kind::Agent | Kind::Unavailable | Kind::UpstreamTimeout
        )
    }

    /// The kind an error status of the agent protocol stands for (the protocol's lines carry
    /// the status the agent chose).
    pub fn from_wire(status: u16) -> Kind {
        match status {
            400 => Kind::Invalid,
            401 => Kind::Unauthorized,
            403 => Kind::Forbidden,
            404 => Kind::NotFound,
            408 => Kind::Timeout,
            409 => Kind::Conflict,
            422 => Kind::Unprocessable,
            503 => Kind::Unavailable,
            502 => Kind::Agent,
            504 => Kind::UpstreamTimeout,
            _ => Kind::Internal,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub code: &'static str,
    pub message: String,
    /// For an `agent_error`: the code the host's agent answered (`not_running`, `not_found`,
    /// `invalid_argument`, `internal`, ...), so callers decide by code, never by message text.
    pub agent_code: Option<String>,
}

/// An agent's code for a volume fork that can never succeed as the volume is (a device node
/// in it): passed on as [`Kind::Unprocessable`], and a migration rolls back at once.
pub const PERMANENT_VOLUME_ERROR: &str = "volume_unsupported";

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

impl Error {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind,
            code,
            message: message.into(),
            agent_code: None,
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, "invalid_argument", m)
    }
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(Kind::NotFound, "not_found", format!("{what} not found"))
    }
    pub fn conflict(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, code, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, "unavailable", m)
    }
    pub fn internal(m: impl std::fmt::Display) -> Self {
        Self::new(Kind::Internal, "internal", m.to_string())
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
            code: self.code.to_owned(),
        }
    }
}

impl From<ferry_store::StoreError> for Error {
    /// Every store error has its kind here: a store validation error is the caller's mistake
    /// (not an internal error the migration driver would retry), a busy or unreachable store
    /// is unavailable.
    fn from(e: ferry_store::StoreError) -> Self {
        let (kind, code) = match e.code() {
            "not_found" => (Kind::NotFound, "not_found"),
            "app_exists" => (Kind::Conflict, "app_exists"),
            "illegal_transition" => (Kind::Conflict, "illegal_transition"),
            "lease_held" => (Kind::Conflict, "lease_held"),
            "lease_mismatch" => (Kind::Conflict, "lease_mismatch"),
            "lock_held" | "lock_mismatch" => (Kind::Conflict, "lock_held"),
            "app_has_machines" => (Kind::Conflict, "app_has_machines"),
            "conflict" => (Kind::Conflict, "conflict"),
            "stale_revision" => (Kind::Conflict, "conflict"),
            "migration_in_progress" => (Kind::Conflict, "migration_in_progress"),
            "invalid" => (Kind::Invalid, "invalid_argument"),
            "busy" | "unavailable" => (Kind::Unavailable, "unavailable"),
            _ => (Kind::Internal, "internal"),
        };
        Error::new(kind, code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
