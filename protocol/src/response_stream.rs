//! The streamed form of the response signature: for answers whose body is sent as it arrives
//! (proxied event streams, unknown-length and large bodies), which have no body hash up front.
//!
//! Head: the `X-Keyholder-Signature` header is
//! `keyId=<16 hex>,ts=<unix seconds>,stream=<standard base64 of 16 random bytes>,sig=<standard base64
//! of 64 bytes>`, the signature over the UTF-8 of seven lines joined by `\n`, no trailing newline:
//! `keyholder-response-stream-v1`, the `ts` value, `<METHOD> <path-and-query>`, the response's
//! `X-Request-Id` (empty if none), the status in decimal, the `stream` value as sent, and the word
//! `body-follows`. The `stream` value is fresh for every answer and binds the end frame to this head.
//!
//! End frame: after the last body byte the server appends exactly [`END_FRAME_LEN`] (188) bytes:
//! `: keyholder-end <length> <hash> <sig>\n\n`, where `<length>` is the body's length before the
//! frame as 16 lowercase hex digits, `<hash>` the lowercase hex SHA-256 of those body bytes and
//! `<sig>` the standard base64 of the Ed25519 signature over the four lines `keyholder-response-
//! stream-end-v1`, the `stream` value, the length in decimal and the hex hash. For
//! `text/event-stream` the frame is an SSE comment line that parsers ignore (the upstream's last
//! event ends with a blank line, so the frame starts a line); for other bodies it is a documented
//! suffix that a reader strips. A body without a valid frame is truncated or altered: fail closed.
//!
//! [`StreamVerifier`] checks the head at once, then the body incrementally: it hands chunks on
//! as they arrive (holding back only a tail that could be the start of the frame, see
//! [`releasable`]) and its `finish` decides. Bytes handed on are provisional until `finish`
//! returns `Ok`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::response_sig::{
    check_signer_and_fields, decode_exact, parse_key_and_ts, IdentityKey, ResponseSigError,
};

/// First line of the signed head of a streamed answer.
pub const STREAM_HEAD_LABEL: &str = "keyholder-response-stream-v1";
/// First line of the message the end frame signs.
pub const STREAM_END_LABEL: &str = "keyholder-response-stream-end-v1";
/// Last line of the signed head: the body follows with its end frame.
pub const BODY_FOLLOWS: &str = "body-follows";
/// What the end frame starts with.
pub const END_FRAME_PREFIX: &[u8] = b": keyholder-end ";
/// Exact length of the end frame in bytes.
pub const END_FRAME_LEN: usize = 16 + 16 + 1 + 64 + 1 + 88 + 2;

/// The signed head's message (see the module doc).
pub fn stream_head_message(
    ts: i64,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    stream: &str,
) -> String {
    format!("{STREAM_HEAD_LABEL}\n{ts}\n{method} {path_and_query}\n{request_id}\n{status}\n{stream}\n{BODY_FOLLOWS}")
}

/// The end frame's signed message.
pub fn stream_end_message(stream: &str, length: u64, body_hash_hex: &str) -> String {
    format!("{STREAM_END_LABEL}\n{stream}\n{length}\n{body_hash_hex}")
}

/// A fresh `stream` value: standard base64 of 16 random bytes.
pub fn new_stream_id() -> String {
    let mut raw = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    STANDARD.encode(raw)
}

/// The head header value for a streamed answer.
pub fn sign_stream_head(
    key: &IdentityKey,
    ts: i64,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    stream: &str,
) -> String {
    let msg = stream_head_message(ts, method, path_and_query, request_id, status, stream);
    let sig = key.sign(msg.as_bytes());
    format!(
        "keyId={},ts={ts},stream={stream},sig={}",
        key.key_id(),
        STANDARD.encode(sig)
    )
}

/// The end frame for a body of `length` bytes with SHA-256 `body_hash`.
pub fn sign_stream_end(
    key: &IdentityKey,
    stream: &str,
    length: u64,
    body_hash: &[u8; 32],
) -> Vec<u8> {
    let hash = crate::hex::encode(body_hash);
    let sig = key.sign(stream_end_message(stream, length, &hash).as_bytes());
    let frame = format!(
        ": keyholder-end {length:016x} {hash} {}\n\n",
        STANDARD.encode(sig)
    );
    frame.into_bytes()
}

/// Signs a streamed body as it is sent: feed every chunk, then take the frame.
pub struct StreamSigner {
    stream: String,
    hasher: Sha256,
    length: u64,
}

impl StreamSigner {
    /// A signer for the stream whose head carried `stream`.
    pub fn new(stream: String) -> Self {
        StreamSigner {
            stream,
            hasher: Sha256::new(),
            length: 0,
        }
    }

    /// One body chunk as sent.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.length += chunk.len() as u64;
    }

    /// The end frame.
    pub fn finish(self, key: &IdentityKey) -> Vec<u8> {
        let hash: [u8; 32] = self.hasher.finalize().into();
        sign_stream_end(key, &self.stream, self.length, &hash)
    }
}

/// A parsed streamed head header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    /// The signer's key id.
    pub key_id: String,
    /// Signing time, unix seconds.
    pub ts: i64,
    /// The `stream` value (24 characters of canonical base64).
    pub stream: String,
    /// The raw signature.
    pub sig: [u8; 64],
}

impl StreamHead {
    /// Strict parse of `keyId=..,ts=..,stream=..,sig=..`.
    pub fn parse(header: &str) -> Result<Self, ResponseSigError> {
        let [k, t, s, g] = crate::compact::split_exact::<4>(header, ',', 256)
            .ok_or(ResponseSigError::Malformed)?;
        let (key_id, ts) = parse_key_and_ts(k, t)?;
        let stream = crate::compact::field(s, "stream").ok_or(ResponseSigError::Malformed)?;
        decode_exact::<16>(stream)?;
        let sig = decode_exact::<64>(
            crate::compact::field(g, "sig").ok_or(ResponseSigError::Malformed)?,
        )?;
        Ok(StreamHead {
            key_id: key_id.to_owned(),
            ts,
            stream: stream.to_owned(),
            sig,
        })
    }
}

/// True when a signature header is of the streamed form (has a `stream=` field).
pub fn is_stream_header(header: &str) -> bool {
    header.split(',').any(|p| p.starts_with("stream="))
}

/// Verifies a streamed answer: the head at construction, the body chunk by chunk, the end frame
/// at `finish` (see the module doc).
pub struct StreamVerifier {
    key: VerifyingKey,
    head: StreamHead,
    hasher: Sha256,
    length: u64,
    held: Vec<u8>,
}

impl StreamVerifier {
    /// Checks the head signature (strict Ed25519) for this request and status.
    pub fn new(
        key: &VerifyingKey,
        header: &str,
        method: &str,
        path_and_query: &str,
        request_id: &str,
        status: u16,
    ) -> Result<Self, ResponseSigError> {
        let head = StreamHead::parse(header)?;
        check_signer_and_fields(key, &head.key_id, [method, path_and_query, request_id])?;
        let msg = stream_head_message(
            head.ts,
            method,
            path_and_query,
            request_id,
            status,
            &head.stream,
        );
        key.verify_strict(msg.as_bytes(), &Signature::from_bytes(&head.sig))
            .map_err(|_| ResponseSigError::BadSignature)?;
        Ok(StreamVerifier {
            key: *key,
            head,
            hasher: Sha256::new(),
            length: 0,
            held: Vec::with_capacity(END_FRAME_LEN * 2),
        })
    }

    /// The verified head.
    pub fn head(&self) -> &StreamHead {
        &self.head
    }

    /// Feeds received bytes; appends the body bytes that cannot be part of the frame to `out`
    /// (provisional until [`StreamVerifier::finish`]).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.held.extend_from_slice(chunk);
        let release = releasable(&self.held);
        if release > 0 {
            let body = &self.held[..release];
            self.hasher.update(body);
            self.length += release as u64;
            out.extend_from_slice(body);
            self.held.drain(..release);
        }
    }

    /// The end of the received bytes: the held bytes must be the valid frame for the body.
    pub fn finish(self) -> Result<(), ResponseSigError> {
        if self.held.len() != END_FRAME_LEN
            || !self.held.starts_with(END_FRAME_PREFIX)
            || !self.held.ends_with(b"\n\n")
        {
            return Err(ResponseSigError::BadSignature);
        }
        let text = std::str::from_utf8(&self.held[END_FRAME_PREFIX.len()..END_FRAME_LEN - 2])
            .map_err(|_| ResponseSigError::BadSignature)?;
        let fields: Vec<&str> = text.split(' ').collect();
        let [len_hex, hash_hex, sig_b64] = fields.as_slice() else {
            return Err(ResponseSigError::BadSignature);
        };
        let length = crate::hex::decode_lower::<8>(len_hex)
            .map(u64::from_be_bytes)
            .ok_or(ResponseSigError::BadSignature)?;
        let hash: [u8; 32] = self.hasher.finalize().into();
        if length != self.length || *hash_hex != crate::hex::encode(&hash) {
            return Err(ResponseSigError::BadSignature);
        }
        let sig = decode_exact::<64>(sig_b64).map_err(|_| ResponseSigError::BadSignature)?;
        let msg = stream_end_message(&self.head.stream, length, hash_hex);
        self.key
            .verify_strict(msg.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| ResponseSigError::BadSignature)
    }
}

/// How many leading bytes of `held` (received, not yet released) cannot belong to the end
/// frame: all but the tail from the first of the last [`END_FRAME_LEN`] positions where the
/// frame could start (the tail begins with [`END_FRAME_PREFIX`], or is the start of it). An
/// event is thus handed on as soon as it arrives, not only once 188 more bytes followed it.
pub fn releasable(held: &[u8]) -> usize {
    let from = held.len().saturating_sub(END_FRAME_LEN);
    (from..held.len())
        .find(|&at| {
            let tail = &held[at..];
            tail.starts_with(END_FRAME_PREFIX) || END_FRAME_PREFIX.starts_with(tail)
        })
        .unwrap_or(held.len())
}

/// Verifies a whole received streamed answer and returns its body without the frame.
pub fn verify_stream_whole(
    key: &VerifyingKey,
    header: &str,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    received: &[u8],
) -> Result<Vec<u8>, ResponseSigError> {
    let mut verifier =
        StreamVerifier::new(key, header, method, path_and_query, request_id, status)?;
    let mut body = Vec::with_capacity(received.len());
    verifier.push(received, &mut body);
    verifier.finish()?;
    Ok(body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn signed(body: &[u8]) -> (IdentityKey, String, Vec<u8>) {
        let key = IdentityKey::from_bytes(&[9u8; 32]);
        let stream = new_stream_id();
        let head = sign_stream_head(
            &key,
            1_700_000_000,
            "POST",
            "/v1/proxy",
            "kh_1",
            200,
            &stream,
        );
        let mut signer = StreamSigner::new(stream);
        let mut wire = Vec::new();
        for chunk in body.chunks(7) {
            signer.update(chunk);
            wire.extend_from_slice(chunk);
        }
        wire.extend_from_slice(&signer.finish(&key));
        (key, head, wire)
    }

    #[test]
    fn frame_has_its_exact_length_and_round_trips_at_any_chunking() {
        let body = b"data: one\n\ndata: two\n\n".repeat(20);
        let (key, head, wire) = signed(&body);
        assert_eq!(wire.len(), body.len() + END_FRAME_LEN);
        let vk = key.verifying_key();
        for size in [1, 5, 187, 188, 189, 4096] {
            let mut v = StreamVerifier::new(&vk, &head, "POST", "/v1/proxy", "kh_1", 200).unwrap();
            let mut out = Vec::new();
            for chunk in wire.chunks(size) {
                v.push(chunk, &mut out);
            }
            v.finish().unwrap();
            assert_eq!(out, body, "chunk size {size}");
        }
        // An empty body too.
        let (key, head, wire) = signed(b"");
        let out = verify_stream_whole(
            &key.verifying_key(),
            &head,
            "POST",
            "/v1/proxy",
            "kh_1",
            200,
            &wire,
        )
        .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn an_event_is_released_at_once_and_a_look_alike_frame_is_body() {
        let key = IdentityKey::from_bytes(&[9u8; 32]);
        let stream = new_stream_id();
        let head = sign_stream_head(&key, 1, "POST", "/v1/proxy", "kh_1", 200, &stream);
        let vk = key.verifying_key();
        let mut v = StreamVerifier::new(&vk, &head, "POST", "/v1/proxy", "kh_1", 200).unwrap();
        let mut out = Vec::new();
        v.push(b"data: one\n\n", &mut out);
        assert_eq!(
            out, b"data: one\n\n",
            "nothing that could be the frame: released"
        );
        // An upstream's own text that looks like the frame's start stays body.
        let fake = b": keyholder-end not a frame\n\n";
        v.push(fake, &mut out);
        let mut signer = StreamSigner::new(stream);
        signer.update(b"data: one\n\n");
        signer.update(fake);
        let frame = signer.finish(&key);
        for b in &frame {
            v.push(&[*b], &mut out);
        }
        v.finish().unwrap();
        assert_eq!(out, [&b"data: one\n\n"[..], fake].concat());
    }

    #[test]
    fn truncated_altered_or_rebound_streams_fail() {
        let body = b"event: x\ndata: payload\n\n".repeat(10);
        let (key, head, wire) = signed(&body);
        let vk = key.verifying_key();
        let check = |head: &str, wire: &[u8], status: u16, rid: &str| {
            verify_stream_whole(&vk, head, "POST", "/v1/proxy", rid, status, wire)
        };
        assert!(check(&head, &wire, 200, "kh_1").is_ok());
        // Truncated anywhere.
        for cut in [0, 1, body.len(), wire.len() - 1] {
            assert!(
                check(&head, &wire[..cut], 200, "kh_1").is_err(),
                "cut {cut}"
            );
        }
        // One body byte changed, or the frame's length field.
        let mut bad = wire.clone();
        bad[3] ^= 1;
        assert!(check(&head, &bad, 200, "kh_1").is_err());
        // Another status or request id for the head.
        assert_eq!(
            check(&head, &wire, 201, "kh_1"),
            Err(ResponseSigError::BadSignature)
        );
        assert!(check(&head, &wire, 200, "kh_2").is_err());
        // A frame from another stream of the same body.
        let (_, _, other) = signed(&body);
        assert!(check(&head, &other, 200, "kh_1").is_err());
        // Appended bytes after the frame.
        let mut longer = wire.clone();
        longer.extend_from_slice(b"data: more\n\n");
        assert!(check(&head, &longer, 200, "kh_1").is_err());
        // A plain header is not a stream head.
        assert_eq!(
            StreamHead::parse("keyId=0000000000000000,ts=1,sig=x"),
            Err(ResponseSigError::Malformed)
        );
    }
}
