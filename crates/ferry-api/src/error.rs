//! API errors: an HTTP status, a stable machine-readable code, and one human sentence.
//! Serialized as `{"error": "...", "code": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// For an `agent_error`: the code the host's agent answered (`not_running`, `not_found`,
    /// `invalid_argument`, `internal`, ...), so callers decide by code, never by message text.
    pub agent_code: Option<String>,
}

/// An agent's code for a volume fork that can never succeed as the volume is (a device node
/// in it): the server passes it on with status 422 and a migration rolls back at once.
pub const PERMANENT_VOLUME_ERROR: &str = "volume_unsupported";

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            agent_code: None,
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(400, "invalid_argument", m)
    }
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(404, "not_found", format!("{what} not found"))
    }
    pub fn conflict(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(409, code, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(503, "unavailable", m)
    }
    pub fn internal(m: impl std::fmt::Display) -> Self {
        Self::new(500, "internal", m.to_string())
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
            code: self.code.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

impl From<ferry_store::StoreError> for ApiError {
    /// Every store error code has its status here: a store validation error is the caller's
    /// 400 (not a 500 the migration driver would retry), a busy or unreachable store a 503.
    fn from(e: ferry_store::StoreError) -> Self {
        let (status, code) = match e.code() {
            "not_found" => (404, "not_found"),
            "app_exists" => (409, "app_exists"),
            "illegal_transition" => (409, "illegal_transition"),
            "lease_held" => (409, "lease_held"),
            "lease_mismatch" => (409, "lease_mismatch"),
            "lock_held" | "lock_mismatch" => (409, "lock_held"),
            "app_has_machines" => (409, "app_has_machines"),
            "conflict" => (409, "conflict"),
            "stale_revision" => (409, "conflict"),
            "migration_in_progress" => (409, "migration_in_progress"),
            "invalid" => (400, "invalid_argument"),
            "busy" | "unavailable" => (503, "unavailable"),
            _ => (500, "internal"),
        };
        ApiError::new(status, code, e.to_string())
    }
}
