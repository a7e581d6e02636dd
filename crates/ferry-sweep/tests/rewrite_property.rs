//! Property: config text with fleet addresses embedded in random textual forms and contexts is
//! matched completely, and after a rewrite with an index that knows every machine, a new scan
//! finds no address with a known owner (only the strangers' remain, untouched).

use ferry_addr::{FleetAddr, HostId, MachineField, NetworkId};
use ferry_sweep::{rewrite, MachineIndex, MachineRecord, Matcher, Owner, OwnerIndex};
use proptest::prelude::*;
use std::net::Ipv6Addr;

fn guest_addr() -> impl Strategy<Value = Ipv6Addr> {
    (
        1..=NetworkId::MAX,
        HostId::MIN..=u32::MAX,
        any::<u32>(),
        any::<u16>(),
    )
        .prop_map(|(n, h, m, s)| {
            FleetAddr::new(
                NetworkId::new(n).unwrap(),
                HostId::new(h).unwrap(),
                MachineField(m),
                s,
            )
            .ip()
        })
}

/// One textual spelling of `a`, chosen by `form`. Returns whether it is the full eight-group form
/// (only that may be followed by an unbracketed `:port`).
fn spell(a: Ipv6Addr, form: u8) -> (String, bool) {
    let w = a.segments();
    let join = |f: &dyn Fn(u16) -> String| w.iter().map(|x| f(*x)).collect::<Vec<_>>().join(":");
    match form % 6 {
        0 => (a.to_string(), false),
        1 => (a.to_string().to_uppercase(), false),
        2 => (join(&|x| format!("{x:04x}")), true),
        3 => (join(&|x| format!("{x:04X}")), true),
        4 => (join(&|x| format!("{x:x}")), true),
        // Mixed case, leading zeros on some groups only.
        _ => (
            w.iter()
                .enumerate()
                .map(|(i, x)| {
                    if i % 2 == 0 {
                        format!("{x:03X}")
                    } else {
                        format!("{x:x}")
                    }
                })
                .collect::<Vec<_>>()
                .join(":"),
            true,
        ),
    }
}

/// One line of config holding `addr` in one of the contexts seen in real files.
fn line(addr: &str, full: bool, ctx: u8, port: u16, i: usize) -> String {
    match ctx % 12 {
        0 => format!("KEY_{i}={addr}\n"),
        1 => format!("host = \"{addr}\"\n"),
        2 => format!("url: http://[{addr}]:{port}/x\n"),
        3 => format!("  \"peer\": \"{addr}\",\n"),
        4 => format!("conn = host={addr} port={port} dbname=app\n"),
        5 => format!("listen [{addr}]:{port};\n"),
        6 => format!("- {addr}\n"),
        7 => format!("peers = [\"{addr}\", \"fd00::1\"]\n"),
        8 => format!("DATABASE_URL=postgres://u:p@[{addr}]:{port}/db?x=1\n"),
        9 if full => format!("upstream {addr}:{port}\n"),
        9 => format!("upstream {addr} {port}\n"),
        10 => format!("peers: [{addr}, fd00::{i:x}]\n"),
        _ => format!("# connect to {addr}. Mac 00:1a:2b:3c:4d:5e, at 12:34:56, sha fdaa{i:x}9c\n"),
    }
}

#[derive(Debug)]
struct Case {
    text: String,
    index: MachineIndex,
    /// Number of embedded addresses, and how many belong to no machine.
    embedded: usize,
    strangers: usize,
}

fn case() -> impl Strategy<Value = Case> {
    let machines = prop::collection::vec(
        (guest_addr(), prop::collection::vec(guest_addr(), 0..3)),
        1..6,
    );
    let lines = prop::collection::vec(
        (
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<u8>(),
            any::<u16>(),
        ),
        0..40,
    );
    (machines, lines, guest_addr()).prop_map(|(machines, lines, stranger)| {
        let records: Vec<MachineRecord> = machines
            .iter()
            .enumerate()
            .map(|(i, (cur, old))| MachineRecord {
                id: format!("{i:014x}"),
                app: "app".into(),
                private_ip: cur.to_string(),
                old_ips: old.iter().map(Ipv6Addr::to_string).collect(),
            })
            .collect();
        // Random addresses can, very rarely, share a /112; such a list is rightly rejected, and
        // then every address is a stranger.
        let index = MachineIndex::from_machines(records).unwrap_or_default();
        let mut pool: Vec<Ipv6Addr> = machines
            .iter()
            .flat_map(|(c, o)| std::iter::once(*c).chain(o.iter().copied()))
            .collect();
        pool.push(stranger);
        let (mut text, mut strangers) = (String::from("# generated\n"), 0);
        for (i, (pick, form, suffix, ctx, port)) in lines.iter().enumerate() {
            let mut a = pool[*pick as usize % pool.len()];
            if suffix % 3 == 0 {
                // Another address in the same /112: still the machine's.
                let mut w = a.segments();
                w[7] = *suffix;
                a = Ipv6Addr::from(w);
            }
            if index.owner(a) == Owner::Unknown {
                strangers += 1;
            }
            let (spelled, full) = spell(a, *form);
            text.push_str(&line(&spelled, full, *ctx, *port, i));
        }
        Case {
            text,
            index,
            embedded: lines.len(),
            strangers,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rewrite_then_scan_finds_nothing_known(c in case()) {
        let m = Matcher::new();
        let hits = m.find_all(c.text.as_bytes());
        prop_assert_eq!(hits.len(), c.embedded, "{}", c.text);

        let names: Vec<Option<String>> = hits.iter().map(|h| c.index.owner(h.ip).dns_name()).collect();
        let edits: Vec<_> = hits.iter().zip(&names).map(|(h, n)| (h, n.as_deref())).collect();
        let new = rewrite::apply(c.text.as_bytes(), &edits);
        let new_text = String::from_utf8(new).unwrap();

        let after = m.find_all(new_text.as_bytes());
        for h in &after {
            prop_assert_eq!(c.index.owner(h.ip), Owner::Unknown, "{}", new_text);
        }
        prop_assert_eq!(after.len(), c.strangers, "{}", new_text);
        // Rewriting is idempotent: a second pass changes nothing.
        let names2: Vec<Option<String>> = after.iter().map(|h| c.index.owner(h.ip).dns_name()).collect();
        let edits2: Vec<_> = after.iter().zip(&names2).map(|(h, n)| (h, n.as_deref())).collect();
        prop_assert_eq!(rewrite::apply(new_text.as_bytes(), &edits2), new_text.as_bytes().to_vec());
    }
}
