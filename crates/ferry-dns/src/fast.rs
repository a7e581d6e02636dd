//! The fast path of [`DnsServer::answer`](crate::DnsServer::answer): the common query shape
//! (one question, class IN, plain labels, no EDNS or a bare OPT) parsed in place and answered
//! from the snapshot's [prepared](crate::prepared) names into the caller's buffer, with no
//! allocation. Anything else (ANY, zone transfers, the apex, compression in the question, EDNS
//! options or versions, answers that would not fit) is declined and goes through the full
//! path, hickory's parse and encode.
//!
//! Its output must be byte for byte what the full path sends for the same packet: the header
//! echoes RD and CD and nothing else, the question is copied verbatim (the asker's case), and
//! records follow hickory's name compression (the question is not a compression target, so the
//! first owner name is written out in lower case and later ones point at it; the SOA's names
//! point at its owner). `tests/fast_path.rs` and the fuzz target hold it to that.
//!
//! It must never answer a packet the full path would treat differently; when in doubt it
//! declines.

use crate::prepared::{Hit, MAX_NAME};
use crate::server::{STREAM, UDP_PAYLOAD};
use crate::zone::{View, ZoneData, SOA_MNAME, SOA_RNAME, SOA_TIMERS, TTL};
use std::net::IpAddr;

const HEADER: usize = 12;
const TYPE_AAAA: u16 = 28;
const TYPE_TXT: u16 = 16;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Question types the full path treats specially (IXFR, AXFR, ANY, OPT).
const SPECIAL: [u16; 4] = [251, 252, 255, TYPE_OPT];
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;
/// The apex's label, `internal`, in wire form.
const APEX_LABEL: &[u8] = b"\x08internal";
/// Our OPT record: root owner, type 41, our UDP size, extended rcode 0, version 0, no flags,
/// no options.
const OPT_RR: [u8; 11] = [
    0,
    0,
    TYPE_OPT as u8,
    (UDP_PAYLOAD >> 8) as u8,
    UDP_PAYLOAD as u8,
    0,
    0,
    0,
    0,
    0,
    0,
];
/// Size of the negative answers' SOA record: owner `internal.`, fixed fields, RDATA (two labels
/// each followed by a pointer to the owner, five 32-bit numbers).
const SOA_RR: usize =
    APEX_LABEL.len() + 1 + RR_FIXED + (1 + SOA_MNAME.len() + 2) + (1 + SOA_RNAME.len() + 2) + 20;
/// Fixed part of a resource record after its owner: type, class, TTL, RDATA length.
const RR_FIXED: usize = 10;

/// A query in the shape the fast path answers, borrowed from the packet.
struct Query<'r> {
    packet: &'r [u8],
    /// The question section (name, type, class), echoed verbatim.
    question: &'r [u8],
    /// Length of the question's wire name (root included).
    name_len: usize,
    /// Offset within the name of its last label (the apex's if the name is in the zone).
    last_label: usize,
    qtype: u16,
    /// The client's UDP size: 512 without EDNS.
    client_max: usize,
    edns: bool,
}

impl<'r> Query<'r> {
    /// The query, if `packet` has the one shape the fast path handles.
    fn parse(packet: &'r [u8]) -> Option<Query<'r>> {
        let h = packet.get(..HEADER)?;
        // A response (never answered) or an opcode other than QUERY.
        if h[2] & 0xf8 != 0 {
            return None;
        }
        let count = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
            return None;
        }
        let mut at = HEADER;
        let mut last_label = 0;
        loop {
            let len = usize::from(*packet.get(at)?);
            if len == 0 {
                at += 1;
                break;
            }
            // Compression pointers and the reserved label types go to the full path, and so
            // do labels with bytes no ferry name has (their case rules and escapes are
            // hickory's business).
            if len > 63 {
                return None;
            }
            let label = packet.get(at + 1..at + 1 + len)?;
            if !label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return None;
            }
            last_label = at - HEADER;
            at += 1 + len;
            if at - HEADER >= MAX_NAME {
                return None;
            }
        }
        let name_len = at - HEADER;
        let fixed = packet.get(at..at + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
        if qclass != CLASS_IN || SPECIAL.contains(&qtype) {
            return None;
        }
        let question = &packet[HEADER..at + 4];
        let rest = &packet[at + 4..];
        let (edns, client_max) = match count(10) {
            0 if rest.is_empty() => (false, 512),
            // A bare OPT: root owner, type OPT, version 0, no options. Its extended rcode and
            // flags do not change the answer (we never set DO), its size does.
            1 if rest.len() == OPT_RR.len()
                && rest[..3] == [0, 0, TYPE_OPT as u8]
                && rest[6] == 0
                && rest[9..] == [0, 0] =>
            {
                let size = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                (true, size.max(512))
            }
            _ => return None,
        };
        Some(Query {
            packet,
            question,
            name_len,
            last_label,
            qtype,
            client_max,
            edns,
        })
    }

    fn name(&self) -> &'r [u8] {
        &self.question[..self.name_len]
    }
}

/// Answers `packet` from `src` into `out` (cleared first) if it has the fast path's shape, as
/// [`DnsServer::answer_full`](crate::DnsServer::answer_full) would; returns false (with `out`
/// empty) to send it down the full path.
pub(crate) fn answer(
    zone: &ZoneData,
    packet: &[u8],
    src: IpAddr,
    max_udp: usize,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    let Some(q) = Query::parse(packet) else {
        return false;
    };
    let limit = if max_udp == STREAM {
        usize::from(u16::MAX)
    } else {
        q.client_max.min(max_udp.clamp(512, usize::from(u16::MAX)))
    };
    let Some(view) = View::of(src) else {
        return refused(&q, limit, out);
    };
    let name = q.name();
    let last = &name[q.last_label..name.len() - 1];
    if !last.eq_ignore_ascii_case(APEX_LABEL) {
        return refused(&q, limit, out);
    }
    if q.last_label == 0 {
        // The apex itself (SOA, NS-less NODATA): rare, left to the full path.
        return false;
    }
    let mut lower = [0u8; MAX_NAME];
    let below = &mut lower[..q.last_label];
    // Length octets are below 64, so lower-casing the whole wire form touches only letters.
    below.copy_from_slice(&name[..q.last_label]);
    below.make_ascii_lowercase();

    let index = zone.load();
    let hit = index.prepared(view, below, q.qtype);
    let owner_at = HEADER + q.question.len();
    let records_len = |rdata_len: usize, n: usize| {
        // The first record's owner is the name in full, the others a 2-byte pointer to it.
        q.name_len + RR_FIXED + rdata_len + (n - 1) * (2 + RR_FIXED + rdata_len)
    };
    let (rcode, answers, body_len) = match hit {
        Hit::Aaaa(ips) => (0, ips.len(), records_len(16, ips.len())),
        Hit::Txt(rdata) => (0, 1, records_len(rdata.len(), 1)),
        Hit::NoData => (0, 0, SOA_RR),
        Hit::NxDomain => (RCODE_NXDOMAIN, 0, SOA_RR),
    };
    let total = owner_at + body_len + if q.edns { OPT_RR.len() } else { 0 };
    if total > limit {
        // Truncation (TC, fewer records) is the full path's job.
        return false;
    }
    out.reserve(total);
    header(&q, out, true, rcode, answers, usize::from(answers == 0));
    out.extend_from_slice(q.question);
    match hit {
        Hit::Aaaa(ips) => {
            for (i, ip) in ips.iter().enumerate() {
                owner(out, name, i, owner_at);
                rr_fixed(out, TYPE_AAAA, 16);
                out.extend_from_slice(ip);
            }
        }
        Hit::Txt(rdata) => {
            owner(out, name, 0, owner_at);
            rr_fixed(out, TYPE_TXT, rdata.len());
            out.extend_from_slice(rdata);
        }
        Hit::NoData | Hit::NxDomain => soa(out, owner_at, index.serial()),
    }
    if q.edns {
        out.extend_from_slice(&OPT_RR);
    }
    debug_assert_eq!(out.len(), total);
    true
}

/// REFUSED (not authoritative, no records): outside the zone, or a source no view admits.
fn refused(q: &Query<'_>, limit: usize, out: &mut Vec<u8>) -> bool {
    let total = HEADER + q.question.len() + if q.edns { OPT_RR.len() } else { 0 };
    if total > limit {
        return false;
    }
    header(q, out, false, RCODE_REFUSED, 0, 0);
    out.extend_from_slice(q.question);
    if q.edns {
        out.extend_from_slice(&OPT_RR);
    }
    true
}

/// The response header: the query's ID, RD and CD echoed, QR set, AA as given.
fn header(q: &Query<'_>, out: &mut Vec<u8>, aa: bool, rcode: u8, an: usize, ns: usize) {
    let p = q.packet;
    let flags = 0x80 | if aa { 0x04 } else { 0 } | (p[2] & 0x01);
    out.extend_from_slice(&[p[0], p[1], flags, (p[3] & 0x10) | rcode, 0, 1]);
    // At most 1232 / 28 answers over UDP, 65535 / 28 over a stream: fits in u16.
    out.extend_from_slice(&(an as u16).to_be_bytes());
    out.extend_from_slice(&(ns as u16).to_be_bytes());
    out.extend_from_slice(&u16::from(q.edns).to_be_bytes());
}

/// Record `i`'s owner: the asked name in lower case for the first, then a pointer to it.
fn owner(out: &mut Vec<u8>, name: &[u8], i: usize, owner_at: usize) {
    if i == 0 {
        let start = out.len();
        out.extend_from_slice(name);
        out[start..].make_ascii_lowercase();
    } else {
        out.extend_from_slice(&pointer(owner_at));
    }
}

fn pointer(at: usize) -> [u8; 2] {
    // `at` is right after the question: below 12 + 259, far below the 14-bit limit.
    (0xc000 | at as u16).to_be_bytes()
}

fn rr_fixed(out: &mut Vec<u8>, rtype: u16, rdata_len: usize) {
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&TTL.to_be_bytes());
    out.extend_from_slice(&(rdata_len as u16).to_be_bytes());
}

/// The zone's SOA (as `Index::build` makes it) at `at`, its names compressed against its owner.
fn soa(out: &mut Vec<u8>, at: usize, serial: u32) {
    out.extend_from_slice(APEX_LABEL);
    out.push(0);
    rr_fixed(out, TYPE_SOA, SOA_RR - APEX_LABEL.len() - 1 - RR_FIXED);
    for label in [SOA_MNAME, SOA_RNAME] {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(&pointer(at));
    }
    out.extend_from_slice(&serial.to_be_bytes());
    for v in SOA_TIMERS {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&TTL.to_be_bytes());
}
