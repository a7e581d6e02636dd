//! A malicious or broken sender, speaking raw frames over real TCP: every case ends in a typed
//! error (or a refused chunk), and nothing is ever written outside the destination.

mod common;

use common::*;
use ferry_volume::wire::{self, encode, encode_data};
use ferry_volume::{
    ChunkHash, Entry, Kind, Manifest, ReceiveOptions, ReceiveReport, SendOptions, Sender, Stat,
    VolumeError, CHUNK_SIZE,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("canary")).unwrap();
        std::fs::create_dir_all(tmp.path().join("dst/vol")).unwrap();
        Env { tmp }
    }
    fn dest(&self) -> std::path::PathBuf {
        self.tmp.path().join("dst/vol")
    }
    /// Nothing appeared anywhere but in the destination (and the state file next to it).
    fn assert_contained(&self) {
        let canary: Vec<_> = std::fs::read_dir(self.tmp.path().join("canary"))
            .unwrap()
            .collect();
        assert!(canary.is_empty(), "canary dir written: {canary:?}");
        let mut top: Vec<String> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["canary", "dst"]);
        for d in std::fs::read_dir(self.tmp.path().join("dst")).unwrap() {
            let n = d.unwrap().file_name().into_string().unwrap();
            assert!(n == "vol" || n.starts_with(".vol.ferry-sync"), "{n}");
        }
        assert!(!Path::new("/etc/ferry-volume-test-x").exists());
    }
    /// Sends `frames` as the sender, then reads whatever the receiver answers.
    fn run(&self, frames: &[Vec<u8>]) -> (Result<ReceiveReport, VolumeError>, Vec<u8>) {
        let l = listener(false);
        let addr = l.local_addr().unwrap();
        let h = spawn_receiver(l, self.dest(), ReceiveOptions::default());
        let mut s = TcpStream::connect(addr).unwrap();
        for f in frames {
            if s.write_all(f).is_err() {
                break;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        (h.join().unwrap(), answer)
    }
}

fn hello_frame(token: &str, target: &str) -> Vec<u8> {
    encode(
        wire::HELLO,
        &ferry_volume::Hello {
            session: "evil".into(),
            token: token.into(),
            target: target.into(),
        },
    )
}

fn file(path: &str, data: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::File,
        mode: 0o644,
        size: data.len() as u64,
        target: None,
        chunks: data
            .chunks(CHUNK_SIZE as usize)
            .map(ChunkHash::of)
            .collect(),
        stat: Stat::default(),
        meta: Default::default(),
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Dir,
        mode: 0o755,
        size: 0,
        target: None,
        chunks: vec![],
        stat: Stat::default(),
        meta: Default::default(),
    }
}

fn manifest(entries: Vec<Entry>) -> Vec<u8> {
    encode(
        wire::MANIFEST,
        &Manifest {
            scan_start_ns: 0,
            entries,
            root_mode: 0o755,
            ..Default::default()
        },
    )
}

fn bad_manifest_case(entries: Vec<Entry>, data: bool) -> VolumeError {
    let env = Env::new();
    let mut frames = vec![hello_frame(TOKEN, "vol"), manifest(entries)];
    if data {
        frames.push(encode_data(0, 0, b"pwned"));
        frames.push(encode(wire::DONE, &()));
    }
    let (r, answer) = env.run(&frames);
    env.assert_contained();
    let (msgs, _) = wire::decode_all(&answer);
    assert!(
        msgs.iter().any(|m| matches!(m, wire::Msg::Error(_))),
        "receiver explains the refusal: {msgs:?}"
    );
    r.unwrap_err()
}

#[test]
fn paths_that_escape_are_refused() {
    for p in [
        "../x",
        "/etc/ferry-volume-test-x",
        "a/../../x",
        "a/./x",
        "a//x",
        "",
        "a/\0x",
    ] {
        let mut entries = vec![dir("a")];
        entries.push(file(p, b"pwned"));
        entries.sort_by(|x, y| x.path.cmp(&y.path));
        let e = bad_manifest_case(entries, true);
        assert!(matches!(e, VolumeError::BadPath(_)), "{p:?}: {e:?}");
    }
    let long = "d/".repeat(2100) + "x";
    let e = bad_manifest_case(vec![file(&long, b"x")], false);
    assert!(matches!(e, VolumeError::TooLarge { .. }), "{e:?}");
}

#[test]
fn inconsistent_manifests_are_refused() {
    // A parent that is not a directory entry (e.g. a symlink the sender made).
    let mut link = dir("s");
    link.kind = Kind::Symlink;
    link.mode = 0;
    link.target = Some("../../canary".into());
    let e = bad_manifest_case(vec![link, file("s/x", b"pwned")], true);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    // Out of order / duplicate.
    let e = bad_manifest_case(vec![file("b", b"1"), file("a", b"2")], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    let e = bad_manifest_case(vec![file("a", b"1"), file("a", b"2")], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    // Chunk count that does not match the size.
    let mut f = file("a", b"123");
    f.size = 10 * CHUNK_SIZE;
    let e = bad_manifest_case(vec![f], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    // Mode bits beyond permissions, set-id and sticky (a file type smuggled in).
    let mut f = file("a", b"123");
    f.mode = 0o104755;
    let e = bad_manifest_case(vec![f], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    // Hard links: to a later entry, to a directory, to a path outside, with data of their own.
    let link = |path: &str, to: &str| {
        let mut l = dir(path);
        l.kind = Kind::Hardlink;
        l.mode = 0;
        l.target = Some(to.into());
        l
    };
    let e = bad_manifest_case(vec![link("a", "b"), file("b", b"1")], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    let e = bad_manifest_case(vec![dir("a"), link("b", "a")], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    let e = bad_manifest_case(vec![file("a", b"1"), link("b", "../../etc/passwd")], false);
    assert!(matches!(e, VolumeError::BadPath(_)), "{e:?}");
    let mut l = link("b", "a");
    l.size = 1;
    let e = bad_manifest_case(vec![file("a", b"1"), l], false);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    // Extended attributes outside the carried namespaces, unsorted, or too big.
    for xs in [
        vec![("system.sockprotoname", vec![1u8])],
        vec![("user.b", vec![]), ("user.a", vec![])],
        vec![("user.big", vec![0u8; ferry_volume::MAX_XATTR_VALUE + 1])],
    ] {
        let mut f = file("a", b"1");
        f.meta.xattrs = xs
            .into_iter()
            .map(|(n, v)| ferry_volume::Xattr {
                name: n.into(),
                value: v,
            })
            .collect();
        let e = bad_manifest_case(vec![f], false);
        assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    }
}

#[test]
fn symlinks_already_in_the_destination_are_never_followed() {
    let env = Env::new();
    let canary = env.tmp.path().join("canary");
    std::os::unix::fs::symlink(&canary, env.dest().join("linkdir")).unwrap();
    std::os::unix::fs::symlink(canary.join("f"), env.dest().join("linkfile")).unwrap();
    // Without a directory entry for the parent: refused.
    let e = bad_manifest_case(vec![file("linkdir/x", b"pwned")], true);
    assert!(matches!(e, VolumeError::BadManifest(_)), "{e:?}");
    // With one: the symlink is replaced by a real directory inside the destination, and the
    // symlinked file is replaced by a regular file, instead of writing through them.
    let data = b"inside".to_vec();
    let entries = vec![
        dir("linkdir"),
        file("linkdir/x", &data),
        file("linkfile", &data),
    ];
    let frames = vec![
        hello_frame(TOKEN, "vol"),
        manifest(entries),
        encode_data(1, 0, &data),
        encode_data(2, 0, &data),
        encode(wire::DONE, &()),
        encode(wire::BYE, &()),
    ];
    let (r, _) = env.run(&frames);
    let r = r.unwrap();
    assert!(r.verified);
    env.assert_contained();
    let md = std::fs::symlink_metadata(env.dest().join("linkdir")).unwrap();
    assert!(md.file_type().is_dir());
    assert_eq!(std::fs::read(env.dest().join("linkdir/x")).unwrap(), data);
    let md = std::fs::symlink_metadata(env.dest().join("linkfile")).unwrap();
    assert!(md.file_type().is_file());
}

#[test]
fn bad_frames_are_typed_errors() {
    let env = Env::new();
    // Oversized lengths, refused before allocating.
    let mut huge = vec![wire::MANIFEST];
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    let (r, _) = env.run(&[hello_frame(TOKEN, "vol"), huge]);
    assert!(matches!(r, Err(VolumeError::TooLarge { .. })), "{r:?}");
    let mut big_hello = vec![wire::HELLO];
    big_hello.extend_from_slice(&(1u32 << 20).to_be_bytes());
    let (r, _) = env.run(&[big_hello]);
    assert!(matches!(r, Err(VolumeError::TooLarge { .. })), "{r:?}");
    let big_data = encode_data(0, 0, &vec![0u8; CHUNK_SIZE as usize + 1]);
    let (r, _) = env.run(&[
        hello_frame(TOKEN, "vol"),
        manifest(vec![file("a", b"x")]),
        big_data,
    ]);
    assert!(matches!(r, Err(VolumeError::TooLarge { .. })), "{r:?}");
    // Garbage JSON, unknown kind, wrong order, truncated frame.
    let mut garbage = vec![wire::MANIFEST];
    garbage.extend_from_slice(&5u32.to_be_bytes());
    garbage.extend_from_slice(b"{nope");
    let (r, _) = env.run(&[hello_frame(TOKEN, "vol"), garbage]);
    assert!(matches!(r, Err(VolumeError::Protocol(_))), "{r:?}");
    let (r, _) = env.run(&[vec![77, 0, 0, 0, 0]]);
    assert!(matches!(r, Err(VolumeError::Protocol(_))), "{r:?}");
    let (r, _) = env.run(&[manifest(vec![])]);
    assert!(matches!(r, Err(VolumeError::Protocol(_))), "{r:?}");
    let (r, _) = env.run(&[vec![wire::HELLO, 0, 0, 1, 0, b'{']]);
    assert!(matches!(r, Err(VolumeError::Protocol(_))), "{r:?}");
    // Data for a chunk that does not exist.
    let (r, _) = env.run(&[
        hello_frame(TOKEN, "vol"),
        manifest(vec![file("a", b"x")]),
        encode_data(5, 0, b"x"),
    ]);
    assert!(matches!(r, Err(VolumeError::Protocol(_))), "{r:?}");
    // A bad target.
    let (r, _) = env.run(&[hello_frame(TOKEN, "../other")]);
    assert!(matches!(r, Err(VolumeError::BadPath(_))), "{r:?}");
    env.assert_contained();
}

#[test]
fn wrong_chunk_bytes_are_never_written() {
    let env = Env::new();
    let good = b"the real content".to_vec();
    let frames = vec![
        hello_frame(TOKEN, "vol"),
        manifest(vec![file("a", &good)]),
        encode_data(0, 0, b"the fake content"),
        encode(wire::DONE, &()),
        encode(wire::BYE, &()),
    ];
    let (r, answer) = env.run(&frames);
    let r = r.unwrap();
    assert!(!r.verified);
    assert_eq!(r.chunks_rejected, 1);
    let (msgs, _) = wire::decode_all(&answer);
    let v = msgs
        .iter()
        .find_map(|m| match m {
            wire::Msg::Verdict(v) => Some(v.clone()),
            _ => None,
        })
        .unwrap();
    assert!(!v.verified);
    assert_eq!(v.missing, vec![(0, 0)]);
    assert_ne!(
        std::fs::read(env.dest().join("a")).unwrap_or_default(),
        b"the fake content"
    );
    env.assert_contained();
}

#[test]
fn wrong_token_is_unauthorized_on_both_sides() {
    let env = Env::new();
    let (r, answer) = env.run(&[hello_frame("guess", "vol")]);
    assert!(matches!(r, Err(VolumeError::Unauthorized)), "{r:?}");
    let (msgs, _) = wire::decode_all(&answer);
    assert!(matches!(&msgs[..], [wire::Msg::Error(e)] if e == "unauthorized"));

    // A real sender with the wrong token.
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "f", b"data");
    let l = listener(false);
    let addr = l.local_addr().unwrap();
    let h = spawn_receiver(l, env.dest(), ReceiveOptions::default());
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = hello();
    hello.token = "wrong".into();
    let r = Sender::new(src.path(), None).round(&mut s, &hello, &SendOptions::default());
    assert!(matches!(r, Err(VolumeError::Unauthorized)), "{r:?}");
    assert!(matches!(h.join().unwrap(), Err(VolumeError::Unauthorized)));
    assert!(!env.dest().join("f").exists());
    env.assert_contained();
}
