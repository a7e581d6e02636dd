//! Batched UDP I/O for [`DnsServer::serve_udp`](crate::DnsServer::serve_udp): one `recvmmsg`
//! fills up to [`BATCH`] slots, one `sendmmsg` sends their answers back to each slot's source.
//! Under load this turns two system calls per query into two per batch; when queries trickle in
//! a batch holds one and nothing is lost.
//!
//! Buffers are allocated once per socket. It never reads a peer address the kernel did not
//! write (the address length it returns is checked) and never sends to anything but the
//! address a datagram came from.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// Datagrams per system call. Enough to drain a busy socket in a few calls; small enough that
/// the buffers (about 340 KiB) stay cheap per socket.
pub(crate) const BATCH: usize = 64;
/// Largest UDP datagram we read; a longer one is cut, fails to parse and gets FORMERR.
pub(crate) const UDP_RECV: usize = 4096;

/// The receive and send state of one socket.
pub(crate) struct Batch {
    bufs: Vec<[u8; UDP_RECV]>,
    lens: [usize; BATCH],
    /// Each slot's source, as the kernel wrote it (reused as the answer's destination).
    names: Vec<libc::sockaddr_storage>,
    name_lens: [libc::socklen_t; BATCH],
    /// Each slot's answer; empty = nothing to send.
    outs: Vec<Vec<u8>>,
    /// Slots with an answer, in receive order.
    to_send: [u8; BATCH],
}

impl Batch {
    pub(crate) fn new(out_capacity: usize) -> Batch {
        Batch {
            bufs: vec![[0; UDP_RECV]; BATCH],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (AF_UNSPEC)
            // value.
            names: vec![unsafe { zeroed() }; BATCH],
            name_lens: [0; BATCH],
            outs: (0..BATCH)
                .map(|_| Vec::with_capacity(out_capacity))
                .collect(),
            to_send: [0; BATCH],
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many slots it filled.
    /// `WouldBlock` when none is waiting.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain C structs for which all zeroes (null pointers,
        // zero lengths) is a valid value; every field the kernel reads is set below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, (iov, hdr)) in iovs.iter_mut().zip(hdrs.iter_mut()).enumerate() {
            iov.iov_base = self.bufs[i].as_mut_ptr().cast();
            iov.iov_len = UDP_RECV;
            hdr.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live, exclusively borrowed buffer of the length it
        // states (UDP_RECV bytes, one sockaddr_storage) and at one iovec in `iovs`; `iovs`,
        // `hdrs` and `self` outlive the call and are not moved during it. vlen is the array
        // length. No timeout pointer (non-blocking).
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, hdr) in hdrs.iter().enumerate().take(n) {
            // msg_len is the datagram's length, cut to the buffer if it was longer.
            self.lens[i] = (hdr.msg_len as usize).min(UDP_RECV);
            self.name_lens[i] = hdr.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// Slot `i`'s request, its source's address (`None` if it is not IP) and its answer buffer.
    pub(crate) fn slot(&mut self, i: usize) -> (&[u8], Option<IpAddr>, &mut Vec<u8>) {
        let src = peer_ip(&self.names[i], self.name_lens[i]);
        (&self.bufs[i][..self.lens[i]], src, &mut self.outs[i])
    }

    /// After answering slots `0..received`: queues the non-empty answers for [`send`](Self::send).
    /// Returns how many there are.
    pub(crate) fn queue(&mut self, received: usize) -> usize {
        let mut n = 0;
        for i in 0..received {
            if !self.outs[i].is_empty() {
                self.to_send[n] = i as u8;
                n += 1;
            }
        }
        n
    }

    /// Sends queued answers `from..queued` with one `sendmmsg`; returns how many the kernel took
    /// (at least one). An error belongs to answer `from` (the first one not sent).
    pub(crate) fn send(&mut self, fd: RawFd, from: usize, queued: usize) -> io::Result<usize> {
        let slots = &self.to_send[from..queued];
        // SAFETY: as in `recv`: all-zero iovec and mmsghdr values are valid.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for ((iov, hdr), &slot) in iovs.iter_mut().zip(hdrs.iter_mut()).zip(slots) {
            let slot = usize::from(slot);
            let out = &mut self.outs[slot];
            iov.iov_base = out.as_mut_ptr().cast();
            iov.iov_len = out.len();
            hdr.msg_hdr.msg_name = (&mut self.names[slot] as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = self.name_lens[slot];
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `slots.len()` headers point at live buffers of the lengths they
        // state (an answer, the source address the kernel wrote with its length) and at one
        // iovec each; nothing is moved or freed during the call; the kernel only reads them
        // (apart from msg_len).
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                slots.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The IP address in a source address the kernel wrote (`len` bytes of it).
fn peer_ip(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<IpAddr> {
    let len = len as usize;
    match i32::from(name.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote an AF_INET address of at least sockaddr_in's size into
            // this sockaddr_storage, which is larger and suitably aligned for it.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for AF_INET6 and sockaddr_in6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}
