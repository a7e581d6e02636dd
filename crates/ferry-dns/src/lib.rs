//! ferry's authoritative `.internal` DNS server (docs/design.md#dns).
//!
//! * [`zone`]: the published data ([`Snapshot`] of [`DnsMachine`]s), its atomic swap
//!   ([`ZoneData::publish`]) and the pure per-view name resolution.
//! * [`server`]: the wire side ([`DnsServer`]): one pure request-bytes -> response-bytes function
//!   ([`DnsServer::answer`]) used by the UDP and TCP loops, the tests and the fuzz target.
//! * `prepared` and `fast`: the fast path of that function. When a snapshot is published every
//!   name that exists in each view is prepared in wire form; common queries are answered from
//!   it in place, the rest by hickory's parse and encode ([`DnsServer::answer_full`]), with the
//!   same bytes either way.
//! * `udp`: the batched (`recvmmsg`/`sendmmsg`) UDP I/O of [`DnsServer::serve_udp`].
//!
//! The view is chosen by the asking client's source address: a guest-form `fdaa::/16` source sees
//! only its own network's apps (other orgs' names are NXDOMAIN, indistinguishable from names that
//! do not exist), loopback sees every org, anything else is REFUSED.
//!
//! Response codes: NXDOMAIN for names in `internal.` that do not exist in the view; NOERROR with
//! no answer (SOA in authority) for existing names or empty non-terminals asked with another
//! type (unknown types included); REFUSED for other zones, other classes, zone transfers and
//! sources outside every view; FORMERR for unparseable packets (header only) and question counts
//! other than one; NOTIMP for opcodes other than QUERY; BADVERS for EDNS versions above 0. ANY
//! is answered per RFC 8482 §4.2 with one synthesized `HINFO "RFC8482" ""` for existing names
//! (NXDOMAIN otherwise). UDP answers larger than the client's size (512 without EDNS, else its
//! EDNS size, capped at our 1232) are truncated with TC set; TCP gets the whole answer.
//!
//! This crate never opens the store and never enters a network namespace: the caller publishes
//! snapshots and hands over sockets it has bound wherever they must live (e.g. `[fdaa::3]:53`
//! inside a host's namespace).

mod fast;
mod prepared;
pub mod server;
mod udp;
pub mod zone;

/// The hickory-proto version this crate speaks (for clients, tests and the fuzz target).
pub use hickory_proto as proto;
pub use server::{DnsServer, STREAM, UDP_PAYLOAD};
pub use zone::{DnsMachine, Lookup, Snapshot, View, ZoneData, TTL, ZONE};

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A machine whose field cannot be a DNS label; it is left out of the published zone.
    #[error("machine {id}: {field} {value:?} is not a valid DNS label")]
    InvalidMachine {
        id: String,
        field: &'static str,
        value: String,
    },
    /// A socket failed in a way that ends a serving loop.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
