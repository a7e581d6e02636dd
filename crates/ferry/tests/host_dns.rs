//! `.internal` DNS on every host is answered by that host's agent, from the snapshot the server
//! streams to it: machines resolve their peers through `fdaa::3` on their own host, and go on
//! resolving while the server does not answer at all.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use support::*;

/// AAAA answers for `name` asked from inside `netns` (a machine's network namespace, so the
/// query comes from the machine's own address) to `fdaa::3`.
fn aaaa_from(netns: &str, name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "dig", "+time=1", "+tries=1", "+short",
        ])
        .args(["-6", "@fdaa::3", "AAAA", name])
        .output()
        .expect("running dig");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| l.contains(':'))
        .collect()
}

/// Resumes the frozen `ferry dev` even when the test fails.
struct Thaw(i32);
impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

fn ip(m: &Value) -> String {
    m["private_ip"].as_str().unwrap().to_owned()
}

#[test]
fn each_host_answers_from_its_agent_and_keeps_answering_without_the_server() {
    let dev = Dev::start("hd", 2);
    let hosts = dev.hosts();
    let sleep = json!({"init": {"cmd": ["sleep", "infinity"]}});
    let a = dev.machine("hdapi", &hosts[0], sleep.clone());
    let b = dev.machine("hdapi", &hosts[1], sleep.clone());
    let a_name = format!("{}.vm.hdapi.internal", a["id"].as_str().unwrap());
    let (a_ns, b_ns) = (dev.machine_netns(&a), dev.machine_netns(&b));
    assert!(
        eventually(Duration::from_secs(10), || aaaa_from(&b_ns, &a_name)
            == [ip(&a)]),
        "{a_name} from host 1: {:?}",
        aaaa_from(&b_ns, &a_name)
    );

    // A new machine shows up on the other host's DNS without anyone asking that host.
    let c = dev.machine("hdapi", &hosts[0], sleep.clone());
    let t = std::time::Instant::now();
    let c_name = format!("{}.vm.hdapi.internal", c["id"].as_str().unwrap());
    assert!(eventually(Duration::from_secs(5), || aaaa_from(
        &b_ns, &c_name
    ) == [ip(&c)]));
    // Reported, not asserted (a timed assertion flakes on a busy box); each probe is a dig
    // process, so this is an upper bound.
    eprintln!(
        "a new machine answered on the other host {:?} after the API's answer",
        t.elapsed()
    );

    // The server stops answering anything (the whole `ferry dev` process is frozen; the agents
    // are processes of their own): both hosts go on answering what they last knew.
    let pid = dev.pid().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let thaw = Thaw(pid);
    let api_down = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap()
        .get(format!("{}/v1/hosts", dev.api))
        .send()
        .is_err();
    assert!(api_down, "the server still answers");
    assert_eq!(aaaa_from(&b_ns, &a_name), [ip(&a)]);
    assert_eq!(aaaa_from(&a_ns, &c_name), [ip(&c)]);
    assert_eq!(
        aaaa_from(&b_ns, "nope.hdapi.internal"),
        Vec::<String>::new()
    );
    drop(thaw);

    // An agent killed and restarted answers again (from the snapshot it kept, then the watch).
    let old = agent_pid(&dev, &hosts[1]).expect("host 1's agent");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(30), || agent_pid(
        &dev, &hosts[1]
    )
    .is_some_and(|p| p != old)
        && aaaa_from(&b_ns, &a_name) == [ip(&a)]));

    // Another org's machine on the same host gets no answer for this org's names.
    let (s, v) = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "hdother", "org_slug": "other"}).to_string()),
    );
    assert_eq!(s, 201, "{v}");
    let o = dev.machine("hdother", &hosts[1], sleep);
    let o_ns = dev.machine_netns(&o);
    assert!(eventually(Duration::from_secs(5), || !aaaa_from(
        &o_ns,
        &format!("{}.vm.hdother.internal", o["id"].as_str().unwrap())
    )
    .is_empty()));
    assert_eq!(aaaa_from(&o_ns, &a_name), Vec::<String>::new());
}
