//! Shared fixtures for the ferry-dns tests: a two-org snapshot and query helpers. Test-only; it
//! must never depend on anything outside this machine's loopback.
#![allow(dead_code)]

use ferry_dns::{DnsMachine, DnsServer, Snapshot, ZoneData, UDP_PAYLOAD};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// Org A is network 1, org B network 2. Hosts 0x80000001 and 0x80000002 are in `ord`,
/// 0x80000003 in `lax`, 0x80000004 in `ams`.
pub fn addr(net: u32, host: u32, machine: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfdaa,
        (net >> 16) as u16,
        net as u16,
        (host >> 16) as u16,
        host as u16,
        (machine >> 16) as u16,
        machine as u16,
        2,
    )
}

pub const HOST_ORD: u32 = 0x8000_0001;
pub const HOST_ORD2: u32 = 0x8000_0002;
pub const HOST_LAX: u32 = 0x8000_0003;
pub const HOST_AMS: u32 = 0x8000_0004;

fn region_of(host: u32) -> &'static str {
    match host {
        HOST_ORD | HOST_ORD2 => "ord",
        HOST_LAX => "lax",
        _ => "ams",
    }
}

pub fn m(
    id: &str,
    app: &str,
    net: u32,
    host: u32,
    field: u32,
    group: &str,
    started: bool,
) -> DnsMachine {
    DnsMachine {
        id: id.into(),
        app: app.into(),
        org: format!("org{net}"),
        network_id: net,
        region: region_of(host).into(),
        private_ip: addr(net, host, field),
        process_group: group.into(),
        started,
    }
}

/// The fixture: org A (net 1) has `web` (ord x2, lax x1 started, one stopped in ord), `pg`
/// (app + worker groups) and `idle` (only a stopped machine); org B (net 2) has `secret` and
/// `api`; `big` (net 1) has 70 machines for truncation.
pub fn snapshot() -> Snapshot {
    let mut machines = vec![
        m("0000000000a001", "web", 1, HOST_ORD, 1, "app", true),
        m("0000000000a002", "web", 1, HOST_ORD2, 2, "app", true),
        m("0000000000a003", "web", 1, HOST_LAX, 3, "app", true),
        m("0000000000a004", "web", 1, HOST_ORD, 4, "app", false),
        m("0000000000b001", "pg", 1, HOST_LAX, 5, "app", true),
        m("0000000000b002", "pg", 1, HOST_AMS, 6, "worker", true),
        m("0000000000c001", "idle", 1, HOST_ORD, 7, "app", false),
        m("0000000000d001", "secret", 2, HOST_AMS, 1, "app", true),
        m("0000000000d002", "api", 2, HOST_ORD, 2, "app", true),
    ];
    for i in 0..70u32 {
        machines.push(m(
            &format!("{:014x}", 0xe000 + i),
            "big",
            1,
            HOST_LAX,
            100 + i,
            "app",
            true,
        ));
    }
    Snapshot { machines }
}

pub fn server() -> DnsServer {
    let zone = Arc::new(ZoneData::new());
    let skipped = zone.publish(snapshot());
    assert!(skipped.is_empty(), "{skipped:?}");
    DnsServer::new(zone)
}

/// A source in org A on an `ord` host, one in org B, the operator, and a stranger.
pub fn src_a() -> IpAddr {
    IpAddr::V6(addr(1, HOST_ORD, 0x999))
}
pub fn src_a_lax() -> IpAddr {
    IpAddr::V6(addr(1, HOST_LAX, 0x999))
}
pub fn src_b() -> IpAddr {
    IpAddr::V6(addr(2, HOST_AMS, 0x999))
}
pub fn operator() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

pub fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut msg = Message::new();
    msg.set_id(0x1234)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        msg.set_edns(e);
    }
    msg.to_vec().unwrap()
}

pub fn ask(server: &DnsServer, name: &str, qtype: RecordType, src: IpAddr) -> Message {
    let bytes = server.answer(&query_bytes(name, qtype, Some(4096)), src, UDP_PAYLOAD);
    Message::from_vec(&bytes).expect("response parses")
}
