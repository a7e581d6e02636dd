//! The HTTP face of the core's errors: a status for each [`Kind`], and the JSON body
//! `{"error": "...", "code": "..."}`. Agents answer their errors the same way.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
pub use ferry_core::error::{ErrorBody, PERMANENT_VOLUME_ERROR};
use ferry_core::{Error, Kind};

/// An error as an HTTP answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ApiError(pub Error);

/// The status each kind answers with: the same as on the agent protocol
/// ([`ferry_core::proto::wire_status`]), so an agent's error and the API's agree.
pub fn status(kind: Kind) -> StatusCode {
    StatusCode::from_u16(ferry_core::proto::wire_status(kind))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl ApiError {
    /// An error with the kind `status` stands for (agents answer their own failures so).
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError(Error::new(Kind::from_wire(status), code, message))
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        ApiError(Error::invalid(m))
    }
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError(Error::not_found(what))
    }
    pub fn conflict(code: &'static str, m: impl Into<String>) -> Self {
        ApiError(Error::conflict(code, m))
    }
    pub fn internal(m: impl std::fmt::Display) -> Self {
        ApiError(Error::internal(m))
    }
    pub fn status(&self) -> StatusCode {
        status(self.0.kind)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl From<ferry_store::StoreError> for ApiError {
    fn from(e: ferry_store::StoreError) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.0.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error keeps its kind across the agent protocol and the API: the status an agent
    /// answers with, the kind the core reads back, the status the API answers with.
    #[test]
    fn every_kind_survives_the_wire_both_ways() {
        use Kind::*;
        for k in [
            Invalid,
            NotFound,
            Timeout,
            Conflict,
            Unprocessable,
            Internal,
            Agent,
            Unavailable,
            Unauthorized,
            Forbidden,
            UpstreamTimeout,
        ] {
            let s = status(k).as_u16();
            assert_eq!(ferry_core::proto::wire_status(k), s, "{k:?}");
            assert_eq!(Kind::from_wire(s), k, "{k:?}");
        }
        // What ferry-image answers (401 refused credentials, 504 unreachable) keeps its status.
        assert_eq!(
            ApiError::new(504, "registry_unreachable", "x").status(),
            504
        );
        assert_eq!(
            ApiError::new(401, "registry_unauthorized", "x").status(),
            401
        );
    }
}
