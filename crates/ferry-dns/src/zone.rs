//! The zone's data: what the server publishes ([`Snapshot`]), how it is indexed for lookups
//! ([`ZoneData`]), and the pure name -> records resolution for one view ([`ZoneData::lookup`]).
//!
//! Everything here is pure and synchronous: no sockets, no store, no namespaces. A snapshot is
//! indexed once when published and swapped in atomically, so a query sees either the old or the
//! new snapshot, never a mix, and the next query after [`ZoneData::publish`] returns sees the new
//! one (no cache, no TTL inside the server).
//!
//! It must never answer a name of an org that the view cannot see: such names resolve exactly
//! like names that do not exist ([`Lookup::NxDomain`]).

use crate::prepared::{Entry, Hit, Orders, Prepared, Span};
use crate::DnsError;
use arc_swap::ArcSwap;
use ferry_addr::FleetAddr;
use hickory_proto::rr::rdata::{AAAA, HINFO, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// TTL of every record and of negative answers (SOA minimum): short, because machines move.
pub const TTL: u32 = 5;
/// The zone apex.
pub const ZONE: &str = "internal.";
/// Largest `N` in `topN.nearest.of.<app>.internal`.
pub const MAX_TOP_N: usize = 64;
/// The SOA's primary server and mailbox (labels below the apex) and its refresh, retry and
/// expire timers: they matter only to secondaries (there are none). Its minimum is [`TTL`].
pub(crate) const SOA_MNAME: &str = "ns";
pub(crate) const SOA_RNAME: &str = "hostmaster";
pub(crate) const SOA_TIMERS: [i32; 3] = [3600, 600, 86400];
/// A DNS character-string holds at most 255 bytes; longer TXT values are split into several
/// strings of one record, which clients concatenate.
const TXT_CHUNK: usize = 255;

/// One machine as DNS sees it. Built by the server from its store on every state change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsMachine {
    /// 14 lowercase hex chars.
    pub id: String,
    pub app: String,
    pub org: String,
    /// The org's network ID; the view of a guest-form source address is its network field.
    pub network_id: u32,
    pub region: String,
    pub private_ip: Ipv6Addr,
    /// Process group (`"app"` unless the config names another).
    pub process_group: String,
    /// Only started machines are answered; the others still make their app's name exist.
    pub started: bool,
}

/// Everything the zone serves, published as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub machines: Vec<DnsMachine>,
}

/// Which names a query may see, chosen by its source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Loopback: operators see every org. No region of its own (`nearest` = ID order).
    Operator,
    /// A machine of network `network`, on host `host` (used to find its region for `nearest`).
    Org { network: u32, host: u32 },
}

impl View {
    /// The view of a source address, or `None` when the source may not ask at all (REFUSED).
    pub fn of(src: IpAddr) -> Option<View> {
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; judge them as IPv4.
        match src.to_canonical() {
            IpAddr::V4(v4) if v4.is_loopback() => Some(View::Operator),
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) if v6 == Ipv6Addr::LOCALHOST => Some(View::Operator),
            IpAddr::V6(v6) => FleetAddr::from_ipv6(v6).ok().map(|a| View::Org {
                network: a.network().get(),
                host: a.host().get(),
            }),
        }
    }

    fn sees(self, network: u32) -> bool {
        match self {
            View::Operator => true,
            View::Org { network: n, .. } => n == network,
        }
    }
}

/// The result of resolving one question in one view.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The name exists and has records of the asked type.
    Answer(Vec<Record>),
    /// The name exists (or is an empty non-terminal) but has no records of that type.
    NoData,
    /// The name does not exist in this view.
    NxDomain,
    /// Not our zone (or not class IN): we are authoritative for `internal.` only.
    Refused,
}

#[derive(Debug)]
struct Mach {
    id: String,
    region: String,
    group: String,
    ip: Ipv6Addr,
}

#[derive(Debug)]
struct App {
    network: u32,
    /// Started machines only, sorted by ID (answers are deterministic).
    started: Vec<Mach>,
}

/// A published snapshot, indexed for lookups.
#[derive(Debug)]
pub(crate) struct Index {
    serial: u32,
    /// App name -> one entry per network that has an app of that name (normally one).
    apps: HashMap<String, Vec<App>>,
    /// Network -> its app names, sorted (for `_apps.internal`).
    apps_by_network: BTreeMap<u32, BTreeSet<String>>,
    /// Host ID -> region, learned from any machine placed there (for `nearest`).
    host_region: HashMap<u32, String>,
    soa: Record,
    /// Every answerable name per view in wire form, for the fast path.
    prepared: Prepared,
}

/// The live zone: an atomically swapped, indexed [`Snapshot`]. Shared by all server tasks.
#[derive(Debug)]
pub struct ZoneData {
    current: ArcSwap<Index>,
    serial: AtomicU32,
    apex: Name,
    /// Responses sent, by RCODE (the low four bits of the header's fourth byte).
    answered: [std::sync::atomic::AtomicU64; 16],
}

impl Default for ZoneData {
    fn default() -> Self {
        Self::new()
    }
}

fn is_label(s: &str) -> bool {
    // Names must be usable as one DNS label and must not collide with the fixed labels' syntax
    // (a dot would make `a.b` look like two labels).
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate(m: &DnsMachine) -> Result<(), DnsError> {
    let bad = |field: &'static str, value: &str| DnsError::InvalidMachine {
        id: m.id.clone(),
        field,
        value: value.to_owned(),
    };
    if m.id.len() != 14 || !m.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("id", &m.id));
    }
    for (field, value) in [
        ("app", &m.app),
        ("region", &m.region),
        ("process_group", &m.process_group),
    ] {
        if !is_label(value) {
            return Err(bad(field, value));
        }
    }
    Ok(())
}

impl ZoneData {
    /// An empty zone (every name NXDOMAIN except the apex) until the first [`publish`](Self::publish).
    pub fn new() -> Self {
        let apex = Name::from_ascii(ZONE).expect("static zone name");
        let index = Index::build(&Snapshot::default(), 0, &apex, &mut Vec::new());
        ZoneData {
            current: ArcSwap::from_pointee(index),
            serial: AtomicU32::new(0),
            apex,
            answered: Default::default(),
        }
    }

    /// Counts one response by its RCODE (what `answered` reports).
    pub(crate) fn count_response(&self, response: &[u8]) {
        if let Some(b) = response.get(3) {
            self.answered[usize::from(b & 0x0f)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Responses sent so far by RCODE (index = RCODE: 0 NOERROR, 3 NXDOMAIN, 5 REFUSED, ...),
    /// every server of this zone together.
    /// The name of an RCODE as [`ZoneData::answered`] indexes them (`NOERROR`, `NXDOMAIN`, ...).
    pub fn rcode_name(code: usize) -> String {
        match code {
            0 => "NOERROR".to_owned(),
            1 => "FORMERR".to_owned(),
            2 => "SERVFAIL".to_owned(),
            3 => "NXDOMAIN".to_owned(),
            4 => "NOTIMP".to_owned(),
            5 => "REFUSED".to_owned(),
            c => format!("RCODE{c}"),
        }
    }

    pub fn answered(&self) -> [u64; 16] {
        std::array::from_fn(|i| self.answered[i].load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Replaces the whole zone atomically; the next query sees it. Machines with fields that
    /// cannot be DNS labels are left out (one bad record must not blank the zone) and returned.
    pub fn publish(&self, snapshot: Snapshot) -> Vec<DnsError> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let mut skipped = Vec::new();
        let index = Index::build(&snapshot, serial, &self.apex, &mut skipped);
        self.current.store(Arc::new(index));
        skipped
    }

    /// The current snapshot's index (the fast path reads it without copying).
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Index>> {
        self.current.load()
    }

    /// Number of names prepared for the fast path, over all views (for tests and logs).
    pub fn prepared_names(&self) -> usize {
        self.current.load().prepared.len()
    }

    /// The SOA serial of the current snapshot (bumps on every publish).
    pub fn serial(&self) -> u32 {
        self.current.load().serial
    }

    /// The SOA record (for the authority section of negative answers).
    pub fn soa(&self) -> Record {
        self.current.load().soa.clone()
    }

    /// Resolves one question. `name` is compared case-insensitively; records are owned by
    /// its lower-case form.
    pub fn lookup(&self, name: &Name, qtype: RecordType, view: View) -> Lookup {
        let index = self.current.load();
        index.lookup(&self.apex, &name.to_lowercase(), qtype, view)
    }

    /// [`lookup`](Self::lookup) for an already lower-case name (hickory's parsed queries), plus
    /// the SOA of the same snapshot (negative answers carry it).
    pub(crate) fn lookup_with_soa(
        &self,
        name: &Name,
        qtype: RecordType,
        view: View,
    ) -> (Lookup, Record) {
        let index = self.current.load();
        (
            index.lookup(&self.apex, name, qtype, view),
            index.soa.clone(),
        )
    }
}

/// What a name denotes, before the query type is considered.
enum Node {
    Apex,
    /// AAAA name; `always` = the name exists even with no started machine (the app itself).
    Aaaa {
        ips: Vec<Ipv6Addr>,
        always: bool,
    },
    /// TXT name with its value (empty value = exists without data).
    Txt(String),
    /// Empty non-terminal such as `vm.<app>.internal`.
    Ent,
    Missing,
}

impl Index {
    /// The SOA serial of this snapshot.
    pub(crate) fn serial(&self) -> u32 {
        self.serial
    }

    /// The fast path's lookup: see [`Prepared::lookup`].
    pub(crate) fn prepared(&self, view: View, wire: &[u8], qtype: u16) -> Hit<'_> {
        self.prepared
            .lookup(view, wire, qtype, || self.region_of(view))
    }

    fn build(snapshot: &Snapshot, serial: u32, apex: &Name, skipped: &mut Vec<DnsError>) -> Index {
        let mut apps: HashMap<String, Vec<App>> = HashMap::new();
        let mut apps_by_network: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        let mut host_region = HashMap::new();
        for m in &snapshot.machines {
            if let Err(e) = validate(m) {
                skipped.push(e);
                continue;
            }
            let app_name = m.app.to_ascii_lowercase();
            if let Ok(a) = FleetAddr::from_ipv6(m.private_ip) {
                host_region.insert(a.host().get(), m.region.to_ascii_lowercase());
            }
            apps_by_network
                .entry(m.network_id)
                .or_default()
                .insert(app_name.clone());
            let entries = apps.entry(app_name).or_default();
            let pos = match entries.iter().position(|a| a.network == m.network_id) {
                Some(p) => p,
                None => {
                    entries.push(App {
                        network: m.network_id,
                        started: Vec::new(),
                    });
                    entries.len() - 1
                }
            };
            if m.started {
                entries[pos].started.push(Mach {
                    id: m.id.to_ascii_lowercase(),
                    region: m.region.to_ascii_lowercase(),
                    group: m.process_group.to_ascii_lowercase(),
                    ip: m.private_ip,
                });
            }
        }
        for list in apps.values_mut() {
            for app in list.iter_mut() {
                app.started.sort_by(|a, b| a.id.cmp(&b.id));
            }
        }
        let mname = Name::from_ascii(SOA_MNAME)
            .and_then(|n| n.append_domain(apex))
            .expect("static name");
        let rname = Name::from_ascii(SOA_RNAME)
            .and_then(|n| n.append_domain(apex))
            .expect("static name");
        // minimum is the negative-caching TTL (RFC 2308), which must be as short as positive
        // answers.
        let [refresh, retry, expire] = SOA_TIMERS;
        let soa = Record::from_rdata(
            apex.clone(),
            TTL,
            RData::SOA(SOA::new(mname, rname, serial, refresh, retry, expire, TTL)),
        );
        let mut index = Index {
            serial,
            apps,
            apps_by_network,
            host_region,
            soa,
            prepared: Prepared::default(),
        };
        index.prepared = index.prepare();
        index
    }

    /// Prepares every name that exists in some view for the fast path. The entries are built
    /// with the same helpers as [`Index::node`] and in the same precedence, and
    /// `tests/fast_path.rs` compares both paths' bytes over whole snapshots; a name left out
    /// here is NXDOMAIN in the fast path, exactly the names `node` calls missing: apps the view
    /// does not see, and shapes or labels that match no started machine.
    fn prepare(&self) -> Prepared {
        // Per started machine: its vm, region and group names, in its org's view and the
        // operator's; per app about ten fixed names, in both views.
        let machines: usize = self.apps.values().flatten().map(|a| a.started.len()).sum();
        let apps: usize = self.apps_by_network.values().map(BTreeSet::len).sum();
        // Addresses: per machine its app, global, vm, region and group names and the nearest
        // orders (about one per region), in both views.
        let mut out = Prepared::with_capacity(2 * (3 * machines + 12 * apps), 2 * 10 * machines);
        let mut views = vec![View::Operator];
        // The host is irrelevant outside `nearest`, whose orders are kept per region.
        views.extend(
            self.apps_by_network
                .keys()
                .map(|&network| View::Org { network, host: 0 }),
        );
        for view in views {
            let names: Vec<&String> = match view {
                View::Operator => self.apps.keys().collect(),
                View::Org { network, .. } => self.apps_by_network[&network].iter().collect(),
            };
            for app in names {
                let visible = self.visible(app.as_bytes(), view);
                let machines: Vec<&Mach> = visible.iter().flat_map(|a| a.started.iter()).collect();
                prepare_app(&mut out, view, app.as_bytes(), &machines);
            }
            // After the apps: `_apps.internal` is the list even if an app is called `_apps`.
            let entry = txt_entry(&mut out, &self.apps_txt(view));
            out.insert(view, &[b"_apps"], entry);
        }
        out
    }

    fn lookup(&self, apex: &Name, name: &Name, qtype: RecordType, view: View) -> Lookup {
        if !apex.zone_of(name) {
            return Lookup::Refused;
        }
        // Labels below the apex, outermost first: `a.b.web.internal.` -> [web, b, a]. A name
        // has at most 127 labels (255 bytes), so this is bounded.
        let below = (name.num_labels() as usize).saturating_sub(1);
        let mut labels: Vec<&[u8]> = name.iter().take(below).collect();
        labels.reverse();
        let node = self.node(&labels, view, self.region_of(view));
        let records: Vec<Record> = match (node, qtype) {
            (Node::Missing, _) => return Lookup::NxDomain,
            (Node::Aaaa { ips, always }, _) if ips.is_empty() && !always => {
                return Lookup::NxDomain
            }
            (Node::Apex, RecordType::SOA) => vec![self.soa.clone()],
            // RFC 8482 §4.2: answer ANY with one synthesized HINFO instead of every RRset (no
            // amplification, no leak beyond "the name exists", which NOERROR already says).
            (_, RecordType::ANY) => vec![Record::from_rdata(
                name.clone(),
                TTL,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            )],
            (Node::Aaaa { ips, .. }, RecordType::AAAA) => ips
                .into_iter()
                .map(|ip| Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(ip))))
                .collect(),
            (Node::Txt(value), RecordType::TXT) if !value.is_empty() => {
                vec![Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::TXT(TXT::new(chunk_txt(&value))),
                )]
            }
            _ => Vec::new(),
        };
        if records.is_empty() {
            Lookup::NoData
        } else {
            Lookup::Answer(records)
        }
    }

    /// The visible apps named `app` (one per network in the operator view).
    fn visible<'s>(&'s self, app: &[u8], view: View) -> Vec<&'s App> {
        let Ok(app) = std::str::from_utf8(app) else {
            return Vec::new();
        };
        match self.apps.get(app) {
            Some(list) => list.iter().filter(|a| view.sees(a.network)).collect(),
            None => Vec::new(),
        }
    }

    /// The asker's region (for `nearest`): its host's, if any machine was placed there.
    fn region_of(&self, view: View) -> Option<&str> {
        match view {
            View::Org { host, .. } => self.host_region.get(&host).map(String::as_str),
            View::Operator => None,
        }
    }

    /// `_apps.internal`: the app names `view` sees, sorted, comma-separated.
    fn apps_txt(&self, view: View) -> String {
        let names: Vec<&str> = match view {
            View::Operator => {
                let all: BTreeSet<&str> = self
                    .apps_by_network
                    .values()
                    .flatten()
                    .map(String::as_str)
                    .collect();
                all.into_iter().collect()
            }
            View::Org { network, .. } => self
                .apps_by_network
                .get(&network)
                .map(|s| s.iter().map(String::as_str).collect())
                .unwrap_or_default(),
        };
        names.join(",")
    }

    /// What the name with lower-case labels `l` (below the apex, outermost first) denotes in
    /// `view`, for an asker in region `here`.
    fn node(&self, l: &[&[u8]], view: View, here: Option<&str>) -> Node {
        let missing = Node::Missing;
        if l.is_empty() {
            return Node::Apex;
        }
        if l.len() == 1 && l[0] == b"_apps" {
            return Node::Txt(self.apps_txt(view));
        }
        let apps = self.visible(l[0], view);
        if apps.is_empty() {
            return missing;
        }
        let machines = || apps.iter().flat_map(|a| a.started.iter());
        let ips = |f: &dyn Fn(&Mach) -> bool| -> Vec<Ipv6Addr> {
            machines().filter(|m| f(m)).map(|m| m.ip).collect()
        };
        match l {
            [_] | [_, b"global"] => Node::Aaaa {
                ips: ips(&|_| true),
                always: true,
            },
            [_, b"vms"] => Node::Txt(vms_txt(machines())),
            [_, b"regions"] => Node::Txt(regions_txt(machines())),
            [_, b"vm"] | [_, b"process"] | [_, b"of"] | [_, b"of", b"nearest"] => Node::Ent,
            [_, region] => Node::Aaaa {
                ips: ips(&|m| m.region.as_bytes() == *region),
                always: false,
            },
            [_, b"vm", id] => Node::Aaaa {
                ips: ips(&|m| m.id.as_bytes() == *id),
                always: false,
            },
            [_, b"process", group] => Node::Aaaa {
                ips: ips(&|m| m.group.as_bytes() == *group),
                always: false,
            },
            [_, b"of", b"nearest", top] => {
                let Some(n) = parse_top(top) else {
                    return missing;
                };
                Node::Aaaa {
                    ips: nearest(machines(), here)
                        .into_iter()
                        .take(n)
                        .map(|m| m.ip)
                        .collect(),
                    always: false,
                }
            }
            _ => missing,
        }
    }
}

/// `vms.<app>`: `id region` per started machine, comma-separated.
fn vms_txt<'m>(machines: impl Iterator<Item = &'m Mach>) -> String {
    machines
        .map(|m| format!("{} {}", m.id, m.region))
        .collect::<Vec<_>>()
        .join(",")
}

/// `regions.<app>`: the started machines' regions, sorted, comma-separated.
fn regions_txt<'m>(machines: impl Iterator<Item = &'m Mach>) -> String {
    let set: BTreeSet<&str> = machines.map(|m| m.region.as_str()).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

/// `nearest` order for an asker in region `here`: same region first, then the rest; ID order
/// within each part (a stable sort) so the answer is the same between queries.
fn nearest<'m>(machines: impl Iterator<Item = &'m Mach>, here: Option<&str>) -> Vec<&'m Mach> {
    let mut all: Vec<&Mach> = machines.collect();
    all.sort_by(|a, b| {
        let ka = (Some(a.region.as_str()) != here, &a.id);
        let kb = (Some(b.region.as_str()) != here, &b.id);
        ka.cmp(&kb)
    });
    all
}

/// Prepares the names of `app` in `view`, whose started machines (in `Index::node`'s order)
/// are `machines`. Mirrors `node`'s shapes and their precedence.
fn prepare_app(out: &mut Prepared, view: View, app: &[u8], machines: &[&Mach]) {
    let ms = || machines.iter().copied();
    // Regions and groups are few per app; IDs are one per machine, so they are grouped by a
    // stable sort (an ID can repeat only across orgs, in the operator's view, and then keeps
    // `node`'s order).
    let mut regions: BTreeSet<&str> = BTreeSet::new();
    let mut groups: BTreeSet<&str> = BTreeSet::new();
    for m in machines {
        regions.insert(&m.region);
        groups.insert(&m.group);
    }
    let mut by_id: Vec<&Mach> = machines.to_vec();
    by_id.sort_by(|a, b| a.id.cmp(&b.id));
    // `<region>.<app>` is the last two-label shape `node` tries: a region spelled like one of
    // the fixed labels below is shadowed by it, so regions go in first and are overwritten.
    for &region in &regions {
        let ips = ms().filter(|m| m.region == region).map(|m| m.ip.octets());
        let entry = aaaa_entry(out.add_ips(ips));
        out.insert(view, &[app, region.as_bytes()], entry);
    }
    let all = aaaa_entry(out.add_ips(ms().map(|m| m.ip.octets())));
    out.insert(view, &[app], all.clone());
    out.insert(view, &[app, b"global"], all);
    let vms = txt_entry(out, &vms_txt(ms()));
    out.insert(view, &[app, b"vms"], vms);
    let regions_txt = txt_entry(out, &regions_txt(ms()));
    out.insert(view, &[app, b"regions"], regions_txt);
    for ent in [&b"vm"[..], b"process", b"of"] {
        out.insert(view, &[app, ent], Entry::Empty);
    }
    for same_id in by_id.chunk_by(|a, b| a.id == b.id) {
        let entry = aaaa_entry(out.add_ips(same_id.iter().map(|m| m.ip.octets())));
        out.insert(view, &[app, b"vm", same_id[0].id.as_bytes()], entry);
    }
    for group in groups {
        let ips = ms().filter(|m| m.group == group).map(|m| m.ip.octets());
        let entry = aaaa_entry(out.add_ips(ips));
        out.insert(view, &[app, b"process", group.as_bytes()], entry);
    }
    // The longest `topN` is a prefix of every shorter one: keep that, per asker region.
    let mut top = |here: Option<&str>| {
        let order = nearest(ms(), here);
        out.add_ips(order.iter().take(MAX_TOP_N).map(|m| m.ip.octets()))
    };
    let orders = Orders {
        default: top(None),
        by_region: regions
            .iter()
            .map(|&r| (r.to_owned(), top(Some(r))))
            .collect(),
    };
    out.insert(
        view,
        &[app, b"of", b"nearest"],
        Entry::Nearest(Box::new(orders)),
    );
}

/// An AAAA name's entry: its addresses, or none (it exists empty: only the app's own names).
fn aaaa_entry(ips: Span) -> Entry {
    if ips.is_empty() {
        Entry::Empty
    } else {
        Entry::Aaaa(ips)
    }
}

/// A TXT name's entry, its RDATA encoded as the full path does ([`chunk_txt`]'s strings).
fn txt_entry(out: &mut Prepared, value: &str) -> Entry {
    let rdata = out.add_txt(value, TXT_CHUNK);
    if rdata.is_empty() {
        Entry::Empty
    } else {
        Entry::Txt(rdata)
    }
}

/// `top7` -> 7; only 1..=64 without leading zeros (so each N has exactly one name).
pub(crate) fn parse_top(label: &[u8]) -> Option<usize> {
    let digits = label.strip_prefix(b"top")?;
    if digits.is_empty() || digits.len() > 2 || digits[0] == b'0' {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse::<usize>().ok()?;
    (1..=MAX_TOP_N).contains(&n).then_some(n)
}

/// Splits a TXT value into character-strings of at most 255 bytes (values are ASCII).
fn chunk_txt(value: &str) -> Vec<String> {
    value
        .as_bytes()
        .chunks(TXT_CHUNK)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_labels() {
        assert_eq!(parse_top(b"top1"), Some(1));
        assert_eq!(parse_top(b"top64"), Some(64));
        for bad in [&b"top0"[..], b"top65", b"top01", b"top", b"top-1", b"tops"] {
            assert_eq!(parse_top(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn txt_chunks_are_at_most_255_bytes() {
        let v = "x".repeat(600);
        let c = chunk_txt(&v);
        assert_eq!(
            c.iter().map(String::len).collect::<Vec<_>>(),
            [255, 255, 90]
        );
    }

    #[test]
    fn views() {
        assert_eq!(View::of("127.0.0.7".parse().unwrap()), Some(View::Operator));
        assert_eq!(View::of("::1".parse().unwrap()), Some(View::Operator));
        assert_eq!(
            View::of("::ffff:127.0.0.1".parse().unwrap()),
            Some(View::Operator)
        );
        assert_eq!(View::of("10.0.0.1".parse().unwrap()), None);
        assert_eq!(View::of("fdaa::3".parse().unwrap()), None);
        assert_eq!(
            View::of("fdaa:0:1:8000:0:0:1:2".parse().unwrap()),
            Some(View::Org {
                network: 1,
                host: 0x8000_0000
            })
        );
    }
}
