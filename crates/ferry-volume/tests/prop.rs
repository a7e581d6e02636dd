//! Random small trees and random modifications: after a round the destination equals the source.

mod common;

use common::*;
use ferry_volume::{SendOptions, Sender, CHUNK_SIZE};
use proptest::prelude::*;
use std::path::Path;

const SIZES: [u64; 8] = [
    0,
    1,
    1000,
    CHUNK_SIZE - 1,
    CHUNK_SIZE,
    CHUNK_SIZE + 1,
    2 * CHUNK_SIZE + 77,
    5000,
];
const PATHS: [&str; 8] = ["a", "b", "d1/c", "d1/d", "d1/d2/e", "d3/f", "g", "d1/d2/h"];

#[derive(Clone, Debug)]
enum Change {
    Flip(usize, u64),
    Resize(usize, usize),
    Delete(usize),
    Rename(usize, usize),
    Chmod(usize, u32),
    ToSymlink(usize),
    ToDir(usize),
    HardLink(usize, usize),
    Chown(usize, u32),
    Xattr(usize, u8),
    ToFifo(usize),
    Sparse(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0..8usize, any::<u64>()).prop_map(|(i, o)| Change::Flip(i, o)),
        (0..8usize, 0..8usize).prop_map(|(i, s)| Change::Resize(i, s)),
        (0..8usize).prop_map(Change::Delete),
        (0..8usize, 0..8usize).prop_map(|(i, j)| Change::Rename(i, j)),
        (
            0..8usize,
            prop::sample::select(vec![0o600u32, 0o644, 0o755, 0o700])
        )
            .prop_map(|(i, m)| Change::Chmod(i, m)),
        (0..8usize).prop_map(Change::ToSymlink),
        (0..8usize).prop_map(Change::ToDir),
        (0..8usize, 0..8usize).prop_map(|(i, j)| Change::HardLink(i, j)),
        (0..8usize, 0..3u32).prop_map(|(i, u)| Change::Chown(i, 1000 + u)),
        (0..8usize, any::<u8>()).prop_map(|(i, v)| Change::Xattr(i, v)),
        (0..8usize).prop_map(Change::ToFifo),
        (0..8usize).prop_map(Change::Sparse),
    ]
}

fn is_file(root: &Path, rel: &str) -> bool {
    std::fs::symlink_metadata(root.join(rel)).is_ok_and(|m| m.file_type().is_file())
}

fn apply(root: &Path, c: &Change, seed: u64) {
    use std::os::unix::fs::FileExt;
    match *c {
        Change::Flip(i, off) => {
            if is_file(root, PATHS[i]) {
                let p = root.join(PATHS[i]);
                let len = std::fs::metadata(&p).unwrap().len();
                if len > 0 {
                    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                    f.write_all_at(&[seed as u8 ^ 0xa5, 1, 2], off % len)
                        .unwrap();
                }
            }
        }
        Change::Resize(i, s) => {
            if is_file(root, PATHS[i]) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join(PATHS[i]))
                    .unwrap();
                f.set_len(SIZES[s]).unwrap();
            }
        }
        Change::Delete(i) => {
            if is_file(root, PATHS[i]) {
                std::fs::remove_file(root.join(PATHS[i])).unwrap();
            }
        }
        Change::Rename(i, j) => {
            if i != j && is_file(root, PATHS[i]) && !root.join(PATHS[j]).exists() {
                let to = root.join(PATHS[j]);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::rename(root.join(PATHS[i]), to).unwrap();
            }
        }
        Change::Chmod(i, m) => {
            if is_file(root, PATHS[i]) {
                chmod(root, PATHS[i], m);
            }
        }
        Change::ToSymlink(i) => {
            if is_file(root, PATHS[i]) {
                std::fs::remove_file(root.join(PATHS[i])).unwrap();
                std::os::unix::fs::symlink("../somewhere", root.join(PATHS[i])).unwrap();
            }
        }
        Change::HardLink(i, j) => {
            // (symlink_metadata: a dangling symlink at `j` exists too.)
            if i != j
                && is_file(root, PATHS[i])
                && std::fs::symlink_metadata(root.join(PATHS[j])).is_err()
            {
                let to = root.join(PATHS[j]);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::hard_link(root.join(PATHS[i]), to).unwrap();
            }
        }
        Change::Chown(i, uid) => {
            if is_file(root, PATHS[i]) {
                std::os::unix::fs::lchown(root.join(PATHS[i]), Some(uid), Some(uid)).unwrap();
            }
        }
        Change::Xattr(i, v) => {
            if is_file(root, PATHS[i]) {
                xattr::set(root.join(PATHS[i]), "user.p", &[v]).unwrap();
            }
        }
        Change::ToFifo(i) => {
            if is_file(root, PATHS[i]) {
                std::fs::remove_file(root.join(PATHS[i])).unwrap();
                let c = std::ffi::CString::new(
                    root.join(PATHS[i]).into_os_string().into_encoded_bytes(),
                )
                .unwrap();
                // SAFETY: valid C string for the call.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            }
        }
        Change::Sparse(i) => {
            if is_file(root, PATHS[i]) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join(PATHS[i]))
                    .unwrap();
                f.write_all_at(b"after a hole", 3 * CHUNK_SIZE + 5).unwrap();
            }
        }
        Change::ToDir(i) => {
            if is_file(root, PATHS[i]) {
                std::fs::remove_file(root.join(PATHS[i])).unwrap();
                write(root, &format!("{}/inner", PATHS[i]), b"now a directory");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn rounds_make_destination_equal_source(
        files in prop::collection::vec((0..8usize, 0..8usize, any::<u64>()), 1..8),
        changes in prop::collection::vec(change(), 0..8),
        seed in any::<u64>(),
    ) {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let dest = dst.path().join("vol");
        for (p, s, d) in &files {
            write(src.path(), PATHS[*p], &bytes(*d, SIZES[*s] as usize));
        }
        let mut sender = Sender::new(src.path(), None);
        let (r1, _) = round(&mut sender, &dest, &SendOptions::default());
        let r1 = r1.unwrap();
        prop_assert!(r1.verified);
        assert_same(src.path(), &dest);
        for c in &changes {
            apply(src.path(), c, seed);
        }
        let (r2, _) = round(&mut sender, &dest, &SendOptions::default());
        let r2 = r2.unwrap();
        prop_assert!(r2.verified);
        prop_assert!(r2.chunks_sent <= r2.chunks_total);
        assert_same(src.path(), &dest);
        prop_assert_eq!(ferry_volume::verify_dir(&dest).unwrap().root(), r2.root);
    }
}
