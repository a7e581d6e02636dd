//! Size-limited volumes: one ext4 file system per volume in a sparse image file
//! (`<volumes dir>/<id>.img`), attached to a loop device and mounted by the agent at
//! `<volumes dir>/<id>`.
//!
//! Why this and not quotas: the size holds whatever the host's own file system is (a write past
//! it fails with ENOSPC inside the machine; project quotas would need XFS or an ext4 mounted
//! with them), the host pays only for what was written (the image is sparse), a volume is one
//! file to remove, and a fork is given the same size by creating the same image on the other
//! host. `mkfs.ext4` (e2fsprogs) is run as a program because no Rust crate makes ext4 file
//! systems; the loop device is set up with two ioctls (`LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`
//! with autoclear) written out here, which is all the loop crates do and avoids their
//! build-time bindgen.
//!
//! Mounted `nosuid,nodev`: a machine's volume is data, never a way to gain privileges on the
//! host.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_core::volumes::MIN_VOLUME_MB;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

/// Makes `img`: a sparse file of `size_mb` MiB holding a fresh ext4 file system whose root
/// belongs to root. Written under a temporary name and renamed, so `img` is never half made.
pub fn create(img: &Path, size_mb: u64) -> io::Result<()> {
    if size_mb < MIN_VOLUME_MB {
        return Err(io::Error::other(format!(
            "a volume needs at least {MIN_VOLUME_MB} MiB, not {size_mb}"
        )));
    }
    let tmp = img.with_extension("img.tmp");
    let f = File::create(&tmp)?;
    f.set_len(size_mb << 20)?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        // -m 0: no blocks reserved for root, the machine gets its whole size; lazy init: the
        // kernel zeroes inode tables in the background instead of mkfs writing them now.
        .args(["-q", "-F", "-m", "0", "-L", "ferry-volume"])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
        ])
        .arg(&tmp)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, img)
}

/// Attaches `img` to a free loop device (detached again by the kernel when its last mount
/// goes) and returns the device's path and an open descriptor of it, which must stay open
/// until the device is mounted: autoclear also fires on the last close of an unmounted device.
fn attach(img: &Path) -> io::Result<(PathBuf, File)> {
    let backing = OpenOptions::new().read(true).write(true).open(img)?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the device between GET_FREE and CONFIGURE: try again.
    for _ in 0..16 {
        // SAFETY: plain ioctl on an open descriptor, no argument.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let loopf = match OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        let name = img.as_os_str().as_bytes();
        let len = name.len().min(63);
        cfg.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: `cfg` is a valid loop_config that outlives the call.
        let r = unsafe { libc::ioctl(loopf.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
        if r == 0 {
            return Ok((dev, loopf));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

/// The loop device `img` is attached to, if any: its file system may still be alive (a
/// machine's mount namespace that has not gone yet holds it after the host's mount was
/// detached).
fn attached_to(img: &Path) -> Option<PathBuf> {
    let img = img.canonicalize().ok()?;
    for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim_end()) == img {
            return Some(PathBuf::from(format!("/dev/{n}")));
        }
    }
    None
}

/// Mounts `img` at `dir` (made if missing) unless something is mounted there already.
/// Returns whether it mounted.
///
/// An image still attached to a loop device is mounted from that device, so the kernel reuses
/// the file system instance that is still alive: two instances of one ext4 image would each
/// write it as if alone, and the newer one would not see what the older one had not written
/// back yet.
pub fn mount(img: &Path, dir: &Path) -> io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    if is_mount_point(dir)? {
        return Ok(false);
    }
    if let Some(dev) = attached_to(img) {
        match mount_dev(&dev, dir) {
            Ok(()) => return Ok(true),
            // It detached meanwhile (its last user went): attach afresh below.
            Err(e) => tracing::debug!("mounting {} from {}: {e}", img.display(), dev.display()),
        }
    }
    let (dev, loopf) = attach(img)?;
    if let Err(e) = mount_dev(&dev, dir) {
        // The loop device has no mount: autoclear only fires on the last close after a
        // mount, so detach it by hand.
        // SAFETY: LOOP_CLR_FD (0x4C01) on an open loop device, no argument.
        unsafe { libc::ioctl(loopf.as_raw_fd(), 0x4C01 as _) };
        return Err(e);
    }
    drop(loopf);
    Ok(true)
}

fn mount_dev(dev: &Path, dir: &Path) -> io::Result<()> {
    let (src, target, fstype) = (cstr(dev)?, cstr(dir)?, c"ext4");
    // SAFETY: valid C strings for the call; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches whatever is mounted at `dir` (lazily: a machine still using it keeps it until it
/// ends). Not mounted is fine.
pub fn unmount(dir: &Path) -> io::Result<()> {
    // Written back first: what the machine wrote is in the image before anyone else looks.
    if let Ok(d) = File::open(dir) {
        // SAFETY: plain syscall on an open descriptor.
        unsafe { libc::syncfs(d.as_raw_fd()) };
    }
    let c = cstr(dir)?;
    // SAFETY: valid C string for the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(e);
        }
    }
    Ok(())
}

/// Whether `dir` is a mount point of this mount namespace (mountinfo names it).
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    Ok(mount_points()?.iter().any(|m| m == dir))
}

/// Every mount point of this mount namespace, from `/proc/self/mountinfo` (the fifth field,
/// with the kernel's octal escapes undone).
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(p))))
        .collect())
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Unmounts every ferry volume (a mount point `.../volumes/vol_*` with an image beside it)
/// below `root`; returns what it unmounted. For `ferry dev` shutdown and `ferry dev clean`.
pub fn unmount_volumes_under(root: &Path) -> Vec<PathBuf> {
    let mut done = Vec::new();
    for m in mount_points().unwrap_or_default() {
        let is_volume = m.starts_with(root)
            && m.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vol_"))
            && m.parent()
                .is_some_and(|p| p.file_name().is_some_and(|n| n == "volumes"))
            && m.with_extension("img").exists();
        if is_volume && unmount(&m).is_ok() {
            done.push(m);
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real kernel (root): make, mount, fill to ENOSPC, unmount; the loop device goes with the
    /// mount.
    #[test]
    fn an_image_mounts_holds_its_size_and_unmounts() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("vol_test.img");
        let dir = t.path().join("vol_test");
        create(&img, 16).unwrap();
        assert!(mount(&img, &dir).unwrap());
        assert!(
            !mount(&img, &dir).unwrap(),
            "already mounted: nothing to do"
        );
        let big = vec![1u8; 1 << 20];
        let mut f = File::create(dir.join("big")).unwrap();
        let mut err = None;
        for _ in 0..32 {
            if let Err(e) = std::io::Write::write_all(&mut f, &big) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err.map(|e| e.raw_os_error()), Some(Some(libc::ENOSPC)));
        drop(f);
        unmount(&dir).unwrap();
        assert!(!is_mount_point(&dir).unwrap());
        assert!(std::fs::metadata(&img).unwrap().len() == 16 << 20);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), b"/a b");
        assert_eq!(unescape(r"/x\134y"), b"/x\\y");
        assert_eq!(unescape("/plain"), b"/plain");
    }
}
