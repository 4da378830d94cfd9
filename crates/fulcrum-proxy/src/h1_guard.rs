//! Request-smuggling guard for HTTP/1 listeners.
//!
//! hyper's HTTP/1 server accepts a request that carries both `Content-Length` and
//! `Transfer-Encoding`: as RFC 9112 §6.3 (rule 3) allows, the transfer coding wins, the
//! `Content-Length` field is dropped and only keep-alive is turned off. The conflict is
//! therefore invisible in the `Request` a service receives. Such a message "might indicate
//! an attempt to perform request smuggling" (§6.3) and RFC 9112 §6.1 lets a server reject
//! it, which is what nginx and Envoy do and what Fulcrum does: answer 400 and never forward.
//!
//! [`H1Guard`] sits between the accepted (and, on TLS listeners, decrypted) stream and
//! hyper's connection: `accept → [TLS] → H1Guard → TokioIo → hyper`. It never changes a
//! byte. It follows HTTP/1 request framing in the bytes hyper reads (request heads; bodies
//! framed by `Content-Length` or by the chunked coding of §7.1, skipped by counting) and
//! records in the shared [`FramingVerdicts`] the first request on the connection that must
//! not be served. The per-connection service counts the HTTP/1 requests hyper hands it and
//! asks [`FramingVerdicts::is_conflicting`] before forwarding request `k`. The verdict is
//! always recorded before hyper can parse the head it concerns: the guard inspects the bytes
//! inside `poll_read`, before handing them to hyper.
//!
//! The framing rules mirror hyper 1.12 rather than a strict reading of the RFC, because the
//! guard must find the same message boundaries hyper finds: a bare LF ends a head line
//! (§2.2 allows it, and so does httparse), empty lines before a request line are skipped
//! (§2.2), a head that names `Content-Length` or `Transfer-Encoding` is parsed with httparse
//! and hyper's own rules for those fields (§6.1, §6.2, §6.3), and the chunk-size line, chunk
//! data and trailer section follow hyper's chunked decoder byte for byte (§7.1; linear
//! whitespace after the size is accepted, a bare LF in the size line or after chunk data is
//! not). A head that names neither field has no body for hyper whatever else is wrong with
//! it, so it is not parsed at all.
//!
//! The guard also tells the listener when a request head is arriving slowly: when a head
//! spans reads, [`FramingVerdicts::head_started_ns`] holds the time its first bytes came
//! and [`FramingVerdicts::head_started`] wakes whoever enforces the request-header timeout.
//! A head that arrives within one read (the normal case) costs nothing here.
//!
//! Cost per read: two `memchr` passes over head bytes, a parse only for heads that frame a
//! body, no allocation while each head arrives within one read (a head split across reads
//! is gathered in a reused buffer), and bodies skipped by counting.
//!
//! When the guard loses the thread it fails closed: the flagged request and every later one
//! on the connection are reported as conflicting. That costs nothing when hyper rejects the
//! same bytes (hyper answers 400 and closes, so no later request reaches the service), and
//! it is the only safe answer when hyper would keep serving (a head longer than
//! [`MAX_HEAD_LEN`] that still fits hyper's read buffer). Tracking stops for good only on an
//! HTTP/2 connection preface, after which hyper speaks HTTP/2 and never parses HTTP/1 again.
//!
//! Requests with `Upgrade` or method `CONNECT` are followed like any other: hyper keeps the
//! connection in HTTP/1 when the answer is not `101` (or `2xx` to `CONNECT`), so stopping
//! there would let the next request through unchecked. When the upgrade does happen, the
//! tunnelled bytes are parsed as if they were requests, which costs a scan and at worst
//! flags an index that hyper never hands to a service (WebSocket frames and TLS records
//! fail on their first byte; other protocols within [`MAX_HEAD_LEN`] bytes).

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The longest request head the guard follows, in bytes: request line, header fields and
/// the empty line that ends them, not counting empty lines before the request line.
///
/// A longer head is flagged [`FramingFault::HeadTooLarge`]. hyper accepts heads up to its
/// read buffer size (about 400 KiB by default); configure
/// `http1().max_buf_size(MAX_HEAD_LEN)` so that hyper answers 431 to such heads first.
pub const MAX_HEAD_LEN: usize = 64 * 1024;

/// Header fields parsed per head. hyper's default limit is 100; a head with more is flagged
/// as malformed (fail closed).
const MAX_HEADERS: usize = 128;

/// Head buffer capacity kept between requests once a head has spanned reads.
const RETAINED_HEAD_CAPACITY: usize = 8 * 1024;

/// The HTTP/2 connection preface up to its first empty line (RFC 9113 §3.4).
const H2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Why the guard tells the service not to serve a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FramingFault {
    /// The head carries both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1, §6.3).
    ContentLengthWithTransferEncoding,
    /// The head is longer than [`MAX_HEAD_LEN`]; the guard cannot follow the connection past it.
    HeadTooLarge,
    /// The bytes are not HTTP/1 request framing as hyper parses it. hyper rejects such bytes
    /// itself, so this verdict reaches a service only if hyper is configured more leniently
    /// than the guard (for example `ignore_invalid_headers`).
    Malformed,
}

impl FramingFault {
    const fn code(self) -> u64 {
        match self {
            Self::ContentLengthWithTransferEncoding => 0,
            Self::HeadTooLarge => 1,
            Self::Malformed => 2,
        }
    }

    const fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(Self::ContentLengthWithTransferEncoding),
            1 => Some(Self::HeadTooLarge),
            2 => Some(Self::Malformed),
            _ => None,
        }
    }
}

impl fmt::Display for FramingFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ContentLengthWithTransferEncoding => {
                "request has both Content-Length and Transfer-Encoding"
            }
            Self::HeadTooLarge => "request head is longer than the guard follows",
            Self::Malformed => "request framing could not be followed",
        })
    }
}

/// Bits of the packed verdict that hold the request index (plus one); the two bits above
/// hold the [`FramingFault`] code.
const INDEX_BITS: u32 = 62;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// The verdicts of one connection, shared between its [`H1Guard`] and its service.
///
/// Holds the first flagged request only: hyper turns keep-alive off after a request with
/// both framing headers, and a guard that has lost the framing reports every later request
/// as flagged, so nothing after the first one needs its own entry.
#[derive(Clone, Default)]
pub struct FramingVerdicts {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// 0 when nothing is flagged, else `fault_code << 62 | (index + 1)`.
    first: AtomicU64,
    /// When the head being read started (clock ns, ≥ 1), while a head spans reads; else 0.
    head_started_ns: AtomicU64,
    /// Signalled when a head starts spanning reads.
    head_started: Notify,
    /// Since when every write to the client has blocked (clock ns, ≥ 1), while one does;
    /// else 0.
    write_stalled_ns: AtomicU64,
    /// Signalled when writes start blocking.
    write_stalled: Notify,
}
impl FramingVerdicts {
    /// Whether the service must answer request number `index` (0-based, in arrival order of
    /// HTTP/1 requests on this connection) with 400 instead of forwarding it: it had both
    /// `Content-Length` and `Transfer-Encoding`, or it comes at or after the point where the
    /// guard lost the framing (see [`FramingVerdicts::fault`]). Never true on an HTTP/2
    /// connection.
    pub fn is_conflicting(&self, index: u64) -> bool {
        self.fault(index).is_some()
    }

    /// Why request number `index` must not be served, if it must not.
    ///
    /// Every request from the first flagged one on reports that request's fault.
    pub fn fault(&self, index: u64) -> Option<FramingFault> {
        let packed = self.shared.first.load(Ordering::Acquire);
        let first = (packed & INDEX_MASK).checked_sub(1)?;
        let fault = FramingFault::from_code(packed >> INDEX_BITS)?;
        (index >= first).then_some(fault)
    }

    /// Records the first flagged request; later calls are ignored.
    fn record(&self, index: u64, fault: FramingFault) {
        // An index past 2^62 saturates, which only flags more requests.
        let packed = (fault.code() << INDEX_BITS) | (index.min(INDEX_MASK - 1) + 1);
        // Fails only if a verdict is already recorded, which then stands.
        let _ = self
            .shared
            .first
            .compare_exchange(0, packed, Ordering::Release, Ordering::Relaxed);
    }

    /// When the request head now being read started arriving (clock nanoseconds, see
    /// `fulcrum_stats::clock`), if one is in progress across reads. A head that arrives
    /// within one read is never reported: it was complete as soon as it was seen.
    pub fn head_started_ns(&self) -> Option<u64> {
        match self.shared.head_started_ns.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Completes when a head starts spanning reads (or at once if one did since the last
    /// wait): the moment a request-header timeout starts to matter.
    pub async fn head_started(&self) {
        self.shared.head_started.notified().await;
    }

    /// Since when (clock ns) writes to the client have been blocking, if they are: the
    /// client stopped reading, or reads slower than responses come.
    pub fn write_stalled_ns(&self) -> Option<u64> {
        match self.shared.write_stalled_ns.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Completes when writes to the client start blocking (or at once if they did since
    /// the last wait): the moment a send timeout starts to matter.
    pub async fn write_stall_started(&self) {
        self.shared.write_stalled.notified().await;
    }

    /// Counts a blocked write as starting at `now_ns` (the client was seen taking bytes).
    /// Nothing if writes no longer block.
    pub fn restart_write_stall(&self, now_ns: u64) {
        let _ = self.shared.write_stalled_ns.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |since| (since != 0).then_some(now_ns.max(1)),
        );
    }

    /// Records the outcome of a write to the client: blocked (`Pending`) starts a stall,
    /// anything else ends one. One load per write; a store only when the state changes.
    #[inline]
    fn note_write<T>(&self, outcome: &Poll<T>) {
        let stalled = self.shared.write_stalled_ns.load(Ordering::Relaxed) != 0;
        match (outcome.is_pending(), stalled) {
            (true, false) => {
                self.shared
                    .write_stalled_ns
                    .store(fulcrum_stats::clock::now_ns().max(1), Ordering::Release);
                self.shared.write_stalled.notify_one();
            }
            (false, true) => self.shared.write_stalled_ns.store(0, Ordering::Release),
            _ => {}
        }
    }

    fn set_head_in_progress(&self, in_progress: bool) {
        if in_progress {
            let now = fulcrum_stats::clock::now_ns().max(1);
            self.shared.head_started_ns.store(now, Ordering::Release);
            self.shared.head_started.notify_one();
        } else {
            self.shared.head_started_ns.store(0, Ordering::Release);
        }
    }
}

impl fmt::Debug for FramingVerdicts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let packed = self.shared.first.load(Ordering::Acquire);
        let first = (packed & INDEX_MASK)
            .checked_sub(1)
            .zip(FramingFault::from_code(packed >> INDEX_BITS));
        f.debug_struct("FramingVerdicts")
            .field("first", &first)
            .finish()
    }
}

/// An HTTP/1 server-side stream wrapper that flags request-smuggling framing.
///
/// Reads are inspected (see the module docs), writes pass straight through.
///
/// ```ignore
/// let verdicts = FramingVerdicts::default();
/// let io = TokioIo::new(H1Guard::new(stream, verdicts.clone()));
/// // in the service, for its k-th HTTP/1 request:
/// if verdicts.is_conflicting(k) { /* answer 400, do not forward */ }
/// ```
pub struct H1Guard<IO> {
    io: IO,
    tracker: FramingTracker,
    verdicts: FramingVerdicts,
    /// Whether the tracker was inside a head after the previous read.
    in_head: bool,
}

impl<IO> H1Guard<IO> {
    /// Wraps `io`, the plaintext stream of one client connection, recording into `verdicts`.
    pub fn new(io: IO, verdicts: FramingVerdicts) -> Self {
        Self {
            io,
            tracker: FramingTracker::default(),
            verdicts,
            in_head: false,
        }
    }

    /// Returns the wrapped stream.
    pub fn into_inner(self) -> IO {
        self.io
    }
}

impl<IO: fmt::Debug> fmt::Debug for H1Guard<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Guard")
            .field("io", &self.io)
            .field("verdicts", &self.verdicts)
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for H1Guard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(read) = buf.filled().get(before..)
            && let Some((index, fault)) = this.tracker.feed(read)
        {
            this.verdicts.record(index, fault);
        }
        let in_head = matches!(this.tracker.state, State::Head { .. });
        if in_head != this.in_head {
            this.in_head = in_head;
            this.verdicts.set_head_in_progress(in_head);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for H1Guard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.io).poll_write(cx, buf);
        this.verdicts.note_write(&outcome);
        outcome
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.verdicts.note_write(&outcome);
        outcome
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.io).poll_flush(cx);
        // A flush that completes says nothing of the client (a TCP flush always does at
        // once); only one that blocks is a sign of a stall.
        if outcome.is_pending() {
            this.verdicts.note_write(&outcome);
        }
        outcome
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Follows request framing over the bytes of one connection, read by read.
#[derive(Debug, Default)]
struct FramingTracker {
    state: State,
    /// The current head, only while it spans reads; a head within one read is parsed in place.
    head: Vec<u8>,
    /// Heads parsed so far: the index of the request being read.
    heads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before a request line, skipping empty lines (RFC 9112 §2.2); `cr`: a CR awaits its LF.
    Idle { cr: bool },
    /// Inside a head; `eol` carries a possible end of head across reads.
    Head { eol: Eol },
    /// Inside a `Content-Length` body (RFC 9112 §6.2), `remaining > 0`.
    Body { remaining: u64 },
    /// Inside a chunked body (RFC 9112 §7.1).
    Chunked(Chunk),
    /// No longer tracking: HTTP/2, or the verdict is final.
    Opaque,
}

impl Default for State {
    fn default() -> Self {
        Self::Idle { cr: false }
    }
}

/// How much of an end-of-head sequence (`LF [CR] LF`) the previous read ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Eol {
    None,
    Lf,
    LfCr,
}

/// Chunked decoding states, one per state of hyper's decoder; numbers are the chunk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// The first hex digit of a chunk-size.
    Start,
    Size(u64),
    /// Whitespace after the chunk-size.
    SizeLws(u64),
    /// A chunk extension (RFC 9112 §7.1.1), up to CR.
    Ext(u64),
    /// The LF of the chunk-size line.
    SizeLf(u64),
    /// Chunk data, `remaining > 0`.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last-chunk line or a trailer field: the final CR or a trailer field (§7.1.2).
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What a complete head says about the bytes that follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    NoBody,
    Length(u64),
    Chunked,
    Http2,
}

impl FramingTracker {
    /// Runs the tracker over the next bytes read from the connection. Returns the newly
    /// flagged request and why, at most once per connection; tracking stops after it.
    fn feed(&mut self, data: &[u8]) -> Option<(u64, FramingFault)> {
        let mut pos = 0;
        while let Some(rest) = data.get(pos..).filter(|rest| !rest.is_empty()) {
            let step = match self.state {
                State::Idle { cr } => self.idle(rest, cr),
                State::Head { eol } => self.head(rest, eol),
                State::Body { remaining } => Ok(self.body(rest, remaining)),
                State::Chunked(chunk) => self.chunked(rest, chunk),
                State::Opaque => return None,
            };
            match step {
                Ok(used) => pos += used,
                Err(fault) => {
                    self.stop();
                    return Some((self.heads, fault));
                }
            }
        }
        None
    }

    fn stop(&mut self) {
        self.state = State::Opaque;
        self.head = Vec::new();
    }

    /// Skips empty lines; moves to `Head` at the first byte of a request line, which must
    /// start a method token as httparse requires.
    fn idle(&mut self, rest: &[u8], mut cr: bool) -> Result<usize, FramingFault> {
        for (i, &b) in rest.iter().enumerate() {
            match b {
                b'\n' => cr = false,
                _ if cr => return Err(FramingFault::Malformed),
                b'\r' => cr = true,
                _ if is_token(b) => {
                    self.state = State::Head { eol: Eol::None };
                    return Ok(i);
                }
                _ => return Err(FramingFault::Malformed),
            }
        }
        self.state = State::Idle { cr };
        Ok(rest.len())
    }

    fn head(&mut self, rest: &[u8], mut eol: Eol) -> Result<usize, FramingFault> {
        let Some(end) = find_head_end(rest, &mut eol) else {
            // Not finished within these bytes, so the head is longer than all of them.
            if self.head.len() + rest.len() >= MAX_HEAD_LEN {
                return Err(FramingFault::HeadTooLarge);
            }
            self.head.extend_from_slice(rest);
            self.state = State::Head { eol };
            return Ok(rest.len());
        };
        if self.head.len() + end > MAX_HEAD_LEN {
            return Err(FramingFault::HeadTooLarge);
        }
        let framing = if self.head.is_empty() {
            inspect_head(&rest[..end], self.heads)
        } else {
            self.head.extend_from_slice(&rest[..end]);
            let framing = inspect_head(&self.head, self.heads);
            self.head.clear();
            self.head.shrink_to(RETAINED_HEAD_CAPACITY);
            framing
        }?;
        self.heads += 1;
        self.state = match framing {
            Framing::NoBody => State::Idle { cr: false },
            Framing::Length(remaining) => State::Body { remaining },
            Framing::Chunked => State::Chunked(Chunk::Start),
            Framing::Http2 => State::Opaque,
        };
        Ok(end)
    }

    fn body(&mut self, rest: &[u8], remaining: u64) -> usize {
        let (used, remaining) = skip(rest, remaining);
        self.state = match remaining {
            0 => State::Idle { cr: false },
            remaining => State::Body { remaining },
        };
        used
    }

    /// Mirrors hyper's `ChunkedState::step`, byte by byte except where bytes are skipped
    /// wholesale (chunk data, extensions, trailer fields).
    fn chunked(&mut self, rest: &[u8], mut chunk: Chunk) -> Result<usize, FramingFault> {
        let malformed = FramingFault::Malformed;
        let mut pos = 0;
        while let Some(&b) = rest.get(pos) {
            let (next, used) = match chunk {
                Chunk::Start => (Chunk::Size(push_hex(0, b).ok_or(malformed)?), 1),
                Chunk::Size(size) => match b {
                    b'\t' | b' ' => (Chunk::SizeLws(size), 1),
                    b';' => (Chunk::Ext(size), 1),
                    b'\r' => (Chunk::SizeLf(size), 1),
                    _ => (Chunk::Size(push_hex(size, b).ok_or(malformed)?), 1),
                },
                Chunk::SizeLws(size) => match b {
                    b'\t' | b' ' => (Chunk::SizeLws(size), 1),
                    b';' => (Chunk::Ext(size), 1),
                    b'\r' => (Chunk::SizeLf(size), 1),
                    _ => return Err(malformed),
                },
                Chunk::Ext(size) => match memchr::memchr2(b'\r', b'\n', &rest[pos..]) {
                    None => (Chunk::Ext(size), rest.len() - pos),
                    Some(at) if rest[pos + at] == b'\r' => (Chunk::SizeLf(size), at + 1),
                    Some(_) => return Err(malformed),
                },
                Chunk::SizeLf(size) => match (b, size) {
                    (b'\n', 0) => (Chunk::EndCr, 1),
                    (b'\n', size) => (Chunk::Data(size), 1),
                    _ => return Err(malformed),
                },
                Chunk::Data(remaining) => match skip(&rest[pos..], remaining) {
                    (used, 0) => (Chunk::DataCr, used),
                    (used, remaining) => (Chunk::Data(remaining), used),
                },
                Chunk::DataCr if b == b'\r' => (Chunk::DataLf, 1),
                Chunk::DataLf if b == b'\n' => (Chunk::Start, 1),
                Chunk::DataCr | Chunk::DataLf => return Err(malformed),
                Chunk::EndCr if b == b'\r' => (Chunk::EndLf, 1),
                Chunk::EndCr => (Chunk::Trailer, 1),
                Chunk::Trailer => match memchr::memchr(b'\r', &rest[pos..]) {
                    None => (Chunk::Trailer, rest.len() - pos),
                    Some(at) => (Chunk::TrailerLf, at + 1),
                },
                Chunk::TrailerLf if b == b'\n' => (Chunk::EndCr, 1),
                Chunk::TrailerLf => return Err(malformed),
                Chunk::EndLf if b == b'\n' => {
                    self.state = State::Idle { cr: false };
                    return Ok(pos + 1);
                }
                Chunk::EndLf => return Err(malformed),
            };
            chunk = next;
            pos += used;
        }
        self.state = State::Chunked(chunk);
        Ok(pos)
    }
}

/// Finds the end of a head in `rest`: just past the first `LF [CR] LF`, which is where
/// httparse (and hyper's `is_complete_fast`) see the empty line ending the field section.
/// `eol` carries a partial match from the previous read in and a partial match at the end
/// of `rest` out.
fn find_head_end(rest: &[u8], eol: &mut Eol) -> Option<usize> {
    let mut from = 0;
    match (*eol, rest.first(), rest.get(1)) {
        (Eol::Lf | Eol::LfCr, Some(b'\n'), _) => return Some(1),
        (Eol::Lf, Some(b'\r'), Some(b'\n')) => return Some(2),
        (Eol::Lf, Some(b'\r'), None) => {
            *eol = Eol::LfCr;
            return None;
        }
        (Eol::Lf, Some(b'\r'), Some(_)) => from = 1,
        _ => {}
    }
    *eol = Eol::None;
    while let Some(at) = memchr::memchr(b'\n', &rest[from..]) {
        let lf = from + at;
        match (rest.get(lf + 1), rest.get(lf + 2)) {
            (Some(b'\n'), _) => return Some(lf + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(lf + 3),
            (Some(b'\r'), None) => {
                *eol = Eol::LfCr;
                return None;
            }
            (None, _) => {
                *eol = Eol::Lf;
                return None;
            }
            _ => from = lf + 1,
        }
    }
    None
}

/// Reads the framing of one complete head, the way hyper's `Server::parse` does.
fn inspect_head(head: &[u8], index: u64) -> Result<Framing, FramingFault> {
    // hyper-util's auto connection switches to HTTP/2 on the preface at the very start.
    if index == 0 && head == H2_PREFACE_HEAD {
        return Ok(Framing::Http2);
    }
    // Most heads name neither field; their framing (no body) needs no parse at all, and
    // is right even for a head hyper rejects, since the connection then closes.
    if !may_name_framing_field(head) {
        return Ok(Framing::NoBody);
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        _ => return Err(FramingFault::Malformed),
    }
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut content_length = false;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    for field in request.headers.iter() {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // hyper looks at each Transfer-Encoding field in turn; the last one decides.
            chunked = is_chunked(field.value);
        } else if field.name.eq_ignore_ascii_case("content-length") {
            content_length = true;
            match parse_content_length(field.value) {
                Some(n) if length.is_none_or(|seen| seen == n) => length = Some(n),
                _ => bad_length = true,
            }
        }
    }
    if content_length && transfer_encoding {
        return Err(FramingFault::ContentLengthWithTransferEncoding);
    }
    if transfer_encoding {
        // hyper rejects Transfer-Encoding in HTTP/1.0 and a final coding other than chunked.
        return match (request.version, chunked) {
            (Some(1), true) => Ok(Framing::Chunked),
            _ => Err(FramingFault::Malformed),
        };
    }
    match length {
        _ if bad_length => Err(FramingFault::Malformed),
        None | Some(0) => Ok(Framing::NoBody),
        // hyper's `DecodedLength::MAX_LEN`.
        Some(n) if n > u64::MAX - 2 => Err(FramingFault::Malformed),
        Some(n) => Ok(Framing::Length(n)),
    }
}

/// Whether a line of `head` starts with `Content-Length` or `Transfer-Encoding` in any case.
/// A field name always starts a line and hyper matches names case-insensitively, so a head
/// without such a line carries neither field, however leniently hyper is configured.
fn may_name_framing_field(head: &[u8]) -> bool {
    let starts_with = |line: &[u8], name: &[u8]| {
        line.get(..name.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(name))
    };
    memchr::memchr_iter(b'\n', head).any(|lf| {
        let line = &head[lf + 1..];
        starts_with(line, b"content-length") || starts_with(line, b"transfer-encoding")
    })
}

/// hyper's `is_chunked_`: the field value is visible ASCII and its last coding is `chunked`.
fn is_chunked(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// hyper's `from_digits`: one or more ASCII digits, no sign, no list, no overflow.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Appends one hex digit to a chunk size; `None` on a non-digit or overflow.
fn push_hex(size: u64, b: u8) -> Option<u64> {
    let digit = match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => return None,
    };
    size.checked_mul(16)?.checked_add(u64::from(digit))
}

/// Skips up to `remaining` bytes of `rest`: returns the bytes used and those still to skip.
fn skip(rest: &[u8], remaining: u64) -> (usize, u64) {
    let used = usize::try_from(remaining).map_or(rest.len(), |r| r.min(rest.len()));
    (used, remaining - used as u64)
}

/// RFC 9110 §5.6.2 `tchar`, the bytes httparse accepts in a method.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CONFLICT: FramingFault = FramingFault::ContentLengthWithTransferEncoding;

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
    const POST_LENGTH: &[u8] =
        b"POST /b HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world";
    const POST_CHUNKED: &[u8] = b"POST /c HTTP/1.1\r\nHost: example.com\r\n\
        Transfer-Encoding: gzip, chunked\r\nTE: trailers\r\n\r\n\
        5;name=value\r\nhello\r\n\
        A ;quoted=\"a;b\"; flag\r\n0123456789\r\n\
        1a\r\nabcdefghijklmnopqrstuvwxyz\r\n\
        000;last\r\nX-Checksum: 1234\r\nX-Other:  two\r\n\r\n";
    const CL_THEN_TE: &[u8] = b"POST /d HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\
        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    const TE_THEN_CL: &[u8] = b"POST /e HTTP/1.1\r\nHost: example.com\r\n\
        transfer-encoding: chunked\r\nCONTENT-LENGTH: 4\r\n\r\n0\r\n\r\n";

    /// Feeds `stream` in reads whose sizes cycle through `sizes`.
    fn run(stream: &[u8], sizes: &[usize]) -> (FramingTracker, Option<(u64, FramingFault)>) {
        let mut tracker = FramingTracker::default();
        let mut verdict = None;
        let mut rest = stream;
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (read, next) = rest.split_at(size.clamp(1, rest.len()));
            if let Some(found) = tracker.feed(read) {
                assert!(verdict.is_none(), "a second verdict: {found:?}");
                verdict = Some(found);
            }
            rest = next;
        }
        (tracker, verdict)
    }

    fn verdict(stream: &[u8], sizes: &[usize]) -> Option<(u64, FramingFault)> {
        run(stream, sizes).1
    }

    /// The verdict and head count of `stream`, checked to be the same for every split into
    /// two reads and for reads of 1, 2, 3, 7 and pseudo-random sizes.
    fn verdict_any_split(stream: &[u8]) -> (Option<(u64, FramingFault)>, u64) {
        let (whole, expected) = run(stream, &[usize::MAX]);
        let outcome = |tracker: &FramingTracker| (tracker.state, tracker.heads);
        for at in 0..=stream.len() {
            let mut tracker = FramingTracker::default();
            let first = tracker.feed(&stream[..at]);
            let second = tracker.feed(&stream[at..]);
            assert_eq!(first.or(second), expected, "split at {at}");
            assert_eq!(outcome(&tracker), outcome(&whole), "split at {at}");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let random: Vec<usize> = (0..64)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 23) as usize + 1
            })
            .collect();
        for sizes in [&[1][..], &[2], &[3], &[7], &random] {
            let (tracker, found) = run(stream, sizes);
            assert_eq!(found, expected, "reads of {sizes:?}");
            assert_eq!(outcome(&tracker), outcome(&whole), "reads of {sizes:?}");
        }
        (expected, whole.heads)
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn content_length_then_transfer_encoding_is_flagged() {
        assert_eq!(verdict_any_split(CL_THEN_TE).0, Some((0, CONFLICT)));
    }

    #[test]
    fn transfer_encoding_then_content_length_is_flagged() {
        assert_eq!(verdict_any_split(TE_THEN_CL).0, Some((0, CONFLICT)));
    }

    #[test]
    fn clean_requests_are_never_flagged() {
        for stream in [GET, POST_LENGTH, POST_CHUNKED] {
            let (found, heads) = verdict_any_split(stream);
            assert_eq!(
                (found, heads),
                (None, 1),
                "{}",
                String::from_utf8_lossy(stream)
            );
        }
        let all = concat(&[GET, POST_CHUNKED, POST_LENGTH, GET]);
        assert_eq!(verdict_any_split(&all), (None, 4));
    }

    #[test]
    fn third_pipelined_request_is_flagged_at_index_two() {
        let stream = concat(&[POST_LENGTH, POST_CHUNKED, CL_THEN_TE, GET]);
        assert_eq!(verdict_any_split(&stream).0, Some((2, CONFLICT)));
        let stream = concat(&[GET, POST_LENGTH, TE_THEN_CL]);
        assert_eq!(verdict_any_split(&stream).0, Some((2, CONFLICT)));
    }

    #[test]
    fn smuggled_heads_inside_bodies_are_skipped() {
        let inner = CL_THEN_TE;
        let mut by_length = format!(
            "POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            inner.len()
        )
        .into_bytes();
        by_length.extend_from_slice(inner);
        let mut chunked = format!(
            "POST /g HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            inner.len()
        )
        .into_bytes();
        chunked.extend_from_slice(inner);
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        let stream = concat(&[&by_length, &chunked, GET]);
        assert_eq!(verdict_any_split(&stream), (None, 3));
    }

    #[test]
    fn empty_lines_between_requests_are_skipped() {
        let stream = concat(&[b"\r\n\n\r\n", GET, b"\r\n\r\n", POST_LENGTH, b"\n", GET]);
        assert_eq!(verdict_any_split(&stream), (None, 3));
        let stream = concat(&[b"\r\n", GET, b"\r\n", CL_THEN_TE]);
        assert_eq!(verdict_any_split(&stream).0, Some((1, CONFLICT)));
    }

    #[test]
    fn bare_lf_heads_are_followed() {
        // httparse ends lines at a bare LF, so hyper serves these; the guard must too.
        let stream = b"POST /h HTTP/1.1\nHost: a\nContent-Length: 2\n\nhiGET / HTTP/1.1\n\r\n\
            POST /i HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 3\n\n0\r\n\r\n";
        assert_eq!(verdict_any_split(stream).0, Some((2, CONFLICT)));
    }

    /// Chunked heads below; the body follows.
    const TE: &str = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn framing_edge_cases_match_hyper() {
        // Framed by hyper, so followed to the next request.
        let followed = [
            // Linear whitespace after the chunk-size, extensions, an all-zero last chunk.
            &format!("{TE}2 \t;x\r\nab\r\nA;y=\"z\"\r\n0123456789\r\n000 \r\n\r\n"),
            // Trailer fields.
            &format!("{TE}0\r\nA: b\r\nC: d\r\n\r\n"),
            // A bare LF does not end a trailer field in hyper's decoder (which then fails
            // to decode these trailers and closes; the framing is what matters here).
            &format!("{TE}0\r\nA: b\nC: d\r\nE: f\r\n\r\n"),
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked \r\n\r\n0\r\n\r\n",
        ];
        for stream in followed {
            let (found, heads) = verdict_any_split(stream.as_bytes());
            assert_eq!(found, None, "{stream:?}");
            assert!(heads >= 1, "{stream:?}");
        }
        // Both fields, whatever their values.
        for stream in [
            "POST / HTTP/1.1\r\nContent-Length: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                verdict_any_split(stream.as_bytes()).0,
                Some((0, CONFLICT)),
                "{stream:?}"
            );
        }
        // Rejected by hyper: flagged at the request hyper would have read next.
        let rejected = [
            (
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
                0,
            ),
            ("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx", 0),
            ("POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\nx", 0),
            ("POST / HTTP/1.1\r\nContent-Length : 1\r\n\r\nx", 0),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                0,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                0,
            ),
            (
                "POST / HTTP/1.1\r\nX: a\r\n folded\r\nContent-Length: 1\r\n\r\nx",
                0,
            ),
            ("POST / HTTP/2.0\r\nContent-Length: 1\r\n\r\nx", 0),
            (" GET / HTTP/1.1\r\n\r\n", 0),
            ("\r\r\nGET / HTTP/1.1\r\n\r\n", 0),
            (&format!("{TE}1\nx\r\n0\r\n\r\n"), 1),
            (&format!("{TE}1;a\nx\r\n0\r\n\r\n"), 1),
            (&format!("{TE}1\r\nxy\r\n0\r\n\r\n"), 1),
            (&format!("{TE};\r\n"), 1),
            (&format!("{TE}10000000000000000\r\n"), 1),
            (&format!("{TE}0\r\n\r\r\n"), 1),
        ];
        for (stream, index) in rejected {
            let found = verdict_any_split(stream.as_bytes()).0;
            assert_eq!(found, Some((index, FramingFault::Malformed)), "{stream:?}");
        }
        // Rejected by hyper too, but naming no framing field: bodiless whatever their flaws.
        for stream in [
            "GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\n Content-Length: 1\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\nX-Content-Length: 1\r\n\r\n",
        ] {
            assert_eq!(
                verdict_any_split(stream.as_bytes()),
                (None, 1),
                "{stream:?}"
            );
        }
    }

    #[test]
    fn upgrade_requests_stay_tracked_while_hyper_speaks_http1() {
        // Answered without 101, an upgrade request leaves hyper reading HTTP/1.
        let upgrade =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let stream = concat(&[upgrade, connect, GET, CL_THEN_TE]);
        assert_eq!(verdict_any_split(&stream).0, Some((3, CONFLICT)));
    }

    #[test]
    fn upgraded_tunnels_only_flag_later_requests() {
        // A masked WebSocket text frame after a 101: flagged at index 1, which hyper never
        // hands to a service once the connection is upgraded; request 0 stays clean.
        let upgrade = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let stream = concat(&[upgrade, &frame]);
        let (tracker, found) = run(&stream, &[usize::MAX]);
        assert_eq!(found, Some((1, FramingFault::Malformed)));
        assert_eq!(tracker.state, State::Opaque);
        assert_eq!(tracker.head.capacity(), 0);
        let verdicts = FramingVerdicts::default();
        verdicts.record(1, FramingFault::Malformed);
        assert!(!verdicts.is_conflicting(0));
        // A TLS record inside a CONNECT tunnel fails on its first byte too.
        let connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let stream = concat(&[connect, &[0x16, 0x03, 0x01, 0x02, 0x00]]);
        assert_eq!(
            verdict(&stream, &[usize::MAX]),
            Some((1, FramingFault::Malformed))
        );
    }

    #[test]
    fn http2_preface_stops_tracking_without_a_verdict() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let stream = concat(&[preface, &[0, 0, 0, 4, 0, 0, 0, 0, 0], CL_THEN_TE]);
        let (found, heads) = verdict_any_split(&stream);
        assert_eq!((found, heads), (None, 1));
        assert_eq!(run(&stream, &[5]).0.state, State::Opaque);
        // Later on it is an HTTP/1 head that hyper rejects, followed like any other.
        let stream = concat(&[GET, preface, CL_THEN_TE]);
        assert_eq!(verdict_any_split(&stream).0, Some((3, CONFLICT)));
    }

    #[test]
    fn oversized_head_is_flagged_without_panicking() {
        let mut head = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        while head.len() < 100 * 1024 {
            head.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        head.extend_from_slice(b"\r\n");
        let stream = concat(&[GET, &head, GET]);
        for sizes in [&[usize::MAX][..], &[1], &[7], &[4096], &[65_536]] {
            let (tracker, found) = run(&stream, sizes);
            assert_eq!(found, Some((1, FramingFault::HeadTooLarge)), "{sizes:?}");
            assert_eq!(tracker.state, State::Opaque);
            assert_eq!(tracker.head.capacity(), 0);
        }
    }

    #[test]
    fn head_of_exactly_the_limit_is_followed() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD_LEN - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        let stream = concat(&[&head, GET]);
        for sizes in [&[usize::MAX][..], &[1000], &[MAX_HEAD_LEN - 1]] {
            let (tracker, found) = run(&stream, sizes);
            assert_eq!((found, tracker.heads), (None, 2), "{sizes:?}");
            assert!(tracker.head.capacity() <= RETAINED_HEAD_CAPACITY);
        }
        let mut longer = head.clone();
        longer.insert(20, b'a');
        assert_eq!(
            verdict(&longer, &[usize::MAX]),
            Some((0, FramingFault::HeadTooLarge))
        );
    }

    #[test]
    fn heads_within_one_read_are_not_copied() {
        let stream = concat(&[GET, POST_LENGTH, POST_CHUNKED]);
        let (tracker, found) = run(&stream, &[usize::MAX]);
        assert_eq!((found, tracker.heads), (None, 3));
        assert_eq!(tracker.head.capacity(), 0);
    }

    #[test]
    fn verdicts_cover_every_request_from_the_first_flagged_one() {
        let verdicts = FramingVerdicts::default();
        assert!(!verdicts.is_conflicting(0));
        assert_eq!(format!("{verdicts:?}"), "FramingVerdicts { first: None }");
        verdicts.record(2, CONFLICT);
        verdicts.record(1, FramingFault::Malformed);
        assert!(!verdicts.is_conflicting(1));
        assert_eq!(verdicts.clone().fault(2), Some(CONFLICT));
        assert_eq!(verdicts.fault(3), Some(CONFLICT));
        let far = FramingVerdicts::default();
        far.record(u64::MAX, FramingFault::HeadTooLarge);
        assert!(!far.is_conflicting(0));
        assert_eq!(far.fault(u64::MAX), Some(FramingFault::HeadTooLarge));
    }

    /// An in-memory client that hands out its bytes in reads of chosen sizes.
    struct ChunkedReader {
        data: Vec<u8>,
        sizes: Vec<usize>,
        reads: usize,
        written: Vec<u8>,
        vectored_writes: usize,
    }

    impl ChunkedReader {
        fn new(data: &[u8], sizes: &[usize]) -> Self {
            Self {
                data: data.to_vec(),
                sizes: sizes.to_vec(),
                reads: 0,
                written: Vec::new(),
                vectored_writes: 0,
            }
        }
    }

    impl AsyncRead for ChunkedReader {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let size = this.sizes[this.reads % this.sizes.len()];
            this.reads += 1;
            let n = size.min(this.data.len()).min(buf.remaining());
            buf.put_slice(&this.data[..n]);
            this.data.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ChunkedReader {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.vectored_writes += 1;
            let before = this.written.len();
            for buf in bufs {
                this.written.extend_from_slice(buf);
            }
            Poll::Ready(Ok(this.written.len() - before))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn guard_passes_bytes_through_and_records_the_verdict() {
        let stream = concat(&[GET, POST_CHUNKED, TE_THEN_CL, GET]);
        for sizes in [&[1][..], &[3, 1, 7], &[8192]] {
            let verdicts = FramingVerdicts::default();
            let mut guard = H1Guard::new(ChunkedReader::new(&stream, sizes), verdicts.clone());
            let mut read = Vec::new();
            guard.read_to_end(&mut read).await.expect("in-memory read");
            assert_eq!(read, stream);
            assert!(!verdicts.is_conflicting(1));
            assert_eq!(verdicts.fault(2), Some(CONFLICT), "{sizes:?}");
        }
    }

    #[tokio::test]
    async fn guard_forwards_writes_and_vectored_writes() {
        let mut guard = H1Guard::new(ChunkedReader::new(b"", &[1]), FramingVerdicts::default());
        assert!(guard.is_write_vectored());
        guard
            .write_all(b"HTTP/1.1 200 OK\r\n")
            .await
            .expect("write");
        let slices = [io::IoSlice::new(b"a: b\r\n"), io::IoSlice::new(b"\r\n")];
        let n = guard.write_vectored(&slices).await.expect("vectored write");
        guard.flush().await.expect("flush");
        guard.shutdown().await.expect("shutdown");
        let inner = guard.into_inner();
        assert_eq!(n, 8);
        assert_eq!(inner.vectored_writes, 1);
        assert_eq!(inner.written, b"HTTP/1.1 200 OK\r\na: b\r\n\r\n");
    }

    #[tokio::test]
    async fn guard_over_a_duplex_pipe() {
        let (mut client, server) = tokio::io::duplex(7);
        let verdicts = FramingVerdicts::default();
        let mut guard = H1Guard::new(server, verdicts.clone());
        let stream = concat(&[POST_LENGTH, GET, CL_THEN_TE]);
        let expected = stream.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&stream).await.expect("duplex write");
            let mut reply = [0; 2];
            client.read_exact(&mut reply).await.expect("duplex read");
            reply
        });
        let mut read = vec![0; expected.len()];
        guard.read_exact(&mut read).await.expect("guard read");
        guard.write_all(b"ok").await.expect("guard write");
        assert_eq!(read, expected);
        assert_eq!(&writer.await.expect("writer task"), b"ok");
        assert!(!verdicts.is_conflicting(1));
        assert!(verdicts.is_conflicting(2));
    }

    /// How a generated request frames its body.
    #[derive(Clone, Debug)]
    enum GenBody {
        None,
        Length(Vec<u8>),
        /// Chunks (data, extension), then trailer fields.
        Chunked(Vec<(Vec<u8>, bool)>, Vec<String>),
    }

    #[derive(Clone, Debug)]
    struct GenRequest {
        empty_lines: Vec<bool>,
        method: &'static str,
        bare_lf: bool,
        fields: Vec<(String, String)>,
        body: GenBody,
        /// Adds the other framing field before (`Some(true)`) or after the real one.
        conflict: Option<bool>,
        upper_hex: bool,
    }

    impl GenRequest {
        fn to_bytes(&self, index: usize) -> Vec<u8> {
            let eol = if self.bare_lf { "\n" } else { "\r\n" };
            let mut out = String::new();
            for &crlf in &self.empty_lines {
                out.push_str(if crlf { "\r\n" } else { "\n" });
            }
            out.push_str(&format!(
                "{} /r/{index} HTTP/1.1{eol}Host: a{eol}",
                self.method
            ));
            let mut fields = self.fields.clone();
            let framing = match (&self.body, self.conflict) {
                (GenBody::None, None) => None,
                (GenBody::None, Some(_)) => Some(("Content-Length", "0".to_owned())),
                (GenBody::Length(data), _) => Some(("Content-Length", data.len().to_string())),
                (GenBody::Chunked(..), _) => Some(("Transfer-Encoding", "chunked".to_owned())),
            };
            let other = match &self.body {
                GenBody::Chunked(..) => ("content-length", "7"),
                _ => ("transfer-encoding", "chunked"),
            };
            if let Some(before) = self.conflict {
                let at = if before { 0 } else { fields.len() };
                fields.insert(at, (other.0.to_owned(), other.1.to_owned()));
            }
            if let Some((name, value)) = framing {
                let at = if self.conflict == Some(true) {
                    fields.len()
                } else {
                    0
                };
                fields.insert(at, (name.to_owned(), value));
            }
            for (name, value) in &fields {
                out.push_str(&format!("{name}: {value}{eol}"));
            }
            out.push_str(eol);
            let mut bytes = out.into_bytes();
            match &self.body {
                GenBody::None => {}
                GenBody::Length(data) => bytes.extend_from_slice(data),
                GenBody::Chunked(chunks, trailers) => {
                    for (data, ext) in chunks {
                        let size = if self.upper_hex {
                            format!("{:X}", data.len())
                        } else {
                            format!("{:x}", data.len())
                        };
                        bytes.extend_from_slice(size.as_bytes());
                        if *ext {
                            bytes.extend_from_slice(b" ;ext=\"v\\\"x\"");
                        }
                        bytes.extend_from_slice(b"\r\n");
                        bytes.extend_from_slice(data);
                        bytes.extend_from_slice(b"\r\n");
                    }
                    bytes.extend_from_slice(b"0\r\n");
                    for trailer in trailers {
                        bytes.extend_from_slice(trailer.as_bytes());
                        bytes.extend_from_slice(b"\r\n");
                    }
                    bytes.extend_from_slice(b"\r\n");
                }
            }
            bytes
        }
    }

    /// Body bytes biased towards framing look-alikes.
    fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(
                prop_oneof![
                    Just(b"\r\n".to_vec()),
                    Just(b"\r\n\r\n".to_vec()),
                    Just(b"0\r\n\r\n".to_vec()),
                    Just(CL_THEN_TE.to_vec()),
                    prop::collection::vec(any::<u8>(), 0..8),
                ],
                0..6,
            )
            .prop_map(|parts| parts.concat()),
        ]
    }

    fn gen_body() -> impl Strategy<Value = GenBody> {
        prop_oneof![
            Just(GenBody::None),
            body_bytes().prop_map(GenBody::Length),
            (
                prop::collection::vec(
                    (
                        body_bytes().prop_filter("data", |d| !d.is_empty()),
                        any::<bool>()
                    ),
                    0..4
                ),
                prop::collection::vec("[A-Za-z-]{1,10}: [ -~]{0,20}", 0..3),
            )
                .prop_map(|(chunks, trailers)| GenBody::Chunked(chunks, trailers)),
        ]
    }

    fn gen_request() -> impl Strategy<Value = GenRequest> {
        (
            prop::collection::vec(any::<bool>(), 0..3),
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "CONNECT", "M-SEARCH"]),
            any::<bool>(),
            prop::collection::vec(
                (
                    "[A-Za-z][A-Za-z0-9-]{0,15}".prop_filter("framing field", |n| {
                        !n.eq_ignore_ascii_case("content-length")
                            && !n.eq_ignore_ascii_case("transfer-encoding")
                    }),
                    "[!-~]([ -~]{0,30}[!-~])?",
                ),
                0..5,
            ),
            gen_body(),
            prop::option::weighted(0.15, any::<bool>()),
            any::<bool>(),
        )
            .prop_map(
                |(empty_lines, method, bare_lf, fields, body, conflict, upper_hex)| GenRequest {
                    empty_lines,
                    method,
                    bare_lf,
                    fields,
                    body,
                    conflict,
                    upper_hex,
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_ignore_read_sizes(
            prefix in prop::sample::select(vec![&b""[..], GET, POST_CHUNKED, b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            bytes in prop::collection::vec(any::<u8>(), 0..2000),
            sizes in prop::collection::vec(1usize..40, 1..8),
        ) {
            let stream = concat(&[prefix, &bytes]);
            let (whole, expected) = run(&stream, &[usize::MAX]);
            let (split, found) = run(&stream, &sizes);
            prop_assert_eq!(found, expected);
            prop_assert_eq!((split.state, split.heads), (whole.state, whole.heads));
        }

        #[test]
        fn generated_requests_get_exactly_the_expected_verdicts(
            requests in prop::collection::vec(gen_request(), 1..6),
            sizes in prop::collection::vec(1usize..64, 1..8),
        ) {
            let stream: Vec<u8> = requests.iter().enumerate().flat_map(|(i, r)| r.to_bytes(i)).collect();
            let expected = requests
                .iter()
                .position(|r| r.conflict.is_some())
                .map(|i| (i as u64, CONFLICT));
            for sizes in [&[usize::MAX][..], &sizes] {
                let (tracker, found) = run(&stream, sizes);
                prop_assert_eq!(found, expected);
                if expected.is_none() {
                    prop_assert_eq!(tracker.heads, requests.len() as u64);
                    prop_assert_eq!(tracker.state, State::Idle { cr: false });
                }
            }
        }
    }
}
