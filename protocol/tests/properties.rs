//! Property tests: round trips for every encoder/decoder pair, and fuzz-style no-panic runs of every parser
//! over a bounded number of random and mutated inputs (fixed case counts keep CI time predictable).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyholder_protocol::binding::registration_url;
use keyholder_protocol::document::{
    decrypt_field, decrypt_platform_v1_field, encrypt_field, encrypt_platform_v1_field,
    format_iso8601, open_document, parse_iso8601, seal_token_data, DocumentError, KeySet,
    SENSITIVE_FIELDS,
};
use keyholder_protocol::envelope::{
    sign_envelope, verify_envelope, Envelope, EnvelopeError, PlatformPublicKey, PlatformSigningKey,
};
use keyholder_protocol::response_sig::{
    sign_response, verify_response, ResponseSigError, ResponseSignature,
};
use keyholder_protocol::signing::{signature_header_value, verify_request, RequestAuthError};
use keyholder_protocol::ticket::{encode_ticket, verify_ticket};
use keyholder_protocol::ticket_kh2::{encode_kh2_ticket, verify_kh2_ticket};
use keyholder_protocol::{DataKey, HmacSecret, IdentityKey, Purpose, TicketClaims, TicketError};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const ROUND_TRIP_CASES: u32 = 128;
const FUZZ_CASES: u32 = 3000;

fn golden_secret() -> HmacSecret {
    HmacSecret::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
}

/// Apply edits (replace / delete / insert a char at a position) to a valid input.
fn mutate(valid: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = valid.chars().collect();
    for &(pos, kind, c) in edits {
        let at = if chars.is_empty() {
            0
        } else {
            pos % (chars.len() + 1)
        };
        match kind % 3 {
            0 if at < chars.len() => chars[at] = c,
            1 if at < chars.len() => {
                chars.remove(at);
            }
            _ => chars.insert(at, c),
        }
    }
    chars.into_iter().collect()
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, char)>> {
    prop::collection::vec(
        (
            any::<usize>(),
            any::<u8>(),
            prop_oneof![
                Just('.'),
                Just('='),
                Just(','),
                Just(':'),
                Just('-'),
                Just('0'),
                Just('A'),
                Just('\n'),
                any::<char>()
            ],
        ),
        1..4,
    )
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("kh1:1:"),
            Just("kh1:0:AAAA"),
            Just("v"),
            Just("fields")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("v".to_owned()),
                    Just("alg".to_owned()),
                    Just("fields".to_owned()),
                    Just("meta".to_owned()),
                    Just("accessToken".to_owned()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn claims() -> impl Strategy<Value = TicketClaims> {
    (
        ".{0,20}",
        ".{0,20}",
        prop::sample::select(Purpose::ALL),
        0i64..4_000_000_000,
        0i64..=3600,
        ".{1,40}",
        prop::option::of(".{0,10}"),
        prop::option::of("[a-z0-9_]{0,10}"),
        prop::option::of("[a-z0-9_]{0,10}"),
        prop::option::of(prop_oneof![
            Just("create".to_owned()),
            Just("overwrite".to_owned())
        ]),
    )
        .prop_map(|(sub, svc, pur, iat, life, nonce, aid, pid, cid, mode)| {
            let mut c = TicketClaims::new(sub, svc, pur, iat, iat + life, nonce);
            c.aid = aid;
            c.pid = pid;
            c.cid = cid.map(Value::String);
            c.mode = mode.map(Value::String);
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(ROUND_TRIP_CASES))]

    #[test]
    fn ticket_round_trip(secret in any::<[u8; 32]>(), c in claims()) {
        let secret = HmacSecret::from_bytes(secret);
        let t = encode_ticket(&secret, &c);
        let now = c.iat.unwrap();
        prop_assert_eq!(verify_ticket(&secret, &t, now, 3600), Ok(c.clone()));
        let purpose = c.purpose().unwrap();
        prop_assert_eq!(c.check_scope(&[purpose], &c.svc), Ok(purpose));
        let other = HmacSecret::from_bytes([0xAA; 32]);
        if !other.ct_eq(&secret) {
            prop_assert_eq!(verify_ticket(&other, &t, now, 3600), Err(TicketError::BadSignature));
        }
    }

    #[test]
    fn request_signature_round_trip(
        secret in any::<[u8; 32]>(),
        ts in any::<i64>(),
        body in prop::collection::vec(any::<u8>(), 0..256),
        flip in any::<usize>(),
    ) {
        let secret = HmacSecret::from_bytes(secret);
        let header = signature_header_value(&secret, ts, &body);
        prop_assert!(header.starts_with("sha256=") && header.len() == 71);
        let ts_text = ts.to_string();
        prop_assert_eq!(verify_request(&secret, Some(&header), Some(&ts_text), &body, ts, 300), Ok(ts));
        let mut tampered = body.clone();
        if tampered.is_empty() { tampered.push(0) } else { let i = flip % tampered.len(); tampered[i] ^= 1 }
        prop_assert_eq!(
            verify_request(&secret, Some(&header), Some(&ts_text), &tampered, ts, 300),
            Err(RequestAuthError::BadSignature)
        );
    }

    #[test]
    fn field_round_trip(
        key in any::<[u8; 32]>(),
        version in any::<u32>(),
        service in ".{0,20}",
        field in ".{0,20}",
        plaintext in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let key = DataKey::from_bytes(key);
        let ct = encrypt_field(&key, version, &service, &field, &plaintext);
        let opened = decrypt_field(&key, &service, &field, &ct).unwrap();
        prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        let moved = format!("{service}x");
        prop_assert_eq!(decrypt_field(&key, &moved, &field, &ct), Err(DocumentError::DecryptionFailed));
        let v1 = encrypt_platform_v1_field(&key, &plaintext);
        let opened_v1 = decrypt_platform_v1_field(&key, &v1).unwrap();
        prop_assert_eq!(opened_v1.as_slice(), plaintext.as_slice());
    }

    #[test]
    fn document_round_trip(
        secrets in prop::collection::btree_map(prop::sample::select(SENSITIVE_FIELDS.to_vec()), ".{1,40}", 0..7),
        extra in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..4),
        version in 1u32..5,
        now in 0i64..4_000_000_000,
    ) {
        let mut keys = KeySet::default();
        keys.keys.insert(version, DataKey::generate());
        let mut td = Map::new();
        for (k, v) in &extra { td.insert(k.clone(), v.clone()); }
        for (k, v) in &secrets { td.insert((*k).to_owned(), json!(v)); }
        let doc = seal_token_data("svc", &td, keys.keys.get(&version).unwrap(), version, now, None, None).unwrap();
        let opened = open_document(&doc, "svc", &keys).unwrap();
        for (k, v) in &secrets {
            prop_assert_eq!(opened.secret(k), Some(v.as_str()));
            prop_assert!(!opened.meta().contains_key(*k));
        }
        let cred: Value = serde_json::from_slice(&opened.credential_json()).unwrap();
        for (k, v) in &secrets {
            prop_assert_eq!(&cred["token"][*k], &json!(v));
        }
        prop_assert_eq!(&cred["token"]["updatedAt"], &json!(format_iso8601(now)));
    }

    #[test]
    fn iso8601_round_trip(unix in -62_167_219_200i64..=253_402_300_799) {
        let text = format_iso8601(unix);
        prop_assert_eq!(text.len(), 20);
        prop_assert_eq!(parse_iso8601(&text), Some(unix));
    }

    #[test]
    fn response_signature_round_trip(
        seed in any::<[u8; 32]>(),
        ts in 0i64..i64::MAX,
        method in "[A-Z]{1,7}",
        path in "/[ -~]{0,60}",
        request_id in "[A-Za-z0-9._:-]{0,40}",
        status in 100u16..600,
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let key = IdentityKey::from_bytes(&seed);
        let vk = key.verifying_key();
        let header = sign_response(&key, ts, &method, &path, &request_id, status, &body);
        let parsed = ResponseSignature::parse(&header).unwrap();
        prop_assert_eq!(parsed.ts, ts);
        prop_assert_eq!(&parsed.key_id, &key.key_id());
        prop_assert_eq!(verify_response(&vk, &header, &method, &path, &request_id, status, &body), Ok(parsed));
        prop_assert_eq!(
            verify_response(&vk, &header, &method, &path, &request_id, status + 1, &body),
            Err(ResponseSigError::BadSignature)
        );
        prop_assert_eq!(key.identity_document().verifying_key(), Ok(vk));
        prop_assert_eq!(IdentityKey::from_bytes(&key.to_bytes()).key_id(), key.key_id());
    }

    #[test]
    fn kh2_ticket_round_trip(seed in any::<[u8; 32]>(), c in claims()) {
        let key = PlatformSigningKey::from_seed(&seed);
        let t = encode_kh2_ticket(&key, &c);
        let now = c.iat.unwrap();
        let other = PlatformSigningKey::from_seed(&[0xAA; 32]).public_key();
        prop_assert_eq!(verify_kh2_ticket(&[other.clone(), key.public_key()], &t, now, 3600), Ok(c.clone()));
        if other != key.public_key() {
            prop_assert_eq!(verify_kh2_ticket(&[other], &t, now, 3600), Err(TicketError::BadSignature));
        }
    }

    #[test]
    fn envelope_round_trip(
        seed in any::<[u8; 32]>(),
        ts in any::<i64>(),
        nonce in "[0-9a-f]{32}",
        method in "[A-Z]{1,7}",
        path in "/[!-~]{0,60}",
        body in prop::collection::vec(any::<u8>(), 0..256),
        flip in any::<usize>(),
    ) {
        let key = PlatformSigningKey::from_seed(&seed);
        let keys = [key.public_key()];
        let header = sign_envelope(&key, ts, &nonce, &method, &path, &body);
        let parsed = Envelope::parse(&header).unwrap();
        prop_assert_eq!(&parsed.nonce, &nonce);
        prop_assert_eq!(parsed.ts, ts);
        prop_assert_eq!(
            verify_envelope(&keys, Some(&header), &method, &path, &body, ts, 300),
            Ok(parsed)
        );
        let mut tampered = body.clone();
        if tampered.is_empty() { tampered.push(0) } else { let i = flip % tampered.len(); tampered[i] ^= 1 }
        prop_assert_eq!(
            verify_envelope(&keys, Some(&header), &method, &path, &tampered, ts, 300),
            Err(EnvelopeError::BadSignature)
        );
        let public = key.public_key();
        prop_assert_eq!(PlatformPublicKey::parse(public.to_base64().as_bytes()), Ok(public.clone()));
        prop_assert_eq!(
            PlatformPublicKey::parse(&serde_json::to_vec(&public.identity_document()).unwrap()),
            Ok(public)
        );
    }

    #[test]
    fn secret_base64_round_trip(bytes in any::<[u8; 32]>()) {
        let s = HmacSecret::from_bytes(bytes);
        prop_assert!(HmacSecret::from_base64(&s.to_base64()).unwrap().ct_eq(&s));
        let k = DataKey::from_bytes(bytes);
        prop_assert!(DataKey::from_base64(&k.to_base64()).unwrap().ct_eq(&k));
    }

    #[test]
    fn registration_url_round_trip(code in ".{0,40}", hook in ".{0,60}") {
        use base64::Engine as _;
        let url = registration_url("https://tv.example/", &code, &hook, &golden_secret());
        let query = url.strip_prefix("https://tv.example/vault/webhook-bind?").unwrap();
        let parts: Vec<&str> = query.split('&').collect();
        prop_assert_eq!(parts.len(), 3);
        let value = |p: &str, name: &str| {
            percent_encoding::percent_decode_str(p.strip_prefix(name).unwrap()).decode_utf8().unwrap().into_owned()
        };
        prop_assert_eq!(value(parts[0], "code="), code);
        let b64 = value(parts[1], "webhook_url=");
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        prop_assert_eq!(String::from_utf8(decoded).unwrap(), hook);
        prop_assert_eq!(parts[2], "hmac_hash=630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd");
    }
}

// ---------------------------------------------------------------- fuzz-style: parsers never panic

const GOLDEN_TICKET: &str = "eyJzdWIiOiJ1c2VyX3Rlc3QiLCJzdmMiOiJnaXRodWIiLCJwdXIiOiJhZ2VudF9jcmVkZW50aWFsIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjk5OTk5OTk5OTksIm5vbmNlIjoiZGVhZGJlZWZkZWFkYmVlZmRlYWRiZWVmZGVhZGJlZWYiLCJhaWQiOiJhZ2VudF90ZXN0In0.b5b3f0d261e89c53c9db035d68244b1d4862a3e9c84edd111f502f9b148da74a";

fn fixed_key() -> DataKey {
    DataKey::from_bytes([3u8; 32])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(FUZZ_CASES))]

    #[test]
    fn fuzz_verify_ticket(
        random in ".{0,120}",
        e in edits(),
        json_text in prop_oneof![".{0,80}", json_value().prop_map(|v| v.to_string())],
        now in any::<i64>(),
        cap in any::<i64>(),
    ) {
        let s = golden_secret();
        let _ = verify_ticket(&s, &random, now, cap);
        let _ = verify_ticket(&s, &mutate(GOLDEN_TICKET, &e), now, cap);
        // A correctly signed payload of arbitrary JSON reaches the decoder and the claim checks.
        let resigned = {
            let c = TicketClaims::new("u", "s", Purpose::Store, 0, 1, "n");
            let t = encode_ticket(&s, &c);
            mutate(&t, &e)
        };
        let _ = verify_ticket(&s, &resigned, now, cap);
        let _ = payload_signed_ticket(&s, &json_text).map(|t| verify_ticket(&s, &t, now, cap));
    }

    #[test]
    fn fuzz_response_signature_parse(random in ".{0,200}", e in edits()) {
        let key = IdentityKey::from_bytes(&[5u8; 32]);
        let valid = sign_response(&key, 1_700_000_000, "GET", "/v1/health", "r", 200, b"{}");
        let _ = ResponseSignature::parse(&random);
        let mutated = mutate(&valid, &e);
        let _ = ResponseSignature::parse(&mutated);
        let _ = verify_response(&key.verifying_key(), &mutated, "GET", "/v1/health", "r", 200, b"{}");
    }

    #[test]
    fn fuzz_verify_request_headers(
        sig in prop::option::of(prop_oneof![".{0,80}", "sha256=[0-9a-fA-F]{0,70}"]),
        ts in prop::option::of(prop_oneof![".{0,24}", "-?[0-9]{1,21}"]),
        body in prop::collection::vec(any::<u8>(), 0..64),
        now in any::<i64>(),
        skew in any::<i64>(),
    ) {
        let _ = verify_request(&golden_secret(), sig.as_deref(), ts.as_deref(), &body, now, skew);
    }

    #[test]
    fn fuzz_decrypt_field(random in ".{0,120}", tail in "[A-Za-z0-9+/=]{0,80}", e in edits()) {
        let key = fixed_key();
        let valid = encrypt_field(&key, 1, "github", "accessToken", b"secret");
        let _ = decrypt_field(&key, "github", "accessToken", &random);
        let _ = decrypt_field(&key, "github", "accessToken", &format!("kh1:1:{tail}"));
        let _ = decrypt_field(&key, "github", "accessToken", &mutate(&valid, &e));
        let _ = decrypt_platform_v1_field(&key, &tail);
        let _ = keyholder_protocol::document::field_key_version(&random);
    }

    #[test]
    fn fuzz_open_document(doc in json_value(), e in edits(), service in ".{0,10}") {
        let mut keys = KeySet::default();
        keys.keys.insert(1, fixed_key());
        keys.platform_v1 = Some(fixed_key());
        if let Ok(opened) = open_document(&doc, &service, &keys) {
            let body = opened.credential_json();
            prop_assert!(serde_json::from_slice::<Value>(&body).is_ok());
        }
        let valid = json!({"v": 2, "alg": "AES-256-GCM", "meta": {"serviceName": "github"},
            "fields": {"accessToken": encrypt_field(&fixed_key(), 1, "github", "accessToken", b"t\"\\\x00")}});
        let mutated = mutate(&valid.to_string(), &e);
        if let Ok(v) = serde_json::from_str::<Value>(&mutated) {
            if let Ok(opened) = open_document(&v, "github", &keys) {
                prop_assert!(serde_json::from_slice::<Value>(&opened.credential_json()).is_ok());
            }
            let _ = keyholder_protocol::document::document_key_versions(&v);
        }
    }

    #[test]
    fn fuzz_envelope(
        random in ".{0,200}",
        e in edits(),
        now in any::<i64>(),
        skew in any::<i64>(),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let key = PlatformSigningKey::from_seed(&[6u8; 32]);
        let valid = sign_envelope(&key, 1_700_000_000, "00112233445566778899aabbccddeeff", "POST", "/v1/storage", b"{}");
        let _ = Envelope::parse(&random);
        let mutated = mutate(&valid, &e);
        let _ = Envelope::parse(&mutated);
        let keys = [key.public_key()];
        let _ = verify_envelope(&keys, Some(&mutated), "POST", "/v1/storage", &body, now, skew);
        let _ = verify_envelope(&keys, Some(&random), "POST", "/v1/storage", b"{}", now, skew);
        let _ = PlatformPublicKey::parse(random.as_bytes());
        let _ = PlatformPublicKey::parse(mutate(&key.public_key().to_base64(), &e).as_bytes());
        let _ = PlatformSigningKey::from_file_bytes(random.as_bytes());
    }

    #[test]
    fn fuzz_verify_kh2_ticket(
        random in ".{0,160}",
        e in edits(),
        now in any::<i64>(),
        cap in any::<i64>(),
    ) {
        let key = PlatformSigningKey::from_seed(&[7u8; 32]);
        let keys = [key.public_key()];
        let valid = encode_kh2_ticket(&key, &TicketClaims::new("u", "s", Purpose::Store, 0, 1, "n"));
        let _ = verify_kh2_ticket(&keys, &random, now, cap);
        let _ = verify_kh2_ticket(&keys, &format!("kh2.{random}"), now, cap);
        let _ = verify_kh2_ticket(&keys, &mutate(&valid, &e), now, cap);
    }

    #[test]
    fn fuzz_parse_iso8601(random in ".{0,40}", e in edits(), unix in any::<i64>()) {
        let _ = parse_iso8601(&random);
        let _ = parse_iso8601(&mutate("2023-11-14T22:13:20.123+01:00", &e));
        let _ = format_iso8601(unix);
    }
}

/// Sign an arbitrary payload text as a ticket (so the fuzz input passes the signature check).
fn payload_signed_ticket(secret: &HmacSecret, text: &str) -> Option<String> {
    use base64::Engine as _;
    use hmac::Mac as _;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text.as_bytes());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose()).ok()?;
    mac.update(payload.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(format!("{payload}.{sig}"))
}
