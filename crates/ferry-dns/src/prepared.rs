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

/// A run of addresses or bytes in one of [`Prepared`]'s arenas. A publish stores every
/// name's data in two vectors instead of a box per name: it allocates (and later frees) a few
/// large blocks, not tens of thousands of small ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    start: u32,
    len: u32,
}

impl Span {
    pub(crate) fn is_empty(self) -> bool {
        self.len == 0
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// What a name holds, ready to copy into an answer.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    /// AAAA addresses (in [`Prepared`]'s address arena), non-empty.
    Aaaa(Span),
    /// One TXT record's RDATA (its character-strings, length-prefixed; in the byte arena),
    /// non-empty.
    Txt(Span),
    /// The name exists without data of any type (empty non-terminal, app with no started
    /// machine, empty TXT value).
    Empty,
    /// `nearest.of.<app>`: an empty non-terminal whose `topN` children are the first N
    /// addresses of the order for the asker's region.
    Nearest(Box<Orders>),
}

/// The `nearest` orders of one app in one view: same region first, then ID order.
#[derive(Debug, Clone)]
pub(crate) struct Orders {
    /// For an asker with no region, or one no started machine of the app is in (ID order).
    pub(crate) default: Span,
    /// For an asker in each region that has a started machine of the app.
    pub(crate) by_region: Vec<(String, Span)>,
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

/// Keys up to this long (view + name; most names of a fleet) live inline in the table.
const INLINE: usize = 46;

/// A view + wire name key, inline when short. Hashes and compares as its bytes, so the table
/// is looked up by a plain `&[u8]` built on the stack.
#[derive(Debug)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(b: &[u8]) -> Key {
        if b.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..b.len()].copy_from_slice(b);
            Key::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(b.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(b) => b,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Exactly `[u8]`'s hash, as `Borrow<[u8]>` requires.
        self.bytes().hash(state)
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

/// All answerable names of one snapshot, keyed by view + lower-case wire name below the apex.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    names: HashMap<Key, Entry>,
    /// Every AAAA answer's addresses, back to back.
    ips: Vec<Ip>,
    /// Every TXT answer's RDATA, back to back.
    txt: Vec<u8>,
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
        self.names.insert(Key::new(&buf[..at]), entry);
    }

    /// An empty set with room for about `names` names and `ips` addresses (a publish knows
    /// roughly how many).
    pub(crate) fn with_capacity(names: usize, ips: usize) -> Prepared {
        Prepared {
            names: HashMap::with_capacity(names),
            ips: Vec::with_capacity(ips),
            txt: Vec::new(),
        }
    }

    /// Stores addresses; their span (empty if there are none).
    pub(crate) fn add_ips(&mut self, ips: impl IntoIterator<Item = Ip>) -> Span {
        let start = self.ips.len();
        self.ips.extend(ips);
        span(start, self.ips.len())
    }

    /// Stores a TXT value as RDATA: character-strings of at most `chunk` bytes, each
    /// length-prefixed; its span (empty for an empty value).
    pub(crate) fn add_txt(&mut self, value: &str, chunk: usize) -> Span {
        let start = self.txt.len();
        for c in value.as_bytes().chunks(chunk) {
            self.txt.push(c.len() as u8);
            self.txt.extend_from_slice(c);
        }
        span(start, self.txt.len())
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
            Some(Entry::Aaaa(ips)) if qtype == AAAA => Hit::Aaaa(&self.ips[ips.range()]),
            Some(Entry::Txt(rdata)) if qtype == TXT => Hit::Txt(&self.txt[rdata.range()]),
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
                        .map_or(orders.default, |&(_, ips)| ips),
                    None => orders.default,
                };
                let order = &self.ips[order.range()];
                match &order[..n.min(order.len())] {
                    [] => Hit::NxDomain,
                    ips if qtype == AAAA => Hit::Aaaa(ips),
                    _ => Hit::NoData,
                }
            }
        }
    }
}

/// The span `start..end` of an arena (a snapshot's arenas stay far below 4 G entries: a UDP
/// answer holds at most 44 addresses, a stream one 2,340, and names are bounded by machines).
fn span(start: usize, end: usize) -> Span {
    Span {
        start: start as u32,
        len: (end - start) as u32,
    }
}
