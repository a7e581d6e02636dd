//! The machine config (docs/design.md#machine-config, Fly-shaped JSON) and its validation. Everything that enters
//! through the API or the CLI is checked here, before anything is stored or started, so bad input
//! changes nothing.

use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::ToSchema;

/// Signals a stop_config may name: the ones a workload can meaningfully handle or that end it.
pub const ALLOWED_SIGNALS: [&str; 7] = [
    "SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGSTOP",
];

/// `s` (`"int"`, `"SIGINT"`, any case) as one of [`ALLOWED_SIGNALS`], or `None`.
pub fn canonical_signal(s: &str) -> Option<String> {
    let up = s.to_ascii_uppercase();
    let sig = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    ALLOWED_SIGNALS.contains(&sig.as_str()).then_some(sig)
}

pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// An OCI image (`registry/repository:tag` or `...@sha256:...`) to run instead of the default
    /// root filesystem. The server pins it to the digest it resolved on the machine's host, so
    /// a stored machine always names the exact image it runs (and a migration moves that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub init: InitConfig,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub guest: GuestConfig,
    #[serde(default)]
    #[schema(max_items = 16)]
    pub mounts: Vec<MountConfig>,
    #[serde(default)]
    pub stop_config: StopConfig,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub checks: BTreeMap<String, CheckConfig>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The command and its arguments (no shell). With an image: replaces the image's `Cmd`
    /// (its `Entrypoint` stays in front), as `docker run IMAGE CMD...` does; empty keeps it.
    #[serde(default)]
    #[schema(max_items = 1024)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    #[serde(default = "default_memory")]
    #[schema(minimum = 16, maximum = 65536)]
    pub memory_mb: u32,
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u32,
}
fn default_memory() -> u32 {
    256
}
fn default_cpus() -> u32 {
    1
}
impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            memory_mb: default_memory(),
            cpus: default_cpus(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// A volume ID (`vol_` + 16 chars).
    pub volume: String,
    /// Absolute path inside the machine.
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopConfig {
    /// Default SIGINT.
    #[serde(default)]
    pub signal: Option<String>,
    /// A duration such as "5s" or "1m30s"; default 5s, at most 300s.
    #[serde(default)]
    pub timeout: Option<String>,
}

impl StopConfig {
    pub fn signal(&self) -> &str {
        self.signal.as_deref().unwrap_or("SIGINT")
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(DEFAULT_STOP_TIMEOUT)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartConfig {
    #[serde(default)]
    pub policy: RestartPolicy,
    /// For on-failure: give up after this many restarts in a row (default 10).
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    Tcp,
    Http,
    Exec,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    #[default]
    Liveness,
    Readiness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    #[serde(rename = "type")]
    pub kind_of: CheckType,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Default "15s".
    #[serde(default)]
    pub interval: Option<String>,
    /// Default "2s".
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub kind: CheckKind,
}

impl CheckConfig {
    pub fn interval(&self) -> Duration {
        self.interval
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(15))
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(2))
    }
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{field}: {msg}"))
}

/// Checks a name (app, machine name, org): 1-63 of `a-z 0-9 -`, starting with a letter or digit.
pub fn validate_name(what: &str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {s:?} is not valid: use 1-63 lowercase letters, digits and '-', not at either end"
        )))
    }
}

/// A light syntax check of an image reference at the edge (the agent parses it fully when it
/// pulls): 1-512 characters of the reference grammar's alphabet.
pub fn validate_image_ref(s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@".contains(&b))
        && !s.starts_with(['/', ':', '@', '-', '.']);
    if ok {
        Ok(())
    } else {
        Err(bad(
            "image",
            format!("{s:?} is not an image reference like registry:5000/repo:tag"),
        ))
    }
}

/// Checks a machine ID: 14 lowercase hex characters.
pub fn validate_machine_id(s: &str) -> Result<(), Error> {
    if s.len() == 14
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::not_found(format!(
            "machine {s:?} (machine IDs are 14 lowercase hex characters)"
        )))
    }
}

fn parse_duration(field: &str, s: &str) -> Result<Duration, Error> {
    humantime::parse_duration(s)
        .map_err(|e| bad(field, format!("{s:?} is not a duration like \"5s\": {e}")))
}

impl MachineConfig {
    /// Everything the server and agents rely on, checked once at the edge.
    pub fn validate(&self) -> Result<(), Error> {
        let cmd = &self.init.cmd;
        if let Some(image) = &self.image {
            validate_image_ref(image)?;
        }
        if (cmd.is_empty() && self.image.is_none()) || cmd.first().is_some_and(|c| c.is_empty()) {
            return Err(bad(
                "init.cmd",
                "must name a program to run (or give an image, whose command runs then)",
            ));
        }
        if cmd.len() > 1024 || cmd.iter().map(|a| a.len()).sum::<usize>() > 128 * 1024 {
            return Err(bad(
                "init.cmd",
                "too long (at most 1024 arguments, 128 KiB)",
            ));
        }
        if cmd.iter().any(|a| a.contains('\0')) {
            return Err(bad("init.cmd", "contains a NUL byte"));
        }
        if self.env.len() > 1024 {
            return Err(bad("env", "at most 1024 variables"));
        }
        for (k, v) in &self.env {
            let valid = !k.is_empty()
                && k.len() <= 256
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(bad("env", format!("{k:?} is not a variable name")));
            }
            if k.starts_with("FERRY_") {
                return Err(bad(
                    "env",
                    format!("{k} is reserved: ferry sets FERRY_* itself"),
                ));
            }
            if v.len() > 64 * 1024 || v.contains('\0') {
                return Err(bad(
                    "env",
                    format!("the value of {k} is too long or contains NUL"),
                ));
            }
        }
        if !(16..=65536).contains(&self.guest.memory_mb) {
            return Err(bad(
                "guest.memory_mb",
                format!("{} is outside 16..=65536", self.guest.memory_mb),
            ));
        }
        if !(1..=64).contains(&self.guest.cpus) {
            return Err(bad(
                "guest.cpus",
                format!("{} is outside 1..=64", self.guest.cpus),
            ));
        }
        if self.mounts.len() > 16 {
            return Err(bad("mounts", "at most 16"));
        }
        let mut paths = std::collections::HashSet::new();
        for m in &self.mounts {
            validate_volume_id(&m.volume)?;
            validate_guest_path("mounts.path", &m.path)?;
            if !paths.insert(&m.path) {
                return Err(bad("mounts.path", format!("{} is mounted twice", m.path)));
            }
        }
        if canonical_signal(self.stop_config.signal()).is_none() {
            return Err(bad(
                "stop_config.signal",
                format!(
                    "{:?} is not one of {}",
                    self.stop_config.signal(),
                    ALLOWED_SIGNALS.join(" ")
                ),
            ));
        }
        if let Some(t) = &self.stop_config.timeout {
            let d = parse_duration("stop_config.timeout", t)?;
            if d > MAX_STOP_TIMEOUT {
                return Err(bad(
                    "stop_config.timeout",
                    format!("{t} is over the maximum of 300s"),
                ));
            }
        }
        if self.checks.len() > 16 {
            return Err(bad("checks", "at most 16"));
        }
        for (name, c) in &self.checks {
            validate_name("check name", name)?;
            let field = format!("checks.{name}");
            match c.kind_of {
                CheckType::Tcp | CheckType::Http if c.port.unwrap_or(0) == 0 => {
                    return Err(bad(&field, "tcp and http checks need a port (1-65535)"));
                }
                CheckType::Exec if c.command.as_ref().is_none_or(|v| v.is_empty()) => {
                    return Err(bad(&field, "exec checks need a command"));
                }
                _ => {}
            }
            if let Some(p) = &c.path {
                if !p.starts_with('/')
                    || p.len() > 1024
                    || p.bytes().any(|b| b.is_ascii_control() || b == b' ')
                {
                    return Err(bad(
                        &field,
                        format!("path {p:?} must start with / and have no spaces"),
                    ));
                }
            }
            for (what, v) in [("interval", &c.interval), ("timeout", &c.timeout)] {
                if let Some(v) = v {
                    let d = parse_duration(&format!("{field}.{what}"), v)?;
                    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                        return Err(bad(&field, format!("{what} {v} is outside 100ms..1h")));
                    }
                }
            }
        }
        if self.metadata.len() > 64
            || self
                .metadata
                .iter()
                .any(|(k, v)| k.len() > 128 || v.len() > 1024)
        {
            return Err(bad(
                "metadata",
                "at most 64 entries, keys up to 128 and values up to 1024 bytes",
            ));
        }
        Ok(())
    }
}

pub fn validate_volume_id(v: &str) -> Result<(), Error> {
    let ok = v.len() == 20
        && v.starts_with("vol_")
        && v[4..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(bad(
            "volume",
            format!("{v:?} is not a volume ID (vol_ + 16 lowercase letters or digits)"),
        ))
    }
}

pub fn validate_guest_path(field: &str, p: &str) -> Result<(), Error> {
    let ok = p.starts_with('/')
        && p != "/"
        && p.len() <= 512
        && !p.split('/').any(|c| c == ".." || c == ".")
        && !p.bytes().any(|b| b.is_ascii_control())
        && !["/proc", "/sys", "/dev", "/etc"]
            .iter()
            .any(|r| p == *r || p.starts_with(&format!("{r}/")));
    if ok {
        Ok(())
    } else {
        Err(bad(field, format!("{p:?} must be an absolute path without . or .., not / or under /proc /sys /dev /etc")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: serde_json::Value, want_err: Option<&str>) {
        let parsed: Result<MachineConfig, _> = serde_json::from_value(json.clone());
        let result = parsed
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate().map_err(|e| e.to_string()));
        match (want_err, result) {
            (None, Ok(())) => {}
            (Some(w), Err(e)) => assert!(e.contains(w), "{json}: error {e:?} should mention {w:?}"),
            (w, r) => panic!("{json}: wanted {w:?}, got {r:?}"),
        }
    }

    #[test]
    fn configs() {
        use serde_json::json;
        check(json!({"init": {"cmd": ["sleep", "1"]}}), None);
        check(
            json!({"init": {"cmd": ["x"]}, "stop_config": {"signal": "SIGTERM", "timeout": "300s"}}),
            None,
        );
        check(
            json!({"init": {"cmd": ["x"]}, "stop_config": {"signal": "SIGHUP"}}),
            Some("not one of"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "stop_config": {"signal": "SIGKILL"}}),
            None,
        );
        check(
            json!({"init": {"cmd": ["x"]}, "stop_config": {"timeout": "301s"}}),
            Some("over the maximum"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "stop_config": {"timeout": "soon"}}),
            Some("not a duration"),
        );
        check(json!({"init": {"cmd": []}}), Some("init.cmd"));
        check(
            json!({"init": {"cmd": ["x"]}, "guest": {"memory_mb": 1048576}}),
            Some("guest.memory_mb"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "guest": {"cpus": 0}}),
            Some("guest.cpus"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "env": {"1X": "y"}}),
            Some("not a variable name"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "env": {"FERRY_MACHINE_ID": "y"}}),
            Some("reserved"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "mounts": [{"volume": "vol_0123456789abcdef", "path": "/data"}]}),
            None,
        );
        check(
            json!({"init": {"cmd": ["x"]}, "mounts": [{"volume": "vol_x", "path": "/data"}]}),
            Some("volume ID"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "mounts": [{"volume": "vol_0123456789abcdef", "path": "/etc/x"}]}),
            Some("absolute path"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "mounts": [{"volume": "vol_0123456789abcdef", "path": "/a/../b"}]}),
            Some("absolute path"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "checks": {"web": {"type": "http", "port": 80, "path": "/"}}}),
            None,
        );
        check(
            json!({"init": {"cmd": ["x"]}, "checks": {"web": {"type": "http"}}}),
            Some("need a port"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "checks": {"web": {"type": "exec"}}}),
            Some("need a command"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "restart": {"policy": "on-failure"}}),
            None,
        );
        check(
            json!({"init": {"cmd": ["x"]}, "restart": {"policy": "sometimes"}}),
            Some("unknown variant"),
        );
        check(
            json!({"init": {"cmd": ["x"]}, "surprise": 1}),
            Some("unknown field"),
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("app", "web-1").is_ok());
        for bad in ["", "-web", "web-", "Web", "web_1", &"a".repeat(64)] {
            assert!(validate_name("app", bad).is_err(), "{bad}");
        }
        assert!(validate_machine_id("d8dd625fed5568").is_ok());
        assert!(validate_machine_id("d8dd625fed556").is_err());
        assert!(validate_machine_id("D8DD625FED5568").is_err());
    }
}
