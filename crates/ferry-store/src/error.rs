//! The one error type of the store, [`StoreError`].
//!
//! Its job: say precisely what went wrong, with the names and IDs involved, and give every failure
//! a stable machine-readable [`StoreError::code`] that the API turns into a JSON error. It must
//! never leak a raw SQLite message as the *code*: codes are a contract with API clients, messages
//! are for humans and may change.

use crate::model::MachineState;
use ferry_addr::HostId;

/// Everything a [`crate::Store`] operation can fail with.
///
/// A failed operation never changes the store: every operation runs in one transaction, and an
/// error rolls it back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("app {name:?} already exists")]
    AppExists { name: String },
    #[error("app {name:?} not found")]
    AppNotFound { name: String },
    #[error("org {name:?} not found")]
    OrgNotFound { name: String },
    #[error("app {name:?} still has {count} machine(s) that are not destroyed")]
    AppHasMachines { name: String, count: u64 },
    #[error("machine {id} already exists")]
    MachineExists { id: String },
    #[error("machine {id} not found")]
    MachineNotFound { id: String },
    #[error("host {id} not found")]
    HostNotFound { id: HostId },
    #[error("machine {id} is {from}; it cannot become {to} from there")]
    IllegalTransition {
        id: String,
        from: MachineState,
        to: MachineState,
    },
    #[error("machine {machine_id} is leased until {expires_at_ms} (ms since the epoch)")]
    LeaseHeld {
        machine_id: String,
        expires_at_ms: i64,
    },
    #[error("the nonce does not match a current lease on machine {machine_id}")]
    LeaseMismatch { machine_id: String },
    /// `owner` is what its holder passed to [`crate::Store::acquire_lock`].
    #[error("lock {name:?} is held until {expires_at_ms} (ms since the epoch)")]
    LockHeld {
        name: String,
        expires_at_ms: i64,
        owner: String,
    },
    #[error("the nonce does not match a current holder of lock {name:?}")]
    LockMismatch { name: String },
    /// A uniqueness rule other than the ones above (e.g. one machine field used twice on a host).
    #[error("conflict: {what}")]
    Conflict { what: String },
    /// The caller passed something the store refuses to record (e.g. a malformed machine ID).
    #[error("invalid: {reason}")]
    Invalid { reason: String },
    /// An ID space has no value left; the store never recycles IDs, so this is final.
    #[error("the {kind} ID space is exhausted")]
    Exhausted { kind: &'static str },
    /// The database was written by a newer ferry whose schema this one does not know.
    #[error("the store's schema version {found} is newer than this ferry supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// A stored value does not decode (hand-edited or damaged database).
    #[error("corrupt store: {what}")]
    Corrupt { what: String },
    /// A record of `kind` (volume, migration, policy, ...) with this key does not exist.
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A create found a record of `kind` with this key already there.
    #[error("{kind} {id} already exists")]
    Exists { kind: &'static str, id: String },
    /// A compare-and-swap update named revision `expected`, but the record is at `found`
    /// (someone else changed it since it was read): read it again, re-apply, retry.
    #[error("{kind} {id} is at revision {found}, not {expected}: it changed since it was read")]
    StaleRevision {
        kind: &'static str,
        id: String,
        expected: u64,
        found: u64,
    },
    /// The machine already has an unfinished migration.
    #[error("machine {machine_id} is already migrating ({migration_id})")]
    MigrationActive {
        machine_id: String,
        migration_id: String,
    },
    /// The backend cannot be reached or has no quorum (etcd down, network cut, timeout). Nothing
    /// was changed, or (for a write whose reply was lost) the change is complete or absent as a
    /// whole; the caller may retry later. The API answers 503.
    #[error("the store is unavailable: {reason}")]
    Unavailable { reason: String },
    /// The etcd backend refused a request for a reason other than availability.
    #[error("etcd: {what}")]
    Etcd { what: String },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// A stable, machine-readable code for API errors. New variants may add codes; existing codes
    /// never change meaning.
    pub fn code(&self) -> &'static str {
        use StoreError::*;
        match self {
            AppExists { .. } => "app_exists",
            AppNotFound { .. } | OrgNotFound { .. } | MachineNotFound { .. } => "not_found",
            HostNotFound { .. } => "not_found",
            AppHasMachines { .. } => "app_has_machines",
            MachineExists { .. } | Conflict { .. } | Exists { .. } => "conflict",
            NotFound { .. } => "not_found",
            StaleRevision { .. } => "stale_revision",
            MigrationActive { .. } => "migration_in_progress",
            Unavailable { .. } => "unavailable",
            IllegalTransition { .. } => "illegal_transition",
            LeaseHeld { .. } => "lease_held",
            LeaseMismatch { .. } => "lease_mismatch",
            LockHeld { .. } => "lock_held",
            LockMismatch { .. } => "lock_mismatch",
            Invalid { .. } => "invalid",
            Exhausted { .. } => "exhausted",
            // Another process held the write lock longer than the busy timeout: worth a retry,
            // unlike the other SQLite failures.
            Sqlite(e) if is_busy(e) => "busy",
            SchemaTooNew { .. } | Corrupt { .. } | Etcd { .. } | Sqlite(_) | Json(_) | Io(_) => {
                "internal"
            }
        }
    }

    /// Whether the error says "this thing does not exist" (HTTP 404 territory).
    pub fn is_not_found(&self) -> bool {
        self.code() == "not_found"
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl From<ferry_addr::AddrError> for StoreError {
    fn from(e: ferry_addr::AddrError) -> Self {
        match e {
            ferry_addr::AddrError::Exhausted { kind } => StoreError::Exhausted { kind },
            // Any other address error here means a stored ID is outside its space.
            other => StoreError::Corrupt {
                what: other.to_string(),
            },
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
