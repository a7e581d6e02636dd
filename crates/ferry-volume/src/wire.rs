//! The wire protocol: `[u8 kind][u32 BE payload length][payload]`.
//!
//! Hand-written on purpose: it is a tiny, fixed protocol of nine frame kinds over one blocking
//! stream, where chunk payloads must go raw (no per-byte encoding) and every length must be
//! checked against a hard limit *before* allocating. No maintained crate fits that better than
//! sixty lines: length-delimited codecs are tied to async runtimes, and general serialization
//! formats would either encode the chunk bytes or leave the limits to us anyway.
//!
//! Control messages are JSON (serde_json), except the manifest, which is postcard (binary: its
//! size is what a round over an unchanged volume costs); a data frame is
//! `[u32 BE entry][u32 BE chunk][bytes]`.

use crate::error::{ChunkRef, Result, VolumeError};
use crate::manifest::{Manifest, CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub const HELLO: u8 = 1;
pub const WELCOME: u8 = 2;
pub const MANIFEST: u8 = 3;
pub const NEED: u8 = 4;
pub const DATA: u8 = 5;
pub const DONE: u8 = 6;
pub const VERDICT: u8 = 7;
pub const BYE: u8 = 8;
pub const ERROR: u8 = 9;

/// Bytes before a frame's payload.
pub const FRAME_HEADER: usize = 5;
/// Bytes before a data frame's chunk bytes (entry, chunk).
pub const DATA_HEADER: usize = 8;
/// Largest manifest, need list or verdict (JSON).
pub const MAX_CONTROL: u32 = 64 << 20;
/// Largest hello, welcome, done, bye or error frame.
pub const MAX_SMALL: u32 = 64 << 10;
/// Largest data frame.
pub const MAX_DATA: u32 = CHUNK_SIZE as u32 + DATA_HEADER as u32;

/// The first frame of a session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Names the session (e.g. the migration ID) in logs and reports.
    pub session: String,
    /// Checked by the receiver's `authorize`.
    pub token: String,
    /// Which volume: a relative path the receiver's `authorize` maps to a directory.
    pub target: String,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("session", &self.session)
            .field("token", &"<redacted>")
            .field("target", &self.target)
            .finish()
    }
}

/// The chunks the receiver asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    pub chunks: Vec<ChunkRef>,
}

/// The receiver's answer after each pass of data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Root (hex) computed from the receiver's own state table.
    pub root: String,
    /// `root` equals the manifest's root and nothing is missing.
    pub verified: bool,
    /// Chunks not received, or received corrupt.
    pub missing: Vec<ChunkRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ErrorMsg {
    message: String,
}

/// One decoded frame. A data frame's bytes stay in the caller's buffer at
/// `buf[DATA_HEADER..]`.
#[derive(Debug)]
pub enum Msg {
    Hello(Hello),
    Welcome,
    Manifest(Box<Manifest>),
    Need(Need),
    Data { entry: u32, chunk: u32 },
    Done,
    Verdict(Verdict),
    Bye,
    Error(String),
}

fn limit(kind: u8) -> Result<u32> {
    Ok(match kind {
        HELLO | WELCOME | DONE | BYE | ERROR => MAX_SMALL,
        MANIFEST | NEED | VERDICT => MAX_CONTROL,
        DATA => MAX_DATA,
        k => return Err(VolumeError::Protocol(format!("unknown frame kind {k}"))),
    })
}

fn json<'a, T: Deserialize<'a>>(what: &str, b: &'a [u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| VolumeError::Protocol(format!("{what}: {e}")))
}

/// Reads one frame into `buf` and decodes it. Limits are checked before `buf` grows; a manifest
/// is also [validated](Manifest::validate). Never panics on any input.
pub fn read_msg<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Msg> {
    let mut h = [0u8; FRAME_HEADER];
    if let Err(e) = r.read_exact(&mut h) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            VolumeError::Protocol("connection closed by peer".into())
        } else {
            VolumeError::Net(e)
        });
    }
    let kind = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let max = limit(kind)?;
    if len > max {
        return Err(VolumeError::TooLarge {
            what: "frame",
            got: len as u64,
            limit: max as u64,
        });
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            VolumeError::Protocol("connection closed inside a frame".into())
        } else {
            VolumeError::Net(e)
        }
    })?;
    let b = &buf[..];
    Ok(match kind {
        HELLO => Msg::Hello(json("hello", b)?),
        WELCOME => Msg::Welcome,
        MANIFEST => {
            let m = Manifest::decode(b)?;
            m.validate()?;
            Msg::Manifest(Box::new(m))
        }
        NEED => Msg::Need(json("need", b)?),
        DATA => {
            if b.len() <= DATA_HEADER {
                return Err(VolumeError::Protocol(
                    "data frame without chunk bytes".into(),
                ));
            }
            Msg::Data {
                entry: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                chunk: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            }
        }
        DONE => Msg::Done,
        VERDICT => Msg::Verdict(json("verdict", b)?),
        BYE => Msg::Bye,
        ERROR => Msg::Error(json::<ErrorMsg>("error", b)?.message),
        _ => unreachable!("limit() rejected unknown kinds"),
    })
}

/// Reads frames until the first error or end of input (for the fuzz target and tests).
pub fn decode_all(bytes: &[u8]) -> (Vec<Msg>, VolumeError) {
    let mut r = std::io::Cursor::new(bytes);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_msg(&mut r, &mut buf) {
            Ok(m) => out.push(m),
            Err(e) => return (out, e),
        }
    }
}

/// Encodes a control frame (tests and fuzz seeds); a manifest frame's body is postcard.
pub fn encode<T: Serialize>(kind: u8, msg: &T) -> Vec<u8> {
    let body = body(kind, msg).expect("serializable");
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Encodes a data frame (tests and fuzz seeds).
pub fn encode_data(entry: u32, chunk: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + DATA_HEADER + bytes.len());
    out.push(DATA);
    out.extend_from_slice(&((bytes.len() + DATA_HEADER) as u32).to_be_bytes());
    out.extend_from_slice(&entry.to_be_bytes());
    out.extend_from_slice(&chunk.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn body<T: Serialize>(kind: u8, msg: &T) -> Result<Vec<u8>> {
    if kind == MANIFEST {
        postcard::to_allocvec(msg).map_err(|e| VolumeError::Protocol(e.to_string()))
    } else {
        serde_json::to_vec(msg).map_err(|e| VolumeError::Protocol(e.to_string()))
    }
}

/// One side of a session: frames are gathered in a large write buffer and go out in big writes.
pub(crate) struct Conn<'a, S: Read + Write> {
    s: &'a mut S,
    w: Vec<u8>,
    pub(crate) buf: Vec<u8>,
}

const WBUF: usize = 1 << 20;

impl<'a, S: Read + Write> Conn<'a, S> {
    pub(crate) fn new(s: &'a mut S) -> Self {
        Conn {
            s,
            w: Vec::with_capacity(WBUF + MAX_DATA as usize + FRAME_HEADER),
            buf: Vec::new(),
        }
    }

    fn header(&mut self, kind: u8, len: usize) {
        self.w.push(kind);
        self.w.extend_from_slice(&(len as u32).to_be_bytes());
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.w.len() >= WBUF {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn send<T: Serialize>(&mut self, kind: u8, msg: &T) -> Result<()> {
        let body = body(kind, msg)?;
        self.header(kind, body.len());
        self.w.extend_from_slice(&body);
        self.maybe_flush()
    }

    pub(crate) fn send_empty(&mut self, kind: u8) -> Result<()> {
        self.header(kind, 0);
        self.maybe_flush()
    }

    pub(crate) fn send_error(&mut self, message: String) -> Result<()> {
        let mut message = message;
        message.truncate(4096);
        self.send(ERROR, &ErrorMsg { message })?;
        self.flush()
    }

    pub(crate) fn send_data(&mut self, entry: u32, chunk: u32, bytes: &[u8]) -> Result<()> {
        self.header(DATA, DATA_HEADER + bytes.len());
        self.w.extend_from_slice(&entry.to_be_bytes());
        self.w.extend_from_slice(&chunk.to_be_bytes());
        self.w.extend_from_slice(bytes);
        self.maybe_flush()
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.w.is_empty() {
            self.s.write_all(&self.w).map_err(VolumeError::Net)?;
            self.w.clear();
        }
        self.s.flush().map_err(VolumeError::Net)
    }

    pub(crate) fn recv(&mut self) -> Result<Msg> {
        read_msg(self.s, &mut self.buf)
    }
}
