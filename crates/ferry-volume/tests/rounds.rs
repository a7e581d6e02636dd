//! Rounds over real loopback TCP between a real source tree and a real destination directory.

mod common;

use common::*;
use ferry_volume::{state_path, Faults, Manifest, ReceiveOptions, SendOptions, Sender, CHUNK_SIZE};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CS: usize = CHUNK_SIZE as usize;

fn sample_tree(root: &std::path::Path) {
    write(root, "empty", b"");
    write(root, "exact", &bytes(1, CS));
    write(root, "plus1", &bytes(2, CS + 1));
    write(root, "a/b/c/deep.txt", b"deep");
    write(root, "a/b/empty-too", b"");
    write(root, "a/big", &bytes(3, 3 * CS + 17));
    std::fs::create_dir_all(root.join("emptydir/inner")).unwrap();
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", root.join("a/dangling")).unwrap();
    write(root, "secret", b"0600");
    chmod(root, "secret", 0o600);
    write(root, "tool", b"#!/bin/sh\n");
    chmod(root, "tool", 0o755);
    chmod(root, "a/b", 0o750);
}

#[test]
fn full_copy_of_a_tree() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    sample_tree(src.path());
    let mut s = Sender::new(src.path(), None);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let opts = SendOptions {
        faults: Faults::default(),
        progress: Some(Arc::new(move |p| seen2.lock().unwrap().push(p))),
    };
    let (r, rx) = round_on(&mut s, &dest, &opts, true, ReceiveOptions::default(), |s| s);
    let r = r.unwrap();
    let rx = rx.unwrap();
    assert!(r.verified && rx.verified);
    assert_eq!(r.root, rx.root);
    // exact 1, plus1 2, a/big 4, deep.txt, secret, tool 1 each.
    assert_eq!(r.chunks_total, 1 + 2 + 4 + 3);
    assert_eq!(r.chunks_sent, r.chunks_total);
    assert_eq!(rx.chunks_written, r.chunks_total);
    assert_same(src.path(), &dest);
    assert_eq!(ferry_volume::verify_dir(&dest).unwrap().root(), r.root);
    assert!(std::fs::read_link(dest.join("link")).unwrap().to_str() == Some("a/b/c/deep.txt"));
    // The state lives next to the volume, not in it.
    let sp = state_path(&dest).unwrap();
    assert_eq!(sp, dst.path().join(".vol.ferry-sync"));
    assert!(sp.exists());
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert_eq!(seen.last().unwrap().phase, ferry_volume::Phase::Verifying);

    // A round with nothing changed sends nothing.
    std::thread::sleep(Duration::from_millis(60));
    let (r2, _) = round(&mut s, &dest, &SendOptions::default());
    let r2 = r2.unwrap();
    assert!(r2.verified);
    assert_eq!(r2.chunks_sent, 0);
    assert_eq!(r2.root, r.root);
}

#[test]
fn second_round_sends_only_changes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    let s_ = src.path();
    write(s_, "big", &bytes(10, 4 * CS + 100));
    write(s_, "app", &bytes(11, 2 * CS + 5000));
    write(s_, "del", b"delete me");
    write(s_, "ren", &bytes(12, CS + 300));
    write(s_, "mode", b"chmod me");
    for i in 0..20 {
        write(s_, &format!("keep/{i}"), &bytes(100 + i, 1000 * i as usize));
    }
    // Older than the first scan's racy window, so the quick check may trust them.
    std::thread::sleep(Duration::from_millis(120));
    let mut s = Sender::new(s_, None);
    let (r1, _) = round(&mut s, &dest, &SendOptions::default());
    let r1 = r1.unwrap();
    assert!(r1.verified);
    assert_eq!(r1.files_rehashed, 25);

    // The coordinator persists the manifest; a restarted source agent resumes from it.
    let json = serde_json::to_string(s.last_manifest().unwrap()).unwrap();
    let m: Manifest = serde_json::from_str(&json).unwrap();
    assert_eq!(&m, s.last_manifest().unwrap());
    let mut s = Sender::new(s_, Some(m));

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s_.join("big"))
        .unwrap();
    f.write_all_at(&bytes(99, 10), 2 * CHUNK_SIZE + 7).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(s_.join("app"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    std::fs::remove_file(s_.join("del")).unwrap();
    std::fs::rename(s_.join("ren"), s_.join("ren2")).unwrap();
    chmod(s_, "mode", 0o640);

    let (r2, rx2) = round(&mut s, &dest, &SendOptions::default());
    let (r2, rx2) = (r2.unwrap(), rx2.unwrap());
    assert!(r2.verified);
    // big: 1 chunk; app: its last chunk; ren2 is copied on the receiver from ren.
    assert_eq!(r2.chunks_sent, 2, "{r2:?}");
    assert_eq!(rx2.chunks_local, 2);
    // big, app, ren2 (new path), mode (ctime): nothing else is read.
    assert_eq!(r2.files_rehashed, 4, "{r2:?}");
    assert_same(s_, &dest);
    assert!(!dest.join("del").exists() && !dest.join("ren").exists());
}

#[test]
fn racy_clean_rewrite_in_the_same_tick_is_detected() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    let p = src.path().join("racy");
    std::fs::write(&p, b"version one, 32 bytes long......").unwrap();
    let mut s = Sender::new(src.path(), None);
    let (r1, _) = round(&mut s, &dest, &SendOptions::default());
    r1.unwrap();
    // Same size, and mtime put back to what the scan saw: only the racy-clean rule can tell.
    let before = std::fs::metadata(&p).unwrap();
    std::fs::write(&p, b"version two, 32 bytes long......").unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    let (r2, _) = round(&mut s, &dest, &SendOptions::default());
    let r2 = r2.unwrap();
    assert!(r2.verified);
    assert_eq!(r2.files_rehashed, 1);
    assert_eq!(r2.chunks_sent, 1);
    assert_eq!(
        std::fs::read(dest.join("racy")).unwrap(),
        b"version two, 32 bytes long......"
    );
}

#[test]
fn quick_check_trusts_old_files() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    write(src.path(), "old", &bytes(5, 1000));
    std::thread::sleep(Duration::from_millis(120));
    let mut s = Sender::new(src.path(), None);
    round(&mut s, &dst.path().join("vol"), &SendOptions::default())
        .0
        .unwrap();
    let (r2, _) = round(&mut s, &dst.path().join("vol"), &SendOptions::default());
    assert_eq!(r2.unwrap().files_rehashed, 0);
}

#[test]
fn corrupt_and_dropped_chunks_are_repaired() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    write(src.path(), "f1", &bytes(20, 3 * CS + 1));
    write(src.path(), "f2", &bytes(21, 2 * CS));
    let faults: Faults = "corrupt=2,drop=1".parse().unwrap();
    assert_eq!(
        faults,
        Faults {
            corrupt_chunks: 2,
            drop_chunks: 1
        }
    );
    let mut s = Sender::new(src.path(), None);
    let opts = SendOptions {
        faults,
        progress: None,
    };
    let (r, rx) = round(&mut s, &dest, &opts);
    let (r, rx) = (r.unwrap(), rx.unwrap());
    assert!(r.verified && rx.verified);
    assert!(r.chunks_resent >= 3, "{r:?}");
    assert_eq!(rx.chunks_rejected, 2);
    assert_same(src.path(), &dest);
}

#[test]
fn fault_spec_parsing() {
    assert_eq!("".parse::<Faults>().unwrap(), Faults::default());
    assert_eq!("drop=3".parse::<Faults>().unwrap().drop_chunks, 3);
    for bad in [
        "corrupt",
        "corrupt=x",
        "flip=1",
        "drop=-1",
        "corrupt=1;drop=2",
    ] {
        assert!(
            matches!(
                bad.parse::<Faults>(),
                Err(ferry_volume::VolumeError::BadFaults(_))
            ),
            "{bad}"
        );
    }
    // Unset in the test environment.
    if std::env::var_os(ferry_volume::FAULT_ENV).is_none() {
        assert_eq!(Faults::from_env().unwrap(), Faults::default());
    }
}

#[test]
fn receiver_killed_mid_round_resumes_from_its_checkpoints() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    for i in 0..4 {
        write(src.path(), &format!("f{i}"), &bytes(30 + i, 12 * CS));
    }
    let total = 48u64;
    let ropts = ReceiveOptions {
        checkpoint_bytes: 4 * CHUNK_SIZE,
    };
    let mut s = Sender::new(src.path(), None);
    // The connection dies after ~6 MiB: the receiver stops like a killed process (no save).
    let (r1, rx1) = round_on(&mut s, &dest, &SendOptions::default(), false, ropts, |t| {
        Cut {
            inner: t,
            left: 6 << 20,
        }
    });
    assert!(r1.is_err());
    assert!(rx1.is_err());
    let recorded = ferry_volume::held_chunks(&dest).unwrap();
    assert!(recorded >= 12 && recorded < total, "recorded {recorded}");

    let (r2, rx2) = round_on(&mut s, &dest, &SendOptions::default(), false, ropts, |t| t);
    let (r2, rx2) = (r2.unwrap(), rx2.unwrap());
    assert!(r2.verified && rx2.verified);
    assert_eq!(r2.chunks_sent, total - recorded);
    assert_same(src.path(), &dest);
}

#[test]
fn changed_destination_file_is_repaired() {
    // Someone edits the destination between rounds: its stamp no longer matches, so the
    // receiver forgets that file's chunks and asks for them again.
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    write(src.path(), "f", &bytes(40, 2 * CS));
    let mut s = Sender::new(src.path(), None);
    round(&mut s, &dest, &SendOptions::default()).0.unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(dest.join("f"), b"tampered").unwrap();
    write(&dest, "stray/file", b"not in the source");
    let (r, _) = round(&mut s, &dest, &SendOptions::default());
    let r = r.unwrap();
    assert!(r.verified);
    assert_eq!(r.chunks_sent, 2);
    assert_same(src.path(), &dest);
}

#[test]
fn type_changes_between_rounds() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let dest = dst.path().join("vol");
    let s_ = src.path();
    write(s_, "x", b"file then dir");
    write(s_, "y/inner", b"dir then file");
    std::os::unix::fs::symlink("x", s_.join("z")).unwrap();
    let mut s = Sender::new(s_, None);
    round(&mut s, &dest, &SendOptions::default()).0.unwrap();
    std::fs::remove_file(s_.join("x")).unwrap();
    write(s_, "x/now", b"a dir");
    std::fs::remove_dir_all(s_.join("y")).unwrap();
    std::os::unix::fs::symlink("x/now", s_.join("y")).unwrap();
    std::fs::remove_file(s_.join("z")).unwrap();
    write(s_, "z", b"was a symlink");
    let (r, _) = round(&mut s, &dest, &SendOptions::default());
    assert!(r.unwrap().verified);
    assert_same(s_, &dest);
}
