//! A machine's output log: what its processes write to stdout and stderr, kept by the shim in
//! bounded, rotated files on the host, one log per instance.
//!
//! The shim (not the agent) owns the pipes, so the log keeps filling while the agent restarts,
//! and the CPU it costs is charged to the machine's own cgroup. A machine that floods its
//! output costs itself CPU and at most `(keep + 1) * max_bytes` of the host's disk.
//!
//! On disk, one record per line: `<unix micros> <o|e> <text>`. The text never holds a newline
//! (output is split into lines; a line longer than [`MAX_LINE`] becomes several records; bytes
//! that are not UTF-8 are replaced), so the format needs no escaping and a reader can resume at
//! any line. Timestamps never decrease within a log (a clock stepping back repeats the last
//! one), which makes `(timestamp, count)` a resumable cursor.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The longest record; longer lines are split (Docker's json-file splits at 16 KiB too).
pub const MAX_LINE: usize = 16 * 1024;
/// A line without its newline is written out after this long, so prompts and progress bars
/// show up in `logs -f`.
pub const PARTIAL_FLUSH: Duration = Duration::from_millis(200);

/// Where a machine's output goes and how much of it is kept. Part of the machine's init spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSpec {
    /// The current file; rotated files are `<path>.1` (newest) to `<path>.<keep>`.
    pub path: PathBuf,
    /// A file is rotated before it would grow past this.
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep: u32,
}

/// Which of the machine's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn tag(self) -> u8 {
        match self {
            Stream::Stdout => b'o',
            Stream::Stderr => b'e',
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One record of a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Microseconds since the Unix epoch, when the shim read the line.
    pub ts_us: i64,
    pub stream: Stream,
    pub message: String,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Appends records to a log, rotating it by size.
pub struct Writer {
    spec: LogSpec,
    file: Option<File>,
    size: u64,
    last_ts: i64,
    /// Records lost to a write error (a full disk must not block the machine).
    pub dropped: u64,
}

impl Writer {
    /// Opens (or continues: a restart in place appends to its instance's log) the current file.
    pub fn open(spec: LogSpec) -> std::io::Result<Writer> {
        if let Some(dir) = spec.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(&spec.path)?;
        let size = file.metadata()?.len();
        // Continue after the last record of an earlier run, so timestamps never decrease.
        let last_ts = read_file(&spec.path, i64::MIN)
            .last()
            .map_or(i64::MIN, |l| l.ts_us);
        Ok(Writer {
            spec,
            file: Some(file),
            size,
            last_ts,
            dropped: 0,
        })
    }

    /// Writes one record per line (or [`MAX_LINE`] chunk) of `lines`, all with the same time.
    pub fn write_lines<'a>(&mut self, stream: Stream, lines: impl IntoIterator<Item = &'a [u8]>) {
        let ts = now_us().max(self.last_ts);
        self.last_ts = ts;
        for line in lines {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text = String::from_utf8_lossy(line);
            let mut rec = Vec::with_capacity(text.len() + 24);
            rec.extend_from_slice(ts.to_string().as_bytes());
            rec.push(b' ');
            rec.push(stream.tag());
            rec.push(b' ');
            rec.extend_from_slice(text.as_bytes());
            rec.push(b'\n');
            self.write_record(&rec);
        }
    }

    fn write_record(&mut self, rec: &[u8]) {
        if self.size > 0 && self.size + rec.len() as u64 > self.spec.max_bytes {
            self.rotate();
        }
        match self.file.as_mut().map(|f| f.write_all(rec)) {
            Some(Ok(())) => self.size += rec.len() as u64,
            _ => self.dropped += 1,
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let p = &self.spec.path;
        if self.spec.keep == 0 {
            let _ = std::fs::remove_file(p);
        } else {
            for i in (1..self.spec.keep).rev() {
                let _ = std::fs::rename(rotated(p, i), rotated(p, i + 1));
            }
            let _ = std::fs::rename(p, rotated(p, 1));
        }
        self.file = open_append(p).ok();
        self.size = 0;
    }
}

fn open_append(p: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

/// `<path>.<n>`: the n-th newest rotated file.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Splits a stream's bytes into lines, holding back an unfinished one.
#[derive(Default)]
struct LineBuf {
    pending: Vec<u8>,
    since: Option<Instant>,
}

impl LineBuf {
    /// Appends `data`; returns the complete lines (and [`MAX_LINE`] chunks) it finished.
    fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            for chunk in self.pending[start..end].chunks(MAX_LINE) {
                out.push(chunk.to_vec());
            }
            if start == end {
                out.push(Vec::new());
            }
            start = end + 1;
        }
        let rest = self.pending.split_off(start);
        self.pending = rest;
        while self.pending.len() >= MAX_LINE {
            let tail = self.pending.split_off(MAX_LINE);
            out.push(std::mem::replace(&mut self.pending, tail));
        }
        self.since = match (self.pending.is_empty(), self.since) {
            (true, _) => None,
            (false, Some(t)) if out.is_empty() => Some(t),
            (false, _) => Some(Instant::now()),
        };
        out
    }

    fn take(&mut self) -> Option<Vec<u8>> {
        self.since = None;
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// The shim's end of a machine's stdout and stderr: two pipes whose write ends become the
/// machine's fds 1 and 2, and a [`Writer`] for what comes out of their read ends.
pub struct Pump {
    readers: [Option<File>; 2],
    bufs: [LineBuf; 2],
    writer: Writer,
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

impl Pump {
    /// Makes the pipes and opens the log. Returns the write ends (stdout, stderr).
    pub fn new(spec: LogSpec) -> std::io::Result<(Pump, OwnedFd, OwnedFd)> {
        let writer = Writer::open(spec)?;
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (out_r, out_w) = nix::unistd::pipe2(cloexec)?;
        let (err_r, err_w) = nix::unistd::pipe2(cloexec)?;
        Ok((
            Pump {
                readers: [Some(File::from(out_r)), Some(File::from(err_r))],
                bufs: Default::default(),
                writer,
            },
            out_w,
            err_w,
        ))
    }

    /// The read ends still open, with their index for [`Pump::readable`].
    pub fn fds(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.readers
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|f| (i, f.as_fd())))
            .collect()
    }

    /// True once both pipes reached end of file (every writer is gone).
    pub fn done(&self) -> bool {
        self.readers.iter().all(Option::is_none)
    }

    /// Reads once from pipe `i` (one read, so a flooding stream cannot starve the other or the
    /// shim's signals) and logs the lines it completes.
    pub fn readable(&mut self, i: usize) {
        use std::io::Read;
        let mut buf = [0u8; 64 * 1024];
        let Some(r) = self.readers[i].as_mut() else {
            return;
        };
        match r.read(&mut buf) {
            Ok(0) => {
                self.readers[i] = None;
                if let Some(rest) = self.bufs[i].take() {
                    self.writer.write_lines(STREAMS[i], [rest.as_slice()]);
                }
            }
            Ok(n) => {
                let lines = self.bufs[i].push(&buf[..n]);
                self.writer
                    .write_lines(STREAMS[i], lines.iter().map(Vec::as_slice));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => self.readers[i] = None,
        }
    }

    /// How long the shim may wait before [`Pump::tick`] has an unfinished line to write out.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.bufs
            .iter()
            .filter_map(|b| b.since)
            .map(|t| PARTIAL_FLUSH.saturating_sub(t.elapsed()))
            .min()
    }

    /// Writes out unfinished lines that waited [`PARTIAL_FLUSH`] (or all of them, at the end).
    pub fn tick(&mut self, all: bool) {
        for (buf, stream) in self.bufs.iter_mut().zip(STREAMS) {
            let due = buf
                .since
                .is_some_and(|t| all || t.elapsed() >= PARTIAL_FLUSH);
            if due {
                if let Some(rest) = buf.take() {
                    self.writer.write_lines(stream, [rest.as_slice()]);
                }
            }
        }
    }

    /// Logs a line of ferry's own (on stderr), e.g. why the shim could not record the exit.
    pub fn note(&mut self, msg: &str) {
        self.writer.write_lines(Stream::Stderr, [msg.as_bytes()]);
    }
}

/// The records of one file with a timestamp after `after_us`. A line that is not a record (a
/// message the shim wrote before its pump ran) is kept as stderr at the time of the record
/// before it.
pub fn read_file(path: &Path, after_us: i64) -> Vec<LogLine> {
    let Ok(f) = File::open(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut last = i64::MIN;
    for raw in BufReader::new(f).split(b'\n').map_while(Result::ok) {
        let line = match parse_record(&raw) {
            Some(l) => l,
            None => LogLine {
                ts_us: last.max(0),
                stream: Stream::Stderr,
                message: String::from_utf8_lossy(&raw).into_owned(),
            },
        };
        last = line.ts_us;
        if line.ts_us > after_us {
            out.push(line);
        }
    }
    out
}

fn parse_record(raw: &[u8]) -> Option<LogLine> {
    let s = String::from_utf8_lossy(raw);
    let (ts, rest) = s.split_once(' ')?;
    let ts_us: i64 = ts.parse().ok()?;
    let (tag, message) = rest.split_at_checked(1)?;
    let stream = match tag {
        "o" => Stream::Stdout,
        "e" => Stream::Stderr,
        _ => return None,
    };
    Some(LogLine {
        ts_us,
        stream,
        message: message.strip_prefix(' ').unwrap_or(message).to_owned(),
    })
}

/// A position in a log: everything up to `ts_us`, and the first `seen` records stamped exactly
/// `ts_us`, were already read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub ts_us: i64,
    pub seen: u32,
}

impl Cursor {
    /// The position after `lines` (read from this position).
    pub fn advance(mut self, lines: &[LogLine]) -> Cursor {
        for l in lines {
            if l.ts_us == self.ts_us {
                self.seen += 1;
            } else {
                self.ts_us = l.ts_us;
                self.seen = 1;
            }
        }
        self
    }
}

/// The records of a log (its rotated files oldest first, then the current one) after `from`.
/// Rotated files older than the cursor are not read.
pub fn read_log(spec_path: &Path, keep: u32, from: Cursor) -> Vec<LogLine> {
    let mut files = vec![spec_path.to_path_buf()];
    for i in 1..=keep.max(MAX_KEEP_SCAN) {
        let p = rotated(spec_path, i);
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    // Newest first until a file starts at or before the cursor: older ones hold nothing newer.
    let mut needed = Vec::new();
    for p in files {
        let first = first_ts(&p);
        needed.push(p);
        if first.is_some_and(|t| t <= from.ts_us) {
            break;
        }
    }
    let mut out = Vec::new();
    let mut skip = from.seen;
    for p in needed.iter().rev() {
        for l in read_file(p, from.ts_us.saturating_sub(1)) {
            if l.ts_us == from.ts_us && skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(l);
        }
    }
    out
}

/// Rotated files are looked for up to this index even when `keep` is lower (it may have been
/// higher when they were written).
const MAX_KEEP_SCAN: u32 = 16;

fn first_ts(p: &Path) -> Option<i64> {
    let f = File::open(p).ok()?;
    let mut line = Vec::new();
    BufReader::new(f).read_until(b'\n', &mut line).ok()?;
    parse_record(line.strip_suffix(b"\n").unwrap_or(&line)).map(|l| l.ts_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, max_bytes: u64, keep: u32) -> LogSpec {
        LogSpec {
            path: dir.join("i.log"),
            max_bytes,
            keep,
        }
    }

    #[test]
    fn lines_split_and_partial_held() {
        let mut b = LineBuf::default();
        assert_eq!(b.push(b"ab\ncd"), vec![b"ab".to_vec()]);
        assert!(b.since.is_some());
        assert_eq!(b.push(b"e\n\nf"), vec![b"cde".to_vec(), Vec::new()]);
        assert_eq!(b.take(), Some(b"f".to_vec()));
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let out = b.push(&long);
        assert_eq!(out.len(), 2);
        assert_eq!(b.pending.len(), 5);
    }

    #[test]
    fn rotation_bounds_the_disk_and_reads_in_order() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path(), 200, 2);
        let mut w = Writer::open(s.clone()).unwrap();
        for i in 0..100 {
            let l = format!("line {i:03}");
            w.write_lines(Stream::Stdout, [l.as_bytes()]);
        }
        let total: u64 = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 3 * 200, "{total} bytes on disk");
        assert!(!rotated(&s.path, 3).exists());
        let lines = read_log(&s.path, 2, Cursor::default());
        let msgs: Vec<_> = lines.iter().map(|l| l.message.clone()).collect();
        assert_eq!(msgs.last().unwrap(), "line 099");
        // What is kept is the newest, contiguous, in order.
        let first: usize = msgs[0][5..].parse().unwrap();
        let want: Vec<_> = (first..100).map(|i| format!("line {i:03}")).collect();
        assert_eq!(msgs, want);
    }

    #[test]
    fn cursor_resumes_without_repeats_or_gaps() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path(), 1 << 20, 1);
        let mut w = Writer::open(s.clone()).unwrap();
        // One write_lines call stamps all its lines alike: the cursor must count within a stamp.
        w.write_lines(Stream::Stdout, [&b"a"[..], b"b", b"c"]);
        let first = read_log(&s.path, 1, Cursor::default());
        let c = Cursor::default().advance(&first[..2]);
        w.write_lines(Stream::Stderr, [&b"d"[..]]);
        let rest: Vec<_> = read_log(&s.path, 1, c)
            .into_iter()
            .map(|l| l.message)
            .collect();
        assert_eq!(rest, ["c", "d"]);
    }

    #[test]
    fn a_machine_cannot_forge_a_record() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path(), 1 << 20, 1);
        let mut w = Writer::open(s.clone()).unwrap();
        let mut b = LineBuf::default();
        // A line that looks like a record of ours, a stamp from the past, the other stream.
        let lines = b.push(b"1 e forged\n\r\n");
        w.write_lines(Stream::Stdout, lines.iter().map(Vec::as_slice));
        let got = read_log(&s.path, 1, Cursor::default());
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].stream, got[0].message.as_str()),
            (Stream::Stdout, "1 e forged")
        );
        assert!(got[0].ts_us > 1);
        assert_eq!(got[1].message, "");
    }

    #[test]
    fn foreign_lines_and_bad_utf8_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.log");
        std::fs::write(&p, b"ferry init: oops\n5 o ok\n6 e \xff\xfe\n").unwrap();
        let l = read_file(&p, i64::MIN);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].stream, Stream::Stderr);
        assert_eq!(l[0].message, "ferry init: oops");
        assert_eq!(l[1].message, "ok");
        assert_eq!((l[2].ts_us, l[2].message.as_str()), (6, "\u{fffd}\u{fffd}"));
    }
}
