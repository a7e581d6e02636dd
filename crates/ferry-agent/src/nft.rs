//! The bridge's nftables DNAT mode: the same job as the cgroup eBPF programs, for comparison and
//! for kernels without cgroup BPF. Each machine's own network namespace gets a table whose
//! output chain DNATs old addresses of the machine's network to their current ones (conntrack
//! reverses the replies, so the application still sees the old address as its peer) and rejects
//! retired ones with a TCP reset / ICMPv6 admin-prohibited (fails fast).
//!
//! Why the `nft` binary: nftables' netlink protocol has no pure-Rust implementation we can rely
//! on with this toolchain (rtnetlink does not cover it), and `nft` is its reference
//! implementation; it runs on a thread inside the machine's namespace, so the table lands there.

use crate::AgentError;
use ferry_core::proto::BridgeMapping;
use ferry_net::netns::{self, NetNs};
use std::io::Write;
use std::net::Ipv6Addr;
use std::process::{Command, Stdio};

const TABLE: &str = "ferry_bridge";

/// The ruleset for one machine of network `net` (whole table, replaced atomically by `nft -f`).
pub fn ruleset(net: u32, enabled: bool, mappings: &[BridgeMapping]) -> String {
    let mut nat = String::new();
    let mut filter = String::new();
    for m in mappings.iter().filter(|m| m.network_id == net) {
        // Both sides were validated as guest-form addresses of `net` by the server; parse again
        // so nothing but an address reaches the ruleset text.
        let (Ok(old), Ok(new)) = (m.old.parse::<Ipv6Addr>(), m.new.parse::<Ipv6Addr>()) else {
            continue;
        };
        if m.retired {
            filter.push_str(&format!(
                "    ip6 daddr {old} meta l4proto tcp counter reject with tcp reset\n"
            ));
            filter.push_str(&format!(
                "    ip6 daddr {old} counter reject with icmpv6 admin-prohibited\n"
            ));
        } else if enabled {
            nat.push_str(&format!("    ip6 daddr {old} counter dnat to {new}\n"));
        }
    }
    format!(
        "table ip6 {TABLE}\ndelete table ip6 {TABLE}\ntable ip6 {TABLE} {{\n  chain nat_out {{\n    type nat hook output priority -100; policy accept;\n{nat}  }}\n  chain filter_out {{\n    type filter hook output priority 0; policy accept;\n{filter}  }}\n}}\n"
    )
}

fn nft_in(ns: &NetNs, args: &[&str], stdin: Option<String>) -> Result<String, AgentError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    netns::run_in(ns, move || -> Result<String, AgentError> {
        let mut child = Command::new("nft")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| AgentError::io("running nft (scripts/setup.sh installs nftables)", e))?;
        if let Some(s) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(s.as_bytes())
                .map_err(|e| AgentError::io("writing to nft", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| AgentError::io("waiting for nft", e))?;
        if !out.status.success() {
            return Err(AgentError::Invalid(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?
}

/// Replaces the machine's bridge table.
pub fn apply(
    ns: &NetNs,
    net: u32,
    enabled: bool,
    mappings: &[BridgeMapping],
) -> Result<(), AgentError> {
    nft_in(ns, &["-f", "-"], Some(ruleset(net, enabled, mappings))).map(|_| ())
}

/// Packets counted per old address in the machine's table.
pub fn counters(ns: &NetNs) -> Result<Vec<(Ipv6Addr, u64)>, AgentError> {
    let text = match nft_in(ns, &["-j", "list", "table", "ip6", TABLE], None) {
        Ok(t) => t,
        Err(_) => return Ok(vec![]), // no table yet: no hits
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| AgentError::Invalid(format!("nft json: {e}")))?;
    let mut out: Vec<(Ipv6Addr, u64)> = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(expr) = item["rule"]["expr"].as_array() else {
            continue;
        };
        let addr = expr
            .iter()
            .find_map(|e| e["match"]["right"].as_str()?.parse::<Ipv6Addr>().ok());
        let packets = expr.iter().find_map(|e| e["counter"]["packets"].as_u64());
        if let (Some(a), Some(p)) = (addr, packets) {
            match out.iter_mut().find(|(x, _)| *x == a) {
                Some(e) => e.1 += p,
                None => out.push((a, p)),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_network_gate_and_retirement() {
        let m = |net, old: &str, new: &str, retired| BridgeMapping {
            network_id: net,
            old: old.into(),
            new: new.into(),
            retired,
            created_at: 0,
        };
        let ms = [
            m(1, "fdaa:0:1:8000:1:fff0:2:2", "fdaa:0:1:8000::1:2", false),
            m(2, "fdaa:0:2:8000:1:fff0:2:2", "fdaa:0:2:8000::1:2", false),
            m(1, "fdaa:0:1:8000:1:fff0:3:2", "fdaa:0:1:8000::1:2", true),
            m(1, "not; an address", "fdaa:0:1:8000::1:2", false),
        ];
        let r = ruleset(1, true, &ms);
        assert!(r.contains("ip6 daddr fdaa:0:1:8000:1:fff0:2:2 counter dnat to fdaa:0:1:8000::1:2"));
        assert!(
            !r.contains("fdaa:0:2:"),
            "another network's mapping leaked: {r}"
        );
        assert!(r.contains(
            "ip6 daddr fdaa:0:1:8000:1:fff0:3:2 meta l4proto tcp counter reject with tcp reset"
        ));
        assert!(!r.contains("not;"));
        let off = ruleset(1, false, &ms);
        assert!(
            !off.contains("dnat") && off.contains("reject"),
            "gate off: no rewrite, retired still refused"
        );
    }
}
