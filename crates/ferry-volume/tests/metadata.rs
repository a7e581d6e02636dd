//! A fork keeps what programs rely on: for every entry its type, owner, group, mode (set-id and
//! sticky too), size, mtime, link count, extended attributes (and ACLs) and allocated blocks
//! (sparse files stay sparse); fifos are recreated, sockets skipped, device nodes refused as a
//! permanent error. Real trees on the host's file system, real loopback TCP. Needs root (chown).

mod common;

use common::*;
use ferry_volume::{ReceiveOptions, SendOptions, Sender, VolumeError};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// Everything the issue names, per entry, as `lstat` and `llistxattr` see it.
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    kind: u32,
    uid: u32,
    gid: u32,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    xattrs: Vec<(String, Vec<u8>)>,
    blocks: u64,
    target: Option<std::path::PathBuf>,
}

fn facts_of(p: &Path) -> Facts {
    let md = std::fs::symlink_metadata(p).unwrap();
    let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .map(|n| {
            let v = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n.to_string_lossy().into_owned(), v)
        })
        .collect();
    xattrs.sort();
    let is_dir = md.is_dir();
    Facts {
        kind: md.mode() & libc::S_IFMT,
        uid: md.uid(),
        gid: md.gid(),
        mode: md.mode() & 0o7777,
        // A directory's size and blocks depend on its history of entries, not on its content.
        size: if is_dir { 0 } else { md.size() },
        mtime: (md.mtime(), md.mtime_nsec()),
        nlink: md.nlink(),
        xattrs,
        blocks: if is_dir { 0 } else { md.blocks() },
        target: md
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(p).unwrap()),
    }
}

fn tree_facts(root: &Path) -> BTreeMap<String, Facts> {
    let mut out = BTreeMap::new();
    out.insert(".".to_string(), facts_of(root));
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for de in std::fs::read_dir(&d).unwrap() {
            let p = de.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(rel, facts_of(&p));
        }
    }
    out
}

fn chown(root: &Path, rel: &str, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(root.join(rel), Some(uid), Some(gid)).unwrap();
}

fn set_mtime(root: &Path, rel: &str, secs: i64, nsec: i64) {
    let c = std::ffi::CString::new(root.join(rel).into_os_string().into_encoded_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid C string and two timespecs alive for the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// A tree with one of everything: a PostgreSQL-like data directory (0700, owned by uid 70),
/// set-id and sticky bits, a symlink with an owner, three names of one file, xattrs and an
/// ACL, a sparse file, an empty directory, a fifo and a live unix socket.
fn rich_tree(root: &Path) -> std::os::unix::net::UnixListener {
    write(root, "pg/PG_VERSION", b"15\n");
    write(root, "pg/postgresql.conf", b"listen_addresses = '*'\n");
    write(root, "pg/base/1/1259", &bytes(7, 3 * 8192));
    chmod(root, "pg", 0o700);
    chmod(root, "pg/postgresql.conf", 0o600);
    for rel in [
        "pg",
        "pg/PG_VERSION",
        "pg/postgresql.conf",
        "pg/base",
        "pg/base/1",
        "pg/base/1/1259",
    ] {
        chown(root, rel, 70, 70);
    }
    write(root, "bin/tool", b"#!/bin/sh\necho hi\n");
    chmod(root, "bin/tool", 0o4755);
    std::fs::create_dir(root.join("shared")).unwrap();
    chmod(root, "shared", 0o1777);
    std::os::unix::fs::symlink("../pg/PG_VERSION", root.join("bin/version")).unwrap();
    chown(root, "bin/version", 1000, 1001);
    write(root, "links/a", &bytes(9, 5000));
    std::fs::hard_link(root.join("links/a"), root.join("links/b")).unwrap();
    std::fs::create_dir(root.join("links/deeper")).unwrap();
    std::fs::hard_link(root.join("links/a"), root.join("links/deeper/c")).unwrap();
    chown(root, "links/a", 1234, 5678);
    write(root, "tagged", b"with xattrs");
    xattr::set(root.join("tagged"), "user.origin", b"host-a").unwrap();
    xattr::set(root.join("tagged"), "user.empty", b"").unwrap();
    xattr::set(root.join("shared"), "user.dir", b"yes").unwrap();
    xattr::set(root.join("shared"), "user.gone", b"soon").unwrap();
    let acl = Command::new("setfacl")
        .args(["-m", "u:1000:rw"])
        .arg(root.join("tagged"))
        .status()
        .unwrap();
    assert!(acl.success(), "setfacl failed (package acl)");
    // Sparse: 8 MiB with data only at 0, in the middle of the second chunk and at the end.
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    f.write_all_at(&bytes(3, 4096), 0).unwrap();
    f.write_all_at(&bytes(4, 10_000), 300_000).unwrap();
    f.write_all_at(&bytes(5, 100), (8 << 20) - 100).unwrap();
    drop(f);
    std::fs::create_dir_all(root.join("empty/inner")).unwrap();
    chmod(root, "empty/inner", 0o711);
    let c =
        std::ffi::CString::new(root.join("pg/fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: valid C string for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    chown(root, "pg/fifo", 70, 70);
    let sock = std::os::unix::net::UnixListener::bind(root.join("pg/.s.PGSQL.5432")).unwrap();
    chown(root, ".", 70, 0);
    chmod(root, ".", 0o750);
    // Mtimes last (everything above touched them), with odd nanoseconds, directories too.
    let all = tree_facts(root);
    for (i, rel) in all.keys().enumerate() {
        if rel.ends_with(".s.PGSQL.5432") {
            continue;
        }
        set_mtime(
            root,
            rel,
            1_600_000_000 + i as i64 * 1000,
            123_456_789 + i as i64,
        );
    }
    sock
}

fn assert_same_facts(src: &Path, dst: &Path) {
    let mut a = tree_facts(src);
    let b = tree_facts(dst);
    // The socket is skipped: its program makes it again.
    assert!(a.remove("pg/.s.PGSQL.5432").is_some());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "entries differ"
    );
    for (k, fa) in &a {
        assert_eq!(fa, &b[k], "{k} differs");
    }
}

#[test]
fn a_fork_keeps_owners_modes_times_links_xattrs_acls_and_holes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    let _sock = rich_tree(src.path());
    let src_facts = tree_facts(src.path());
    assert!(
        src_facts["sparse"].blocks * 512 < 1 << 20,
        "the test's sparse file is not sparse on this file system"
    );
    let mut s = Sender::new(src.path(), None);
    let (r, rx) = round(&mut s, &dest, &SendOptions::default());
    let (r, rx) = (r.unwrap(), rx.unwrap());
    assert!(r.verified && rx.verified, "{r:?} {rx:?}");
    assert_same_facts(src.path(), &dest);
    assert_eq!(
        std::fs::read(dest.join("links/deeper/c")).unwrap(),
        bytes(9, 5000)
    );
    assert_eq!(
        std::fs::read(dest.join("sparse")).unwrap(),
        std::fs::read(src.path().join("sparse")).unwrap()
    );
    // The holes did not cross the network: 3 chunks of 32 hold data, the rest is zeros.
    assert!(rx.chunks_local >= 29, "{rx:?}");

    // Metadata-only changes are carried by the next round, and a link broken on the source is
    // broken on the destination (the other names keep the old bytes).
    chown(src.path(), "tagged", 42, 43);
    // (Same size, and removals on a directory: a file's xattr block, once allocated, stays and
    // would count in its blocks on one side only.)
    xattr::set(src.path().join("tagged"), "user.origin", b"host-b").unwrap();
    xattr::remove(src.path().join("shared"), "user.gone").unwrap();
    set_mtime(src.path(), "shared", 1_700_000_002, 7);
    chmod(src.path(), "pg/postgresql.conf", 0o640);
    std::fs::remove_file(src.path().join("links/b")).unwrap();
    write(src.path(), "links/b", b"a file of its own now");
    set_mtime(src.path(), "links", 1_700_000_000, 5);
    set_mtime(src.path(), "tagged", 1_700_000_001, 6);
    let (r, rx) = round(&mut s, &dest, &SendOptions::default());
    let (r, rx) = (r.unwrap(), rx.unwrap());
    assert!(r.verified && rx.verified, "{r:?} {rx:?}");
    assert_same_facts(src.path(), &dest);
    assert_eq!(std::fs::read(dest.join("links/a")).unwrap(), bytes(9, 5000));

    // Changed behind the receiver's back (owner of a file): the next round puts it back, because
    // the receiver's verdict covers metadata and the sender's root does too.
    let (r, _) = round(&mut s, &dest, &SendOptions::default());
    assert!(r.unwrap().verified);
}

#[test]
fn a_device_node_is_a_permanent_error_and_the_receiver_keeps_nothing_new() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    write(src.path(), "data", b"hello");
    let c = std::ffi::CString::new(
        src.path()
            .join("null")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: valid C string for the call. /dev/null's numbers (1, 3).
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let mut s = Sender::new(src.path(), None);
    let (r, _rx) = round_on(
        &mut s,
        &dest,
        &SendOptions::default(),
        false,
        ReceiveOptions::default(),
        |s| s,
    );
    let e = r.unwrap_err();
    assert!(matches!(e, VolumeError::UnsupportedFileType { .. }), "{e}");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("device node"), "{e}");
    assert!(!dest.join("data").exists());
}

#[test]
fn zero_chunks_become_holes_even_when_written_as_zeros() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    // 4 MiB of written zeros with one 4 KiB block of data: the copy holds one block.
    let mut data = vec![0u8; 4 << 20];
    data[1 << 20..(1 << 20) + 4096].copy_from_slice(&bytes(1, 4096));
    write(src.path(), "zeros", &data);
    let mut s = Sender::new(src.path(), None);
    let (r, _) = round(&mut s, &dest, &SendOptions::default());
    assert!(r.unwrap().verified);
    let md = std::fs::metadata(dest.join("zeros")).unwrap();
    assert_eq!(md.len(), 4 << 20);
    assert!(md.blocks() * 512 <= 64 * 1024, "{} blocks", md.blocks());
    assert_eq!(std::fs::read(dest.join("zeros")).unwrap(), data);
}
