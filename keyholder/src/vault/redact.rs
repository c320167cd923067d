//! Redacts an injected credential from a proxied answer before it reaches the platform: an upstream
//! that echoes request headers would otherwise hand the secret back. It looks for the raw value,
//! its base64 forms (as inside `Basic base64(user:secret)`, at any alignment) and its JSON-escaped
//! form, and works chunk by chunk: a chunk's tail that could be the start of one of those forms
//! (at most the longest minus one byte) is held back until the next chunk, so a value split
//! across a chunk boundary is still found, and nothing else waits.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use zeroize::Zeroizing;

/// What a found value is replaced with.
pub const REDACTED: &[u8] = b"[REDACTED]";
/// Needles shorter than this are not searched for: a short value would match ordinary text and
/// corrupt answers, and tells an attacker little.
pub const MIN_NEEDLE: usize = 8;

/// A streaming redactor for one credential (no Debug or Clone: it holds the secret's forms).
pub struct Redactor {
    /// Longest first.
    needles: Vec<Zeroizing<Vec<u8>>>,
    max_len: usize,
    held: Zeroizing<Vec<u8>>,
    /// The distinct first bytes of the needles, in groups of up to three (one `memchr` each).
    groups: Vec<Vec<u8>>,
    /// Scratch for [`Redactor::scan`]: each group's next position.
    next: Vec<Option<usize>>,
    count: u64,
}

/// The base64 text that every encoding of `secret` contains when it starts `offset` (0..3) bytes
/// into a 3-byte group: the characters that depend only on the secret's own bits.
fn base64_core(secret: &[u8], offset: usize) -> Vec<u8> {
    let mut buf = vec![0u8; offset];
    buf.extend_from_slice(secret);
    let encoded = Zeroizing::new(STANDARD_NO_PAD.encode(&buf).into_bytes());
    buf.iter_mut().for_each(|b| *b = 0);
    let start = (offset * 8).div_ceil(6);
    let end = if (offset + secret.len()).is_multiple_of(3) {
        encoded.len()
    } else {
        encoded.len().saturating_sub(1)
    };
    encoded
        .get(start..end)
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

impl Redactor {
    /// A redactor for `secret`.
    pub fn new(secret: &str) -> Redactor {
        let raw = secret.as_bytes();
        let mut forms: Vec<Vec<u8>> = vec![raw.to_vec()];
        for offset in 0..3 {
            forms.push(base64_core(raw, offset));
        }
        let escaped = Zeroizing::new(serde_json::to_string(secret).unwrap_or_default());
        if let Some(inner) = escaped.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            forms.push(inner.as_bytes().to_vec());
            // Some encoders also escape the solidus.
            forms.push(inner.replace('/', "\\/").into_bytes());
        }
        let mut needles: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for form in forms {
            let form = Zeroizing::new(form);
            if form.len() >= MIN_NEEDLE && !needles.iter().any(|n| **n == *form) {
                needles.push(form);
            }
        }
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        let mut first_bytes = [false; 256];
        for needle in &needles {
            if let Some(b) = needle.first() {
                first_bytes[usize::from(*b)] = true;
            }
        }
        let max_len = needles.first().map_or(0, |n| n.len());
        let firsts: Vec<u8> = (0..=255u8)
            .filter(|b| first_bytes[usize::from(*b)])
            .collect();
        let groups: Vec<Vec<u8>> = firsts.chunks(3).map(<[u8]>::to_vec).collect();
        let next = vec![None; groups.len()];
        Redactor {
            needles,
            max_len,
            held: Zeroizing::new(Vec::new()),
            groups,
            next,
            count: 0,
        }
    }

    /// How many values were replaced so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Feeds one chunk; appends what can be released to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.held.is_empty() {
            // Nothing held back: scan the chunk where it is, keep only its undecided tail.
            let keep_from = self.scan(chunk, false, out);
            self.held.extend_from_slice(&chunk[keep_from..]);
            return;
        }
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(chunk);
        let keep_from = self.scan(&data, false, out);
        self.held.extend_from_slice(&data[keep_from..]);
        // `data` is wiped as it drops.
    }

    /// Releases everything still held (end of the answer).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let data = std::mem::take(&mut self.held);
        self.scan(&data, true, out);
    }

    /// Redacts a whole value at once; returns the count of replacements in it.
    pub fn redact_all(&mut self, input: &[u8], out: &mut Vec<u8>) -> u64 {
        let before = self.count;
        self.push(input, out);
        self.finish(out);
        self.count - before
    }

    /// Whether a whole value holds no form of the secret (nothing held back before it): it can
    /// then go on as it is.
    pub fn is_clean(&mut self, whole: &[u8]) -> bool {
        matches!(self.first_step(whole, true), Some(Step::Clean(_)))
    }

    /// Feeds one chunk that may go on unchanged: when nothing is held back and the chunk holds no
    /// form of the secret, returns how much of its start can be released as it is (the undecided
    /// tail is held back, as with [`Redactor::push`]). `None` when it must be rewritten: call
    /// [`Redactor::push`] with it then. Most chunks hold no echo; this spares them a copy.
    pub fn pass_clean(&mut self, chunk: &[u8]) -> Option<usize> {
        let Some(Step::Clean(keep_from)) = self.first_step(chunk, false) else {
            return None;
        };
        self.held.extend_from_slice(&chunk[keep_from..]);
        Some(keep_from)
    }

    /// The first [`Redactor::step`] over `data` when nothing is held back (`None` when something
    /// is: `data` continues it).
    fn first_step(&mut self, data: &[u8], finish: bool) -> Option<Step> {
        if !self.held.is_empty() {
            return None;
        }
        let mut next = std::mem::take(&mut self.next);
        next.fill(None);
        let step = self.step(data, 0, finish, &mut next);
        self.next = next;
        Some(step)
    }

    /// Appends the redacted part of `data` that can be released to `out`; returns where the
    /// undecided tail starts (`data.len()` when `finish`).
    fn scan(&mut self, data: &[u8], finish: bool, out: &mut Vec<u8>) -> usize {
        if self.max_len == 0 {
            out.extend_from_slice(data);
            return data.len();
        }
        out.reserve(data.len());
        let mut next = std::mem::take(&mut self.next);
        next.fill(None);
        let mut emitted = 0;
        let keep_from = loop {
            match self.step(data, emitted, finish, &mut next) {
                Step::Found { at, len } => {
                    out.extend_from_slice(&data[emitted..at]);
                    out.extend_from_slice(REDACTED);
                    self.count += 1;
                    emitted = at + len;
                }
                Step::Clean(keep_from) => break keep_from,
            }
        };
        self.next = next;
        out.extend_from_slice(&data[emitted..keep_from]);
        keep_from
    }

    /// The next form of the secret in `data` from `at` on, or where the clean part ends (the end,
    /// or unless `finish` a possible start of a form). Jumps between the bytes a needle can start
    /// with (`memchr`, a few at a time), so a long answer without them is scanned at memory speed
    /// rather than byte by byte. `next` caches each group's next position across calls on the
    /// same `data` (stale once `at` passes it).
    fn step(&self, data: &[u8], mut at: usize, finish: bool, next: &mut [Option<usize>]) -> Step {
        let len = data.len();
        while at < len {
            let mut candidate = len;
            for (group, next) in self.groups.iter().zip(next.iter_mut()) {
                if next.is_none_or(|n| n < at) {
                    let hay = &data[at..];
                    let found = match group.as_slice() {
                        [a] => memchr::memchr(*a, hay),
                        [a, b] => memchr::memchr2(*a, *b, hay),
                        [a, b, c, ..] => memchr::memchr3(*a, *b, *c, hay),
                        [] => None,
                    };
                    *next = Some(found.map_or(len, |offset| at + offset));
                }
                candidate = candidate.min(next.unwrap_or(len));
            }
            if candidate >= len {
                return Step::Clean(len);
            }
            at = candidate;
            let rest = &data[at..];
            // Undecided while the rest is a proper prefix of a needle (always longer than any
            // whole match here): hold back from this byte until more arrives. Only a possible
            // start of the secret waits, so an event stream's last event goes on at once.
            if !finish
                && self
                    .needles
                    .iter()
                    .any(|n| n.len() > rest.len() && n.starts_with(rest))
            {
                return Step::Clean(at);
            }
            // Longest first.
            if let Some(found) = self.needles.iter().find(|n| rest.starts_with(n)) {
                return Step::Found {
                    at,
                    len: found.len(),
                };
            }
            at += 1;
        }
        Step::Clean(at.min(len))
    }
}

/// What [`Redactor::step`] found.
enum Step {
    /// A form of the secret, `len` bytes at `at`.
    Found { at: usize, len: usize },
    /// No form before this position (the end, or a possible start held back).
    Clean(usize),
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    const SECRET: &str = "ghp_Secret/Value\"123";

    fn whole(input: &[u8]) -> (Vec<u8>, u64) {
        let mut r = Redactor::new(SECRET);
        let mut out = Vec::new();
        let n = r.redact_all(input, &mut out);
        (out, n)
    }

    fn chunked(input: &[u8], size: usize) -> (Vec<u8>, u64) {
        let mut r = Redactor::new(SECRET);
        let mut out = Vec::new();
        for chunk in input.chunks(size) {
            r.push(chunk, &mut out);
        }
        r.finish(&mut out);
        (out, r.count())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn every_form_is_redacted() {
        let basic = STANDARD.encode(format!("x-access-token:{SECRET}"));
        let basic2 = STANDARD.encode(format!("abc:{SECRET}"));
        let basic3 = STANDARD.encode(format!("a:{SECRET}"));
        let json = serde_json::to_string(SECRET).unwrap();
        let input = format!(
            "raw={SECRET} basic=Basic {basic} b2={basic2} b3={basic3} plain64={} json={json} slash={}",
            STANDARD.encode(SECRET),
            json.replace('/', "\\/")
        );
        let (out, n) = whole(input.as_bytes());
        assert_eq!(n, 7, "{}", String::from_utf8_lossy(&out));
        assert!(!contains(&out, SECRET.as_bytes()));
        assert!(!contains(&out, b"Secret/Value"));
        assert!(contains(&out, b"raw=[REDACTED]"));
    }

    #[test]
    fn values_split_across_chunks_are_found() {
        let input = format!("aaaa{SECRET}bbbb{SECRET}{SECRET}c");
        let (expected, n) = whole(input.as_bytes());
        assert_eq!(n, 3);
        for size in 1..=input.len() {
            let (out, count) = chunked(input.as_bytes(), size);
            assert_eq!(out, expected, "chunk size {size}");
            assert_eq!(count, 3, "chunk size {size}");
            // As the proxy streams: clean chunks unchanged, the others through `push`.
            let (out, count, _) = passed(input.as_bytes(), size);
            assert_eq!((out, count), (expected.clone(), 3), "chunk size {size}");
        }
    }

    #[test]
    fn boundaries_release_everything_else_unchanged() {
        // A prefix of the secret at the very end is released at finish, not lost.
        let partial = &SECRET[..SECRET.len() - 1];
        for size in 1..=8 {
            let input = format!("head {partial}");
            let (out, n) = chunked(input.as_bytes(), size);
            assert_eq!(out, input.as_bytes());
            assert_eq!(n, 0);
        }
        // Empty input and input shorter than the hold-back.
        assert_eq!(chunked(b"", 1).0, b"");
        assert_eq!(chunked(b"ab", 1).0, b"ab");
        // Binary bytes pass through.
        let bin: Vec<u8> = (0..=255u8).collect();
        assert_eq!(chunked(&bin, 7).0, bin);
    }

    #[test]
    fn only_a_possible_start_of_the_secret_is_held_back() {
        let mut r = Redactor::new(SECRET);
        let mut out = Vec::new();
        r.push(b"data: one\n\n", &mut out);
        assert_eq!(out, b"data: one\n\n", "nothing to wait for");
        out.clear();
        r.push(b"data: ghp_Sec", &mut out);
        assert_eq!(out, b"data: ", "the start of the secret waits");
        out.clear();
        r.push(b"ret/Value\"123 x", &mut out);
        assert_eq!(out, b"[REDACTED] x");
    }

    /// As the proxy streams: clean chunks go on unchanged, the others through `push`.
    fn passed(input: &[u8], size: usize) -> (Vec<u8>, u64, usize) {
        let mut r = Redactor::new(SECRET);
        let (mut out, mut unchanged) = (Vec::new(), 0);
        for chunk in input.chunks(size) {
            match r.pass_clean(chunk) {
                Some(clean) => {
                    out.extend_from_slice(&chunk[..clean]);
                    unchanged += 1;
                }
                None => r.push(chunk, &mut out),
            }
        }
        r.finish(&mut out);
        (out, r.count(), unchanged)
    }

    #[test]
    fn clean_chunks_pass_unchanged() {
        // A possible start of the secret is still held back as before.
        let clean = b"data: one\n\ndata: two ghp_Sec".repeat(3);
        for size in 1..=clean.len() {
            let (out, count, _) = passed(&clean, size);
            assert_eq!(out, clean, "chunk size {size}");
            assert_eq!(count, 0);
        }
        let (_, _, unchanged) = passed(&b"x".repeat(1000), 100);
        assert_eq!(unchanged, 10);
        let mut r = Redactor::new(SECRET);
        assert!(r.is_clean(b"no secret here"));
        assert!(!r.is_clean(format!("a {SECRET} b").as_bytes()));
        assert!(
            r.is_clean(b"ends with ghp_Sec"),
            "a whole value holds nothing back"
        );
    }

    #[test]
    fn short_secrets_are_not_searched() {
        let mut r = Redactor::new("abc");
        let mut out = Vec::new();
        assert_eq!(r.redact_all(b"abcabc", &mut out), 0);
        assert_eq!(out, b"abcabc");
    }
}
