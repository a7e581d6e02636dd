//! Who is calling and what they may touch (docs/design.md#tokens). The HTTP layer only extracts
//! the bearer token; [`authenticate`] turns it into a [`Caller`], and every operation asks this
//! module whether that caller may do it, so the rules are tested here without HTTP.
//!
//! The one invariant: **org A never sees org B.** An org token reaches only its own org's apps,
//! machines, volumes, bridge mappings and migrations, and anything of another org answers
//! exactly what a name that does not exist answers (same status, same body), so a caller cannot
//! even learn that it exists. Hosts, drains, images, registries, tokens and cross-org views need
//! an admin token; the agents' routes a join token.
//!
//! A token is `<id>.<secret>`; the store keeps only the BLAKE3 hash of the secret.

use crate::error::{Error, Kind, Result};
use crate::Core;
use ferry_store::{TokenKind, TokenRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a caller may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// One org's resources only.
    Org(String),
    /// A host of the fleet: the agents' protocol only (registration, reports, the watch).
    Join,
}

/// An authenticated caller: the token that acted (its ID, never its secret) and its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub scope: Scope,
}

impl Caller {
    pub fn admin(token_id: impl Into<String>) -> Caller {
        Caller {
            token_id: token_id.into(),
            scope: Scope::Admin,
        }
    }
    /// The control plane itself (its metrics, its background work): no token, every org.
    pub fn server() -> Caller {
        Caller::admin("server")
    }
    pub fn org(token_id: impl Into<String>, org: impl Into<String>) -> Caller {
        Caller {
            token_id: token_id.into(),
            scope: Scope::Org(org.into()),
        }
    }
    pub fn join(token_id: impl Into<String>) -> Caller {
        Caller {
            token_id: token_id.into(),
            scope: Scope::Join,
        }
    }

    /// The org this caller is confined to; `None` for an admin (and for a host, which reaches
    /// no org's resources at all: see [`Caller::may_see_org`]).
    pub fn org_name(&self) -> Option<&str> {
        match &self.scope {
            Scope::Org(o) => Some(o),
            _ => None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }

    /// Whether resources of `org` exist for this caller.
    pub fn may_see_org(&self, org: &str) -> bool {
        match &self.scope {
            Scope::Admin => true,
            Scope::Org(o) => o == org,
            Scope::Join => false,
        }
    }

    /// Fleet-wide operations (hosts, drains, images, registries, tokens, cross-org views).
    pub fn require_admin(&self) -> Result<()> {
        if self.is_admin() {
            return Ok(());
        }
        Err(forbidden("this needs an admin token"))
    }

    /// The public API: an admin or an org token. A join token is for the agents' protocol.
    pub fn require_user(&self) -> Result<()> {
        match self.scope {
            Scope::Admin | Scope::Org(_) => Ok(()),
            Scope::Join => Err(forbidden("a join token only reaches the agents' routes")),
        }
    }

    /// The agents' protocol (`/internal/...`): a join token, or an admin's. Never an org
    /// token: registering a host or reporting a machine's state is fleet-wide power.
    pub fn require_host(&self) -> Result<()> {
        match self.scope {
            Scope::Admin | Scope::Join => Ok(()),
            Scope::Org(_) => Err(forbidden(
                "the agents' routes need a join token (ferry token create --join)",
            )),
        }
    }
}

/// 401: no token, or one that is not (or no longer) valid. One code for every case, and no
/// detail on which part failed, so a guesser learns nothing.
pub fn unauthenticated(m: impl Into<String>) -> Error {
    Error::new(Kind::Unauthorized, "unauthenticated", m)
}

/// 403: a valid token whose scope does not reach this operation.
pub fn forbidden(m: impl Into<String>) -> Error {
    Error::new(Kind::Forbidden, "forbidden", m)
}

/// A token's secret as the store keeps it.
fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// The caller a bearer token stands for. `None` (no header) and every way a token can be wrong
/// (malformed, unknown, wrong secret, revoked, expired) are the same 401.
pub fn authenticate(core: &Core, bearer: Option<&str>) -> Result<Caller> {
    let Some(token) = bearer else {
        return Err(unauthenticated(
            "this needs a token: Authorization: Bearer <token> (FERRY_TOKEN for the CLI)",
        ));
    };
    let invalid = || unauthenticated("the token is not valid (unknown, revoked or expired)");
    let (id, secret) = token.trim().split_once('.').ok_or_else(invalid)?;
    if !is_token_id(id) {
        return Err(invalid());
    }
    let rec = match core.store.get_token(id) {
        Ok(r) => r,
        Err(e) if e.is_not_found() => return Err(invalid()),
        Err(e) => return Err(e.into()),
    };
    // blake3::Hash compares in constant time; the hex strings are parsed back to hashes for it.
    let want = blake3::Hash::from_hex(&rec.secret_hash).map_err(Error::internal)?;
    if blake3::hash(secret.as_bytes()) != want {
        return Err(invalid());
    }
    if rec.revoked || rec.expires_at_ms.is_some_and(|t| t <= core.store.now_ms()) {
        return Err(invalid());
    }
    Ok(Caller {
        token_id: rec.id,
        scope: match (rec.kind, rec.org) {
            (TokenKind::Admin, _) => Scope::Admin,
            (TokenKind::Join, _) => Scope::Join,
            (TokenKind::Org, Some(o)) => Scope::Org(o),
            (TokenKind::Org, None) => return Err(Error::internal("an org token without org")),
        },
    })
}

fn is_token_id(s: &str) -> bool {
    s.len() == 20 && s.starts_with("tok_") && s[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

// ---- what org-scoped names resolve to ---------------------------------------------------------

/// The app, if this caller may see it. An app of another org answers exactly as an app that
/// does not exist (the store's own "not found", built from the same error).
pub fn app(core: &Core, caller: &Caller, name: &str) -> Result<ferry_store::App> {
    caller.require_user()?;
    let missing = || -> Error {
        ferry_store::StoreError::AppNotFound {
            name: name.to_owned(),
        }
        .into()
    };
    // From the store, never the create path's read cache: that cache keeps an app until it is
    // read again, and a name deleted by one org and taken by another must not keep the first
    // org's access.
    match core.store.get_app(name) {
        Ok(a) if caller.may_see_org(&a.org) => Ok(a),
        Ok(_) => Err(missing()),
        Err(e) => Err(e.into()),
    }
}

/// The org a new app (or volume) of this caller goes to: an org token's own; an admin's choice
/// (`personal` by default). An org token naming another org is refused whether that org exists
/// or not, so the refusal says nothing about it.
pub fn org_for_new(caller: &Caller, asked: Option<&str>) -> Result<String> {
    caller.require_user()?;
    match (caller.org_name(), asked) {
        (Some(own), Some(a)) if a != own => Err(forbidden(format!(
            "this token is for org {own}; it cannot create anything in another org"
        ))),
        (Some(own), _) => Ok(own.to_owned()),
        (None, a) => Ok(a.unwrap_or("personal").to_owned()),
    }
}

/// The network an org-scoped caller is confined to (`None`: every network, an admin). An org
/// with no network yet (no app ever created) has the network ID 0, which no mapping or
/// migration has.
pub fn network(core: &Core, caller: &Caller) -> Result<Option<u32>> {
    caller.require_user()?;
    match caller.org_name() {
        None => Ok(None),
        Some(o) => match core.store.get_org(o) {
            Ok(org) => Ok(Some(org.network_id.get())),
            Err(e) if e.is_not_found() => Ok(Some(0)),
            Err(e) => Err(e.into()),
        },
    }
}

/// Whether a resource of network `n` exists for this caller (given [`network`]'s answer).
pub fn sees_network(confined: Option<u32>, n: u32) -> bool {
    confined.is_none_or(|c| c == n)
}

// ---- events name the token that acted ---------------------------------------------------------

tokio::task_local! {
    /// The token of the request being served: the API's edge sets it around each request, and
    /// the events recorded while serving it say which token acted.
    static ACTING: String;
}

/// Runs `f` with `caller` as the one acting (for [`stamp`]).
pub async fn acting<F: std::future::Future>(caller: &Caller, f: F) -> F::Output {
    ACTING.scope(caller.token_id.clone(), f).await
}

/// `request` (an event's body) with the acting token's ID added as `token_id`, if a request is
/// being served. The ID only: the secret never leaves [`authenticate`].
pub fn stamp(mut request: serde_json::Value) -> serde_json::Value {
    if let Ok(id) = ACTING.try_with(|t| t.clone()) {
        if let Some(o) = request.as_object_mut() {
            o.insert("token_id".into(), serde_json::Value::String(id));
        }
    }
    request
}

// ---- tokens -----------------------------------------------------------------------------------

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// `admin`, `org` (then `org` is required) or `join`.
    pub kind: String,
    #[serde(default)]
    pub org: Option<String>,
    /// How long it is valid, e.g. `30d`, `12h`; default: until revoked.
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub kind: String,
    pub org: Option<String>,
    pub description: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

/// A token just made: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// `<id>.<secret>`: what the caller sends as `Authorization: Bearer ...`.
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

fn view(t: &TokenRecord) -> TokenView {
    TokenView {
        id: t.id.clone(),
        kind: t.kind.as_str().to_owned(),
        org: t.org.clone(),
        description: t.description.clone(),
        created_at: t.created_at_ms,
        expires_at: t.expires_at_ms,
        revoked: t.revoked,
    }
}

/// Makes a token without asking who wants it: for the control plane's own bootstrap (the
/// first admin token, its local agents' join token). The API's [`create_token`] checks first.
pub fn issue(core: &Core, req: CreateToken) -> Result<CreatedToken> {
    let kind = TokenKind::parse(&req.kind)
        .ok_or_else(|| Error::invalid(format!("kind {:?}: admin, org or join", req.kind)))?;
    let org = match (kind, req.org) {
        (TokenKind::Org, Some(o)) => {
            crate::config::validate_name("org", &o)?;
            Some(o)
        }
        (TokenKind::Org, None) => return Err(Error::invalid("an org token needs its org")),
        (_, Some(_)) => return Err(Error::invalid("only an org token has an org")),
        (_, None) => None,
    };
    let expires_at_ms = match req.ttl.as_deref() {
        None => None,
        Some(t) => {
            let d = humantime::parse_duration(t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| Error::invalid(format!("ttl {t:?} is not a duration like 30d")))?;
            Some(
                core.store
                    .now_ms()
                    .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            )
        }
    };
    let description = req.description.unwrap_or_default();
    if description.len() > 200 {
        return Err(Error::invalid("description: at most 200 bytes"));
    }
    let id = format!("tok_{}", crate::random_hex(8));
    let secret = crate::random_hex(32);
    let rec = core.store.create_token(&TokenRecord {
        id: id.clone(),
        kind,
        org,
        secret_hash: hash_secret(&secret),
        description,
        created_at_ms: 0,
        expires_at_ms,
        revoked: false,
    })?;
    Ok(CreatedToken {
        token: format!("{id}.{secret}"),
        view: view(&rec),
    })
}

pub fn create_token(core: &Core, caller: &Caller, req: CreateToken) -> Result<CreatedToken> {
    caller.require_admin()?;
    issue(core, req)
}

pub fn list_tokens(core: &Core, caller: &Caller) -> Result<Vec<TokenView>> {
    caller.require_admin()?;
    Ok(core.store.list_tokens()?.iter().map(view).collect())
}

/// Revokes for good: every later call with it is a 401. Idempotent.
pub fn revoke_token(core: &Core, caller: &Caller, id: &str) -> Result<TokenView> {
    caller.require_admin()?;
    if !is_token_id(id) {
        return Err(Error::invalid(format!(
            "{id:?} is not a token ID (tok_ + 16 hex)"
        )));
    }
    Ok(view(&core.store.revoke_token(id)?))
}

/// Whether `token` (`<id>.<secret>`) is a valid, unrevoked, unexpired admin token of this
/// store: the control plane reuses the admin token it wrote at an earlier start if so.
pub fn is_valid_admin(core: &Core, token: &str) -> bool {
    matches!(authenticate(core, Some(token)), Ok(c) if c.is_admin())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> std::sync::Arc<Core> {
        let store = std::sync::Arc::new(ferry_store::SqliteStore::in_memory().unwrap());
        Core::new(
            store,
            std::env::temp_dir(),
            std::sync::Arc::new(crate::testing::Double::default()),
            std::sync::Arc::new(crate::testing::NoWebhooks),
        )
    }

    fn make(c: &Core, kind: &str, org: Option<&str>, ttl: Option<&str>) -> CreatedToken {
        issue(
            c,
            CreateToken {
                kind: kind.into(),
                org: org.map(Into::into),
                ttl: ttl.map(Into::into),
                description: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn tokens_authenticate_by_secret_and_stop_when_revoked() {
        let c = core();
        let a = make(&c, "org", Some("acme"), None);
        let caller = authenticate(&c, Some(&a.token)).unwrap();
        assert_eq!(caller, Caller::org(a.view.id.clone(), "acme"));
        // The store has only the hash.
        let rec = c.store.get_token(&a.view.id).unwrap();
        assert!(!rec.secret_hash.contains(a.token.split_once('.').unwrap().1));

        for bad in [
            None,
            Some(""),
            Some("nonsense"),
            Some("tok_0000000000000000.abc"),
            Some(&*format!("{}.wrong", a.view.id)),
        ] {
            let e = authenticate(&c, bad).unwrap_err();
            assert_eq!((e.kind, e.code), (Kind::Unauthorized, "unauthenticated"));
        }
        revoke_token(&c, &Caller::admin("t"), &a.view.id).unwrap();
        let e = authenticate(&c, Some(&a.token)).unwrap_err();
        assert_eq!(e.code, "unauthenticated");
    }

    #[test]
    fn an_expired_token_is_refused() {
        let clock = ferry_store::ManualClock::new(1_000_000);
        let store = std::sync::Arc::new(
            ferry_store::SqliteStore::in_memory_with_clock(std::sync::Arc::new(clock.clone()))
                .unwrap(),
        );
        let c = Core::new(
            store,
            std::env::temp_dir(),
            std::sync::Arc::new(crate::testing::Double::default()),
            std::sync::Arc::new(crate::testing::NoWebhooks),
        );
        let t = make(&c, "admin", None, Some("1h"));
        assert!(authenticate(&c, Some(&t.token)).unwrap().is_admin());
        clock.advance(3_600_000);
        assert_eq!(
            authenticate(&c, Some(&t.token)).unwrap_err().code,
            "unauthenticated"
        );
    }

    #[test]
    fn scopes_decide_who_reaches_what() {
        let c = core();
        c.store.create_app("a1", "a").unwrap();
        c.store.create_app("b1", "b").unwrap();
        let (admin, a, b, host) = (
            Caller::admin("t0"),
            Caller::org("t1", "a"),
            Caller::org("t2", "b"),
            Caller::join("t3"),
        );
        assert_eq!(app(&c, &admin, "b1").unwrap().org, "b");
        assert_eq!(app(&c, &a, "a1").unwrap().org, "a");
        // Another org's app and an app that does not exist: the same error, word for word.
        let foreign = app(&c, &a, "b1").unwrap_err();
        let missing = app(&c, &a, "zz").unwrap_err();
        assert_eq!(foreign.kind, Kind::NotFound);
        assert_eq!(foreign.body().code, missing.body().code);
        assert_eq!(foreign.message, missing.message.replace("\"zz\"", "\"b1\""));
        assert_eq!(app(&c, &b, "b1").unwrap().name, "b1");
        assert_eq!(app(&c, &host, "a1").unwrap_err().kind, Kind::Forbidden);

        assert!(admin.require_admin().is_ok());
        for who in [&a, &host] {
            assert_eq!(who.require_admin().unwrap_err().kind, Kind::Forbidden);
        }
        assert!(host.require_host().is_ok() && admin.require_host().is_ok());
        assert_eq!(a.require_host().unwrap_err().kind, Kind::Forbidden);

        assert_eq!(org_for_new(&a, None).unwrap(), "a");
        assert_eq!(org_for_new(&a, Some("a")).unwrap(), "a");
        assert_eq!(
            org_for_new(&a, Some("b")).unwrap_err().kind,
            Kind::Forbidden
        );
        assert_eq!(org_for_new(&admin, Some("b")).unwrap(), "b");
        assert_eq!(org_for_new(&admin, None).unwrap(), "personal");

        let na = c.store.get_org("a").unwrap().network_id.get();
        assert_eq!(network(&c, &admin).unwrap(), None);
        assert_eq!(network(&c, &a).unwrap(), Some(na));
        assert_eq!(network(&c, &Caller::org("t", "new")).unwrap(), Some(0));
        assert!(sees_network(None, 7) && sees_network(Some(7), 7) && !sees_network(Some(7), 8));
    }

    #[test]
    fn a_name_another_org_takes_over_is_theirs() {
        let c = core();
        let a = Caller::org("t1", "a");
        c.store.create_app("x", "a").unwrap();
        assert!(app(&c, &a, "x").is_ok());
        // The create path caches apps; the decision must not follow it.
        let _ = crate::cache::app(&c, "x");
        c.store.delete_app("x").unwrap();
        c.store.create_app("x", "b").unwrap();
        assert_eq!(app(&c, &a, "x").unwrap_err().kind, Kind::NotFound);
        assert!(app(&c, &Caller::org("t2", "b"), "x").is_ok());
    }

    #[test]
    fn only_an_admin_manages_tokens() {
        let c = core();
        let a = Caller::org("t1", "a");
        let req = CreateToken {
            kind: "admin".into(),
            ..Default::default()
        };
        assert_eq!(
            create_token(&c, &a, req.clone()).unwrap_err().kind,
            Kind::Forbidden
        );
        assert!(c.store.list_tokens().unwrap().is_empty());
        let t = create_token(&c, &Caller::admin("t0"), req).unwrap();
        assert_eq!(list_tokens(&c, &a).unwrap_err().kind, Kind::Forbidden);
        assert_eq!(
            revoke_token(&c, &a, &t.view.id).unwrap_err().kind,
            Kind::Forbidden
        );
        assert!(!c.store.get_token(&t.view.id).unwrap().revoked);
        let bad = CreateToken {
            kind: "org".into(),
            ..Default::default()
        };
        assert_eq!(
            create_token(&c, &Caller::admin("t0"), bad)
                .unwrap_err()
                .kind,
            Kind::Invalid
        );
    }

    #[tokio::test]
    async fn events_name_the_acting_token() {
        assert_eq!(stamp(serde_json::json!({})), serde_json::json!({}));
        let got = acting(&Caller::org("tok_1", "a"), async {
            stamp(serde_json::json!({"signal": "TERM"}))
        })
        .await;
        assert_eq!(
            got,
            serde_json::json!({"signal": "TERM", "token_id": "tok_1"})
        );
    }
}
