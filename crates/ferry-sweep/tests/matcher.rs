//! Data-driven matcher tests: every textual form a fleet address takes in a config, every
//! near-miss that must not match, and what a rewrite replaces in each context.

use ferry_addr::Form;
use ferry_sweep::{rewrite, Context, Matcher, Owner, OwnerIndex};
use std::net::Ipv6Addr;

/// Asserts that `input` holds exactly the literals `expected` (their text as written), in order,
/// and that every hit's span really is that text and parses to an fdaa address.
fn check(input: &str, expected: &[&str]) {
    let hits = Matcher::new().find_all(input.as_bytes());
    let got: Vec<&str> = hits.iter().map(|h| &input[h.span.clone()]).collect();
    assert_eq!(got, expected, "input: {input:?}");
    for h in &hits {
        let ip: Ipv6Addr = input[h.span.clone()].parse().unwrap();
        assert_eq!(ip, h.ip);
        assert_eq!(ip.segments()[0], 0xfdaa);
        assert!(h.replace.start <= h.span.start && h.span.end <= h.replace.end);
    }
}

const A: &str = "fdaa:0:18:8000:7d:f066:b83b:2";

#[test]
fn compressed_expanded_case_and_leading_zeros() {
    check(A, &[A]);
    check(
        "fdaa:0000:0018:8000:007d:f066:b83b:0002",
        &["fdaa:0000:0018:8000:007d:f066:b83b:0002"],
    );
    check(
        "FDAA:0:18:8000:7D:F066:B83B:2",
        &["FDAA:0:18:8000:7D:F066:B83B:2"],
    );
    check(
        "FdAa:0:18:8000:7d:F066:b83b:2",
        &["FdAa:0:18:8000:7d:F066:b83b:2"],
    );
    check(
        "fdaa::18:8000:7d:f066:b83b:2",
        &["fdaa::18:8000:7d:f066:b83b:2"],
    );
    check("fdaa::3", &["fdaa::3"]);
    check("fdaa::", &["fdaa::"]);
    check("fdaa:0:18::2", &["fdaa:0:18::2"]);
    check(
        "fdaa:00:018:8000:7d:f066:b83b:2",
        &["fdaa:00:018:8000:7d:f066:b83b:2"],
    );
}

#[test]
fn brackets_ports_urls_and_connection_strings() {
    check("[fdaa::2]:5432", &["fdaa::2"]);
    check("listen [fdaa:0:18:8000:7d:f066:b83b:2]:80;", &[A]);
    check("http://[fdaa::2]:8080/x", &["fdaa::2"]);
    check(
        "postgres://user:pw@[fdaa::2]:5432/db?sslmode=disable",
        &["fdaa::2"],
    );
    check("http://[fdaa::2]/health", &["fdaa::2"]);
    check("host=fdaa::2 port=5432 dbname=app", &["fdaa::2"]);
    check("Server=fdaa::2;Port=5432;", &["fdaa::2"]);
    check(
        "postgres://[fdaa::2]:5432,[fdaa::3]:5432/db",
        &["fdaa::2", "fdaa::3"],
    );
    check(&format!("{A}:5432"), &[A]);
    check("fdaa::2%eth0", &["fdaa::2"]);
    check("http://[fdaa::2%25eth0]:80/", &["fdaa::2"]);
}

#[test]
fn config_formats() {
    check(
        "PRIMARY=fdaa::2\nREPLICA=\"fdaa::3\"\n",
        &["fdaa::2", "fdaa::3"],
    );
    check("export DB_HOST='fdaa::2'", &["fdaa::2"]);
    check("[database]\nhost = fdaa::2\nport=5432\n", &["fdaa::2"]);
    check(
        "db:\n  host: fdaa::2\n  peers: [fdaa::3, \"fdaa::4\"]\n",
        &["fdaa::2", "fdaa::3", "fdaa::4"],
    );
    check("- fdaa::2\n- 'fdaa::3'\n", &["fdaa::2", "fdaa::3"]);
    check(
        r#"{"host":"fdaa::2","peers":["fdaa::3"],"url":"http://[fdaa::4]:80"}"#,
        &["fdaa::2", "fdaa::3", "fdaa::4"],
    );
    check(
        "[pg]\nhost = \"fdaa::2\"\npeers = [\"fdaa::3\"]\n",
        &["fdaa::2", "fdaa::3"],
    );
    check("host = 'fdaa::2' # primary\n", &["fdaa::2"]);
    check("nameserver fdaa::3\n", &["fdaa::3"]);
    check(
        "a=fdaa::2,fdaa::3;fdaa::4 (fdaa::5) <fdaa::6>",
        &["fdaa::2", "fdaa::3", "fdaa::4", "fdaa::5", "fdaa::6"],
    );
    check("addr\tfdaa::2\r\n", &["fdaa::2"]);
}

#[test]
fn punctuation_after_the_address() {
    check("connect to fdaa::2.", &["fdaa::2"]);
    check("dial fdaa::2: connection refused", &["fdaa::2"]);
    check("fdaa::2, then", &["fdaa::2"]);
    check("“fdaa::2”", &["fdaa::2"]);
}

#[test]
fn embedded_ipv4_and_ffff_tails() {
    check("fdaa::1.2.3.4", &["fdaa::1.2.3.4"]);
    check("fdaa::ffff:10.0.0.1", &["fdaa::ffff:10.0.0.1"]);
    check("fdaa::ffff", &["fdaa::ffff"]);
    check("fdaa:0:0:0:0:ffff:1.2.3.4", &["fdaa:0:0:0:0:ffff:1.2.3.4"]);
    // Not valid embedded forms: no literal.
    check("fdaa::1.2.3", &[]);
    check("fdaa::1.2.3.4.5", &[]);
    check("fdaa::1.2.3.256", &[]);
}

#[test]
fn must_not_match() {
    for s in [
        "fd00::1",
        "2001:db8::1",
        "fdaa0::",
        "fdaa0::1",
        "xfdaa::1",
        "0xfdaa::1",
        "_fdaa::1",
        "2001:db8::fdaa:1",
        "::fdaa:1",
        "1.fdaa::1",
        "fd:aa:00:11:22:33",
        "FD-AA-00-11-22-33",
        "fdaa.0011.2233",
        "12:34:56",
        "fdaa:12:34",
        "sha256:fdaa93c2e1b04f5d",
        "3fdaa:0:18::2",
        "cafefdaa::1",
        "commit fdaa1b2c3d4e5f60718293a4b5c6d7e8f9012345",
        "10.0.0.1",
        "192.168.1.10:5432",
        "fdaa::2g",
        "fdaa::2::3",
        "fdaa:::2",
        "fdaa:1:2:3:4:5:6:7:8:9",
        "fdaa:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0",
        "fdaa",
        "fdaa:",
        "fdaa:g::1",
        "fdaa::12345",
        "fdaa:00000::1",
    ] {
        check(s, &[]);
    }
}

#[test]
fn classifies_every_form() {
    let forms = |s: &str| {
        Matcher::new()
            .find_all(s.as_bytes())
            .iter()
            .map(|h| h.form)
            .collect::<Vec<_>>()
    };
    assert_eq!(forms(A), [Form::Guest]);
    assert_eq!(forms("fdaa:8000:7d:0:18:f066:b83b:2"), [Form::Infra]);
    assert_eq!(forms("fdaa::3"), [Form::Service]);
    assert_eq!(forms("fdaa:1::1"), [Form::Invalid]);
}

#[test]
fn contexts() {
    let ctx = |s: &str| Matcher::new().find_all(s.as_bytes())[0].context;
    assert_eq!(ctx("fdaa::2"), Context::Bare);
    assert_eq!(
        ctx("[fdaa::2]:5432"),
        Context::Bracketed { port: Some(5432) }
    );
    assert_eq!(ctx("http://[fdaa::2]/"), Context::Bracketed { port: None });
    assert_eq!(ctx("u@[fdaa::2]"), Context::Bracketed { port: None });
    assert_eq!(ctx("peers: [fdaa::2]"), Context::InBrackets);
    assert_eq!(ctx(&format!("{A}:5432")), Context::WithPort { port: 5432 });
}

/// Owns every address: machine `aaaaaaaaaaaaaa` of app `pg`.
struct Everyone;
impl OwnerIndex for Everyone {
    fn owner(&self, _ip: Ipv6Addr) -> Owner {
        Owner::Current {
            machine_id: "aaaaaaaaaaaaaa".into(),
            app: "pg".into(),
        }
    }
}

fn rewritten(input: &str) -> String {
    let hits = Matcher::new().find_all(input.as_bytes());
    let names: Vec<_> = hits
        .iter()
        .map(|h| Everyone.owner(h.ip).dns_name())
        .collect();
    let edits: Vec<_> = hits
        .iter()
        .zip(&names)
        .map(|(h, n)| (h, n.as_deref()))
        .collect();
    String::from_utf8(rewrite::apply(input.as_bytes(), &edits)).unwrap()
}

#[test]
fn rewrite_keeps_brackets_and_ports_right() {
    const N: &str = "aaaaaaaaaaaaaa.vm.pg.internal";
    for (input, want) in [
        ("[fdaa::2]:5432", format!("{N}:5432")),
        ("http://[fdaa::2]:8080/x", format!("http://{N}:8080/x")),
        ("http://[fdaa::2]/x", format!("http://{N}/x")),
        (
            "postgres://u:p@[fdaa::2]:5432/db",
            format!("postgres://u:p@{N}:5432/db"),
        ),
        ("postgres://u@[fdaa::2]/db", format!("postgres://u@{N}/db")),
        ("fdaa::2", N.to_string()),
        ("host=fdaa::2 port=5432", format!("host={N} port=5432")),
        ("\"fdaa::2\"", format!("\"{N}\"")),
        ("peers: [fdaa::2]", format!("peers: [{N}]")),
        ("peers: [fdaa::2, fdaa::3]", format!("peers: [{N}, {N}]")),
        (&format!("{A}:5432"), format!("{N}:5432")),
        ("fdaa::2%eth0 x", format!("{N} x")),
        ("http://[fdaa::2%25eth0]:80/", format!("http://{N}:80/")),
        ("connect to fdaa::2.", format!("connect to {N}.")),
        (
            "no literal here: fd00::1",
            "no literal here: fd00::1".to_string(),
        ),
    ] {
        assert_eq!(rewritten(input), want, "input: {input:?}");
    }
}
