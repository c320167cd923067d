//! Time-budgeted mutational fuzzing of every parser in the protocol crate, on the stable toolchain
//! (cargo-fuzz needs nightly). Each target starts from valid seeds, applies random byte-level
//! mutations (flips, inserts of protocol-significant tokens, deletions, splices, case changes) and
//! checks more than "no panic": a verifier may only accept input byte-identical to a validly
//! signed seed (no malleable encodings), and a parser that accepts must round-trip canonically.
//!
//! Short run (CI): `cargo test -p keyholder-protocol --test fuzz`. Long run:
//! `KEYHOLDER_FUZZ_SECONDS=300 cargo test --release -p keyholder-protocol --test fuzz -- --nocapture`
//! (seconds per target; `KEYHOLDER_FUZZ_SEED` replays a run).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keyholder_protocol::document::{
    decrypt_field, decrypt_platform_v1_field, encrypt_field, encrypt_platform_v1_field,
    field_key_version, format_iso8601, open_document, parse_iso8601, KeySet,
};
use keyholder_protocol::request_id::is_valid_request_id;
use keyholder_protocol::response_sig::{sign_response, verify_response, ResponseSignature};
use keyholder_protocol::signing::{signature_header_value, verify_request};
use keyholder_protocol::ticket::{encode_ticket, verify_ticket};
use keyholder_protocol::wire::{self, Collection};
use keyholder_protocol::{DataKey, ErrorCode, HmacSecret, IdentityKey, Purpose, TicketClaims};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const TOKENS: &[&[u8]] = &[
    b".",
    b"=",
    b"==",
    b"-",
    b"_",
    b"+",
    b"/",
    b":",
    b",",
    b"sha256=",
    b"kh1:",
    b"keyId=",
    b"ts=",
    b"sig=",
    b"\0",
    b"\xef\xbb\xbf",
    b"\xff",
    b" ",
    b"\r\n",
    b"0",
    b"-1",
    b"9999999999999999999999",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"null",
    b"true",
    b"1e308",
    b"\\u0000",
    b"T",
    b"Z",
    b"+01:00",
];

fn budget() -> Duration {
    let secs: f64 = std::env::var("KEYHOLDER_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5);
    Duration::from_secs_f64(secs)
}

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=4) {
        let len = input.len();
        match rng.gen_range(0..9) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = rng.gen();
            }
            2 => {
                let token = TOKENS[rng.gen_range(0..TOKENS.len())];
                let i = rng.gen_range(0..=len);
                input.splice(i..i, token.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = (a + rng.gen_range(1..=8)).min(len);
                input.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = (a + rng.gen_range(1..=16)).min(len);
                let piece = input[a..b].to_vec();
                let i = rng.gen_range(0..=len);
                input.splice(i..i, piece);
            }
            5 => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let cut = rng.gen_range(0..=input.len());
                let from = rng.gen_range(0..=other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = if input[i].is_ascii_lowercase() {
                    input[i].to_ascii_uppercase()
                } else {
                    input[i].to_ascii_lowercase()
                };
            }
            7 => input.truncate(rng.gen_range(0..=len)),
            _ => {
                let i = rng.gen_range(0..=len);
                input.insert(i, rng.gen_range(0x20..0x7f));
            }
        }
    }
}

/// Runs `check` on the seeds, then on mutants until the budget is spent; returns executions.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, check: impl Fn(&[u8])) -> u64 {
    let seed: u64 = std::env::var("KEYHOLDER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    for s in &seeds {
        check(s);
    }
    let deadline = Instant::now() + budget();
    let mut corpus = seeds.clone();
    let mut execs = seeds.len() as u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let mut input = corpus[rng.gen_range(0..corpus.len())].clone();
            mutate(&mut rng, &seeds, &mut input);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
            if result.is_err() {
                panic!(
                    "fuzz {name} (seed {seed}): failing input {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
            execs += 1;
            // Keep some mutants so that mutations stack up over time.
            if input.len() < 4096 && rng.gen_ratio(1, 50) {
                if corpus.len() >= 256 {
                    let i = rng.gen_range(seeds.len()..corpus.len());
                    corpus[i] = input;
                } else {
                    corpus.push(input);
                }
            }
        }
    }
    eprintln!("fuzz {name}: {execs} executions, seed {seed}, no findings");
    execs
}

fn text(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

fn secret() -> HmacSecret {
    HmacSecret::from_bytes(core::array::from_fn(|i| i as u8))
}

#[test]
fn fuzz_verify_ticket() {
    let s = secret();
    let seeds: Vec<String> = vec![
        encode_ticket(
            &s,
            &TicketClaims::new(
                "u",
                "github",
                Purpose::AgentCredential,
                1_700_000_000,
                1_700_000_600,
                "n1",
            ),
        ),
        encode_ticket(
            &s,
            &TicketClaims::new(
                "user_x",
                "svc.a-b",
                Purpose::Store,
                1_700_000_000,
                1_700_000_060,
                "deadbeef",
            ),
        ),
    ];
    let valid = seeds.clone();
    fuzz(
        "verify_ticket",
        seeds.into_iter().map(String::into_bytes).collect(),
        |input| {
            let Some(t) = text(input) else { return };
            if let Ok(claims) = verify_ticket(&s, t, 1_700_000_010, 3600) {
                assert!(
                    valid.iter().any(|v| v == t),
                    "a mutated ticket verified: {t}"
                );
                assert!(claims.nonce.as_deref().is_some_and(|n| !n.is_empty()));
            }
        },
    );
}

#[test]
fn fuzz_verify_request() {
    let s = secret();
    let body = br#"{"operation":"get","collection":"tokens","key":"github","requestId":"r1"}"#;
    let sig = signature_header_value(&s, 1_700_000_000, body);
    let seed = [sig.as_bytes(), b"\n1700000000\n", body].concat();
    fuzz("verify_request", vec![seed.clone()], |input| {
        let mut parts = input.splitn(3, |b| *b == b'\n');
        let (Some(sig), Some(ts), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let (Some(sig), Some(ts)) = (text(sig), text(ts)) else {
            return;
        };
        if verify_request(&s, Some(sig), Some(ts), body, 1_700_000_000, 300).is_ok() {
            assert_eq!(input, &seed[..], "a mutated signed request verified");
        }
    });
}

#[test]
fn fuzz_response_signature() {
    let key = IdentityKey::from_bytes(&[5u8; 32]);
    let header = sign_response(&key, 1_700_000_000, "GET", "/v1/health", "r", 200, b"{}");
    let vk = key.verifying_key();
    let valid = header.clone();
    fuzz("response_signature", vec![header.into_bytes()], |input| {
        let Some(h) = text(input) else { return };
        let _ = ResponseSignature::parse(h);
        if verify_response(&vk, h, "GET", "/v1/health", "r", 200, b"{}").is_ok() {
            assert_eq!(h, valid, "a mutated response signature verified");
        }
    });
}

#[test]
fn fuzz_decrypt_field() {
    let key = DataKey::from_bytes([3u8; 32]);
    let kh1 = encrypt_field(&key, 7, "github", "accessToken", b"secret value");
    let v1 = encrypt_platform_v1_field(&key, b"secret value");
    let (valid_kh1, valid_v1) = (kh1.clone(), v1.clone());
    fuzz(
        "decrypt_field",
        vec![kh1.into_bytes(), v1.into_bytes()],
        |input| {
            let Some(t) = text(input) else { return };
            let _ = field_key_version(t);
            if let Ok(plain) = decrypt_field(&key, "github", "accessToken", t) {
                assert_eq!(t, valid_kh1, "a mutated kh1 ciphertext decrypted");
                assert_eq!(&plain[..], b"secret value");
            }
            if decrypt_platform_v1_field(&key, t).is_ok() {
                assert_eq!(t, valid_v1, "a mutated v1 ciphertext decrypted");
            }
        },
    );
}

#[test]
fn fuzz_open_document() {
    let key = DataKey::from_bytes([3u8; 32]);
    let mut keys = KeySet::default();
    keys.keys.insert(1, DataKey::from_bytes([3u8; 32]));
    keys.platform_v1 = Some(DataKey::from_bytes([3u8; 32]));
    let doc = json!({"v": 2, "alg": "AES-256-GCM", "meta": {"serviceName": "github", "scope": "repo"},
        "fields": {"accessToken": encrypt_field(&key, 1, "github", "accessToken", b"t\"\\\x00")}});
    let v1 = json!({"v": 1, "alg": "AES-256-GCM", "meta": {},
        "fields": {"accessToken": encrypt_platform_v1_field(&key, b"tok")}});
    let plain = json!({"accessToken": "plain", "tokenType": "oauth"});
    let seeds = [doc, v1, plain]
        .iter()
        .map(|d| d.to_string().into_bytes())
        .collect();
    fuzz("open_document", seeds, |input| {
        let Ok(v) = serde_json::from_slice::<Value>(input) else {
            return;
        };
        if let Ok(opened) = open_document(&v, "github", &keys) {
            assert!(serde_json::from_slice::<Value>(&opened.credential_json()).is_ok());
        }
        let _ = keyholder_protocol::document::document_key_versions(&v);
    });
}

#[test]
fn fuzz_small_parsers() {
    let seeds = vec![
        b"2023-11-14T22:13:20Z".to_vec(),
        b"req_abc-123.x:y".to_vec(),
        b"storage_unavailable".to_vec(),
        b"agent_credential".to_vec(),
        b"proxy_configs".to_vec(),
        b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_vec(),
    ];
    fuzz("iso8601/request_id/codes/secret", seeds, |input| {
        let Some(t) = text(input) else { return };
        if let Some(unix) = parse_iso8601(t) {
            // The canonical form round-trips exactly.
            if t.len() == 20 && t.ends_with('Z') {
                assert_eq!(format_iso8601(unix), t);
            }
        }
        if is_valid_request_id(t) {
            assert!((1..=128).contains(&t.len()));
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b)));
        }
        if let Some(code) = ErrorCode::parse(t) {
            assert_eq!(code.as_str(), t);
        }
        if let Some(p) = Purpose::parse(t) {
            assert_eq!(p.as_str(), t);
        }
        if let Some(c) = Collection::parse(t) {
            assert_eq!(c.as_str(), t);
        }
        if let Ok(s) = HmacSecret::from_base64(t) {
            assert_eq!(&*s.to_base64(), t, "non-canonical base64 accepted");
        }
    });
}

#[test]
fn fuzz_wire_types() {
    let seeds = vec![
        br#"{"operation":"list","collection":"tokens","options":{"filters":{"a":"b"},"since":"k","after":"z","limit":5},"requestId":"r"}"#.to_vec(),
        br#"{"ticket":"a.b","service":"github","tokenData":{"accessToken":"x","expiresAt":"2020-01-01T00:00:00Z"}}"#.to_vec(),
        br#"{"ticket":"a.b","service":"s","upstream":{"url":"https://x","method":"POST","headers":{"A":"b"},"body":"AA=="},"headerTemplates":{"Authorization":"Bearer ${TOKEN}"}}"#.to_vec(),
        br#"{"requestId":"r","service":"s","reason":"expired","refreshHint":{"provider":"github","tokenUrl":"https://t","clientId":"c","clientSecret":"s"}}"#.to_vec(),
        br#"{"requestId":"r","action":"update","service":"s","tokens":{"accessToken":"a","refreshToken":"b","expiryTime":1}}"#.to_vec(),
        br#"{"code":"00000000-0000-4000-8000-000000000000"}"#.to_vec(),
    ];
    fuzz("wire_types", seeds, |input| {
        let _ = serde_json::from_slice::<wire::StorageRequest>(input);
        let _ = serde_json::from_slice::<wire::StoreRequest>(input);
        let _ = serde_json::from_slice::<wire::CredentialRequest>(input);
        let _ = serde_json::from_slice::<wire::ProxyRequest>(input);
        let _ = serde_json::from_slice::<wire::RefreshNotifyRequest>(input);
        let _ = serde_json::from_slice::<wire::RefreshRequest>(input);
        let _ = serde_json::from_slice::<wire::ExchangeRequest>(input);
    });
}

#[test]
fn fuzz_otpauth_links() {
    use keyholder_protocol::otpauth::{parse_otpauth, MAX_SECRET_CHARS, MAX_TEXT_LEN, MAX_URI_LEN};
    let seeds = vec![
        b"otpauth://totp/ACME%20Co:john%40example.com?secret=JBSWY3DPEHPK3PXP&issuer=ACME%20Co&algorithm=SHA256&digits=8&period=60".to_vec(),
        b"otpauth://totp/a?secret=GEZDGNBVGY%3D%3D%3D%3D%3D%3D".to_vec(),
        b"OTPAUTH://TOTP/x:y?secret=mzxw6===&digits=7&image=z".to_vec(),
        b"otpauth://hotp/a?secret=JBSWY3DP&counter=0".to_vec(),
    ];
    fuzz("otpauth", seeds, |input| {
        let Some(t) = text(input) else { return };
        let Ok(link) = parse_otpauth(t) else { return };
        assert!(t.len() <= MAX_URI_LEN);
        let secret = link.secret();
        assert!(!secret.is_empty() && secret.len() <= MAX_SECRET_CHARS);
        assert!(secret
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)));
        assert!((6..=8).contains(&link.digits) && (1..=3600).contains(&link.period));
        assert!(link.account_name.len() <= MAX_TEXT_LEN);
        assert!(!link.account_name.chars().any(char::is_control));
        if let Some(issuer) = &link.issuer {
            assert!(issuer.len() <= MAX_TEXT_LEN && !issuer.chars().any(char::is_control));
        }
        // The normalised seed with the parsed descriptors is itself a link that parses the same.
        let canonical = format!(
            "otpauth://totp/x?secret={secret}&algorithm={}&digits={}&period={}",
            link.algorithm.as_str(),
            link.digits,
            link.period
        );
        let again = parse_otpauth(&canonical).unwrap();
        assert_eq!(again.secret(), secret);
        assert_eq!(
            (again.algorithm, again.digits, again.period),
            (link.algorithm, link.digits, link.period)
        );
    });
}
