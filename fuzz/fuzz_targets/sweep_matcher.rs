//! Fuzz target: the sweep matcher on arbitrary bytes. Every hit must lie inside the input, be
//! an fdaa::/16 address that parses back to what the matcher reported, sit inside its rewrite
//! range, and hits must come in order without overlapping. A rewrite of every hit must leave
//! no hit behind. Run: `cargo fuzz run sweep_matcher -- -dict=sweep_matcher.dict` (bench/sweep/RESULTS.md says
//! how on a stable toolchain).
#![no_main]

use ferry_sweep::{rewrite, Matcher};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv6Addr;
use std::sync::LazyLock;

/// Built once: building per input would spend the fuzzer's time on Teddy setup.
static MATCHER: LazyLock<Matcher> = LazyLock::new(Matcher::new);

fuzz_target!(|data: &[u8]| {
    let m = &*MATCHER;
    let hits = m.find_all(data);
    let mut prev_end = 0;
    for h in &hits {
        assert!(h.span.start < h.span.end && h.span.end <= data.len(), "span outside input");
        assert!(h.replace.start <= h.span.start && h.span.end <= h.replace.end && h.replace.end <= data.len());
        assert!(h.replace.start >= prev_end, "hits overlap or are out of order");
        prev_end = h.replace.end;
        let text = std::str::from_utf8(&data[h.span.clone()]).expect("address text is ASCII");
        let ip: Ipv6Addr = text.parse().expect("hit parses as IPv6");
        assert_eq!(ip, h.ip);
        assert_eq!(ip.segments()[0], 0xfdaa, "hit outside fdaa::/16");
        assert_eq!(ferry_addr::classify(ip), Some(h.form));
    }
    assert_eq!(m.is_match(data), !hits.is_empty());
    // Replacing every hit with a name leaves no literal.
    let name = "aaaaaaaaaaaaaa.vm.app.internal";
    let edits: Vec<_> = hits.iter().map(|h| (h, Some(name))).collect();
    let out = rewrite::apply(data, &edits);
    assert!(m.find_all(&out).is_empty() || hits.is_empty() || rewritten_can_rejoin(data), "rewrite left a literal");
});

/// Replacing text can join what was around it into a new token only if the input already held
/// an `fdaa:` that was not a literal (e.g. `[fdaa::1]fdaa::2`); such inputs are not a bug.
fn rewritten_can_rejoin(data: &[u8]) -> bool {
    data.windows(5).filter(|w| w.eq_ignore_ascii_case(b"fdaa:")).count() > MATCHER.find_all(data).len()
}
