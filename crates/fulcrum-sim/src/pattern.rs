//! The deterministic byte stream served by `/download`, so clients can verify what they got.
//!
//! The stream is a pure function of its length: a client (or a test, or `fulcrum bench`)
//! can regenerate it with [`DownloadPattern`] or compare the SHA-256 the simulator announces
//! in `x-content-sha256`, which [`pattern_sha256`] computes.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};

/// Size of the chunks `/download` sends: 64 KiB.
pub const DOWNLOAD_CHUNK: usize = 64 * 1024;

/// The largest `/download?bytes=N`: 1 GiB.
pub const MAX_DOWNLOAD_BYTES: u64 = 1 << 30;

/// Seed of the generator; any fixed non-zero value would do.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// Generator of the `/download` byte stream.
///
/// The stream is xorshift64* (Vigna, "An experimental exploration of Marsaglia's xorshift
/// generators, scrambled", 2016) started from the state `0x9E3779B97F4A7C15`: each step's
/// 64-bit output is written little-endian, eight bytes per step, and the stream is cut at
/// the requested length. Successive [`fill`](Self::fill) calls continue the stream, so the
/// chunking of the reads never changes the bytes.
#[derive(Clone, Debug)]
pub struct DownloadPattern {
    state: u64,
    word: [u8; 8],
    /// Bytes of `word` already handed out; 8 = none left.
    used: usize,
}

impl Default for DownloadPattern {
    fn default() -> Self {
        Self::new()
    }
}

impl DownloadPattern {
    /// A generator at the start of the stream.
    pub fn new() -> Self {
        DownloadPattern {
            state: SEED,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Writes the next `buf.len()` bytes of the stream into `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let pending = (8 - self.used).min(buf.len());
        let (head, rest) = buf.split_at_mut(pending);
        head.copy_from_slice(&self.word[self.used..self.used + pending]);
        self.used += pending;
        let mut words = rest.chunks_exact_mut(8);
        for out in &mut words {
            out.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.used = tail.len();
        }
    }
}

/// Hex SHA-256 of the first `len` bytes of the stream. CPU-bound (about as slow as hashing
/// `len` bytes): call it off the async workers.
pub fn pattern_sha256(len: u64) -> String {
    let mut pattern = DownloadPattern::new();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; DOWNLOAD_CHUNK];
    let mut remaining = len;
    while remaining > 0 {
        let n = chunk_len(remaining);
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    hex(&hasher.finalize())
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            // Writing to a String cannot fail.
            let _ = write!(out, "{b:02x}");
            out
        })
}

fn chunk_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(DOWNLOAD_CHUNK, |r| r.min(DOWNLOAD_CHUNK))
}

/// Response body streaming the pattern in [`DOWNLOAD_CHUNK`]-sized frames, generated as the
/// client reads, so memory stays at one chunk whatever the length.
pub(crate) struct PatternBody {
    pattern: DownloadPattern,
    remaining: u64,
}

impl PatternBody {
    pub(crate) fn new(len: u64) -> Self {
        PatternBody {
            pattern: DownloadPattern::new(),
            remaining: len,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = chunk_len(this.remaining);
        let mut chunk = vec![0u8; n];
        this.pattern.fill(&mut chunk);
        this.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn stream(len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        DownloadPattern::new().fill(&mut out);
        out
    }

    #[test]
    fn chunking_never_changes_the_bytes() {
        let whole = stream(1000);
        for step in [1, 3, 7, 8, 9, 64, 999] {
            let mut pattern = DownloadPattern::new();
            let mut pieces = Vec::new();
            while pieces.len() < whole.len() {
                let mut buf = vec![0u8; step.min(whole.len() - pieces.len())];
                pattern.fill(&mut buf);
                pieces.extend_from_slice(&buf);
            }
            assert_eq!(pieces, whole, "step {step}");
        }
    }

    #[test]
    fn stream_is_not_trivially_periodic() {
        let bytes = stream(DOWNLOAD_CHUNK * 2);
        assert_ne!(bytes[..DOWNLOAD_CHUNK], bytes[DOWNLOAD_CHUNK..]);
        let distinct = bytes.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(distinct, 256);
    }

    #[test]
    fn checksum_matches_the_stream() {
        let len = DOWNLOAD_CHUNK * 3 + 5;
        let expected = hex(&Sha256::digest(stream(len)));
        assert_eq!(pattern_sha256(len as u64), expected);
        assert_eq!(
            pattern_sha256(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn body_streams_the_pattern_in_chunks() {
        let len = DOWNLOAD_CHUNK * 2 + 10;
        let mut body = PatternBody::new(len as u64);
        assert_eq!(body.size_hint().exact(), Some(len as u64));
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("infallible").into_data().expect("data frame");
            sizes.push(data.len());
            all.extend_from_slice(&data);
        }
        assert_eq!(sizes, [DOWNLOAD_CHUNK, DOWNLOAD_CHUNK, 10]);
        assert_eq!(all, stream(len));
        assert!(body.is_end_stream());
    }
}
