//! Data-driven answer tests over the two-org fixture (pure `answer()`), plus real loopback
//! sockets for truncation + TCP retry and for freshness. Loopback only; every wait is bounded.

mod common;

use common::*;
use ferry_dns::{DnsMachine, DnsServer, Snapshot, ZoneData, STREAM, TTL, UDP_PAYLOAD};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
enum Want {
    /// AAAA answers, as (org, host, machine field) address triples.
    Aaaa(Vec<Ipv6Addr>),
    /// AAAA answers in this exact order.
    AaaaOrdered(Vec<Ipv6Addr>),
    /// One TXT record whose strings concatenate to this.
    Txt(&'static str),
    NoData,
    NxDomain,
    Rcode(ResponseCode),
}
use Want::*;

fn aaaa_of(msg: &Message) -> Vec<Ipv6Addr> {
    msg.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn check(server: &DnsServer, name: &str, qtype: RecordType, src: IpAddr, want: Want) {
    let msg = ask(server, name, qtype, src);
    let ctx = format!("{name} {qtype} from {src}: got {msg}");
    assert_eq!(msg.id(), 0x1234, "{ctx}");
    assert!(!msg.truncated(), "{ctx}");
    for r in msg.answers().iter().chain(msg.name_servers()) {
        assert_eq!(r.ttl(), TTL, "TTL {ctx}");
    }
    let negative = |code: ResponseCode| {
        assert_eq!(msg.response_code(), code, "{ctx}");
        assert!(msg.answers().is_empty(), "{ctx}");
        assert!(msg.authoritative(), "{ctx}");
        assert_eq!(msg.name_servers().len(), 1, "SOA in authority {ctx}");
        assert_eq!(
            msg.name_servers()[0].record_type(),
            RecordType::SOA,
            "{ctx}"
        );
    };
    match want {
        Aaaa(mut want) => {
            assert_eq!(msg.response_code(), ResponseCode::NoError, "{ctx}");
            assert!(msg.authoritative(), "{ctx}");
            let mut got = aaaa_of(&msg);
            got.sort();
            want.sort();
            assert_eq!(got, want, "{ctx}");
        }
        AaaaOrdered(want) => {
            assert_eq!(msg.response_code(), ResponseCode::NoError, "{ctx}");
            assert_eq!(aaaa_of(&msg), want, "{ctx}");
        }
        Txt(want) => {
            assert_eq!(msg.response_code(), ResponseCode::NoError, "{ctx}");
            assert_eq!(msg.answers().len(), 1, "{ctx}");
            let RData::TXT(txt) = msg.answers()[0].data() else {
                panic!("not TXT: {ctx}")
            };
            let joined: Vec<u8> = txt
                .txt_data()
                .iter()
                .flat_map(|s| s.iter().copied())
                .collect();
            assert_eq!(String::from_utf8(joined).unwrap(), want, "{ctx}");
        }
        NoData => negative(ResponseCode::NoError),
        NxDomain => negative(ResponseCode::NXDomain),
        Rcode(code) => {
            assert_eq!(msg.response_code(), code, "{ctx}");
            assert!(msg.answers().is_empty(), "{ctx}");
        }
    }
}

// Addresses of the fixture's machines.
fn web1() -> Ipv6Addr {
    addr(1, HOST_ORD, 1)
}
fn web2() -> Ipv6Addr {
    addr(1, HOST_ORD2, 2)
}
fn web3() -> Ipv6Addr {
    addr(1, HOST_LAX, 3)
}

#[test]
fn every_name_form() {
    let s = server();
    let a = src_a();
    use RecordType::{AAAA, TXT};
    let cases: Vec<(&str, RecordType, Want)> = vec![
        ("web.internal.", AAAA, Aaaa(vec![web1(), web2(), web3()])),
        ("WEB.Internal.", AAAA, Aaaa(vec![web1(), web2(), web3()])),
        (
            "global.web.internal.",
            AAAA,
            Aaaa(vec![web1(), web2(), web3()]),
        ),
        ("0000000000a003.vm.web.internal.", AAAA, Aaaa(vec![web3()])),
        ("ord.web.internal.", AAAA, Aaaa(vec![web1(), web2()])),
        ("lax.web.internal.", AAAA, Aaaa(vec![web3()])),
        (
            "app.process.pg.internal.",
            AAAA,
            Aaaa(vec![addr(1, HOST_LAX, 5)]),
        ),
        (
            "worker.process.pg.internal.",
            AAAA,
            Aaaa(vec![addr(1, HOST_AMS, 6)]),
        ),
        (
            "top1.nearest.of.web.internal.",
            AAAA,
            AaaaOrdered(vec![web1()]),
        ),
        (
            "top2.nearest.of.web.internal.",
            AAAA,
            AaaaOrdered(vec![web1(), web2()]),
        ),
        (
            "top64.nearest.of.web.internal.",
            AAAA,
            AaaaOrdered(vec![web1(), web2(), web3()]),
        ),
        (
            "vms.web.internal.",
            TXT,
            Txt("0000000000a001 ord,0000000000a002 ord,0000000000a003 lax"),
        ),
        ("regions.web.internal.", TXT, Txt("lax,ord")),
        ("regions.pg.internal.", TXT, Txt("ams,lax")),
        ("_apps.internal.", TXT, Txt("big,idle,pg,web")),
        // Existing names asked with another type: NOERROR, empty, SOA.
        ("web.internal.", RecordType::A, NoData),
        ("web.internal.", TXT, NoData),
        ("vms.web.internal.", AAAA, NoData),
        ("_apps.internal.", AAAA, NoData),
        ("web.internal.", RecordType::Unknown(65280), NoData),
        ("internal.", AAAA, NoData),
        // Empty non-terminals exist (RFC 8020: NXDOMAIN would deny the names below them).
        ("vm.web.internal.", AAAA, NoData),
        ("process.pg.internal.", AAAA, NoData),
        ("nearest.of.web.internal.", AAAA, NoData),
        // Only started machines: the stopped one has no name, the stopped-only app exists empty.
        ("0000000000a004.vm.web.internal.", AAAA, NxDomain),
        ("idle.internal.", AAAA, NoData),
        ("vms.idle.internal.", TXT, NoData),
        ("ams.web.internal.", AAAA, NxDomain),
        // Names that do not exist.
        ("nope.internal.", AAAA, NxDomain),
        ("nope.internal.", RecordType::Unknown(65280), NxDomain),
        ("ffffffffffffff.vm.web.internal.", AAAA, NxDomain),
        ("nope.process.web.internal.", AAAA, NxDomain),
        ("top0.nearest.of.web.internal.", AAAA, NxDomain),
        ("top65.nearest.of.web.internal.", AAAA, NxDomain),
        ("top01.nearest.of.web.internal.", AAAA, NxDomain),
        ("x.y.z.web.internal.", AAAA, NxDomain),
        ("a.0000000000a003.vm.web.internal.", AAAA, NxDomain),
        // Outside the zone.
        ("example.com.", AAAA, Rcode(ResponseCode::Refused)),
        ("internal.example.", AAAA, Rcode(ResponseCode::Refused)),
        (".", RecordType::NS, Rcode(ResponseCode::Refused)),
    ];
    for (name, qtype, want) in cases {
        check(&s, name, qtype, a, want);
    }
    // The apex SOA.
    let msg = ask(&s, "internal.", RecordType::SOA, a);
    assert_eq!(msg.answers().len(), 1);
    assert_eq!(msg.answers()[0].ttl(), TTL);
}

#[test]
fn nearest_prefers_the_askers_region() {
    let s = server();
    // From a lax host, the lax machine comes first, then ord in ID order.
    check(
        &s,
        "top1.nearest.of.web.internal.",
        RecordType::AAAA,
        src_a_lax(),
        AaaaOrdered(vec![web3()]),
    );
    check(
        &s,
        "top3.nearest.of.web.internal.",
        RecordType::AAAA,
        src_a_lax(),
        AaaaOrdered(vec![web3(), web1(), web2()]),
    );
    // The operator has no region: ID order.
    check(
        &s,
        "top2.nearest.of.web.internal.",
        RecordType::AAAA,
        operator(),
        AaaaOrdered(vec![web1(), web2()]),
    );
}

#[test]
fn views_hide_other_orgs_exactly_like_missing_names() {
    let s = server();
    let b_names = [
        "secret.internal.",
        "global.secret.internal.",
        "vms.secret.internal.",
        "regions.secret.internal.",
        "ams.secret.internal.",
        "0000000000d001.vm.secret.internal.",
        "app.process.secret.internal.",
        "top1.nearest.of.secret.internal.",
        "vm.secret.internal.",
    ];
    for name in b_names {
        for qtype in [
            RecordType::AAAA,
            RecordType::TXT,
            RecordType::A,
            RecordType::ANY,
        ] {
            check(&s, name, qtype, src_a(), NxDomain);
            // Byte-identical to a name that never existed, apart from the echoed question.
            let hidden = ask(&s, name, qtype, src_a());
            let missing = ask(&s, "doesnotexist.internal.", qtype, src_a());
            assert_eq!(hidden.header(), missing.header(), "{name}");
            assert_eq!(hidden.name_servers(), missing.name_servers(), "{name}");
            assert_eq!(hidden.additionals(), missing.additionals(), "{name}");
            assert_eq!(hidden.extensions(), missing.extensions(), "{name}");
        }
    }
    // Org B sees its own names and not A's.
    check(
        &s,
        "secret.internal.",
        RecordType::AAAA,
        src_b(),
        Aaaa(vec![addr(2, HOST_AMS, 1)]),
    );
    check(&s, "web.internal.", RecordType::AAAA, src_b(), NxDomain);
    check(
        &s,
        "_apps.internal.",
        RecordType::TXT,
        src_b(),
        Txt("api,secret"),
    );
    // The operator sees everything.
    let op = operator();
    check(
        &s,
        "secret.internal.",
        RecordType::AAAA,
        op,
        Aaaa(vec![addr(2, HOST_AMS, 1)]),
    );
    check(
        &s,
        "web.internal.",
        RecordType::AAAA,
        op,
        Aaaa(vec![web1(), web2(), web3()]),
    );
    check(
        &s,
        "_apps.internal.",
        RecordType::TXT,
        op,
        Txt("api,big,idle,pg,secret,web"),
    );
    check(
        &s,
        "web.internal.",
        RecordType::AAAA,
        "::1".parse().unwrap(),
        Aaaa(vec![web1(), web2(), web3()]),
    );
    check(
        &s,
        "web.internal.",
        RecordType::AAAA,
        "::ffff:127.0.0.1".parse().unwrap(),
        Aaaa(vec![web1(), web2(), web3()]),
    );
    // Anyone else is refused, whatever the name.
    for stranger in [
        "10.1.2.3",
        "192.0.2.1",
        "fdaa::3",
        "2001:db8::1",
        "fdaa:8000:1:0:1:0:1:2",
    ] {
        for name in ["web.internal.", "nope.internal.", "example.com."] {
            check(
                &s,
                name,
                RecordType::AAAA,
                stranger.parse().unwrap(),
                Rcode(ResponseCode::Refused),
            );
        }
    }
}

#[test]
fn any_is_answered_minimally_per_rfc8482() {
    let s = server();
    let msg = ask(&s, "web.internal.", RecordType::ANY, src_a());
    assert_eq!(msg.response_code(), ResponseCode::NoError);
    assert_eq!(msg.answers().len(), 1, "{msg}");
    assert!(matches!(msg.answers()[0].data(), RData::HINFO(h) if h.cpu() == b"RFC8482"));
    check(&s, "nope.internal.", RecordType::ANY, src_a(), NxDomain);
}

#[test]
fn odd_questions_get_the_right_rcode() {
    let s = server();
    check(
        &s,
        "web.internal.",
        RecordType::AXFR,
        src_a(),
        Rcode(ResponseCode::Refused),
    );
    check(
        &s,
        "web.internal.",
        RecordType::IXFR,
        src_a(),
        Rcode(ResponseCode::Refused),
    );

    // Class CH (e.g. version.bind): not ours.
    let mut q = query_bytes("web.internal.", RecordType::AAAA, None);
    let n = q.len();
    q[n - 1] = 3;
    let r = Message::from_vec(&s.answer(&q, src_a(), UDP_PAYLOAD)).unwrap();
    assert_eq!(r.response_code(), ResponseCode::Refused);

    // Opcode NOTIFY / UPDATE: not implemented.
    for opcode in [4u8, 5] {
        let mut q = query_bytes("web.internal.", RecordType::AAAA, None);
        q[2] = (q[2] & !0x78) | (opcode << 3);
        let r = Message::from_vec(&s.answer(&q, src_a(), UDP_PAYLOAD)).unwrap();
        assert_eq!(r.response_code(), ResponseCode::NotImp, "opcode {opcode}");
    }

    // EDNS version 1: BADVERS (extended rcode carried in OPT).
    let mut q = query_bytes("web.internal.", RecordType::AAAA, Some(1232));
    let n = q.len();
    // OPT RR tail: ... TTL = ext-rcode(1) version(1) flags(2), rdlen(2). Version is at n-5.
    q[n - 5] = 1;
    let r = Message::from_vec(&s.answer(&q, src_a(), UDP_PAYLOAD)).unwrap();
    // 16 is both BADVERS and BADSIG; hickory decodes it as the latter.
    assert_eq!(
        u16::from(r.response_code()),
        u16::from(ResponseCode::BADVERS)
    );
    assert!(r.answers().is_empty());
}

fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    [id, flags, qd, an, ns, ar]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

#[test]
fn malformed_packets_get_formerr_or_nothing() {
    let s = server();
    let src = src_a();
    let formerr = |bytes: &[u8]| {
        let out = s.answer(bytes, src, UDP_PAYLOAD);
        let r = Message::from_vec(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert_eq!(r.response_code(), ResponseCode::FormErr, "{bytes:?}");
        assert_eq!(r.id(), 0xbeef);
        assert!(r.answers().is_empty());
    };
    // Header promises a question that is not there.
    formerr(&header(0xbeef, 0x0100, 1, 0, 0, 0));
    // No question at all; two questions.
    formerr(&header(0xbeef, 0x0100, 0, 0, 0, 0));
    let mut two = header(0xbeef, 0x0100, 2, 0, 0, 0);
    for _ in 0..2 {
        two.extend_from_slice(b"\x03web\x08internal\x00\x00\x1c\x00\x01");
    }
    formerr(&two);
    // A compression pointer loop.
    let mut looped = header(0xbeef, 0x0100, 1, 0, 0, 0);
    looped.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1]);
    formerr(&looped);
    // A 64-byte label (labels are at most 63).
    let mut long_label = header(0xbeef, 0x0100, 1, 0, 0, 0);
    long_label.push(64);
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(b"\x08internal\x00\x00\x1c\x00\x01");
    formerr(&long_label);
    // A name over 255 bytes (five 63-byte labels).
    let mut long_name = header(0xbeef, 0x0100, 1, 0, 0, 0);
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'a'; 63]);
    }
    long_name.extend_from_slice(b"\x08internal\x00\x00\x1c\x00\x01");
    formerr(&long_name);
    // Truncated question and trailing junk in the counts.
    let mut cut = header(0xbeef, 0x0100, 1, 0, 0, 0);
    cut.extend_from_slice(b"\x03web\x08inter");
    formerr(&cut);
    let mut extra = header(0xbeef, 0x0100, 1, 5, 0, 0);
    extra.extend_from_slice(b"\x03web\x08internal\x00\x00\x1c\x00\x01");
    formerr(&extra);

    // Too short for an ID, or a response: nothing is sent back.
    for bytes in [&b""[..], b"\x00", b"\x12\x34\x01\x00\x00\x01"] {
        assert!(s.answer(bytes, src, UDP_PAYLOAD).is_empty());
    }
    let mut resp = query_bytes("web.internal.", RecordType::AAAA, None);
    resp[2] |= 0x80;
    assert!(s.answer(&resp, src, UDP_PAYLOAD).is_empty());

    // A pseudo-random soup never panics and anything sent back parses.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..2000usize {
        let mut b = Vec::with_capacity(len % 600);
        for _ in 0..len % 600 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        if b.len() > 2 {
            b[2] &= 0x7f;
        }
        let out = s.answer(&b, src, UDP_PAYLOAD);
        if !out.is_empty() {
            Message::from_vec(&out).expect("responses always parse");
        }
    }
}

#[test]
fn large_answers_truncate_over_udp_not_over_stream() {
    let s = server();
    let q = query_bytes("big.internal.", RecordType::AAAA, None);
    // Without EDNS the limit is 512 bytes.
    let out = s.answer(&q, src_a(), UDP_PAYLOAD);
    assert!(out.len() <= 512, "{}", out.len());
    let r = Message::from_vec(&out).unwrap();
    assert!(r.truncated());
    // With EDNS 4096 our own 1232 caps it.
    let q = query_bytes("big.internal.", RecordType::AAAA, Some(4096));
    let out = s.answer(&q, src_a(), UDP_PAYLOAD);
    assert!(out.len() <= UDP_PAYLOAD, "{}", out.len());
    assert!(Message::from_vec(&out).unwrap().truncated());
    // Over a stream everything fits.
    let out = s.answer(&q, src_a(), STREAM);
    let r = Message::from_vec(&out).unwrap();
    assert!(!r.truncated());
    assert_eq!(r.answers().len(), 70);
    // vms TXT of 70 machines is split into <= 255-byte strings of one record.
    let q = query_bytes("vms.big.internal.", RecordType::TXT, None);
    let r = Message::from_vec(&s.answer(&q, src_a(), STREAM)).unwrap();
    let RData::TXT(t) = r.answers()[0].data() else {
        panic!()
    };
    assert!(t.txt_data().len() > 1 && t.txt_data().iter().all(|c| c.len() <= 255));
}

#[test]
fn invalid_machines_are_left_out_not_fatal() {
    let zone = ZoneData::new();
    let mut snap = snapshot();
    snap.machines.push(m(
        "0000000000f001",
        "bad.name",
        1,
        HOST_ORD,
        900,
        "app",
        true,
    ));
    snap.machines
        .push(m("short", "web", 1, HOST_ORD, 901, "app", true));
    let skipped = zone.publish(snap);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    let s = DnsServer::new(Arc::new(zone));
    check(
        &s,
        "web.internal.",
        RecordType::AAAA,
        src_a(),
        Aaaa(vec![web1(), web2(), web3()]),
    );
}

/// Runs a server on 127.0.0.1 (UDP and TCP on the same port) in a background runtime.
struct Loopback {
    port: u16,
    _rt: tokio::runtime::Runtime,
}

fn loopback(server: DnsServer) -> Loopback {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let port = rt.block_on(async {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let (s1, s2) = (server.clone(), server);
        tokio::spawn(async move { s1.serve_udp(udp).await });
        tokio::spawn(async move { s2.serve_tcp(tcp).await });
        port
    });
    Loopback { port, _rt: rt }
}

fn udp_ask(port: u16, q: &[u8]) -> Message {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(q, ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("udp answer within 2 s");
    Message::from_vec(&buf[..n]).unwrap()
}

fn tcp_ask(port: u16, q: &[u8]) -> Message {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    c.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    c.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut body).unwrap();
    Message::from_vec(&body).unwrap()
}

#[test]
fn truncation_then_tcp_retry_over_real_sockets() {
    let lb = loopback(server());
    let q = query_bytes("big.internal.", RecordType::AAAA, None);
    let udp = udp_ask(lb.port, &q);
    assert!(udp.truncated(), "{udp}");
    let tcp = tcp_ask(lb.port, &q);
    assert!(!tcp.truncated());
    assert_eq!(tcp.answers().len(), 70);
    // A small answer is complete over UDP.
    let q = query_bytes("web.internal.", RecordType::AAAA, None);
    let udp = udp_ask(lb.port, &q);
    assert!(!udp.truncated());
    assert_eq!(udp.answers().len(), 3);

    // dig does the TC -> TCP retry itself (when installed).
    if let Ok(out) = std::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &lb.port.to_string(),
            "+time=2",
            "+tries=1",
            "+noedns",
        ])
        .args(["big.internal", "AAAA"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Truncated, retrying in TCP mode"), "{text}");
        assert!(text.contains("ANSWER: 70"), "{text}");
    }
}

#[test]
fn a_published_change_is_visible_within_100ms() {
    let zone = Arc::new(ZoneData::new());
    zone.publish(snapshot());
    let lb = loopback(DnsServer::new(zone.clone()));
    let q = query_bytes("fresh.internal.", RecordType::AAAA, None);
    assert_eq!(udp_ask(lb.port, &q).response_code(), ResponseCode::NXDomain);

    // Start: a new app appears; then stop: it disappears again.
    let fresh = DnsMachine {
        id: "00000000fff001".into(),
        app: "fresh".into(),
        org: "org1".into(),
        network_id: 1,
        region: "ord".into(),
        private_ip: addr(1, HOST_ORD, 0xfff),
        process_group: "app".into(),
        started: true,
    };
    let mut figures = Vec::new();
    for started in [true, false, true] {
        let mut snap: Snapshot = snapshot();
        snap.machines.push(DnsMachine {
            started,
            ..fresh.clone()
        });
        let t0 = Instant::now();
        zone.publish(snap);
        let deadline = t0 + Duration::from_secs(2);
        loop {
            let r = udp_ask(lb.port, &q);
            if r.answers().len() == usize::from(started) {
                break;
            }
            assert!(Instant::now() < deadline, "change not visible after 2 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        figures.push(t0.elapsed());
    }
    println!("freshness (publish -> changed answer over UDP loopback): {figures:?}");
    for f in figures {
        assert!(f < Duration::from_millis(100), "{f:?}");
    }
}
