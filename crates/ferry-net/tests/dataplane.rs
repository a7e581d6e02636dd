//! The host data plane on real namespaces, veths and eBPF (root, as CI is): reachability,
//! isolation, anti-spoofing, checksums, path MTU discovery, the route budget, cleanup.

mod support;

use ferry_addr::{FleetAddr, HostId, NetworkId};
use ferry_ebpf::Stat;
use ferry_net::netns;
use ferry_net::nl::Netlink;
use ferry_net::{DevFleet, MachineNet, Mode};
use std::net::{SocketAddrV6, UdpSocket};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(3);
const SHORT: Duration = Duration::from_millis(400);

fn net(n: u32) -> NetworkId {
    NetworkId::new(n).unwrap()
}

fn stat(f: &DevFleet, h: HostId, s: Stat) -> u64 {
    f.host(h)
        .unwrap()
        .stats()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == s)
        .unwrap()
        .1
}

/// 3 hosts x 2 networks x 2 machines per network per host.
fn twelve(f: &mut DevFleet) -> Vec<MachineNet> {
    let hosts: Vec<HostId> = (0..3).map(|_| f.add_host().unwrap()).collect();
    let mut ms = Vec::new();
    for &h in &hosts {
        for n in [net(1), net(2)] {
            for _ in 0..2 {
                ms.push(f.add_machine(h, n).unwrap());
            }
        }
    }
    ms
}

#[test]
fn one_network_talks_across_and_within_hosts_and_networks_stay_apart() {
    let mut f = fleet("m", Mode::Swap);
    let ms = twelve(&mut f);
    let echoes: Vec<Echo> = ms.iter().map(Echo::start).collect();

    // One thread per sender keeps the negative (timing-out) probes from adding up.
    let results: Vec<(usize, usize)> = std::thread::scope(|scope| {
        let ms = &ms;
        let echoes = &echoes;
        let handles: Vec<_> = (0..ms.len())
            .map(|i| {
                scope.spawn(move || {
                    let a = &ms[i];
                    let (mut same, mut across) = (0, 0);
                    for (j, b) in ms.iter().enumerate().filter(|(j, _)| *j != i) {
                        let payload = format!("{} -> {}", a.addr, b.addr).into_bytes();
                        let same_net = a.addr.network() == b.addr.network();
                        let wait = if same_net { T } else { SHORT };
                        let tcp = tcp_echo(a, b.addr.ip(), &payload, wait);
                        let udp = udp_echo(a, None, b.addr.ip(), &payload, wait);
                        if same_net {
                            assert_eq!(
                                tcp.as_deref(),
                                Some(&payload[..]),
                                "TCP {} -> {}",
                                a.addr,
                                b.addr
                            );
                            assert_eq!(
                                udp.as_deref(),
                                Some(&payload[..]),
                                "UDP {} -> {}",
                                a.addr,
                                b.addr
                            );
                            // The server saw the client's real guest address, not an infra-form one.
                            // (The UDP server logs before it replies, so the entry is there.)
                            let log = echoes[j].log.lock().unwrap_or_else(|e| e.into_inner());
                            assert!(log
                                .iter()
                                .any(|(ip, p, _)| *ip == a.addr.ip() && *p == payload));
                            if a.host() == b.host() {
                                same += 1
                            } else {
                                across += 1
                            }
                        } else {
                            assert_eq!(tcp, None, "TCP crossed networks {} -> {}", a.addr, b.addr);
                            assert_eq!(udp, None, "UDP crossed networks {} -> {}", a.addr, b.addr);
                        }
                    }
                    (same, across)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (same, across) = results
        .iter()
        .fold((0, 0), |acc, r| (acc.0 + r.0, acc.1 + r.1));
    // Nothing from another network ever reached a server.
    for (j, e) in echoes.iter().enumerate() {
        for (ip, _, _) in e.log.lock().unwrap().iter() {
            let from = ferry_addr::FleetAddr::from_ipv6(*ip).unwrap();
            assert_eq!(
                from.network(),
                ms[j].addr.network(),
                "{} got traffic from {ip}",
                ms[j].addr
            );
        }
    }
    assert_eq!(
        (same, across),
        (2 * 6, 2 * 24),
        "pairs tested within one host / across hosts"
    );
    let dropped: u64 = f
        .host_ids()
        .into_iter()
        .map(|h| stat(&f, h, Stat::OtherNetwork))
        .sum();
    assert!(dropped > 0, "isolation drops are counted");
}

#[test]
fn a_forged_source_gets_nothing_through() {
    let mut f = fleet("f", Mode::Swap);
    let (h1, h2) = (f.add_host().unwrap(), f.add_host().unwrap());
    let a = f.add_machine(h1, net(1)).unwrap();
    let b = f.add_machine(h2, net(1)).unwrap();
    let c = f.add_machine(h1, net(1)).unwrap();
    let echo_b = Echo::start(&b);
    let echo_c = Echo::start(&c);

    // Control: from its own address, a reaches both.
    assert!(udp_echo(&a, Some(a.addr.ip()), b.addr.ip(), b"real", T).is_some());

    // a claims c's address (same network, same host) and then a made-up one on another host.
    let forged = [
        c.addr.ip(),
        FleetAddr::primary(net(1), h2, ferry_addr::MachineField(0xdead)).ip(),
    ];
    for src in forged {
        netns::run_in(&a.ns, move || {
            let nl = Netlink::new().unwrap();
            nl.add_address(nl.require_index("eth0").unwrap(), src, 128)
                .unwrap();
        })
        .unwrap();
        let before = stat(&f, h1, Stat::SpoofedSrc);
        let payload = format!("forged from {src}").into_bytes();
        assert_eq!(udp_echo(&a, Some(src), b.addr.ip(), &payload, SHORT), None);
        assert_eq!(
            tcp_echo_src(&a, Some(src), b.addr.ip(), &payload, SHORT),
            None
        );
        assert!(
            !echo_b.saw(&payload) && !echo_c.saw(&payload),
            "forged packet delivered"
        );
        assert!(
            stat(&f, h1, Stat::SpoofedSrc) > before,
            "the drop was the anti-spoofing check"
        );
    }
}

#[test]
fn a_crafted_infra_form_destination_gets_nothing_through() {
    let mut f = fleet("i", Mode::Swap);
    let (h1, h2) = (f.add_host().unwrap(), f.add_host().unwrap());
    let a = f.add_machine(h1, net(1)).unwrap();
    let other_org = f.add_machine(h2, net(2)).unwrap();
    let same_org = f.add_machine(h2, net(1)).unwrap();
    let echo_o = Echo::start(&other_org);
    let echo_s = Echo::start(&same_org);
    assert!(udp_echo(&a, None, same_org.addr.ip(), b"control", T).is_some());

    // Addresses that look like what the fabric carries, aimed past the isolation check.
    for target in [
        other_org.addr.to_infra().ip(),
        same_org.addr.to_infra().ip(),
    ] {
        let before = stat(&f, h1, Stat::OtherNetwork);
        let payload = format!("crafted {target}").into_bytes();
        assert_eq!(udp_echo(&a, None, target, &payload, SHORT), None);
        assert_eq!(tcp_echo(&a, target, &payload, SHORT), None);
        assert!(!echo_o.saw(&payload) && !echo_s.saw(&payload));
        assert!(stat(&f, h1, Stat::OtherNetwork) > before);
    }
    assert_eq!(
        stat(&f, h2, Stat::FabricBadDst) + stat(&f, h2, Stat::FabricBadSrc),
        0,
        "stopped at the first host"
    );
}

/// Reads a counter from the calling thread's namespace (`/proc/thread-self/net/...`).
fn snmp(file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap();
    if file == "snmp6" {
        return text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
    }
    // snmp: a header line of names followed by a line of values, per protocol.
    let (proto, name) = key.split_once('.').unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{proto}:")))
        .collect();
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    values[names.iter().position(|n| *n == name).unwrap()]
        .parse()
        .unwrap()
}

#[test]
fn checksums_stay_valid_without_fixup() {
    let mut f = fleet("c", Mode::Swap);
    let (h1, h2) = (f.add_host().unwrap(), f.add_host().unwrap());
    let a = f.add_machine(h1, net(1)).unwrap();
    let b = f.add_machine(h2, net(1)).unwrap();
    // Over veth with offloads on, nobody computes or verifies a checksum. Turn them off on every
    // hop: the sender computes in software, every receiver verifies in software.
    let fab = f
        .namespaces()
        .into_iter()
        .find(|n| n.name().ends_with("-fab"))
        .unwrap();
    let hops: Vec<(String, String)> = vec![
        (a.ns.name().into(), "eth0".into()),
        (f.host(h1).unwrap().ns().name().into(), a.host_iface.clone()),
        (f.host(h1).unwrap().ns().name().into(), "fab0".into()),
        (fab.name().into(), format!("h{:x}", h1.get())),
        (fab.name().into(), format!("h{:x}", h2.get())),
        (f.host(h2).unwrap().ns().name().into(), "fab0".into()),
        (f.host(h2).unwrap().ns().name().into(), b.host_iface.clone()),
        (b.ns.name().into(), "eth0".into()),
    ];
    for (ns, dev) in &hops {
        ns_exec(ns, &["ethtool", "-K", dev, "tx", "off", "rx", "off"]);
    }
    let _echo = Echo::start(&b);
    let counters = || {
        netns::run_in(&b.ns, || {
            (
                snmp("snmp6", "Udp6InCsumErrors"),
                snmp("snmp", "Tcp.InCsumErrors"),
            )
        })
        .unwrap()
    };
    let before = counters();

    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(
        tcp_echo(&a, b.addr.ip(), &big, T).as_deref(),
        Some(&big[..]),
        "TCP through the swap"
    );
    for i in 0..50u32 {
        let p = format!("datagram {i}").into_bytes();
        assert_eq!(
            udp_echo(&a, None, b.addr.ip(), &p, T).as_deref(),
            Some(&p[..])
        );
    }
    assert_eq!(counters(), before, "no checksum errors at the receiver");
    assert!(
        stat(&f, h1, Stat::SwappedOut) > 0 && stat(&f, h2, Stat::SwappedIn) > 0,
        "the packets were swapped"
    );

    // Control: the receiver does verify. A datagram with a wrong checksum is counted.
    let dst = b.addr.ip();
    netns::run_in(&a.ns, move || {
        use nix::sys::socket::{
            sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn6,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Udp,
        )
        .unwrap();
        // UDP header: ports 9999 -> 9 (no listener), length 12, checksum deliberately wrong.
        let pkt = [
            0x27, 0x0f, 0x00, 0x09, 0x00, 0x0c, 0x12, 0x34, b'b', b'a', b'd', b'!',
        ];
        sendto(
            fd.as_raw_fd(),
            &pkt,
            &SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, 0)),
            MsgFlags::empty(),
        )
        .unwrap();
    })
    .unwrap();
    assert!(
        eventually(T, || counters().0 == before.0 + 1),
        "a bad checksum is detected: {:?}",
        counters()
    );
}

#[test]
fn packet_too_big_from_a_remote_host_reaches_the_sender() {
    let mut f = fleet("p", Mode::Swap);
    let (h1, h2) = (f.add_host().unwrap(), f.add_host().unwrap());
    let a = f.add_machine(h1, net(1)).unwrap();
    let b = f.add_machine(h2, net(1)).unwrap();
    // The last hop to b is narrower than the rest of the path: host 2 must tell a.
    f.host(h2).unwrap().set_machine_mtu(&b, 1280).unwrap();
    let _echo = Echo::start(&b);
    let dst = b.addr.ip();
    let mtu = netns::run_in(&a.ns, move || {
        use nix::sys::socket::{setsockopt, sockopt};
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.connect(SocketAddrV6::new(dst, PORT, 0, 0)).unwrap();
        // Don't fragment locally: the kernel must learn the path MTU from the ICMPv6 error.
        setsockopt(&s, sockopt::Ipv6DontFrag, &true).unwrap();
        let mut mtu = 0;
        eventually(T, || {
            let _ = s.send(&[0u8; 1400]);
            std::thread::sleep(Duration::from_millis(20));
            mtu = ipv6_mtu(&s);
            mtu == 1280
        });
        mtu
    })
    .unwrap();
    assert_eq!(
        mtu, 1280,
        "path MTU learned from the remote host's Packet Too Big"
    );
    assert!(
        stat(&f, h1, Stat::IcmpInner) > 0,
        "the quoted header was put back in guest form"
    );
    // And TCP still carries big writes over the narrower path.
    let big = vec![42u8; 100_000];
    assert_eq!(tcp_echo(&a, dst, &big, T).map(|v| v.len()), Some(big.len()));
}

/// getsockopt(IPV6_MTU): the path MTU the kernel holds for a connected socket.
fn ipv6_mtu(s: &UdpSocket) -> i32 {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for an int option.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        v
    } else {
        -1
    }
}

#[test]
fn the_route_count_does_not_grow_with_remote_machines() {
    let mut f = fleet("r", Mode::Swap);
    let hosts: Vec<HostId> = (0..3).map(|_| f.add_host().unwrap()).collect();
    let ours = |f: &DevFleet| {
        let mut v: Vec<String> = f
            .host(hosts[0])
            .unwrap()
            .routes()
            .unwrap()
            .into_iter()
            .filter(|r| r.is_static)
            .map(|r| format!("{}/{}", r.dst, r.len))
            .collect();
        v.sort();
        v
    };
    let start = ours(&f);
    let mut want: Vec<String> = hosts[1..]
        .iter()
        .map(|&h| ferry_addr::host_infra_prefix(h).to_string())
        .collect();
    want.sort();
    assert_eq!(start, want, "one route per other host, nothing else");
    for _ in 0..5 {
        f.add_machine(hosts[1], net(1)).unwrap();
        f.add_machine(hosts[2], net(2)).unwrap();
    }
    assert_eq!(ours(&f), start, "machines on other hosts add no route here");
    let local = f.add_machine(hosts[0], net(1)).unwrap();
    let mut with_local = start.clone();
    with_local.push(local.addr.machine_prefix().to_string());
    with_local.sort();
    assert_eq!(
        ours(&f),
        with_local,
        "a local machine adds exactly its /112"
    );
    f.remove_machine(&local).unwrap();
    assert_eq!(ours(&f), start);
}

#[test]
fn the_plain_baseline_connects_without_ebpf() {
    let mut f = fleet("b", Mode::PlainRoutes);
    let (h1, h2) = (f.add_host().unwrap(), f.add_host().unwrap());
    let a = f.add_machine(h1, net(1)).unwrap();
    let b = f.add_machine(h2, net(1)).unwrap();
    let _e = Echo::start(&b);
    assert_eq!(
        tcp_echo(&a, b.addr.ip(), b"plain", T).as_deref(),
        Some(&b"plain"[..])
    );
    assert_eq!(stat(&f, h1, Stat::SwappedOut), 0);
}

#[test]
fn teardown_leaves_nothing_behind_even_after_a_panic() {
    let name = unique_fleet("d");
    let pins = std::path::Path::new(ferry_net::BPF_PIN_ROOT).join(&name);
    let result = std::panic::catch_unwind(|| {
        let mut f = DevFleet::create(&name, Mode::Swap).unwrap();
        let h = f.add_host().unwrap();
        f.add_host().unwrap();
        f.add_machine(h, net(1)).unwrap();
        assert!(pins.exists(), "maps are pinned while the fleet lives");
        assert_eq!(f.namespaces().len(), 4);
        panic!("a test failing half way");
    });
    assert!(result.is_err());
    assert_eq!(
        netns::list(&format!("ferry-{name}-")),
        vec![],
        "namespaces left"
    );
    assert!(!pins.exists(), "BPF pins left");
}

/// The kernel IDs of the TC links pinned in a host's pin directory (`<pins>/tc/*`).
fn pinned_link_ids(tc_pins: &std::path::Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(tc_pins)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let out = std::process::Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&path)
                .output()
                .expect("running bpftool (scripts/setup.sh installs it)");
            assert!(out.status.success(), "bpftool on {}", path.display());
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            // Older bpftools print the type's number (BPF_LINK_TYPE_TCX = 11).
            assert!(
                v["type"] == "tcx" || v["type"] == 11,
                "{} is a TCX link: {v}",
                path.display()
            );
            v["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    ids
}

fn link_exists(id: u64) -> bool {
    std::process::Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn tc_links_are_pinned_per_interface_and_removed_with_it_and_with_the_fleet() {
    let name = unique_fleet("l");
    let (fabric_ids, machine_ids);
    {
        let mut f = DevFleet::create(&name, Mode::Swap).unwrap();
        let (h1, h2) = (f.add_host().unwrap(), f.add_host().unwrap());
        let tc = std::path::Path::new(ferry_net::BPF_PIN_ROOT)
            .join(&name)
            .join(format!("{:x}", h1.get()))
            .join("tc");
        fabric_ids = pinned_link_ids(&tc);
        assert_eq!(fabric_ids.len(), 2, "fabric_in and fabric_out");
        let a = f.add_machine(h1, net(1)).unwrap();
        let b = f.add_machine(h2, net(1)).unwrap();
        let with_machine = pinned_link_ids(&tc);
        machine_ids = with_machine
            .iter()
            .copied()
            .filter(|id| !fabric_ids.contains(id))
            .collect::<Vec<_>>();
        assert_eq!(machine_ids.len(), 2, "machine_in and machine_out");
        // The links carry the swap: traffic crosses and is counted.
        let _e = Echo::start(&b);
        assert_eq!(
            tcp_echo(&a, b.addr.ip(), b"tcx", T).as_deref(),
            Some(&b"tcx"[..])
        );
        assert!(stat(&f, h1, Stat::SwappedOut) > 0);
        assert!(stat(&f, h2, Stat::SwappedIn) > 0);

        f.remove_machine(&a).unwrap();
        assert_eq!(pinned_link_ids(&tc), fabric_ids, "the machine's pins went");
        for &id in &machine_ids {
            assert!(!link_exists(id), "link {id} of a removed machine is gone");
        }
    }
    // Dropping the fleet removed the pins, and with them the last reference to each link.
    for &id in &fabric_ids {
        assert!(!link_exists(id), "fabric link {id} left after teardown");
    }
    assert!(!std::path::Path::new(ferry_net::BPF_PIN_ROOT)
        .join(&name)
        .exists());
}
