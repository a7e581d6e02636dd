//! Small Linux helpers the rest of the crate shares: pidfds, `/proc/<pid>/stat`, atomic file
//! writes and an allocation-free integer formatter for code that runs between fork and exec.

use crate::{Result, RuntimeError};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `P_PIDFD` for `waitid` (Linux 5.4); the libc crate does not export it yet.
const P_PIDFD: libc::idtype_t = 3;

/// Opens a pidfd for `pid`. A pidfd pins the process identity: signals sent through it can never
/// reach a recycled pid, and it becomes readable when the process exits, parent or not.
pub(crate) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` through a pidfd.
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills in a SI_USER one); fd is a live pidfd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits up to `timeout` for the process behind `fd` to exit. True when it has exited.
pub(crate) fn pidfd_wait(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd array of length 1 living across the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 {
            return false;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Reaps the process behind `fd` if it is our child and has exited; returns its wait status
/// (`Some((code, signal))`). Non-children (after an agent restart) give `None`: their real parent
/// reaps them.
pub(crate) fn pidfd_reap(fd: &OwnedFd) -> Option<(Option<i32>, Option<i32>)> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid out-pointer; fd is a live pidfd; WNOHANG keeps this non-blocking.
    let r = unsafe {
        libc::waitid(
            P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: after a successful waitid, si_pid/si_status are the valid union members.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if r != 0 || pid == 0 {
        return None;
    }
    match info.si_code {
        libc::CLD_EXITED => Some((Some(status), None)),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some((None, Some(status))),
        _ => None,
    }
}

/// The state letter and start time (field 22, clock ticks since boot) of `/proc/<pid>/stat`.
/// Start time plus pid identifies a process across pid reuse.
pub(crate) fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    // `rest` starts at field 3 (state), so field 22 is the 20th item counting state as the 1st.
    let start = it.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename), so a
/// reader after a crash sees the old or the new content, never half of it.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| RuntimeError::io(format!("writing {}", path.display()), e))
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Formats a non-negative integer into `buf` without allocating (usable between fork and exec)
/// and returns the digits as a slice of it.
pub(crate) fn fmt_int(mut n: u64, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Clears the signal mask. For the code between fork and exec: std's spawn leaves the mask as
/// the parent had it, and both the shim and init block the signals they forward, which the
/// command must not inherit. Async-signal-safe.
pub(crate) fn unblock_all_signals() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; a null old-set pointer is allowed.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// `kill(2)` that treats "already gone" as success.
pub(crate) fn kill_quiet(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; pid > 0 never means a process group.
        unsafe { libc::kill(pid, sig) };
    }
}

/// `kill(-pgid, sig)`: signals a whole process group.
pub(crate) fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill has no memory-safety preconditions; pgid > 1 never means "everyone".
        unsafe { libc::kill(-pgid, sig) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_int_digits() {
        let mut b = [0u8; 24];
        assert_eq!(fmt_int(0, &mut b), b"0");
        assert_eq!(fmt_int(4194304, &mut b), b"4194304");
        assert_eq!(fmt_int(u64::MAX, &mut b), b"18446744073709551615");
    }

    #[test]
    fn proc_stat_self() {
        let (state, start) = proc_stat(std::process::id() as i32).unwrap();
        assert!(state == 'R' || state == 'S');
        assert!(start > 0);
    }
}
