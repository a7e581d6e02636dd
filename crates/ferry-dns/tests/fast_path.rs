//! The fast path (answers from the names prepared at publish time) against the full path
//! (hickory's parse and encode): wherever the fast path answers, its bytes must be the full
//! path's, for every name of the fixture snapshot and then some (missing names, other orgs'
//! names, wrong types, case variations, EDNS sizes, header flags, mangled packets), so the
//! prepared names cannot drift from the zone's rules. Pure; no sockets.

mod common;

use common::*;
use ferry_dns::{DnsServer, Snapshot, ZoneData, STREAM, UDP_PAYLOAD};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use std::net::IpAddr;
use std::sync::Arc;

/// Compares both paths on one packet; returns whether the fast path answered.
fn same(s: &DnsServer, packet: &[u8], src: IpAddr, max: usize) -> bool {
    let full = s.answer_full(packet, src, max);
    match s.answer_fast(packet, src, max) {
        Some(fast) => {
            assert_eq!(
                fast,
                full,
                "fast != full for {packet:02x?} from {src} (max {max}): full answer {:?}",
                Message::from_vec(&full).map(|m| m.to_string())
            );
            assert_eq!(s.answer(packet, src, max), full);
            true
        }
        None => {
            assert_eq!(s.answer(packet, src, max), full);
            false
        }
    }
}

/// Every name form of every app in the fixture, plus names that exist nowhere.
fn names() -> Vec<String> {
    let snap = tricky();
    let mut apps: Vec<String> = snap.machines.iter().map(|m| m.app.clone()).collect();
    apps.sort();
    apps.dedup();
    apps.push("nosuchapp".into());
    let mut names = vec![
        "internal.".to_owned(),
        "_apps.internal.".into(),
        "x._apps.internal.".into(),
        "nope.internal.".into(),
        "example.com.".into(),
        "internal.example.".into(),
        ".".into(),
        "a.b.c.d.e.f.internal.".into(),
        "internal.internal.".into(),
    ];
    for app in &apps {
        for form in [
            "",
            "global.",
            "vms.",
            "regions.",
            "vm.",
            "process.",
            "of.",
            "nearest.of.",
            "x.nearest.of.",
            "ord.",
            "lax.",
            "ams.",
            "syd.",
            "app.process.",
            "worker.process.",
            "nope.process.",
            "ffffffffffffff.vm.",
            "a.b.",
            "x.vms.",
        ] {
            names.push(format!("{form}{app}.internal."));
        }
        for n in ["0", "1", "2", "3", "4", "63", "64", "65", "01", "", "99"] {
            names.push(format!("top{n}.nearest.of.{app}.internal."));
        }
        names.push(format!("a.top1.nearest.of.{app}.internal."));
    }
    for m in &snap.machines {
        names.push(format!("{}.{}.internal.", m.region, m.app));
        names.push(format!("{}.process.{}.internal.", m.process_group, m.app));
        names.push(format!("{}.vm.{}.internal.", m.id, m.app));
        names.push(format!("{}.vm.{}.internal.", m.id, "web"));
        names.push(format!("x.{}.vm.{}.internal.", m.id, m.app));
    }
    names
}

/// Three spellings of a name: lower, upper, alternating.
fn cases(name: &str) -> [String; 3] {
    let alt: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    [name.to_ascii_lowercase(), name.to_ascii_uppercase(), alt]
}

fn sources() -> Vec<IpAddr> {
    vec![
        src_a(),
        src_a_lax(),
        src_b(),
        operator(),
        "::1".parse().unwrap(),
        "::ffff:127.0.0.1".parse().unwrap(),
        // An org-A source on a host no machine is on (no region), an org with no apps, a
        // stranger.
        IpAddr::V6(addr(1, 0x8000_0009, 7)),
        IpAddr::V6(addr(3, HOST_ORD, 7)),
        "10.0.0.1".parse().unwrap(),
    ]
}

const TYPES: [RecordType; 11] = [
    RecordType::AAAA,
    RecordType::TXT,
    RecordType::A,
    RecordType::SOA,
    RecordType::NS,
    RecordType::ANY,
    RecordType::AXFR,
    RecordType::IXFR,
    RecordType::OPT,
    RecordType::Unknown(65280),
    RecordType::ZERO,
];

/// The fixture plus the awkward cases: an app name in two orgs (the operator sees both
/// merged), an app called `_apps`, regions and groups named like the fixed labels.
fn tricky() -> Snapshot {
    let mut snap = snapshot();
    let mut odd =
        |id: &str, app: &str, net: u32, host: u32, field: u32, region: &str, group: &str| {
            let mut m = m(id, app, net, host, field, group, true);
            m.region = region.into();
            snap.machines.push(m);
        };
    odd("0000000000f001", "web", 2, HOST_AMS, 50, "ams", "app");
    odd("0000000000f002", "web", 2, HOST_AMS, 51, "vms", "nearest");
    odd("0000000000f003", "_apps", 1, HOST_ORD, 52, "global", "app");
    odd("0000000000f004", "pg", 1, HOST_ORD, 53, "vm", "process");
    odd("0000000000f005", "pg", 1, HOST_ORD, 54, "of", "vm");
    snap
}

#[test]
fn fast_equals_full_for_every_name_type_case_and_view() {
    every_name_type_case_and_view(&server());
}

#[test]
fn fast_equals_full_on_an_awkward_snapshot() {
    let zone = Arc::new(ZoneData::new());
    let skipped = zone.publish(tricky());
    assert!(skipped.is_empty(), "{skipped:?}");
    every_name_type_case_and_view(&DnsServer::new(zone));
}

fn every_name_type_case_and_view(s: &DnsServer) {
    let (mut fast, mut total) = (0, 0);
    for name in names() {
        for (i, spelled) in cases(&name).into_iter().enumerate() {
            for qtype in TYPES {
                // Without EDNS for one spelling: the other spellings only change the echoed
                // question and the case-folding, which EDNS does not touch.
                let sizes: &[Option<u16>] = if i == 0 {
                    &[None, Some(1232)]
                } else {
                    &[Some(1232)]
                };
                for &edns in sizes {
                    let q = query_bytes(&spelled, qtype, edns);
                    for src in sources() {
                        total += 1;
                        if same(s, &q, src, UDP_PAYLOAD) {
                            fast += 1;
                        }
                    }
                }
            }
        }
    }
    println!("fast path answered {fast} of {total}");
    // The common shapes must actually take the fast path, or this test compares nothing.
    assert!(
        fast * 2 > total,
        "fast path answered only {fast} of {total}"
    );
}

#[test]
fn hits_misses_and_other_orgs_all_take_the_fast_path() {
    let s = server();
    let q = |name: &str, t| query_bytes(name, t, Some(1232));
    for (name, t, src, code) in [
        (
            "web.internal.",
            RecordType::AAAA,
            src_a(),
            ResponseCode::NoError,
        ),
        (
            "Web.INTERNAL.",
            RecordType::AAAA,
            src_a(),
            ResponseCode::NoError,
        ),
        (
            "vms.web.internal.",
            RecordType::TXT,
            src_a(),
            ResponseCode::NoError,
        ),
        (
            "top2.nearest.of.web.internal.",
            RecordType::AAAA,
            src_a_lax(),
            ResponseCode::NoError,
        ),
        (
            "web.internal.",
            RecordType::TXT,
            src_a(),
            ResponseCode::NoError,
        ),
        (
            "nope.internal.",
            RecordType::AAAA,
            src_a(),
            ResponseCode::NXDomain,
        ),
        // Another org's name: the same NXDOMAIN, through the same path.
        (
            "secret.internal.",
            RecordType::AAAA,
            src_a(),
            ResponseCode::NXDomain,
        ),
        (
            "example.com.",
            RecordType::AAAA,
            src_a(),
            ResponseCode::Refused,
        ),
        (
            "web.internal.",
            RecordType::AAAA,
            "10.0.0.1".parse().unwrap(),
            ResponseCode::Refused,
        ),
    ] {
        let out = s
            .answer_fast(&q(name, t), src, UDP_PAYLOAD)
            .unwrap_or_else(|| panic!("{name} {t} from {src} left the fast path"));
        assert_eq!(
            Message::from_vec(&out).unwrap().response_code(),
            code,
            "{name}"
        );
        assert!(same(&s, &q(name, t), src, UDP_PAYLOAD));
    }
    // Hidden and missing: byte-identical apart from the echoed question.
    let hidden = s.answer_fast(
        &q("secret.internal.", RecordType::AAAA),
        src_a(),
        UDP_PAYLOAD,
    );
    let missing = s.answer_fast(
        &q("secreu.internal.", RecordType::AAAA),
        src_a(),
        UDP_PAYLOAD,
    );
    assert_eq!(
        hidden,
        missing.map(|mut m| {
            let at = m.windows(6).position(|w| w == b"secreu").unwrap();
            m[at + 5] = b't';
            m
        })
    );
}

#[test]
fn fast_equals_full_across_sizes_flags_and_transports() {
    let s = server();
    let names = [
        "web.internal.",
        "BIG.internal.",
        "vms.big.internal.",
        "Nope.internal.",
        "secret.internal.",
        "example.com.",
        "top64.nearest.of.big.internal.",
    ];
    for name in names {
        for qtype in [RecordType::AAAA, RecordType::TXT, RecordType::A] {
            for edns in [
                None,
                Some(0),
                Some(100),
                Some(512),
                Some(600),
                Some(1232),
                Some(4096),
                Some(65535),
            ] {
                let base = query_bytes(name, qtype, edns);
                // RD, CD, AD, TC, AA, Z and the rcode bits of a query: only RD and CD echo.
                for (b2, b3) in [
                    (0x01, 0x00),
                    (0x00, 0x00),
                    (0x00, 0x10),
                    (0x01, 0x20),
                    (0x03, 0x0f),
                    (0x05, 0x40),
                    (0x07, 0xff),
                ] {
                    let mut q = base.clone();
                    q[2] = b2;
                    q[3] = b3;
                    for src in [src_a(), operator(), src_b()] {
                        for max in [0, 512, 700, UDP_PAYLOAD, 4096, STREAM] {
                            same(&s, &q, src, max);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fast_equals_full_on_edge_shapes() {
    let s = server();
    let src = src_a();
    // Names of 253..=257 wire bytes (the limit is 255), in and out of the zone.
    for total in 250..=258usize {
        let mut labels = Vec::new();
        let mut len = 10; // "\x08internal\x00"
        while total - len > 64 {
            labels.push("a".repeat(62));
            len += 63;
        }
        let rest = total - len;
        if rest >= 2 {
            labels.push("b".repeat(rest - 1));
        }
        let name = format!("{}.internal.", labels.join("."));
        let mut q = query_bytes("x.internal.", RecordType::AAAA, None);
        let wire: Vec<u8> = name
            .trim_end_matches('.')
            .split('.')
            .flat_map(|l| std::iter::once(l.len() as u8).chain(l.bytes()))
            .chain([0])
            .collect();
        q.truncate(12);
        q.extend_from_slice(&wire);
        q.extend_from_slice(&[0, 28, 0, 1]);
        same(&s, &q, src, UDP_PAYLOAD);
    }
    // OPT variants: options, version 1, DO, extended rcode, a non-root owner, trailing bytes,
    // two additional records, class CH.
    let base = query_bytes("web.internal.", RecordType::AAAA, Some(1232));
    let n = base.len();
    // The OPT record is the last 11 bytes: owner, type, class, extended rcode, version,
    // flags, RDATA length; the question's type and class are just before it.
    let variants: [fn(&mut Vec<u8>, usize); 9] = [
        |q, n| q[n - 5] = 1,
        |q, n| q[n - 4] = 0x80,
        |q, n| q[n - 6] = 1,
        |q, _| q.push(0),
        |q, n| {
            q[n - 1] = 4;
            q.extend_from_slice(&[0, 10, 0, 0]);
        },
        |q, _| q[11] = 2,
        |q, n| q[n - 11] = 1,
        |q, n| q[n - 12] = 3,
        |q, n| q[n - 14] = 29,
    ];
    for v in variants {
        let mut q = base.clone();
        v(&mut q, n);
        same(&s, &q, src, UDP_PAYLOAD);
    }
    // Labels with bytes outside [a-z0-9_-], a compression pointer (to itself: a loop).
    let mut q = query_bytes("web.internal.", RecordType::AAAA, None);
    for (at, b) in [(13, b'W'), (13, b'.'), (13, 0xc3), (13, 0), (12, 0xc0)] {
        q[at] = b;
        same(&s, &q, src, UDP_PAYLOAD);
    }
}

#[test]
fn mangled_packets_never_make_the_paths_disagree() {
    let s = server();
    let seeds: Vec<Vec<u8>> = [
        ("web.internal.", RecordType::AAAA, Some(1232)),
        ("vms.web.internal.", RecordType::TXT, None),
        (
            "top3.nearest.of.web.internal.",
            RecordType::AAAA,
            Some(4096),
        ),
        ("nope.internal.", RecordType::AAAA, None),
        ("secret.internal.", RecordType::TXT, Some(512)),
    ]
    .into_iter()
    .map(|(n, t, e)| query_bytes(n, t, e))
    .collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut fast, mut total) = (0, 0);
    for round in 0..60_000usize {
        let mut q = seeds[round % seeds.len()].clone();
        for _ in 0..1 + next() % 3 {
            if q.is_empty() {
                break;
            }
            let r = next();
            let at = (r as usize >> 8) % q.len();
            match r % 4 {
                0 => q[at] = r as u8 >> 3,
                1 => q[at] ^= 1 << (r % 8),
                2 => q.truncate(at),
                _ => q[at] = q[at].to_ascii_uppercase(),
            }
        }
        let src = sources()[round % sources().len()];
        total += 1;
        if same(&s, &q, src, UDP_PAYLOAD) {
            fast += 1;
        }
    }
    println!("fast path answered {fast} of {total} mangled packets");
}

#[test]
fn fast_path_follows_publishes() {
    let zone = Arc::new(ZoneData::new());
    let s = DnsServer::new(zone.clone());
    let q = query_bytes("web.internal.", RecordType::AAAA, None);
    // Empty zone: NXDOMAIN, _apps exists without data.
    assert!(same(&s, &q, src_a(), UDP_PAYLOAD));
    assert!(same(
        &s,
        &query_bytes("_apps.internal.", RecordType::TXT, None),
        src_a(),
        UDP_PAYLOAD
    ));
    zone.publish(snapshot());
    assert!(same(&s, &q, src_a(), UDP_PAYLOAD));
    let r = Message::from_vec(&s.answer(&q, src_a(), UDP_PAYLOAD)).unwrap();
    assert_eq!(r.answers().len(), 3);
    assert!(zone.prepared_names() > 0);
    zone.publish(Snapshot::default());
    let r = Message::from_vec(&s.answer(&q, src_a(), UDP_PAYLOAD)).unwrap();
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    assert!(same(&s, &q, src_a(), UDP_PAYLOAD));
}
