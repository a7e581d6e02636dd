//! Fault injection for tests of the callers (migration): the sender damages or drops its first
//! chunks; the protocol must detect and repair both.

use crate::error::{Result, VolumeError};

/// Environment variable read by [`Faults::from_env`], e.g. `corrupt=2,drop=1`.
pub const FAULT_ENV: &str = "FERRY_TEST_VOLUME_FAULT";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Flip a byte in the first N chunk payloads sent (first pass only).
    pub corrupt_chunks: u32,
    /// Silently skip the first M chunks that should be sent (first pass only).
    pub drop_chunks: u32,
}

impl Faults {
    /// Reads [`FAULT_ENV`]; unset or empty means no faults; anything malformed is an error.
    pub fn from_env() -> Result<Faults> {
        match std::env::var(FAULT_ENV) {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(Faults::default()),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(VolumeError::BadFaults(v.to_string_lossy().into_owned()))
            }
        }
    }
}

impl std::str::FromStr for Faults {
    type Err = VolumeError;
    fn from_str(s: &str) -> Result<Faults> {
        let mut f = Faults::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || VolumeError::BadFaults(s.to_string());
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let n: u32 = v.trim().parse().map_err(|_| bad())?;
            match k.trim() {
                "corrupt" => f.corrupt_chunks = n,
                "drop" => f.drop_chunks = n,
                _ => return Err(bad()),
            }
        }
        Ok(f)
    }
}
