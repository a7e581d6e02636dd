//! The wire side of the `.internal` server: request bytes in, response bytes out
//! ([`DnsServer::answer`]), and the UDP and TCP loops that feed it.
//!
//! Parsing and encoding use hickory-server's request/response types (`MessageRequest`,
//! `MessageResponseBuilder`), which echo the question verbatim and truncate (TC bit) at the size
//! we give the encoder. The loops are our own rather than hickory's `ServerFuture`: they call
//! the same pure function for both transports, keep per-packet work to one parse and one encode
//! (no task per UDP packet), and bound TCP connections and idle time.
//!
//! It must never panic on input, never answer a response packet (reflection loops), never grow
//! memory with input (buffers are fixed; TCP connections are capped and time out) and never pick
//! a view from anything but the source address.

use crate::zone::{Lookup, View, ZoneData};
use crate::{fast, udp, DnsError};
use hickory_proto::op::{Edns, Header, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable, BinEncoder};
use hickory_server::authority::{MessageRequest, MessageResponseBuilder};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// The UDP payload size we advertise and never exceed (the DNS Flag Day 2020 value: no IP
/// fragmentation on any sane path).
pub const UDP_PAYLOAD: usize = 1232;
/// `max_udp` value for stream transports: no truncation below the 65535-byte message limit.
pub const STREAM: usize = usize::MAX;
/// A TCP client idle this long is disconnected (RFC 7766 suggests seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Concurrent TCP connections; more are closed at once so a flood cannot exhaust memory.
const MAX_TCP_CONNS: usize = 256;
/// A UDP loop that sees this many consecutive receive errors gives up (the socket is broken).
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

/// The `.internal` server. Cheap to clone (it shares the zone).
#[derive(Debug, Clone)]
pub struct DnsServer {
    zone: Arc<ZoneData>,
}

impl DnsServer {
    pub fn new(zone: Arc<ZoneData>) -> Self {
        DnsServer { zone }
    }

    /// The zone this server answers from (publish to it to change answers).
    pub fn zone(&self) -> &Arc<ZoneData> {
        &self.zone
    }

    /// Answers one DNS message from `src`. `max_udp` is the largest response this transport may
    /// carry: the client's EDNS size (or 512 without EDNS) caps it further; pass [`STREAM`] for
    /// TCP. Returns the response bytes, or an empty vector when nothing must be sent (the input
    /// is a response, or too short to carry an ID).
    ///
    /// Common queries take the fast path (answered from the names prepared at publish time);
    /// the rest [`answer_full`](Self::answer_full). Both give the same bytes.
    pub fn answer(&self, request: &[u8], src: IpAddr, max_udp: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.answer_into(request, src, max_udp, &mut out);
        out
    }

    /// [`answer`](Self::answer) into `out` (replacing its contents): the serving loops reuse
    /// one buffer per packet slot, so the fast path allocates nothing.
    pub fn answer_into(&self, request: &[u8], src: IpAddr, max_udp: usize, out: &mut Vec<u8>) {
        if !fast::answer(&self.zone, request, src, max_udp, out) {
            let full = self.answer_full(request, src, max_udp);
            out.clear();
            out.extend_from_slice(&full);
        }
        self.zone.count_response(out);
    }

    /// The fast path alone: `None` where it declines the packet. For tests and the fuzz
    /// target, which hold it to [`answer_full`](Self::answer_full)'s bytes.
    pub fn answer_fast(&self, request: &[u8], src: IpAddr, max_udp: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        fast::answer(&self.zone, request, src, max_udp, &mut out).then_some(out)
    }

    /// The full path alone: hickory's parse and encode, every query shape. The reference the
    /// fast path must equal.
    pub fn answer_full(&self, request: &[u8], src: IpAddr, max_udp: usize) -> Vec<u8> {
        let req = match MessageRequest::from_bytes(request) {
            Ok(r) => r,
            Err(_) => return form_error(request),
        };
        if req.message_type() == MessageType::Response {
            return Vec::new();
        }
        let limit: u16 = if max_udp == STREAM {
            u16::MAX
        } else {
            // The client's limit (512 without EDNS), ours, and never below the 512 every client
            // must accept.
            let ours = max_udp.clamp(512, u16::MAX as usize) as u16;
            req.max_payload().min(ours)
        };
        let mut header = Header::response_from_request(req.header());
        let edns = req.edns().map(|theirs| {
            let mut e = Edns::new();
            e.set_max_payload(UDP_PAYLOAD as u16);
            e.set_version(0);
            e.set_dnssec_ok(false);
            if theirs.version() > 0 {
                header.set_response_code(ResponseCode::BADVERS);
            }
            e
        });
        let refuse = |header: &mut Header, code| {
            header.set_response_code(code);
        };
        if header.response_code() == ResponseCode::BADVERS {
            // RFC 6891 §6.1.3: answer a higher EDNS version with BADVERS and our version.
        } else if req.op_code() != OpCode::Query {
            refuse(&mut header, ResponseCode::NotImp);
        } else if req.queries().len() != 1 {
            refuse(&mut header, ResponseCode::FormErr);
        } else {
            let q = &req.queries()[0];
            let qtype = q.query_type();
            match View::of(src) {
                None => refuse(&mut header, ResponseCode::Refused),
                Some(_) if q.query_class() != DNSClass::IN => {
                    refuse(&mut header, ResponseCode::Refused)
                }
                // Meta types that make no sense as a question.
                Some(_) if matches!(qtype, RecordType::OPT) => {
                    refuse(&mut header, ResponseCode::FormErr)
                }
                // No zone transfers: the zone is per view and changes every few seconds.
                Some(_) if matches!(qtype, RecordType::AXFR | RecordType::IXFR) => {
                    refuse(&mut header, ResponseCode::Refused)
                }
                Some(view) => {
                    let (lookup, soa) = self.zone.lookup_with_soa(q.name(), qtype, view);
                    let soa = [soa];
                    header.set_authoritative(true);
                    return match lookup {
                        Lookup::Answer(records) => emit(&req, header, &records, &[], edns, limit),
                        Lookup::NoData => emit(&req, header, &[], &soa, edns, limit),
                        Lookup::NxDomain => {
                            header.set_response_code(ResponseCode::NXDomain);
                            emit(&req, header, &[], &soa, edns, limit)
                        }
                        Lookup::Refused => {
                            header.set_authoritative(false);
                            header.set_response_code(ResponseCode::Refused);
                            emit(&req, header, &[], &[], edns, limit)
                        }
                    };
                }
            }
        }
        emit(&req, header, &[], &[], edns, limit)
    }

    /// Serves UDP on `socket` until the socket fails for good. Per-packet errors (e.g. ICMP
    /// unreachable reported on the next receive, a send that fails) are skipped.
    ///
    /// Datagrams are received and answered in batches ([`udp::BATCH`] per `recvmmsg`, the
    /// answers in one `sendmmsg`), each into its slot's reused buffer.
    pub async fn serve_udp(&self, socket: UdpSocket) -> Result<(), DnsError> {
        let fd = socket.as_raw_fd();
        let mut batch = udp::Batch::new(UDP_PAYLOAD);
        let mut errors = 0u32;
        loop {
            // async_io waits for readiness, retries after WouldBlock and spends the task's
            // cooperative budget, so a socket that never drains still lets the runtime's
            // other tasks (other sockets, TCP) run.
            let received = match socket.async_io(Interest::READABLE, || batch.recv(fd)).await {
                Ok(n) => {
                    errors = 0;
                    n
                }
                Err(e) => {
                    errors += 1;
                    if errors >= MAX_CONSECUTIVE_ERRORS {
                        return Err(DnsError::Io {
                            what: "receiving on the DNS UDP socket",
                            source: e,
                        });
                    }
                    tracing::debug!(error = %e, "dns udp receive error");
                    continue;
                }
            };
            for i in 0..received {
                let (request, src, out) = batch.slot(i);
                match src {
                    Some(src) => self.answer_into(request, src, UDP_PAYLOAD, out),
                    None => out.clear(),
                }
            }
            let queued = batch.queue(received);
            let mut sent = 0;
            while sent < queued {
                match socket
                    .async_io(Interest::WRITABLE, || batch.send(fd, sent, queued))
                    .await
                {
                    Ok(n) => sent += n,
                    Err(e) => {
                        // The error is the first unsent answer's (e.g. its destination is
                        // unreachable): drop that one, send the rest.
                        tracing::debug!(error = %e, "dns udp send error");
                        sent += 1;
                    }
                }
            }
        }
    }

    /// Serves TCP (RFC 7766 framing, pipelined queries answered in order) on `listener` until
    /// accepting fails for good.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<(), DnsError> {
        let slots = Arc::new(Semaphore::new(MAX_TCP_CONNS));
        let mut errors = 0u32;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => {
                    errors = 0;
                    x
                }
                Err(e) => {
                    errors += 1;
                    if errors >= MAX_CONSECUTIVE_ERRORS {
                        return Err(DnsError::Io {
                            what: "accepting on the DNS TCP listener",
                            source: e,
                        });
                    }
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "dns tcp connection limit reached; closing");
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = server.serve_connection(stream, peer.ip()).await {
                    tracing::debug!(error = %e, %peer, "dns tcp connection ended");
                }
            });
        }
    }

    async fn serve_connection(&self, mut stream: TcpStream, src: IpAddr) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        // One buffer per connection, at most 64 KiB (the framing's limit).
        let mut buf = Vec::new();
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(r) => r? as usize,
            };
            buf.resize(len, 0);
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await {
                Err(_) => return Ok(()),
                Ok(r) => r?,
            };
            let response = self.answer(&buf, src, STREAM);
            if response.is_empty() {
                // Not a query we can even answer FORMERR to: the stream is out of sync.
                return Ok(());
            }
            let mut framed = Vec::with_capacity(2 + response.len());
            framed.extend_from_slice(&(response.len() as u16).to_be_bytes());
            framed.extend_from_slice(&response);
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
    }
}

/// Encodes a response to `req` within `limit` bytes (hickory sets TC and drops what does not fit).
fn emit(
    req: &MessageRequest,
    header: Header,
    answers: &[Record],
    soa: &[Record],
    edns: Option<Edns>,
    limit: u16,
) -> Vec<u8> {
    let mut builder = MessageResponseBuilder::from_message_request(req);
    if let Some(e) = edns {
        builder.edns(e);
    }
    let response = builder.build(
        header,
        answers.iter(),
        std::iter::empty(),
        soa.iter(),
        std::iter::empty(),
    );
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(limit);
    match response.destructive_emit(&mut encoder) {
        Ok(_) => buf,
        Err(e) => {
            tracing::warn!(error = %e, "encoding a dns response failed; answering SERVFAIL");
            let mut h = Header::response_from_request(req.header());
            h.set_response_code(ResponseCode::ServFail);
            h.to_bytes().unwrap_or_default()
        }
    }
}

/// FORMERR for a message hickory could not parse: only the header is echoed (the question may
/// be what is broken). Too short for a header, or a response: nothing is sent.
fn form_error(request: &[u8]) -> Vec<u8> {
    if request.len() < 12 || request[2] & 0x80 != 0 {
        return Vec::new();
    }
    let opcode = request[2] & 0x78;
    let rd = request[2] & 0x01;
    let mut out = vec![0u8; 12];
    out[0] = request[0];
    out[1] = request[1];
    out[2] = 0x80 | opcode | rd;
    out[3] = ResponseCode::FormErr.low();
    out
}
