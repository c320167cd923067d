//! Lowercase hex on top of the `hex` crate, with the protocol's strictness: signatures and key
//! ids are lowercase only, so uppercase input is refused rather than accepted.

/// Lowercase hex of `bytes`.
pub(crate) fn encode(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Decode exactly `N` bytes of lowercase hex; anything else (uppercase, wrong length) is `None`.
pub(crate) fn decode_lower<const N: usize>(s: &str) -> Option<[u8; N]> {
    if !is_lower_hex(s, N * 2) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// True when `s` is exactly `len` lowercase hex characters.
pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}
