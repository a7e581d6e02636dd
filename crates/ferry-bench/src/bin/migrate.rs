//! Migration downtime as a client sees it (issue 6): ferry's pre-copy migration vs a cold
//! migration (stop, copy everything, start), measured in the same run, alternating.
//!
//! The same binary is the workload: `migrate serve` is the server machine's command (a TCP
//! server on `[::]:7300` that writes one byte per connection and closes), and `migrate client`
//! is exec'd inside a client machine on a third host. The client probes every `INTERVAL_US`
//! (default 2 ms), alternating between the server's address before the move (reached through
//! the bridge once the machine moved) and `mig.internal` (a fresh getaddrinfo per probe), and
//! reports per target the longest outage: from the last success before a run of failures to
//! the first success after it. `migrate stop-client` (exec'd in the same machine) ends the
//! client through a datagram on loopback; the client also stops by itself after `max_secs`.
//!
//! Per size (default 1 GiB and 4 GiB): a volume filled with 4 MiB files of pseudo-random bytes
//! (written into the volume's host directory, then `sync`), the server machine on host A with
//! the volume at /data, then pairs of rounds (ferry pre-copy, cold; the order alternates per
//! pair), each moving the machine to the other of hosts A and B. During every round 1% of the
//! files are rewritten in place (fsync'd): for ferry right after the migrate call returned
//! (while pre-copy runs), for the cold baseline just before the call (the machine's writes
//! before it is stopped). A round fails the bench if the migration rolls back or if sampled
//! files' hashes on the destination differ from the source's.
//!
//! The floor of a migration that stops its machine is measured in the same run, by the same
//! probe: a restart in place (the same machine stopped and started again on its own host, no
//! copy, no new address), interleaved with the migrations (issue 17 item 2: ferry / restart
//! <= 1.3). And both again with a server that keeps writing until it is stopped (`writer.on`
//! in its volume), so that the final sync has data to copy.
//!
//! Environment: `PAIRS_1G` (default 3), `PAIRS_4G` (default 2), `SIZES_MB` (default
//! "1024,4096"), `INTERVAL_US` (2000), `COLD` (1: with the cold baseline), `WRITING` (1: with
//! the writing server's rounds), `FERRY_BIN`.

use anyhow::{bail, ensure, Context, Result};
use ferry_bench::{env_or, median, BenchFleet};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PORT: u16 = 7300;
/// Where the machines find this binary: in their volume.
const IN_MACHINE: &str = "/data/migrate";
/// The client's control port (loopback inside the client machine).
const CTL_PORT: u16 = 7301;
const FILE_BYTES: usize = 4 << 20;
/// Per-probe connect and read timeout: a dropped SYN would otherwise wait for the kernel's 1 s
/// retransmission and hide when service came back.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn now_ms_f() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

// ---- the workload -----------------------------------------------------------------------------

/// The file whose presence in the volume makes the server write until it is stopped.
const WRITER_FLAG: &str = "writer.on";
/// What the writer rewrites: its own file, so the bench's sampled files stay as it wrote them.
const WRITER_FILE: &str = "writer.bin";

/// One byte per connection, then close. SIGINT (ferry's default stop signal) ends it at once:
/// the default disposition, with the signal mask a parent may have left cleared. While
/// `/data/writer.on` exists, a thread keeps rewriting 1 MiB blocks of `/data/writer.bin` (fsync'd,
/// every 20 ms) until the process is stopped: the workload whose final sync is never empty.
fn serve() -> Result<()> {
    nix::sys::signal::SigSet::all().thread_unblock()?;
    std::thread::spawn(|| {
        let data = Path::new("/data");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            if data.join(WRITER_FLAG).exists() {
                n += 1;
                fill_random(&mut buf, n);
                if let Ok(f) = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(data.join(WRITER_FILE))
                {
                    // 8 blocks of 1 MiB, one per write: each final sync has up to 8 MiB new.
                    let _ = f.write_all_at(&buf, (n % 8) << 20);
                    let _ = f.sync_data();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let l = TcpListener::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PORT, 0, 0))?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        let _ = c.write_all(b"y");
    }
    Ok(())
}

/// One probe: connect, read the byte, close with RST (no TIME_WAIT pile-up).
fn probe(addr: &SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect_timeout(addr, PROBE_TIMEOUT)?;
    c.set_read_timeout(Some(PROBE_TIMEOUT))?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b)?;
    let _ = nix::sys::socket::setsockopt(
        &c,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    Ok(())
}

fn err_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        _ => match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".into(),
            std::io::ErrorKind::UnexpectedEof => "eof".into(),
            k => format!("{k:?}"),
        },
    }
}

/// A probe's outcome: completion time (ms since the epoch), and the error kind if it failed.
type Sample = (f64, Option<String>);

/// The longest outage in `s`: (ms, last success before, first success after, failed probes in
/// it, their error kinds). An outage still open at the end is reported up to the last probe,
/// flagged.
fn longest_outage(s: &[Sample]) -> Value {
    let mut best = json!({"outage_ms": 0.0, "fails": 0});
    let mut last_ok: Option<f64> = None;
    let mut run: Vec<&str> = Vec::new();
    let mut best_ms = 0.0;
    let consider =
        |from: f64, to: f64, run: &[&str], open: bool, best: &mut Value, bm: &mut f64| {
            if to - from > *bm {
                *bm = to - from;
                let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
                for k in run {
                    *kinds.entry(k).or_default() += 1;
                }
                *best = json!({"outage_ms": to - from, "from_ms": from, "to_ms": to,
                "fails": run.len(), "kinds": kinds, "open": open});
            }
        };
    for (t, e) in s {
        match e {
            None => {
                if let Some(lo) = last_ok {
                    if !run.is_empty() {
                        consider(lo, *t, &run, false, &mut best, &mut best_ms);
                    }
                }
                last_ok = Some(*t);
                run.clear();
            }
            Some(k) => {
                if last_ok.is_some() {
                    run.push(k);
                }
            }
        }
    }
    if let (Some(lo), false) = (last_ok, run.is_empty()) {
        let end = s.last().map(|x| x.0).unwrap_or(lo);
        consider(lo, end, &run, true, &mut best, &mut best_ms);
    }
    best["probes"] = json!(s.len());
    best["failed_total"] = json!(s.iter().filter(|x| x.1.is_some()).count());
    best["leading_fails"] = json!(s.iter().take_while(|x| x.1.is_some()).count());
    best
}

/// `client MAX_SECS INTERVAL_US OLD_ADDR NAME`: probes alternately until told to stop (a
/// datagram on `[::1]:CTL_PORT`) or `MAX_SECS`; prints one JSON object.
fn client(args: &[String]) -> Result<()> {
    ensure!(args.len() == 4, "client MAX_SECS INTERVAL_US OLD_ADDR NAME");
    let max = Duration::from_secs_f64(args[0].parse()?);
    let interval = Duration::from_micros(args[1].parse()?);
    let old: Ipv6Addr = args[2].parse()?;
    let name = args[3].clone();
    let old = SocketAddr::V6(SocketAddrV6::new(old, PORT, 0, 0));
    let ctl = std::net::UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, CTL_PORT, 0, 0))
        .context("binding the control socket")?;
    ctl.set_nonblocking(true)?;
    let (mut s_old, mut s_dns): (Vec<Sample>, Vec<Sample>) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut next = start;
    let mut i = 0u64;
    let mut stopped = false;
    while start.elapsed() < max {
        let mut b = [0u8; 8];
        if ctl.recv_from(&mut b).is_ok() {
            stopped = true;
            break;
        }
        if i.is_multiple_of(2) {
            let r = probe(&old).map_err(|e| err_kind(&e));
            s_old.push((now_ms_f(), r.err()));
        } else {
            // A fresh getaddrinfo per probe (glibc caches nothing without nscd).
            let r = match (name.as_str(), PORT).to_socket_addrs() {
                Ok(mut a) => match a.find(|a| a.is_ipv6()) {
                    Some(a) => probe(&a).map_err(|e| err_kind(&e)),
                    None => Err("no_address".to_string()),
                },
                Err(_) => Err("no_name".to_string()),
            };
            s_dns.push((now_ms_f(), r.err()));
        }
        i += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    println!(
        "{}",
        json!({"old": longest_outage(&s_old), "dns": longest_outage(&s_dns),
            "stopped": stopped, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn stop_client() -> Result<()> {
    let s = std::net::UdpSocket::bind("[::1]:0")?;
    s.send_to(
        b"stop",
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, CTL_PORT, 0, 0),
    )?;
    Ok(())
}

// ---- volume contents --------------------------------------------------------------------------

/// wyrand: 8 pseudo-random bytes per step, ~1 GB/s on one core.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    for c in buf.chunks_exact_mut(8) {
        s = s.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (s as u128).wrapping_mul((s ^ 0xe703_7ed1_a0b4_28db) as u128);
        c.copy_from_slice(&(((t >> 64) as u64) ^ (t as u64)).to_le_bytes());
    }
}

fn file_name(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("f{i:05}.bin"))
}

/// Writes `n` files of 4 MiB into `dir` on two threads, then `sync`.
fn fill_volume(dir: &Path, n: usize, seed: u64) -> Result<()> {
    std::thread::scope(|sc| -> Result<()> {
        let hs: Vec<_> = (0..2)
            .map(|t| {
                sc.spawn(move || -> Result<()> {
                    let mut buf = vec![0u8; FILE_BYTES];
                    for i in (t..n).step_by(2) {
                        fill_random(&mut buf, seed ^ (i as u64) << 20);
                        std::fs::write(file_name(dir, i), &buf)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap()?;
        }
        Ok(())
    })?;
    nix::unistd::sync();
    Ok(())
}

/// Rewrites the files `which` in place with new bytes, each fsync'd.
fn rewrite(dir: &Path, which: &[usize], seed: u64) -> Result<()> {
    let mut buf = vec![0u8; FILE_BYTES];
    for &i in which {
        fill_random(&mut buf, seed ^ (i as u64) << 20);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file_name(dir, i))?;
        f.write_all_at(&buf, 0)?;
        f.sync_data()?;
    }
    Ok(())
}

/// (size, digest) of sampled files.
type Digests = Vec<(u64, u64)>;

/// A 64-bit digest of a file (not cryptographic: it checks a copy, no adversary involved).
fn digest(p: &Path) -> Result<(u64, u64)> {
    let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ b.len() as u64;
    for c in b.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    Ok((b.len() as u64, h))
}

/// A small deterministic PRNG for choosing files.
struct Pick(u64);
impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
    /// `k` distinct indexes below `n`.
    fn distinct(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = Vec::with_capacity(k);
        while v.len() < k.min(n) {
            let x = self.next(n);
            if !v.contains(&x) {
                v.push(x);
            }
        }
        v
    }
}

// ---- the orchestrator -------------------------------------------------------------------------

/// What a round does to the server machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// ferry's migration with pre-copy.
    Ferry,
    /// A migration without pre-copy: stop, copy everything, start.
    Cold,
    /// The floor of a migration that stops its machine: the same machine stopped and started
    /// again on its own host (`POST .../restart`; no copy, no new address, no bridge).
    Restart,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ferry => "ferry",
            Mode::Cold => "cold",
            Mode::Restart => "restart",
        }
    }
}

struct Round {
    size_mb: u64,
    mode: Mode,
    /// The server kept writing until it was stopped ([`WRITER_FLAG`]).
    writing: bool,
    from: String,
    to: String,
    client_old_ms: f64,
    client_dns_ms: f64,
    server_ms: u64,
    final_bytes: u64,
    final_chunks: u64,
    final_sync_ms: u64,
    precopy_ms: u64,
    precopy_bytes: u64,
    total_ms: i64,
    timeline: String,
}

struct Bench<'a> {
    dev: &'a BenchFleet,
    /// No timeout: the client's exec lasts as long as a migration.
    slow: reqwest::blocking::Client,
    me: String,
    client_id: String,
    interval_us: u64,
}

impl Bench<'_> {
    fn machine(&self, id: &str) -> Result<Value> {
        self.dev.get(&format!("/v1/apps/mig/machines/{id}"))
    }

    /// The host directory of the machine's /data volume.
    fn volume_dir(&self, m: &Value) -> Result<(String, PathBuf)> {
        let vol = m["config"]["mounts"][0]["volume"]
            .as_str()
            .context("no volume mounted")?
            .to_owned();
        let all = self.dev.get("/v1/volumes")?;
        let v = all
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["id"] == vol.as_str())
            .with_context(|| format!("volume {vol} not listed"))?;
        Ok((vol, PathBuf::from(v["host_dir"].as_str().unwrap())))
    }

    fn exec_client(&self, args: Vec<String>, timeout: u64) -> Result<Value> {
        let mut cmd = vec![self.me.clone()];
        cmd.extend(args);
        let r = self
            .slow
            .post(format!(
                "{}/v1/apps/migc/machines/{}/exec",
                self.dev.api, self.client_id
            ))
            .json(&json!({"cmd": cmd, "timeout": timeout}))
            .send()?;
        let s = r.status();
        let v: Value = r.json()?;
        ensure!(s.is_success(), "exec: {v}");
        ensure!(v["exit_code"] == 0, "exec {cmd:?} failed: {v}");
        Ok(v)
    }

    /// One migration of `server` to `to`, with the client probing; returns the round's numbers.
    #[allow(clippy::too_many_arguments)]
    fn round(
        &self,
        server: &str,
        to: &str,
        mode: Mode,
        writing: bool,
        size_mb: u64,
        nfiles: usize,
        pick: &mut Pick,
        seed: u64,
    ) -> Result<Round> {
        let ferry = mode == Mode::Ferry;
        let restart = mode == Mode::Restart;
        let to = if restart {
            // A restart stays where it is.
            self.machine(server)?["host"]
                .as_str()
                .context("no host")?
                .to_owned()
        } else {
            to.to_owned()
        };
        let to = to.as_str();
        let m = self.machine(server)?;
        ensure!(
            m["state"] == "started",
            "server not started: {}; its events: {}",
            m["state"],
            m["events"]
        );
        let from = m["host"].as_str().unwrap().to_owned();
        let old_ip = m["private_ip"].as_str().unwrap().to_owned();
        let (_, src_dir) = self.volume_dir(&m)?;
        let changed = pick.distinct(nfiles.div_ceil(100), nfiles);
        // Sampled for the hash check: some rewritten files, some not.
        let mut sample: Vec<usize> = changed.iter().copied().take(4).collect();
        sample.extend(pick.distinct(4, nfiles));
        sample.sort();
        sample.dedup();
        if !ferry {
            rewrite(&src_dir, &changed, seed)?;
        }
        let flag = src_dir.join(WRITER_FLAG);
        if writing {
            std::fs::write(&flag, b"")?;
            // The writer has written a few blocks before the round starts.
            std::thread::sleep(Duration::from_millis(100));
        }

        let client = std::thread::scope(|sc| -> Result<(Value, Value, i64)> {
            let c = sc.spawn(|| {
                self.exec_client(
                    vec![
                        "client".into(),
                        "400".into(),
                        self.interval_us.to_string(),
                        old_ip.clone(),
                        "mig.internal".into(),
                    ],
                    420,
                )
            });
            let res = (|| -> Result<(Value, i64, Digests)> {
                std::thread::sleep(Duration::from_millis(700));
                if restart {
                    let t0 = now_ms();
                    self.dev.call(
                        Method::POST,
                        &format!("/v1/apps/mig/machines/{server}/restart"),
                        json!({}),
                    )?;
                    let want: Digests = sample
                        .iter()
                        .map(|&i| digest(&file_name(&src_dir, i)))
                        .collect::<Result<_>>()?;
                    std::thread::sleep(Duration::from_millis(500));
                    // Shaped like a finished migration, for the checks and the timeline below.
                    let done = json!({"phase": "done", "created_at_ms": t0, "finished_at_ms": now_ms(),
                        "stats": {}});
                    return Ok((done, 0, want));
                }
                let mig = self.dev.call(
                    Method::POST,
                    &format!("/v1/apps/mig/machines/{server}/migrate"),
                    json!({"to": to, "precopy": ferry}),
                )?;
                let id = mig["id"].as_str().context("no migration id")?.to_owned();
                let mut rewrite_end = 0;
                if ferry {
                    rewrite(&src_dir, &changed, seed)?;
                    rewrite_end = now_ms();
                }
                // The source's bytes, after every write of this round (nothing else writes).
                let want: Digests = sample
                    .iter()
                    .map(|&i| digest(&file_name(&src_dir, i)))
                    .collect::<Result<_>>()?;
                let t = Instant::now();
                let done = loop {
                    let v = self.dev.get(&format!("/v1/migrations/{id}"))?;
                    if v["phase"] == "done" || v["phase"] == "rolled_back" {
                        break v;
                    }
                    ensure!(
                        t.elapsed() < Duration::from_secs(300),
                        "migration {id} did not end in 300 s: {v}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                };
                std::thread::sleep(Duration::from_millis(500));
                Ok((done, rewrite_end, want))
            })();
            // Stop the client whatever happened, then report.
            let stop = self.exec_client(vec!["stop-client".into()], 10);
            let out = c.join().unwrap();
            let (done, rewrite_end, want) = res?;
            stop?;
            let out = out?;
            let mut report: Value = serde_json::from_str(out["stdout"].as_str().unwrap_or(""))
                .with_context(|| format!("client printed {out}"))?;
            report["want"] = json!(want);
            Ok((done, report, rewrite_end))
        })?;
        let (mig, report, rewrite_end) = client;
        if mig["phase"] != "done" {
            bail!(
                "migration {} ended {}: {}",
                mig["id"],
                mig["phase"],
                mig["error"]
            );
        }
        let st = &mig["stats"];
        let m2 = self.machine(server)?;
        let (_, dst_dir) = self.volume_dir(&m2)?;
        if writing {
            std::fs::remove_file(dst_dir.join(WRITER_FLAG))?;
        }
        let stopped_at = st["stopped_at_ms"].as_i64().unwrap_or(0);
        if ferry && rewrite_end > stopped_at {
            eprintln!(
                "warning: the rewrite ended {} ms after the stop (it should land during pre-copy)",
                rewrite_end - stopped_at
            );
        }

        // Data intact: the destination's sampled files hash as the source's did, every file is
        // there with its size.
        ensure!(m2["host"] == to, "machine is on {} not {to}", m2["host"]);
        if restart {
            ensure!(dst_dir == src_dir, "a restart moved the volume");
        } else {
            ensure!(dst_dir != src_dir, "volume did not move");
        }
        let want: Digests = serde_json::from_value(report["want"].clone())?;
        for (k, &i) in sample.iter().enumerate() {
            let got = digest(&file_name(&dst_dir, i))?;
            ensure!(
                got == want[k],
                "DATA MISMATCH: {} on the destination {:?}, source had {:?}",
                file_name(&dst_dir, i).display(),
                got,
                want[k]
            );
        }
        let count = std::fs::read_dir(&dst_dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('f'))
            .filter(|e| e.metadata().is_ok_and(|m| m.len() == FILE_BYTES as u64))
            .count();
        ensure!(
            count == nfiles,
            "DATA MISMATCH: {count} full files on the destination, {nfiles} expected"
        );

        let timeline = self.timeline(&m2, &mig, &report)?;
        for t in ["old", "dns"] {
            ensure!(
                report[t]["open"] != true,
                "client never reached the server again via {t}: {report}"
            );
        }
        Ok(Round {
            size_mb,
            mode,
            writing,
            from,
            to: to.to_owned(),
            client_old_ms: report["old"]["outage_ms"].as_f64().unwrap_or(0.0),
            client_dns_ms: report["dns"]["outage_ms"].as_f64().unwrap_or(0.0),
            server_ms: st["downtime_ms"].as_u64().unwrap_or(0),
            final_bytes: st["final_bytes"].as_u64().unwrap_or(0),
            final_chunks: st["final_chunks"].as_u64().unwrap_or(0),
            final_sync_ms: st["final_sync_ms"].as_u64().unwrap_or(0),
            precopy_ms: st["precopy_ms"].as_u64().unwrap_or(0),
            precopy_bytes: st["precopy_bytes"].as_u64().unwrap_or(0),
            total_ms: mig["finished_at_ms"].as_i64().unwrap_or(0)
                - mig["created_at_ms"].as_i64().unwrap_or(0),
            timeline,
        })
    }

    /// The machine's events during this migration and the client's outages, in ms after the
    /// source's stop began.
    fn timeline(&self, m: &Value, mig: &Value, report: &Value) -> Result<String> {
        // A restart has no migration stats: its times count from the call.
        let stop = mig["stats"]["stopped_at_ms"]
            .as_i64()
            .unwrap_or(mig["created_at_ms"].as_i64().unwrap_or(0)) as f64;
        let since = mig["created_at_ms"].as_i64().unwrap_or(0);
        let mut ev: Vec<&Value> = m["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["timestamp"].as_i64().unwrap_or(0) >= since)
            .collect();
        ev.sort_by_key(|e| e["timestamp"].as_i64());
        let mut parts: Vec<String> = ev
            .iter()
            .map(|e| {
                format!(
                    "{}/{} {:+.0}",
                    e["type"].as_str().unwrap_or("?"),
                    e["status"].as_str().unwrap_or("?"),
                    e["timestamp"].as_f64().unwrap_or(0.0) - stop
                )
            })
            .collect();
        for t in ["old", "dns"] {
            let o = &report[t];
            if o["fails"].as_u64().unwrap_or(0) > 0 {
                parts.push(format!(
                    "client-{t} down {:+.0}..{:+.0} {}",
                    o["from_ms"].as_f64().unwrap_or(0.0) - stop,
                    o["to_ms"].as_f64().unwrap_or(0.0) - stop,
                    o["kinds"]
                ));
            }
        }
        Ok(parts.join(", "))
    }
}

fn orchestrate() -> Result<()> {
    let ferry_bin = std::env::var("FERRY_BIN").unwrap_or_else(|_| {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{dir}/release/ferry")
    });
    let pairs_1g: usize = env_or("PAIRS_1G", 3);
    let pairs_4g: usize = env_or("PAIRS_4G", 2);
    let interval_us: u64 = env_or("INTERVAL_US", 2000);
    // COLD=0 leaves the cold baseline out (its rounds take seconds each); WRITING=0 the rounds
    // whose server keeps writing until it is stopped.
    let cold: u64 = env_or("COLD", 1);
    let writing: u64 = env_or("WRITING", 1);
    let sizes: Vec<u64> = std::env::var("SIZES_MB")
        .unwrap_or_else(|_| "1024,4096".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let me = std::env::current_exe()?.display().to_string();
    let name = format!("mg{:x}", std::process::id() & 0xffff);
    let dev = BenchFleet::start(&ferry_bin, &name, 3, &[])?;
    let hosts = dev.get("/v1/hosts")?;
    let h: Vec<String> = hosts
        .as_array()
        .context("hosts")?
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_owned())
        .collect();
    ensure!(h.len() == 3, "3 hosts expected: {hosts}");
    for app in ["mig", "migc"] {
        dev.call(Method::POST, "/v1/apps", json!({"app_name": app}))?;
    }
    dev.call(
        Method::POST,
        "/v1/apps/mig/policy",
        json!({"volume_retention": "1s"}),
    )?;
    // A machine sees its own root file system (the host's /usr, not the build's directory): the
    // bench binary reaches its machines inside their volumes, at /data/migrate.
    let client_vol = dev.call(Method::POST, "/v1/volumes", json!({"size_mb": 256}))?;
    let client_m = dev.call(
        Method::POST,
        "/v1/apps/migc/machines",
        json!({"host": h[2], "config": {"init": {"cmd": ["sleep", "infinity"]},
            "mounts": [{"volume": client_vol["id"], "path": "/data"}]}}),
    )?;
    let bench = Bench {
        dev: &dev,
        slow: reqwest::blocking::Client::builder()
            .timeout(None)
            .default_headers(
                [(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {}", dev.token).parse()?,
                )]
                .into_iter()
                .collect(),
            )
            .build()?,
        me: IN_MACHINE.into(),
        client_id: client_m["id"].as_str().unwrap().to_owned(),
        interval_us,
    };
    let (_, client_dir) = bench.volume_dir(&client_m)?;
    std::fs::copy(&me, client_dir.join("migrate"))?;
    println!(
        "migrate: 3 hosts, server on {} <-> {}, client on {}; probes every {interval_us} us \
         alternating the old address and mig.internal; sizes {sizes:?} MiB; pairs 1 GiB {pairs_1g}, \
         4 GiB {pairs_4g}",
        h[0], h[1], h[2]
    );

    let mut rounds: Vec<Round> = Vec::new();
    for &size_mb in &sizes {
        let pairs = if size_mb <= 1024 { pairs_1g } else { pairs_4g };
        let nfiles = (size_mb as usize * (1 << 20)) / FILE_BYTES;
        // A volume is an ext4 file system of its size: room for the data plus its own
        // metadata and journal.
        let vol = dev.call(
            Method::POST,
            "/v1/volumes",
            json!({"size_mb": size_mb + size_mb / 8 + 64}),
        )?;
        let server = dev.call(
            Method::POST,
            "/v1/apps/mig/machines",
            json!({"host": h[0], "config": {"init": {"cmd": [IN_MACHINE, "serve"]},
                "mounts": [{"volume": vol["id"], "path": "/data"}]}}),
        )?;
        let sid = server["id"].as_str().unwrap().to_owned();
        // The volume exists (on the server's host) once its first machine started; that first
        // start finds no /data/migrate yet and exits: the binary goes in, then it starts again.
        let (_, dir) = bench.volume_dir(&server)?;
        std::fs::copy(&me, dir.join("migrate"))?;
        let t = Instant::now();
        loop {
            let st = bench.machine(&sid)?["state"].clone();
            if st == "stopped" || st == "failed" {
                break;
            }
            ensure!(t.elapsed() < Duration::from_secs(30), "server still {st}");
            std::thread::sleep(Duration::from_millis(50));
        }
        dev.call(
            Method::POST,
            &format!("/v1/apps/mig/machines/{sid}/start"),
            json!(null),
        )?;
        let t = Instant::now();
        fill_volume(&dir, nfiles, size_mb)?;
        eprintln!(
            "{size_mb} MiB: {nfiles} files written and synced in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let mut pick = Pick(0x5eed ^ size_mb);
        let mut r = 0u64;
        for p in 0..pairs {
            // Each group of rounds in one order, the next group in the reverse order (ABBA):
            // every mode sees the same drift of the box's load.
            let mut order = vec![(Mode::Ferry, false), (Mode::Restart, false)];
            if cold != 0 {
                order.push((Mode::Cold, false));
            }
            if writing != 0 {
                order.extend([(Mode::Ferry, true), (Mode::Restart, true)]);
            }
            if !p.is_multiple_of(2) {
                order.reverse();
            }
            for (mode, wr) in order {
                let m = bench.machine(&sid)?;
                let to = if m["host"] == h[0].as_str() {
                    &h[1]
                } else {
                    &h[0]
                };
                r += 1;
                let x = bench.round(&sid, to, mode, wr, size_mb, nfiles, &mut pick, r << 40)?;
                eprintln!(
                    "{size_mb:>5} MiB {:<7}{} {}->{}: client old {:>7.1} ms, dns {:>7.1} ms; \
                     server {:>5} ms; final {} B in {} chunks, {} ms; precopy {} B, {} ms; \
                     total {} ms\n      {}",
                    mode.name(),
                    if wr { "+w" } else { "  " },
                    x.from,
                    x.to,
                    x.client_old_ms,
                    x.client_dns_ms,
                    x.server_ms,
                    x.final_bytes,
                    x.final_chunks,
                    x.final_sync_ms,
                    x.precopy_bytes,
                    x.precopy_ms,
                    x.total_ms,
                    x.timeline
                );
                rounds.push(x);
                // The source copy expires after the 1 s retention (listing volumes expires).
                std::thread::sleep(Duration::from_millis(1200));
                dev.get("/v1/volumes")?;
            }
        }
        // Free the disk: the machine goes, then its volume's files.
        let m = bench.machine(&sid)?;
        let (_, last_dir) = bench.volume_dir(&m)?;
        dev.call(
            Method::DELETE,
            &format!("/v1/apps/mig/machines/{sid}?force=true"),
            json!(null),
        )?;
        if last_dir.is_dir() {
            for i in 0..nfiles {
                let _ = std::fs::remove_file(file_name(&last_dir, i));
            }
        }
    }

    summarize(&rounds, &sizes);
    drop(dev);
    Ok(())
}

fn summarize(rounds: &[Round], sizes: &[u64]) {
    println!();
    println!("| size | round | mode | server writes | move | client downtime, old address (ms) | client downtime, mig.internal (ms) | server downtime_ms | final_bytes | final sync (ms) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "| {} MiB | {} | {} | {} | {}->{} | {:.1} | {:.1} | {} | {} | {} |",
            r.size_mb,
            i + 1,
            match r.mode {
                Mode::Ferry => "ferry pre-copy",
                Mode::Cold => "cold",
                Mode::Restart => "restart in place",
            },
            if r.writing { "yes" } else { "no" },
            r.from,
            r.to,
            r.client_old_ms,
            r.client_dns_ms,
            r.server_ms,
            r.final_bytes,
            r.final_sync_ms
        );
    }
    println!();
    let mut summary = json!({});
    let mut ferry_old_by_size = Vec::new();
    for &size in sizes {
        let sel = |mode: Mode, writing: bool| -> Vec<&Round> {
            rounds
                .iter()
                .filter(|r| r.size_mb == size && r.mode == mode && r.writing == writing)
                .collect()
        };
        let med = |v: &[&Round], k: fn(&Round) -> f64| {
            median(&v.iter().map(|r| k(r)).collect::<Vec<_>>())
        };
        for writing in [false, true] {
            let (f, rs) = (sel(Mode::Ferry, writing), sel(Mode::Restart, writing));
            if f.is_empty() || rs.is_empty() {
                continue;
            }
            let (fo, ro) = (med(&f, |r| r.client_old_ms), med(&rs, |r| r.client_old_ms));
            let (fd, rd) = (med(&f, |r| r.client_dns_ms), med(&rs, |r| r.client_dns_ms));
            let ff = med(&f, |r| r.final_bytes as f64);
            let fsync = med(&f, |r| r.final_sync_ms as f64);
            let w = if writing { ", server writing" } else { "" };
            println!(
                "{size} MiB{w} medians ({} ferry, {} restart rounds): client old address ferry \
                 {fo:.1} ms, restart in place {ro:.1} ms, ferry/restart {:.2}; mig.internal ferry \
                 {fd:.1} ms, restart {rd:.1} ms, ferry/restart {:.2} (goal <= 1.3); ferry final \
                 sync {ff:.0} B in {fsync:.0} ms",
                f.len(),
                rs.len(),
                fo / ro,
                fd / rd,
            );
            summary[format!("{size}{}", if writing { "_writing" } else { "" })] = json!({
                "ferry_client_old_ms": fo, "restart_client_old_ms": ro,
                "ferry_client_dns_ms": fd, "restart_client_dns_ms": rd,
                "ratio_ferry_over_restart_old": fo / ro, "ratio_ferry_over_restart_dns": fd / rd,
                "ferry_final_bytes": ff, "ferry_final_sync_ms": fsync});
        }
        let (f, b) = (sel(Mode::Ferry, false), sel(Mode::Cold, false));
        if f.is_empty() {
            continue;
        }
        let fo = med(&f, |r| r.client_old_ms);
        let fd = med(&f, |r| r.client_dns_ms);
        let fs = med(&f, |r| r.server_ms as f64);
        ferry_old_by_size.push((size, fo, fd, fs));
        if b.is_empty() {
            continue;
        }
        let (bo, bd) = (med(&b, |r| r.client_old_ms), med(&b, |r| r.client_dns_ms));
        let bs = med(&b, |r| r.server_ms as f64);
        let (ff, bf) = (
            med(&f, |r| r.final_bytes as f64),
            med(&b, |r| r.final_bytes as f64),
        );
        println!(
            "{size} MiB medians ({} ferry, {} cold rounds): client old address ferry {fo:.1} ms, \
             cold {bo:.1} ms (cold/ferry {:.1}x); mig.internal ferry {fd:.1} ms, cold {bd:.1} ms \
             ({:.1}x); server downtime_ms ferry {fs:.0}, cold {bs:.0} ({:.1}x); final_bytes ferry \
             {ff:.0}, cold {bf:.0}",
            f.len(),
            b.len(),
            bo / fo,
            bd / fd,
            bs / fs
        );
        summary[format!("{size}")]["cold"] = json!({"ferry_client_old_ms": fo,
            "cold_client_old_ms": bo, "ferry_client_dns_ms": fd, "cold_client_dns_ms": bd,
            "ferry_server_ms": fs, "cold_server_ms": bs, "ferry_final_bytes": ff,
            "cold_final_bytes": bf, "ratio_cold_over_ferry_old": bo / fo,
            "ratio_cold_over_ferry_dns": bd / fd});
    }
    if ferry_old_by_size.len() >= 2 {
        let (s0, o0, d0, v0) = ferry_old_by_size[0];
        let (s1, o1, d1, v1) = ferry_old_by_size[ferry_old_by_size.len() - 1];
        println!(
            "ferry {s1} MiB / {s0} MiB: client old address {:.2}, mig.internal {:.2}, server {:.2} \
             (goal <= 1.2)",
            o1 / o0,
            d1 / d0,
            v1 / v0
        );
        summary["ratio_ferry_large_over_small"] =
            json!({"old": o1 / o0, "dns": d1 / d0, "server": v1 / v0});
    }
    println!(
        "goals: ferry/restart in place <= 1.3 (client-observed, p50); cold/ferry >= 10; ferry \
         large/small <= 1.2"
    );
    println!("{summary}");
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(),
        Some("client") => client(&args[2..]),
        Some("stop-client") => stop_client(),
        _ => orchestrate(),
    }
}
