//! The strict parsing every compact text format shares (tickets, request envelopes, response
//! signature headers): a length cap before anything else, exactly the expected number of parts,
//! `name=value` fields in their fixed order, canonical integers and canonical base64 of an exact
//! length. Each format maps a `None` to its own error.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// `text` split at `sep` into exactly `N` parts, or `None` when it is longer than `max_len` bytes
/// (checked first) or has another number of parts.
pub(crate) fn split_exact<const N: usize>(
    text: &str,
    sep: char,
    max_len: usize,
) -> Option<[&str; N]> {
    if text.len() > max_len {
        return None;
    }
    let mut parts = text.split(sep);
    let mut out = [""; N];
    for slot in &mut out {
        *slot = parts.next()?;
    }
    parts.next().is_none().then_some(out)
}

/// The value of a `name=value` part whose name is exactly `name`.
pub(crate) fn field<'a>(part: &'a str, name: &str) -> Option<&'a str> {
    part.strip_prefix(name)?.strip_prefix('=')
}

/// A decimal `i64` in its one spelling (no sign on zero, no leading zeros or `+`).
pub(crate) fn canonical_i64(text: &str) -> Option<i64> {
    crate::signing::parse_strict_i64(text).filter(|n| n.to_string() == text)
}

/// Canonical padded standard base64 of exactly `N` bytes.
pub(crate) fn base64_exact<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N.div_ceil(3) * 4 {
        return None;
    }
    STANDARD.decode(text).ok()?.as_slice().try_into().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_fields_integers_and_base64_are_strict() {
        assert_eq!(split_exact::<2>("a.b", '.', 8), Some(["a", "b"]));
        assert_eq!(split_exact::<2>("a.b.c", '.', 8), None);
        assert_eq!(split_exact::<2>("a", '.', 8), None);
        assert_eq!(split_exact::<2>("a.b", '.', 2), None);
        assert_eq!(split_exact::<2>(".", '.', 8), Some(["", ""]));
        assert_eq!(field("ts=12", "ts"), Some("12"));
        assert_eq!(field("tsx=12", "ts"), None);
        assert_eq!(field("ts", "ts"), None);
        assert_eq!(canonical_i64("12"), Some(12));
        assert_eq!(canonical_i64("-3"), Some(-3));
        for bad in ["012", "+1", "-0", "", "1 "] {
            assert_eq!(canonical_i64(bad), None, "{bad}");
        }
        let text = STANDARD.encode([7u8; 16]);
        assert_eq!(base64_exact::<16>(&text), Some([7u8; 16]));
        assert_eq!(base64_exact::<15>(&text), None);
        assert_eq!(base64_exact::<16>(&text.replace('=', "A")), None);
    }
}
