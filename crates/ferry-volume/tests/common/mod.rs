#![allow(dead_code)]
//! Helpers for the integration tests: real trees under temp dirs, real TCP sessions.

use ferry_volume::{
    serve_one_with, verify_dir, Hello, ReceiveOptions, ReceiveReport, RoundReport, SendOptions,
    Sender, VolumeError,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

pub const TOKEN: &str = "s3cret";

pub fn hello() -> Hello {
    Hello {
        session: "test".into(),
        token: TOKEN.into(),
        target: "vol".into(),
    }
}

pub fn listener(v6: bool) -> TcpListener {
    if v6 {
        if let Ok(l) = TcpListener::bind("[::1]:0") {
            return l;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Starts a receiver for one session on its own thread.
pub fn spawn_receiver(
    l: TcpListener,
    dest: PathBuf,
    opts: ReceiveOptions,
) -> std::thread::JoinHandle<Result<ReceiveReport, VolumeError>> {
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        serve_one_with(
            &mut s,
            |h: &Hello| (h.token == TOKEN && h.target == "vol").then(|| dest.clone()),
            &opts,
        )
    })
}

/// One round over a fresh loopback connection.
pub fn round(
    sender: &mut Sender,
    dest: &Path,
    opts: &SendOptions,
) -> (
    Result<RoundReport, VolumeError>,
    Result<ReceiveReport, VolumeError>,
) {
    round_on(sender, dest, opts, false, ReceiveOptions::default(), |s| s)
}

pub fn round_on<W: Read + Write>(
    sender: &mut Sender,
    dest: &Path,
    opts: &SendOptions,
    v6: bool,
    ropts: ReceiveOptions,
    wrap: impl FnOnce(TcpStream) -> W,
) -> (
    Result<RoundReport, VolumeError>,
    Result<ReceiveReport, VolumeError>,
) {
    let l = listener(v6);
    let addr: SocketAddr = l.local_addr().unwrap();
    let h = spawn_receiver(l, dest.to_path_buf(), ropts);
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut w = wrap(s);
    let r = sender.round(&mut w, &hello(), opts);
    drop(w);
    (r, h.join().unwrap())
}

/// Source and destination hold the same tree: same root from a full rehash of both, and the
/// same bytes in every file.
pub fn assert_same(src: &Path, dst: &Path) {
    let a = verify_dir(src).unwrap();
    let b = verify_dir(dst).unwrap();
    let pa: Vec<_> = a
        .entries
        .iter()
        .map(|e| (&e.path, e.kind, e.mode))
        .collect();
    let pb: Vec<_> = b
        .entries
        .iter()
        .map(|e| (&e.path, e.kind, e.mode))
        .collect();
    assert_eq!(pa, pb);
    for e in &a.entries {
        if e.kind == ferry_volume::Kind::File {
            let x = std::fs::read(src.join(&e.path)).unwrap();
            let y = std::fs::read(dst.join(&e.path)).unwrap();
            assert!(x == y, "{} differs", e.path);
        }
    }
    assert_eq!(a.root(), b.root());
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

pub fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

pub fn chmod(root: &Path, rel: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A stream that fails (and stops) after `left` bytes written.
pub struct Cut<S> {
    pub inner: S,
    pub left: usize,
}

impl<S: Read> Read for Cut<S> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(b)
    }
}

impl<S: Write> Write for Cut<S> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "cut by test",
            ));
        }
        let n = b.len().min(self.left);
        let n = self.inner.write(&b[..n])?;
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
