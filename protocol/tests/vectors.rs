//! Runs every named test vector in `protocol/vectors/` against this crate.

use keyholder_protocol::vectors;

#[test]
fn every_vector_passes() {
    let outcomes = vectors::run_all();
    let failures: Vec<_> = outcomes.iter().filter(|o| !o.passed).collect();
    assert!(
        failures.is_empty(),
        "{} failing vectors: {failures:#?}",
        failures.len()
    );
    // Every file contributes cases, and the golden vectors are among them.
    for (file, _) in vectors::FILES {
        assert!(
            outcomes.iter().any(|o| o.file == *file),
            "{file} has no cases"
        );
    }
    for (file, case) in [
        ("request_signatures.json", "golden_sign"),
        ("request_signatures.json", "golden_verify"),
        ("binding.json", "golden_hmac_hash"),
        ("tickets.json", "golden_encode"),
        ("tickets.json", "golden_verify"),
        ("envelopes.json", "verify_ok"),
        ("envelopes.json", "body_swapped"),
        ("kh2_tickets.json", "golden_verify"),
        ("kh2_tickets.json", "payload_swapped_under_signature"),
        ("otpauth.json", "minimal_defaults"),
        ("otpauth.json", "wrong_scheme"),
        ("otpauth.json", "hotp"),
        ("otpauth.json", "bad_base32_character"),
        ("otpauth.json", "digits_5"),
        ("otpauth.json", "digits_9"),
        ("otpauth.json", "period_0"),
        ("otpauth.json", "period_3601"),
        ("otpauth.json", "unknown_algorithm"),
        ("ticket_constraints.json", "cid_differs"),
        ("ticket_constraints.json", "store_mode_unknown"),
    ] {
        assert!(
            outcomes
                .iter()
                .any(|o| o.file == file && o.case == case && o.passed),
            "{file}/{case}"
        );
    }
}
