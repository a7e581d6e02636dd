//! Every name a snapshot can answer, per view, in wire form: built once when a snapshot is
//! published ([`Prepared`], inside the zone's index) so the fast path
//! ([`crate::fast`]) answers a query with one hash lookup and a few copies, no parse tree, no
//! allocation.
//!
//! The entries are built by `zone::prepare_app` with the same helpers as `Index::node` (the
//! full path's resolution) and in the same precedence; `tests/fast_path.rs` compares the two
//! paths' bytes over whole snapshots. A name that is not here does not exist in that view
//! (NXDOMAIN), which is what keeps another org's names and missing names indistinguishable:
//! both are simply absent from the view's key space.
//!
//! It must never be consulted for a view other than the one the source address chose, and a
//! miss must never mean anything but NXDOMAIN (except `_apps`, which always exists).

use crate::zone::View;
use std::collections::HashMap;

/// Longest wire name (RFC 1035 §2.3.4: 255 bytes, length octets and root included).
pub(crate) const MAX_NAME: usize = 255;
/// A view's key prefix: tag (0 = operator, 1 = org) + network ID.
const SCOPE: usize = 5;
/// `_apps` in wire form: the one name that exists in every view, even one with no apps.
const APPS: &[u8] = b"\x05_apps";

/// One AAAA address as it goes on the wire.
pub(crate) type Ip = [u8; 16];

/// What a name holds, ready to copy into an answer.
#[derive(Debug)]
pub(crate) enum Entry {
    /// AAAA addresses, non-empty.
    Aaaa(Box<[Ip]>),
    /// One TXT record's RDATA (its character-strings, length-prefixed), non-empty.
    Txt(Box<[u8]>),
    /// The name exists without data of any type (empty non-terminal, app with no started
    /// machine, empty TXT value).
    Empty,
    /// `nearest.of.<app>`: an empty non-terminal whose `topN` children are the first N
    /// addresses of the order for the asker's region.
    Nearest(Box<Orders>),
}

/// The `nearest` orders of one app in one view: same region first, then ID order.
#[derive(Debug)]
pub(crate) struct Orders {
    /// For an asker with no region, or one no started machine of the app is in (ID order).
    pub(crate) default: Box<[Ip]>,
    /// For an asker in each region that has a started machine of the app.
    pub(crate) by_region: Vec<(String, Box<[Ip]>)>,
}

/// The outcome of a prepared lookup (the zone check and the query type's own rules are the
/// caller's).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hit<'a> {
    Aaaa(&'a [Ip]),
    Txt(&'a [u8]),
    NoData,
    NxDomain,
}

/// All answerable names of one snapshot, keyed by view + lower-case wire name below the apex.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    names: HashMap<Box<[u8]>, Entry>,
}

/// The key of `view`'s name `wire` (lower-case labels below the apex, innermost first, as on
/// the wire, without the apex and root) in `buf`; `None` if it cannot be a name.
fn key<'b>(buf: &'b mut [u8; SCOPE + MAX_NAME], view: View, wire: &[u8]) -> Option<&'b [u8]> {
    if wire.len() > MAX_NAME {
        return None;
    }
    match view {
        View::Operator => buf[..SCOPE].copy_from_slice(&[0; SCOPE]),
        View::Org { network, .. } => {
            buf[0] = 1;
            buf[1..SCOPE].copy_from_slice(&network.to_be_bytes());
        }
    }
    buf[SCOPE..SCOPE + wire.len()].copy_from_slice(wire);
    Some(&buf[..SCOPE + wire.len()])
}

/// `top7` -> 7 (the same rule as the zone's: 1..=64, no leading zero).
fn top_n(label: &[u8]) -> Option<usize> {
    crate::zone::parse_top(label)
}

impl Prepared {
    /// Records `entry` for `view`'s name `labels` (outermost first, lower case).
    pub(crate) fn insert(&mut self, view: View, labels: &[&[u8]], entry: Entry) {
        // The key written straight into one buffer: this runs for every name at every publish.
        let mut buf = [0u8; SCOPE + MAX_NAME];
        let Some(scope) = key(&mut buf, view, &[]).map(<[u8]>::len) else {
            return;
        };
        let mut at = scope;
        for l in labels.iter().rev() {
            if at + 1 + l.len() > SCOPE + MAX_NAME {
                return;
            }
            buf[at] = l.len() as u8;
            buf[at + 1..at + 1 + l.len()].copy_from_slice(l);
            at += 1 + l.len();
        }
        self.names.insert(buf[..at].into(), entry);
    }

    /// An empty set with room for about `names` names (a publish knows roughly how many).
    pub(crate) fn with_capacity(names: usize) -> Prepared {
        Prepared {
            names: HashMap::with_capacity(names),
        }
    }

    /// Number of prepared names (all views).
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// Resolves `wire` (lower-case labels below the apex, innermost first; at least one) in
    /// `view` for query type `qtype`, an asker in region `here` (only asked for `topN` names).
    pub(crate) fn lookup<'a>(
        &'a self,
        view: View,
        wire: &[u8],
        qtype: u16,
        here: impl FnOnce() -> Option<&'a str>,
    ) -> Hit<'a> {
        const AAAA: u16 = 28;
        const TXT: u16 = 16;
        let mut buf = [0u8; SCOPE + MAX_NAME];
        let Some(k) = key(&mut buf, view, wire) else {
            return Hit::NxDomain;
        };
        match self.names.get(k) {
            Some(Entry::Aaaa(ips)) if qtype == AAAA => Hit::Aaaa(ips),
            Some(Entry::Txt(rdata)) if qtype == TXT => Hit::Txt(rdata),
            Some(_) => Hit::NoData,
            None if wire == APPS => Hit::NoData,
            None => {
                // `topN.nearest.of.<app>`: the first label picks N, its parent holds the orders.
                let Some(&first) = wire.first() else {
                    return Hit::NxDomain;
                };
                let first = usize::from(first);
                let Some(n) = wire.get(1..1 + first).and_then(top_n) else {
                    return Hit::NxDomain;
                };
                let Some(parent) = key(&mut buf, view, &wire[1 + first..]) else {
                    return Hit::NxDomain;
                };
                let Some(Entry::Nearest(orders)) = self.names.get(parent) else {
                    return Hit::NxDomain;
                };
                let order = match here() {
                    Some(region) => orders
                        .by_region
                        .iter()
                        .find(|(r, _)| r == region)
                        .map_or(&orders.default, |(_, ips)| ips),
                    None => &orders.default,
                };
                match &order[..n.min(order.len())] {
                    [] => Hit::NxDomain,
                    ips if qtype == AAAA => Hit::Aaaa(ips),
                    _ => Hit::NoData,
                }
            }
        }
    }
}
