use super::*;
use proptest::prelude::*;

fn net() -> impl Strategy<Value = NetworkId> {
    (1..=NetworkId::MAX).prop_map(|v| NetworkId::new(v).unwrap())
}
fn host() -> impl Strategy<Value = HostId> {
    (HostId::MIN..=u32::MAX).prop_map(|v| HostId::new(v).unwrap())
}
fn fleet_addr() -> impl Strategy<Value = FleetAddr> {
    (net(), host(), any::<u32>(), any::<u16>())
        .prop_map(|(n, h, m, s)| FleetAddr::new(n, h, MachineField(m), s))
}

/// One's-complement sum of the 16-bit words, folded: what the checksum pseudo-header adds.
fn ones_sum(addrs: &[Ipv6Addr]) -> u16 {
    let mut sum: u32 = addrs.iter().flat_map(|a| a.segments()).map(u32::from).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Every RFC 4291/5952 text form of one address.
fn text_forms(a: Ipv6Addr) -> Vec<String> {
    let w = a.segments();
    let expanded = w
        .iter()
        .map(|x| format!("{x:04x}"))
        .collect::<Vec<_>>()
        .join(":");
    let no_zeros = w
        .iter()
        .map(|x| format!("{x:x}"))
        .collect::<Vec<_>>()
        .join(":");
    vec![
        a.to_string(),
        a.to_string().to_uppercase(),
        expanded.clone(),
        expanded.to_uppercase(),
        no_zeros,
    ]
}

proptest! {
    #[test]
    fn swap_is_its_own_inverse(a in any::<u128>()) {
        let a = Ipv6Addr::from(a);
        prop_assert_eq!(swap_fields(swap_fields(a)), a);
    }

    #[test]
    fn swap_keeps_the_pseudo_header_sum(src in fleet_addr(), dst in fleet_addr()) {
        let before = ones_sum(&[src.ip(), dst.ip()]);
        let after = ones_sum(&[src.to_infra().ip(), dst.to_infra().ip()]);
        prop_assert_eq!(before, after);
    }

    #[test]
    fn guest_and_infra_forms_never_overlap(a in fleet_addr()) {
        prop_assert_eq!(classify(a.ip()), Some(Form::Guest));
        prop_assert_eq!(classify(a.to_infra().ip()), Some(Form::Infra));
        prop_assert!(FleetAddr::from_ipv6(a.to_infra().ip()).is_err());
        prop_assert_eq!(a.to_infra().to_guest(), a);
    }

    #[test]
    fn parse_format_roundtrip(a in fleet_addr()) {
        for form in text_forms(a.ip()) {
            prop_assert_eq!(form.parse::<FleetAddr>().unwrap(), a, "form {}", form);
        }
        prop_assert_eq!(a.to_string().parse::<FleetAddr>().unwrap(), a);
    }

    #[test]
    fn fields_roundtrip(n in net(), h in host(), m in any::<u32>(), s in any::<u16>()) {
        let a = FleetAddr::new(n, h, MachineField(m), s);
        prop_assert_eq!((a.network(), a.host(), a.machine(), a.suffix()), (n, h, MachineField(m), s));
        prop_assert!(a.machine_prefix().contains(a.ip()));
        prop_assert!(a.network_prefix().contains(a.ip()));
        prop_assert!(host_infra_prefix(h).contains(a.to_infra().ip()));
    }

    /// Allocate, "crash" (persist through JSON), restore, allocate again: no value twice.
    #[test]
    fn allocation_never_repeats_across_restarts(rounds in proptest::collection::vec(1usize..40, 1..6)) {
        let mut seen_m = std::collections::HashSet::new();
        let mut seen_h = std::collections::HashSet::new();
        let mut seen_n = std::collections::HashSet::new();
        let (mut ms, mut hs, mut ns) = (MachineAllocator::default().state(), HostAllocator::default().state(), NetworkAllocator::default().state());
        for k in rounds {
            let (mut m, mut h, mut n) = (MachineAllocator::restore(ms), HostAllocator::restore(hs), NetworkAllocator::restore(ns));
            for _ in 0..k {
                prop_assert!(seen_m.insert(m.allocate().unwrap()));
                prop_assert!(seen_h.insert(h.allocate().unwrap()));
                prop_assert!(seen_n.insert(n.allocate().unwrap()));
            }
            let json = serde_json::to_string(&(m.state(), h.state(), n.state())).unwrap();
            (ms, hs, ns) = serde_json::from_str(&json).unwrap();
        }
    }
}

#[test]
fn the_spec_example_decodes() {
    let a: FleetAddr = "fdaa:0:18:8000:7d:f066:b83b:2".parse().unwrap();
    assert_eq!(a.network().get(), 0x18);
    assert_eq!(a.host().get(), 0x8000_007d);
    assert_eq!(a.machine(), MachineField(0xf066_b83b));
    assert_eq!(a.suffix(), 2);
    assert_eq!(
        a.machine_prefix().to_string(),
        "fdaa:0:18:8000:7d:f066:b83b:0/112"
    );
    assert_eq!(a.network_prefix().to_string(), "fdaa:0:18::/48");
    assert_eq!(a.to_infra().to_string(), "fdaa:8000:7d:0:18:f066:b83b:2");
    assert_eq!(host_infra_prefix(a.host()).to_string(), "fdaa:8000:7d::/48");
}

#[test]
fn bad_inputs_are_named() {
    let check = |s: &str, want: &str| {
        let e = s.parse::<FleetAddr>().unwrap_err().to_string();
        assert!(e.contains(want), "{s}: {e}");
    };
    check("fdaa::g", "not an IPv6 address");
    check("10.0.0.1", "not an IPv6 address");
    check("fd00::1", "outside the fleet prefix");
    check("fdaa:8000:7d:0:18:f066:b83b:2", "infra form");
    check("fdaa::3", "infrastructure service");
    check("fdaa:0:18:0:7d::2", "outside its ID space");
    assert_eq!(classify(DNS_ADDR), Some(Form::Service));
    assert!(NetworkId::new(0).is_err() && NetworkId::new(1 << 31).is_err());
    assert!(HostId::new((1 << 31) - 1).is_err());
    assert!(serde_json::from_str::<HostId>("5").is_err());
}

#[test]
fn allocators_stop_at_the_end_of_their_space() {
    let mut n = NetworkAllocator::restore(AllocatorState {
        next: u64::from(NetworkId::MAX),
    });
    assert_eq!(n.allocate().unwrap().get(), NetworkId::MAX);
    assert!(matches!(
        n.allocate(),
        Err(AddrError::Exhausted { kind: "network" })
    ));
    assert_eq!(
        HostAllocator::default().allocate().unwrap().get(),
        HostId::MIN
    );
}
