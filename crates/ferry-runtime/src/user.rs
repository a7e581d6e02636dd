//! Who an image's `User` names, read from the machine's own `/etc/passwd` and `/etc/group`
//! (Docker's rules: `name`, `uid`, `uid:gid`, `name:group`; a bare uid not in passwd gets gid 0).

use crate::{Result, RuntimeError};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: Option<String>,
}

/// Resolves `spec` against the passwd and group files in `etc`.
pub fn resolve(spec: &str, etc: &Path) -> Result<User> {
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // passwd: name:x:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u)));
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => entry
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| RuntimeError::Invalid(format!("no user {u:?} in /etc/passwd")))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| RuntimeError::Invalid(format!("no group {g:?} in /etc/group")))?,
        },
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    if uid >= crate::sandbox::ID_COUNT || gid >= crate::sandbox::ID_COUNT {
        return Err(RuntimeError::Invalid(format!(
            "user {spec:?}: ids must be below {}",
            crate::sandbox::ID_COUNT
        )));
    }
    Ok(User {
        uid,
        gid,
        home: entry.and_then(|f| f.get(5).map(|h| h.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_user_forms() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/srv/web:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let check = |s: &str| resolve(s, d.path()).map(|u| (u.uid, u.gid));
        assert_eq!(check("web").unwrap(), (1000, 1001));
        assert_eq!(check("1000").unwrap(), (1000, 1001));
        assert_eq!(check("1234").unwrap(), (1234, 0));
        assert_eq!(check("web:staff").unwrap(), (1000, 50));
        assert_eq!(check("7:8").unwrap(), (7, 8));
        assert!(check("nobody").is_err());
        assert!(check("web:nogroup").is_err());
        assert!(check("70000").is_err());
        assert_eq!(
            resolve("web", d.path()).unwrap().home.as_deref(),
            Some("/srv/web")
        );
    }
}
