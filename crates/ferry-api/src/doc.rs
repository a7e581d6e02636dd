//! The pieces the OpenAPI document is made of that more than one route shares: path parameters
//! and error responses. Every route lists, next to its handler, the error responses it can answer
//! with the types below, so the document says exactly which statuses and `code`s a client must
//! handle (schemathesis checks every answer against it).

use crate::error::ErrorBody;
use serde::Deserialize;
use utoipa::{IntoParams, IntoResponses};

/// `/v1/apps/{app}/...`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AppPath {
    /// The app's name (unique across the fleet).
    #[param(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub app: String,
}

/// `/v1/apps/{app}/machines/{id}/...`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MachinePath {
    /// The app's name. A machine of another app answers 404, as one that does not exist.
    #[param(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub app: String,
    /// The machine's ID: 14 lowercase hex characters.
    #[param(pattern = "^[0-9a-f]{14}$")]
    pub id: String,
}

/// `/v1/apps/{app}/machines/{id}/metadata/{key}`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MetadataPath {
    /// The app's name.
    #[param(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub app: String,
    /// The machine's ID: 14 lowercase hex characters.
    #[param(pattern = "^[0-9a-f]{14}$")]
    pub id: String,
    /// The metadata key: 1..=128 of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub key: String,
}

/// `/v1/hosts/{id}/...`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct HostPath {
    /// The host's ID, as `ferry host list` shows it (hex).
    pub id: String,
}

/// `/v1/migrations/{id}`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MigrationPath {
    /// The migration's ID: `mig_` and 16 hex characters.
    #[param(pattern = "^mig_[0-9a-f]{16}$")]
    pub id: String,
}

/// `/v1/tokens/{id}`
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TokenPath {
    /// The token's ID (`tok_` and 16 hex characters), never its secret.
    #[param(pattern = "^tok_[0-9a-f]{16}$")]
    pub id: String,
}

/// 401 and 403: what every route answers to a caller without the right token.
#[derive(IntoResponses)]
pub enum Refused {
    #[response(
        status = 401,
        description = "`unauthenticated`: no `Authorization: Bearer <token>`, or a token that \
                       is unknown, revoked or expired. Nothing was changed."
    )]
    Unauthenticated(#[allow(dead_code)] ErrorBody),
    #[response(
        status = 403,
        description = "`forbidden`: the token is valid but does not reach this operation (an \
                       org token on an admin route or naming another org, a join token outside \
                       the agents' routes). Nothing was changed."
    )]
    Forbidden(#[allow(dead_code)] ErrorBody),
}

/// 400.
#[derive(IntoResponses)]
#[response(
    status = 400,
    description = "`invalid_argument`: a malformed body, query or path parameter, or a value \
                   out of its range. Nothing was changed."
)]
pub struct BadRequest(#[allow(dead_code)] ErrorBody);

/// 404.
#[derive(IntoResponses)]
#[response(
    status = 404,
    description = "`not_found`: the app, machine, host, volume, migration, lease or mapping \
                   does not exist, belongs to another app, or belongs to another org (the \
                   same answer, word for word)."
)]
pub struct NotFound(#[allow(dead_code)] ErrorBody);

/// 408.
#[derive(IntoResponses)]
#[response(
    status = 408,
    description = "`timeout`: the machine did not reach the state within the timeout given."
)]
pub struct WaitTimeout(#[allow(dead_code)] ErrorBody);

/// 409.
#[derive(IntoResponses)]
#[response(
    status = 409,
    description = "The request conflicts with the current state; nothing was changed. Codes: \
                   `app_exists`, `app_has_machines`, `illegal_transition` (the machine is not \
                   in a state that allows this), `lease_held`, `lease_mismatch`, `lock_held`, \
                   `conflict`, `not_placed`, `machine_running`, `machine_not_started`, `machine_busy`, \
                   `machine_not_movable`, `migration_in_progress`, `host_cordoned`, \
                   `no_destination`, `same_host`, `volume_elsewhere`, `bridge_loop`."
)]
pub struct Conflict(#[allow(dead_code)] ErrorBody);

/// 422.
#[derive(IntoResponses)]
#[response(
    status = 422,
    description = "`volume_unsupported`: the machine's volume holds something a fork cannot \
                   carry (a device node); retrying will not help."
)]
pub struct Unprocessable(#[allow(dead_code)] ErrorBody);

/// 502 and 504: a host's agent failed or did not answer in time.
#[derive(IntoResponses)]
pub enum AgentFailed {
    #[response(
        status = 502,
        description = "`agent_error`: the host's agent refused or failed the request, or \
                       could not be reached."
    )]
    Failed(#[allow(dead_code)] ErrorBody),
}

/// 500 and 503: what any route can answer when the server itself cannot proceed.
#[derive(IntoResponses)]
pub enum ServerFailed {
    #[response(
        status = 500,
        description = "`internal`: a bug or a broken store record; the request may not have \
                       been carried out."
    )]
    Internal(#[allow(dead_code)] ErrorBody),
    #[response(
        status = 503,
        description = "`unavailable`: the store or every host is unreachable right now; \
                       nothing was changed. Retry later."
    )]
    Unavailable(#[allow(dead_code)] ErrorBody),
}
