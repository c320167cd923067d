//! Request ids: the shape a keyholder accepts and echoes, and fresh ids for requests that bring none.

use rand::RngCore as _;

/// Longest request id a keyholder echoes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// True for 1-128 characters of `[A-Za-z0-9._:-]`.
pub fn is_valid_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// A fresh id: `kh_` followed by 24 random lowercase hex characters.
pub fn new_request_id() -> String {
    let mut bytes = [0u8; 12];
    // The thread's CSPRNG (seeded from the OS): unpredictable, without a system call per id.
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("kh_{}", crate::hex::encode(&bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let id = new_request_id();
        assert_eq!(id.len(), 27);
        assert!(is_valid_request_id(&id));
        assert!(is_valid_request_id("req_testfixture01"));
        assert!(is_valid_request_id("a.b:c-d_e"));
        assert!(is_valid_request_id(&"a".repeat(128)));
        assert!(!is_valid_request_id(&"a".repeat(129)));
        assert!(!is_valid_request_id(""));
        assert!(!is_valid_request_id("a b"));
        assert!(!is_valid_request_id("a\nb"));
        assert!(!is_valid_request_id("é"));
        assert!(!is_valid_request_id("a/b"));
    }
}
