//! `ferry-volume-bench [MiB]`: builds a tree of that many MiB in a temp dir, forks it over
//! loopback TCP (full round), rewrites 1% of the files, forks again (delta round), and prints the
//! full round's throughput and the delta round's time. Both sides run in this process, on their
//! own threads, as the agents would.

use ferry_volume::{serve_one, verify_dir, Hello, SendOptions, Sender};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const FILE_MIB: u64 = 4;
const SMALL_FILES: u64 = 1000;

fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn write_file(p: &Path, seed: u64, len: usize, buf: &mut Vec<u8>) {
    buf.resize(len, 0);
    fill(seed, buf);
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(buf).unwrap();
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("usage: ferry-volume-bench [MiB]"))
        .unwrap_or(256);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dest = tmp.path().join("dst/vol");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();

    // Big files of FILE_MIB plus SMALL_FILES small ones (4 KiB each) in 10 directories.
    let big = (mib / FILE_MIB).max(1);
    let mut files = Vec::new();
    let mut buf = Vec::new();
    for i in 0..big {
        let d = src.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("big{i}"));
        write_file(&p, i, (FILE_MIB << 20) as usize, &mut buf);
        files.push(p);
    }
    for i in 0..SMALL_FILES {
        let d = src.join(format!("d{}/small", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("s{i}"));
        write_file(&p, 1_000_000 + i, 4096, &mut buf);
        files.push(p);
    }
    let total: u64 = big * (FILE_MIB << 20) + SMALL_FILES * 4096;
    println!(
        "tree: {} files, {:.1} MiB ({} x {FILE_MIB} MiB + {SMALL_FILES} x 4 KiB)",
        files.len(),
        total as f64 / (1 << 20) as f64,
        big
    );
    // Let the files age past the racy-clean window, like a volume that has been sitting there.
    std::thread::sleep(Duration::from_millis(100));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let d = dest.clone();
    let agent = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let r = serve_one(&mut s, |_h: &Hello| Some(d.clone())).unwrap();
            assert!(r.verified);
        }
    });
    let hello = Hello {
        session: "bench".into(),
        token: "t".into(),
        target: "vol".into(),
    };
    let mut sender = Sender::new(&src, None);
    let round = |sender: &mut Sender| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let t = Instant::now();
        let r = sender
            .round(&mut s, &hello, &SendOptions::default())
            .unwrap();
        (r, t.elapsed())
    };

    let (r1, t1) = round(&mut sender);
    assert!(r1.verified);
    println!(
        "full round: {:.0} ms, {:.0} MB/s ({:.0} MiB/s) end to end (scan {} ms, transfer {} ms, {} chunks)",
        t1.as_secs_f64() * 1e3,
        total as f64 / t1.as_secs_f64() / 1e6,
        total as f64 / t1.as_secs_f64() / (1 << 20) as f64,
        r1.scan_ms,
        r1.transfer_ms,
        r1.chunks_sent
    );

    // Rewrite 1% of the files (every 100th), same sizes, new content.
    let mut changed = 0;
    let mut changed_bytes = 0u64;
    for (i, p) in files.iter().enumerate().step_by(100) {
        let len = std::fs::metadata(p).unwrap().len() as usize;
        write_file(p, 77_000_000 + i as u64, len, &mut buf);
        changed += 1;
        changed_bytes += len as u64;
    }
    let (r2, t2) = round(&mut sender);
    assert!(r2.verified);
    println!(
        "delta round ({changed} of {} files rewritten, {:.1} MiB): {:.1} ms (scan {} ms, transfer {} ms, {} files rehashed, {} chunks sent)",
        files.len(),
        changed_bytes as f64 / (1 << 20) as f64,
        t2.as_secs_f64() * 1e3,
        r2.scan_ms,
        r2.transfer_ms,
        r2.files_rehashed,
        r2.chunks_sent
    );
    // Nothing changed: what a round costs by itself (what the final round of a migration costs
    // when the pre-copy caught everything).
    let (r3, t3) = round(&mut sender);
    assert!(r3.verified);
    println!(
        "unchanged round: {:.1} ms (scan {} ms, transfer {} ms, {} chunks sent)",
        t3.as_secs_f64() * 1e3,
        r3.scan_ms,
        r3.transfer_ms,
        r3.chunks_sent
    );
    agent.join().unwrap();
    let t = Instant::now();
    assert_eq!(verify_dir(&dest).unwrap().root(), r2.root);
    println!(
        "check: full rehash of the destination matches ({:.0} ms)",
        t.elapsed().as_secs_f64() * 1e3
    );
}
