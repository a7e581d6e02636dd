mod support;
use ferry_addr::NetworkId;
use ferry_net::Mode;
use std::time::Duration;
use support::*;

#[test]
fn smoke() {
    let mut f = fleet("s", Mode::Swap);
    let h1 = f.add_host().unwrap();
    let h2 = f.add_host().unwrap();
    let n = NetworkId::new(1).unwrap();
    let a = f.add_machine(h1, n).unwrap();
    let b = f.add_machine(h2, n).unwrap();
    let c = f.add_machine(h1, n).unwrap();
    let _eb = Echo::start(&b);
    let _ec = Echo::start(&c);
    println!("a={} b={}", a.addr, b.addr);
    assert_eq!(tcp_echo(&a, c.addr.ip(), b"local", Duration::from_secs(2)).as_deref(), Some(&b"local"[..]));
    assert_eq!(tcp_echo(&a, b.addr.ip(), b"hello", Duration::from_secs(2)).as_deref(), Some(&b"hello"[..]));
}
