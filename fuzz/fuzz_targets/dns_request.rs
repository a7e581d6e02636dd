//! Fuzz target for the `.internal` request path: arbitrary bytes from an org view, the operator
//! view and a stranger go through `DnsServer::answer` (UDP limits and stream). It must never
//! panic, whatever it sends back must parse as a DNS message within the size limit, and
//! wherever the fast path answers, its bytes must be the full path's.
#![no_main]

use ferry_dns::proto::op::Message;
use ferry_dns::{DnsMachine, DnsServer, Snapshot, ZoneData, STREAM, UDP_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

fn server() -> &'static DnsServer {
    static S: OnceLock<DnsServer> = OnceLock::new();
    S.get_or_init(|| {
        let mut machines = Vec::new();
        for (i, (app, net, region)) in [
            ("web", 1, "ord"),
            ("web", 1, "lax"),
            ("pg", 1, "ord"),
            ("secret", 2, "ams"),
        ]
        .into_iter()
        .enumerate()
        {
            machines.push(DnsMachine {
                id: format!("{:014x}", 0xa000 + i),
                app: app.into(),
                org: format!("org{net}"),
                network_id: net,
                region: region.into(),
                private_ip: Ipv6Addr::new(0xfdaa, 0, net as u16, 0x8000, 1, 0, i as u16 + 1, 2),
                process_group: "app".into(),
                started: i != 1,
            });
        }
        let zone = Arc::new(ZoneData::new());
        zone.publish(Snapshot { machines });
        DnsServer::new(zone)
    })
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    let sources: [IpAddr; 3] = [
        "fdaa:0:1:8000:1:0:99:2".parse().unwrap(),
        "127.0.0.1".parse().unwrap(),
        "10.0.0.1".parse().unwrap(),
    ];
    for src in sources {
        for max in [512usize, UDP_PAYLOAD, STREAM] {
            let out = s.answer(data, src, max);
            if let Some(fast) = s.answer_fast(data, src, max) {
                assert_eq!(fast, s.answer_full(data, src, max), "fast path != full path");
            }
            if out.is_empty() {
                continue;
            }
            let limit = if max == STREAM { 65535 } else { max };
            assert!(out.len() <= limit, "{} > {limit}", out.len());
            Message::from_vec(&out).expect("every response parses");
        }
    }
});
