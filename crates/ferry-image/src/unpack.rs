//! One layer tarball into one directory, in overlayfs' terms, without ever writing outside it.
//!
//! Every entry is written relative to a directory descriptor reached from the layer's root one
//! component at a time with `O_NOFOLLOW | O_DIRECTORY`: a symlink (the layer's own, or a race)
//! can never redirect a write, and a `..` component is refused before anything is opened. Hard
//! links name their target the same way, so they cannot point outside the layer either.
//!
//! OCI whiteouts become what overlayfs reads in a lower layer: `.wh.NAME` a character device
//! 0/0 named `NAME`, `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr on its directory.
//! Device nodes are not created (a machine gets its own `/dev`; a node in a layer would be a
//! door to a host device); sockets cannot be in a tar.

use crate::{ImageError, Result};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// IDs above this are stored as `nobody` (a machine maps 65,536 IDs; more would be the host's).
const MAX_ID: u64 = 65_535;
const NOBODY: u32 = 65_534;

/// What an unpack wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub skipped_devices: u64,
}

/// Unpacks the tar stream `input` into `dir` (an existing, empty directory). `layer` names the
/// layer in errors; `max_bytes` bounds the file contents written.
pub fn unpack(input: impl Read, dir: &Path, layer: &str, max_bytes: u64) -> Result<Stats> {
    let root = open_dir_path(dir).map_err(|e| ImageError::io_at("opening", dir, e))?;
    let mut ar = tar::Archive::new(input);
    let mut stats = Stats::default();
    let bad = |detail: String| ImageError::BadLayer {
        layer: layer.to_string(),
        detail,
    };
    for entry in ar.entries().map_err(|e| bad(format!("not a tar: {e}")))? {
        let mut entry = entry.map_err(|e| bad(format!("reading the tar: {e}")))?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let escape = |reason: &str| ImageError::Escape {
            layer: layer.to_string(),
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let comps = components(&raw_path).map_err(&escape)?;
        let Some((name, parents)) = comps.split_last() else {
            continue; // "./" or "/": the root itself
        };
        let parent = walk(&root, parents, true).map_err(|r| escape(&r))?;
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = id(header.uid().unwrap_or(0));
        let gid = id(header.gid().unwrap_or(0));
        let kind = header.entry_type();
        stats.entries += 1;

        // Whiteouts first: their names are markers, not files.
        if name.as_slice() == b".wh..wh..opq" {
            set_opaque(&parent).map_err(|e| ImageError::io(format!("opaque dir {shown}"), e))?;
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(escape("is a whiteout of nothing"));
            }
            let c = cstring(hidden);
            remove_any(&parent, &c);
            // SAFETY: mknodat on a live dirfd and a NUL-terminated name.
            if unsafe { libc::mknodat(parent.as_raw_fd(), c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                return Err(ImageError::io(
                    format!("whiteout {shown}"),
                    std::io::Error::last_os_error(),
                ));
            }
            stats.whiteouts += 1;
            continue;
        }

        let c = cstring(name);
        let io =
            |what: &str| ImageError::io(format!("{what} {shown}"), std::io::Error::last_os_error());
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                // SAFETY (all calls below): *at syscalls on live descriptors with NUL-terminated
                // names; no pointer outlives its call.
                let made = unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o700) };
                if made != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(io("mkdir"));
                }
                let d = match open_at(&parent, &c, libc::O_DIRECTORY) {
                    Ok(d) => d,
                    Err(_) => {
                        // Something else was there (a file of an earlier entry): replace it.
                        remove_any(&parent, &c);
                        if unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
                            return Err(io("mkdir"));
                        }
                        open_at(&parent, &c, libc::O_DIRECTORY)
                            .map_err(|e| ImageError::io(format!("open {shown}"), e))?
                    }
                };
                owner_mode(&d, uid, gid, mode).map_err(|e| ImageError::io(shown.clone(), e))?;
            }
            T::Regular | T::Continuous => {
                remove_any(&parent, &c);
                let fd = unsafe {
                    libc::openat(
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if fd < 0 {
                    return Err(io("create"));
                }
                // SAFETY: a fresh descriptor we own.
                let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let left = max_bytes.saturating_sub(stats.bytes);
                let n = std::io::copy(&mut (&mut entry).take(left + 1), &mut f)
                    .map_err(|e| bad(format!("reading {shown}: {e}")))?;
                stats.bytes += n;
                if n > left {
                    return Err(ImageError::TooBig {
                        what: format!("layer {layer} unpacked"),
                        size: stats.bytes,
                        limit: max_bytes,
                    });
                }
                owner_mode(&f, uid, gid, mode).map_err(|e| ImageError::io(shown.clone(), e))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = [
                        libc::timespec {
                            tv_sec: mtime as libc::time_t,
                            tv_nsec: 0,
                        },
                        libc::timespec {
                            tv_sec: mtime as libc::time_t,
                            tv_nsec: 0,
                        },
                    ];
                    unsafe { libc::futimens(f.as_raw_fd(), t.as_ptr()) };
                }
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| escape("is a symlink without a target"))?;
                let t = cstring(&target);
                remove_any(&parent, &c);
                // A symlink is stored as it is (an absolute target resolves inside the machine's
                // root there); what matters is that unpacking never writes through it.
                if unsafe { libc::symlinkat(t.as_ptr(), parent.as_raw_fd(), c.as_ptr()) } != 0 {
                    return Err(io("symlink"));
                }
                unsafe {
                    libc::fchownat(
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        uid,
                        gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| escape("is a hard link without a target"))?;
                let tcomps =
                    components(&target).map_err(|r| escape(&format!("hard link target {r}")))?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(escape("is a hard link to the root"));
                };
                let tparent = walk(&root, tparents, false)
                    .map_err(|r| escape(&format!("hard link target {r}")))?;
                let tc = cstring(tname);
                remove_any(&parent, &c);
                // flags 0: a symlink target is linked itself, never followed.
                if unsafe {
                    libc::linkat(
                        tparent.as_raw_fd(),
                        tc.as_ptr(),
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        0,
                    )
                } != 0
                {
                    return Err(escape(&format!(
                        "is a hard link to {:?}, which is not in this layer",
                        String::from_utf8_lossy(&target)
                    )));
                }
            }
            T::Fifo => {
                remove_any(&parent, &c);
                if unsafe { libc::mkfifoat(parent.as_raw_fd(), c.as_ptr(), 0o600) } != 0 {
                    return Err(io("mkfifo"));
                }
                let f = open_at(&parent, &c, libc::O_PATH)
                    .map_err(|e| ImageError::io(shown.clone(), e))?;
                let _ = f;
                unsafe {
                    libc::fchownat(
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        uid,
                        gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    );
                    libc::fchmodat(parent.as_raw_fd(), c.as_ptr(), mode, 0);
                }
            }
            T::Char | T::Block => stats.skipped_devices += 1,
            // PAX and GNU long-name headers are consumed by the tar crate; anything else
            // (sparse files, volume labels) is not what an image layer holds.
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            other => {
                return Err(bad(format!(
                    "entry {shown:?} has unsupported type {other:?}"
                )))
            }
        }
    }
    Ok(stats)
}

fn id(v: u64) -> u32 {
    if v > MAX_ID {
        NOBODY
    } else {
        v as u32
    }
}

fn cstring(b: &[u8]) -> CString {
    // components() refused NULs already (tar names cannot hold them either).
    CString::new(b).expect("no NUL in a path component")
}

/// The path's components, refusing `..` and NUL; `.` and empty components (leading `/`,
/// `./`, doubled slashes) are dropped.
fn components(p: &[u8]) -> std::result::Result<Vec<Vec<u8>>, &'static str> {
    if p.contains(&0) {
        return Err("holds a NUL byte");
    }
    let mut out = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("climbs out with '..'"),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn open_dir_path(p: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_at(dir: &OwnedFd, name: &CString, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: openat on a live dirfd with a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory `comps` below `root`, every step without following a symlink; missing
/// directories are made (0755, as tar does for implied parents) when `create`.
fn walk(root: &OwnedFd, comps: &[Vec<u8>], create: bool) -> std::result::Result<OwnedFd, String> {
    let mut cur = root
        .try_clone()
        .map_err(|e| format!("cannot be reached: {e}"))?;
    for c in comps {
        let name = cstring(c);
        let next = match open_at(&cur, &name, libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                // SAFETY: mkdirat on a live dirfd with a NUL-terminated name.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
                    return Err(format!(
                        "cannot be reached: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                open_at(&cur, &name, libc::O_DIRECTORY)
                    .map_err(|e| format!("cannot be reached: {e}"))?
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                return Err(format!(
                    "goes through {:?}, which is a symlink or not a directory",
                    String::from_utf8_lossy(c)
                ))
            }
            Err(e) => return Err(format!("cannot be reached: {e}")),
        };
        cur = next;
    }
    Ok(cur)
}

/// Removes whatever `name` is in `dir` (a file, a symlink, a whole tree): a later entry replaces
/// an earlier one, as tar does.
fn remove_any(dir: &OwnedFd, name: &CString) {
    // SAFETY: *at syscalls on a live dirfd with a NUL-terminated name.
    unsafe {
        if libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) == 0 {
            return;
        }
        if libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) == 0 {
            return;
        }
    }
    if let Ok(sub) = open_at(dir, name, libc::O_DIRECTORY) {
        remove_tree(&sub);
        // SAFETY: as above.
        unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
    }
}

fn remove_tree(dir: &OwnedFd) {
    let Ok(dup) = dir.try_clone() else { return };
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dup.as_raw_fd())) else {
        return;
    };
    for e in entries.flatten() {
        remove_any(dir, &cstring(e.file_name().as_encoded_bytes()));
    }
}

fn owner_mode(f: &impl AsRawFd, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    // SAFETY: fchown/fchmod on a live descriptor. chown first: it clears setuid bits.
    unsafe {
        if libc::fchown(f.as_raw_fd(), uid, gid) != 0
            || libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn set_opaque(dir: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fsetxattr on a live descriptor with NUL-terminated name and a 1-byte value.
    let r = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar built entry by entry with raw names (the tar crate's builder refuses `..`, which is
    /// what these tests need to feed the unpacker).
    pub(crate) struct RawTar(tar::Builder<Vec<u8>>);

    impl RawTar {
        pub fn new() -> Self {
            RawTar(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, path: &str, size: u64) -> tar::Header {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_size(size);
            let name = path.as_bytes();
            h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            h
        }
        pub fn file(mut self, path: &str, data: &[u8]) -> Self {
            let h = Self::header(tar::EntryType::Regular, path, data.len() as u64);
            self.0.append(&h, data).unwrap();
            self
        }
        pub fn dir(mut self, path: &str) -> Self {
            let h = Self::header(tar::EntryType::Directory, path, 0);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        pub fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
            let mut h = Self::header(kind, path, 0);
            let t = target.as_bytes();
            h.as_ustar_mut().unwrap().linkname[..t.len()].copy_from_slice(t);
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        pub fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn run(t: RawTar) -> (tempfile::TempDir, Result<Stats>) {
        let dir = tempfile::tempdir().unwrap();
        let r = unpack(&t.bytes()[..], dir.path(), "test", 1 << 20);
        (dir, r)
    }

    #[test]
    fn files_dirs_links_and_whiteouts() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let (dir, r) = run(RawTar::new()
            .dir("etc/")
            .file("etc/motd", b"hello")
            .link(tar::EntryType::Symlink, "etc/abs", "/etc/motd")
            .link(tar::EntryType::Link, "etc/hard", "etc/motd")
            .file("gone/.wh.old", b"")
            .file("opq/.wh..wh..opq", b""));
        let s = r.unwrap();
        assert_eq!(s.whiteouts, 2);
        let p = dir.path();
        assert_eq!(std::fs::read(p.join("etc/motd")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(p.join("etc/abs")).unwrap(),
            Path::new("/etc/motd")
        );
        assert_eq!(std::fs::metadata(p.join("etc/hard")).unwrap().nlink(), 2);
        let wh = std::fs::symlink_metadata(p.join("gone/old")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        let mut v = [0u8; 4];
        let c = CString::new(p.join("opq").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: getxattr with NUL-terminated strings into a stack buffer.
        let n = unsafe {
            libc::getxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                4,
            )
        };
        assert_eq!((n, v[0]), (1, b'y'));
    }

    #[test]
    fn escapes_are_refused_and_nothing_lands_outside() {
        let outside = tempfile::tempdir().unwrap();
        let o = outside.path().display().to_string();
        let cases = [
            RawTar::new().file("../evil", b"x"),
            RawTar::new().file("a/../../evil", b"x"),
            // A symlink to outside, then a write through it.
            RawTar::new()
                .link(tar::EntryType::Symlink, "out", &o)
                .file("out/evil", b"x"),
            // A relative symlink climbing out, then a write through it.
            RawTar::new()
                .link(tar::EntryType::Symlink, "up", "../../../../../../..")
                .file(&format!("up{o}/evil"), b"x"),
            // A hard link to a file outside the layer.
            RawTar::new().link(tar::EntryType::Link, "h", &format!("{o}/../etc/passwd")),
            RawTar::new().link(tar::EntryType::Link, "h", "/etc/passwd"),
        ];
        for t in cases {
            let (_d, r) = run(t);
            let e = r.unwrap_err();
            assert_eq!(e.code(), "image_layer_escape", "{e}");
            assert!(!outside.path().join("evil").exists());
        }
    }

    #[test]
    fn content_beyond_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = RawTar::new()
            .file("a", &[1; 600])
            .file("b", &[2; 600])
            .bytes();
        let e = unpack(&t[..], dir.path(), "big", 1000).unwrap_err();
        assert_eq!(e.code(), "image_too_big", "{e}");
    }
}
