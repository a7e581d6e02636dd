//! [`open`]: a store from a connect string, so the binary's `--store` flag picks the backend.
//!
//! Its job: parse `sqlite://PATH`, `sqlite::memory:` and `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`
//! and open the matching backend. It must never guess: anything else is
//! [`StoreError::Invalid`], not a file named after the string.

use crate::clock::{Clock, SystemClock};
use crate::error::{Result, StoreError};
use crate::{EtcdStore, SqliteStore, Store};
use std::sync::Arc;

/// The key prefix of an etcd URL without one.
pub const DEFAULT_ETCD_PREFIX: &str = "/ferry/";

/// Opens the store named by `url`:
/// - `sqlite://PATH` — the embedded store in the file PATH (`sqlite:///var/lib/ferry/ferry.db`
///   is absolute, `sqlite://state/ferry.db` relative);
/// - `sqlite::memory:` — a private in-memory store (tests, demos);
/// - `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` — etcd v3 at those members, every key under
///   `/PREFIX/` (default [`DEFAULT_ETCD_PREFIX`]).
///
/// ```
/// let s = ferry_store::open("sqlite::memory:").unwrap();
/// assert_eq!(s.ensure_org("acme").unwrap().network_id.get(), 1);
/// assert_eq!(ferry_store::open("postgres://x").err().unwrap().code(), "invalid");
/// ```
pub fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with_clock(url, Arc::new(SystemClock))
}

/// [`open`] with an injected clock.
pub fn open_with_clock(url: &str, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>> {
    if url == "sqlite::memory:" {
        return Ok(Arc::new(SqliteStore::in_memory_with_clock(clock)?));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(bad(url, "no path"));
        }
        return Ok(Arc::new(SqliteStore::open_with_clock(path, clock)?));
    }
    if let Some(rest) = url.strip_prefix("etcd://") {
        let (hosts, prefix) = parse_etcd(rest).map_err(|why| bad(url, why))?;
        return Ok(Arc::new(EtcdStore::connect_with_clock(
            &hosts, &prefix, clock,
        )?));
    }
    Err(bad(
        url,
        "expected sqlite://PATH, sqlite::memory: or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]",
    ))
}

fn bad(url: &str, why: &str) -> StoreError {
    StoreError::Invalid {
        reason: format!("store {url:?}: {why}"),
    }
}

/// `HOST:PORT[,HOST:PORT...][/PREFIX]` -> (endpoints, prefix).
pub(crate) fn parse_etcd(rest: &str) -> std::result::Result<(Vec<String>, String), &'static str> {
    let (hosts, prefix) = match rest.split_once('/') {
        Some((h, p)) if !p.trim_matches('/').is_empty() => {
            (h, format!("/{}/", p.trim_matches('/')))
        }
        Some((h, _)) => (h, DEFAULT_ETCD_PREFIX.to_owned()),
        None => (rest, DEFAULT_ETCD_PREFIX.to_owned()),
    };
    let eps: Vec<String> = hosts.split(',').map(str::to_owned).collect();
    for e in &eps {
        let port = e.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
        if !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
            return Err("each member must be HOST:PORT");
        }
    }
    Ok((eps, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_urls_parse() {
        let ok = |s: &str| parse_etcd(s).unwrap();
        assert_eq!(
            ok("127.0.0.1:2379"),
            (vec!["127.0.0.1:2379".to_owned()], "/ferry/".to_owned())
        );
        assert_eq!(
            ok("a:1,b:2,[::1]:3/fleet/eu/"),
            (
                vec!["a:1".into(), "b:2".into(), "[::1]:3".into()],
                "/fleet/eu/".to_owned()
            )
        );
        for bad in ["", "a", "a:", ":1", "a:1,", "a:99999", "a:1,b/x"] {
            assert!(parse_etcd(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(open("etcd://nope").err().unwrap().code(), "invalid");
        assert_eq!(open("sqlite://").err().unwrap().code(), "invalid");
        assert_eq!(open("/var/lib/ferry.db").err().unwrap().code(), "invalid");
    }

    #[test]
    fn sqlite_urls_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x").join("f.db");
        let url = format!("sqlite://{}", path.display());
        let org = open(&url).unwrap().ensure_org("acme").unwrap();
        // Same file, same data.
        assert_eq!(open(&url).unwrap().get_org("acme").unwrap(), org);
        assert!(path.exists());
    }
}
