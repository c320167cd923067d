#!/usr/bin/env python3
"""Regenerate the Keyholder protocol test vectors in this folder.

This is an independent implementation (Python + the `cryptography` package) of the formats that
`keyholder-protocol` implements in Rust, so the vectors check one implementation against another. The two
golden vectors from PROTOCOL.md come from the platform's own code and are written in literally; this script
asserts that it reproduces them. Run: `python3 protocol/vectors/generate.py` (writes the *.json files here).
"""

import base64
import hashlib
import hmac
import json
import os
import struct
import urllib.parse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives import serialization

HERE = os.path.dirname(os.path.abspath(__file__))

GOLDEN_SECRET = bytes(range(32))
GOLDEN_SECRET_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GOLDEN_HMAC_HASH = "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
GOLDEN_BODY = '{"operation":"get","collection":"tokens","key":"github","requestId":"req_testfixture01"}'
GOLDEN_SIG = "c196ad249f0d81158ebfec10a47f7f67122de187c094332e9ae9290bc45fcdeb"
GOLDEN_TICKET = (
    "eyJzdWIiOiJ1c2VyX3Rlc3QiLCJzdmMiOiJnaXRodWIiLCJwdXIiOiJhZ2VudF9jcmVkZW50aWFsIiwiaWF0IjoxNzAwMDAwMDAwLCJl"
    "eHAiOjk5OTk5OTk5OTksIm5vbmNlIjoiZGVhZGJlZWZkZWFkYmVlZmRlYWRiZWVmZGVhZGJlZWYiLCJhaWQiOiJhZ2VudF90ZXN0In0"
    ".b5b3f0d261e89c53c9db035d68244b1d4862a3e9c84edd111f502f9b148da74a"
)
WRONG_SECRET_B64 = base64.b64encode(bytes(range(1, 33))).decode()
I64_MAX = 9223372036854775807
NOW = 1700000000


def b64(b):
    return base64.b64encode(b).decode()


def b64url(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def hmac_hex(key, msg):
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def ok(v):
    return {"ok": v}


def err(name):
    return {"error": name}


def write(name, description, cases):
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), name
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        json.dump({"description": description, "cases": cases}, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------- request signatures (PROTOCOL.md 2.1)
def request_signatures():
    assert b64(GOLDEN_SECRET) == GOLDEN_SECRET_B64
    sig = hmac_hex(GOLDEN_SECRET, b"1700000000." + GOLDEN_BODY.encode())
    assert sig == GOLDEN_SIG
    hdr = "sha256=" + sig

    def verify(name, expected, signature_header=hdr, timestamp_header="1700000000", body=GOLDEN_BODY,
               now=NOW, secret=GOLDEN_SECRET_B64, max_skew_secs=300):
        return {"name": name, "op": "verify", "secret_base64": secret, "signature_header": signature_header,
                "timestamp_header": timestamp_header, "body": body, "now": now, "max_skew_secs": max_skew_secs,
                "expected": expected}

    cases = [
        {"name": "golden_sign", "op": "sign", "secret_base64": GOLDEN_SECRET_B64, "timestamp": 1700000000,
         "body": GOLDEN_BODY, "expected": ok(hdr)},
        {"name": "empty_body_sign", "op": "sign", "secret_base64": GOLDEN_SECRET_B64, "timestamp": 1700000000,
         "body": "", "expected": ok("sha256=" + hmac_hex(GOLDEN_SECRET, b"1700000000."))},
        verify("golden_verify", ok(1700000000)),
        verify("golden_verify_at_skew_limit", ok(1700000000), now=NOW + 300),
        verify("golden_verify_at_negative_skew_limit", ok(1700000000), now=NOW - 300),
        verify("missing_signature", err("MissingSignature"), signature_header=None),
        verify("signature_without_prefix", err("MissingSignature"), signature_header=sig),
        verify("signature_wrong_prefix", err("MissingSignature"), signature_header="sha1=" + sig),
        verify("missing_timestamp", err("MissingTimestamp"), timestamp_header=None),
        verify("missing_signature_wins_over_missing_timestamp", err("MissingSignature"), signature_header=None,
               timestamp_header=None),
        verify("timestamp_not_integer", err("InvalidTimestamp"), timestamp_header="1700000000.5"),
        verify("timestamp_with_plus", err("InvalidTimestamp"), timestamp_header="+1700000000"),
        verify("timestamp_with_space", err("InvalidTimestamp"), timestamp_header=" 1700000000"),
        verify("timestamp_empty", err("InvalidTimestamp"), timestamp_header=""),
        verify("timestamp_overflow", err("InvalidTimestamp"), timestamp_header="99999999999999999999"),
        verify("stale_timestamp", err("StaleTimestamp"), now=NOW + 301),
        verify("future_timestamp", err("StaleTimestamp"), now=NOW - 301),
        verify("stale_wins_over_bad_signature", err("StaleTimestamp"), signature_header="sha256=" + "0" * 64,
               now=NOW + 301),
        verify("wrong_secret", err("BadSignature"), secret=WRONG_SECRET_B64),
        verify("tampered_body", err("BadSignature"), body=GOLDEN_BODY.replace("github", "gitlab")),
        verify("body_reserialized_with_spaces", err("BadSignature"), body=json.dumps(json.loads(GOLDEN_BODY))),
        verify("signature_for_other_timestamp", err("BadSignature"), timestamp_header="1700000001"),
        verify("signature_uppercase_hex", err("BadSignature"), signature_header="sha256=" + sig.upper()),
        verify("signature_truncated", err("BadSignature"), signature_header=hdr[:-2]),
        verify("signature_not_hex", err("BadSignature"), signature_header="sha256=" + "z" * 64),
        verify("signature_with_trailing_space", err("BadSignature"), signature_header=hdr + " "),
    ]
    write("request_signatures.json",
          "X-TokenVault-Signature: sha256=<hex HMAC-SHA256(secret, \"<timestamp>.\" + raw body)>, PROTOCOL.md 2.1. "
          "op sign: expected.ok is the header value. op verify: expected.ok is the timestamp, or the "
          "RequestAuthError variant. body is the UTF-8 request body.",
          cases)


# ---------------------------------------------------------------- binding (PROTOCOL.md 1, 2.3)
def binding():
    assert hashlib.sha256(GOLDEN_SECRET).hexdigest() == GOLDEN_HMAC_HASH
    code = "3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f"
    hook = "https://keyholder.example.org"
    q = lambda s: urllib.parse.quote(s, safe="-._~")
    url = ("https://tokenvault.uk/vault/webhook-bind?code=" + q(code) + "&webhook_url=" + q(b64(hook.encode()))
           + "&hmac_hash=" + GOLDEN_HMAC_HASH)
    cases = [
        {"name": "golden_hmac_hash", "op": "hmac_hash", "secret_base64": GOLDEN_SECRET_B64,
         "expected": ok(GOLDEN_HMAC_HASH)},
        {"name": "registration_url", "op": "registration_url", "frontend": "https://tokenvault.uk/",
         "code": code, "webhook_url": hook, "secret_base64": GOLDEN_SECRET_B64, "expected": ok(url)},
        {"name": "registration_url_escapes_code", "op": "registration_url", "frontend": "https://tv.example",
         "code": "a b&c", "webhook_url": "https://h.example:8443/x?y", "secret_base64": GOLDEN_SECRET_B64,
         "expected": ok("https://tv.example/vault/webhook-bind?code=" + q("a b&c") + "&webhook_url="
                        + q(b64(b"https://h.example:8443/x?y")) + "&hmac_hash=" + GOLDEN_HMAC_HASH)},
        {"name": "secret_not_canonical_base64", "op": "hmac_hash",
         "secret_base64": GOLDEN_SECRET_B64[:-2] + "9=", "expected": err("InvalidBase64")},
        {"name": "secret_wrong_length", "op": "hmac_hash", "secret_base64": b64(bytes(31)),
         "expected": err("WrongLength")},
    ]
    write("binding.json",
          "Bind hmac_hash (lowercase hex SHA-256 of the 32 secret bytes) and the registration URL. "
          "Errors are KeyLengthError variants.", cases)


# ---------------------------------------------------------------- tickets (PROTOCOL.md 2.2)
def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def ticket_from_payload(payload, secret=GOLDEN_SECRET):
    return payload + "." + hmac_hex(secret, payload.encode())


def ticket(claims_json, secret=GOLDEN_SECRET):
    return ticket_from_payload(b64url(claims_json.encode()), secret)


THIRTY_DAYS = 30 * 86400
I64_MIN = -9223372036854775808
U64_MAX = 18446744073709551615


def iat_and_extreme_cases(ok):
    """(name, claims over the base ticket, expected, verify kwargs): shared by both ticket formats.
    The rules: iat <= now + 300 (clock skew), iat <= exp, exp - now <= cap, all without overflow."""
    def claims(**c):
        return dict({"sub": "u", "svc": "s", "pur": "proxy", "iat": NOW, "exp": NOW + 60, "nonce": "n1"}, **c)
    return [
        ("iat_at_skew_limit", {"iat": NOW + 300, "exp": NOW + 600}, ok(claims(iat=NOW + 300, exp=NOW + 600)), {}),
        ("iat_in_future", {"iat": NOW + 301, "exp": NOW + 600}, err("IssuedInFuture"), {}),
        ("iat_and_exp_thirty_days_ahead", {"iat": NOW + THIRTY_DAYS, "exp": NOW + THIRTY_DAYS + 60},
         err("IssuedInFuture"), {}),
        ("iat_after_exp", {"iat": NOW + 10, "exp": NOW + 5}, err("IssuedAfterExpiry"), {}),
        ("old_iat_exp_beyond_cap_from_now", {"iat": NOW - 3000, "exp": NOW + 3601}, err("LifetimeTooLong"), {}),
        ("old_iat_short_exp", {"iat": NOW - THIRTY_DAYS, "exp": NOW + 60},
         ok(claims(iat=NOW - THIRTY_DAYS, exp=NOW + 60)), {}),
        ("exp_i64_max", {"exp": I64_MAX}, err("LifetimeTooLong"), {}),
        ("exp_i64_max_unbounded_cap", {"exp": I64_MAX}, ok(claims(exp=I64_MAX)),
         {"max_lifetime_secs": I64_MAX}),
        ("iat_i64_min_exp_i64_max", {"iat": I64_MIN, "exp": I64_MAX}, err("LifetimeTooLong"), {}),
        ("iat_i64_max_exp_i64_max", {"iat": I64_MAX, "exp": I64_MAX}, err("IssuedInFuture"),
         {"max_lifetime_secs": I64_MAX}),
        ("iat_i64_min_short_exp", {"iat": I64_MIN}, ok(claims(iat=I64_MIN)), {}),
        ("exp_i64_min", {"exp": I64_MIN}, err("Expired"), {}),
        ("iat_i64_max", {"iat": I64_MAX}, err("IssuedInFuture"), {}),
        ("exp_u64_max", {"exp": U64_MAX}, err("Undecodable"), {}),
        ("exp_negative", {"iat": -5, "exp": -1}, err("Expired"), {}),
    ]


def tickets():
    golden_claims = {"sub": "user_test", "svc": "github", "pur": "agent_credential", "iat": 1700000000,
                     "exp": 9999999999, "nonce": "deadbeefdeadbeefdeadbeefdeadbeef", "aid": "agent_test"}
    assert ticket(compact(golden_claims)) == GOLDEN_TICKET
    payload, sig = GOLDEN_TICKET.split(".")

    def verify(name, t, expected, now=NOW, max_lifetime_secs=3600, secret=GOLDEN_SECRET_B64):
        return {"name": name, "op": "verify", "secret_base64": secret, "ticket": t, "now": now,
                "max_lifetime_secs": max_lifetime_secs, "expected": expected}

    store = {"sub": "user_1", "svc": "github", "pur": "store", "iat": NOW, "exp": NOW + 300,
             "nonce": "n-store-1", "cid": "creation_1", "mode": "create"}
    base = {"sub": "u", "svc": "s", "pur": "proxy", "iat": NOW, "exp": NOW + 60, "nonce": "n1"}
    base_json = compact(base)
    # a payload whose standard base64 has '+' or '/', to show the standard alphabet is refused
    i = 0
    while True:
        c = dict(base, nonce="n" + "?" * i + ">")
        std = base64.b64encode(compact(c).encode()).decode().rstrip("=")
        if "+" in std or "/" in std:
            break
        i += 1
    std_alphabet_payload = std
    # payload with non-canonical trailing bits: needs a length that is not a multiple of 3
    odd = compact(dict(base, nonce="n12"))
    odd_b64 = b64url(odd.encode())
    assert len(odd.encode()) % 3 != 0
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(odd_b64[-1])
    noncanonical = odd_b64[:-1] + alphabet[last | 1]
    assert noncanonical != odd_b64
    padded = b64url(odd.encode()) + "=" * (-len(odd_b64) % 4)
    assert padded != odd_b64

    cases = [
        {"name": "golden_encode", "op": "encode", "secret_base64": GOLDEN_SECRET_B64, "claims": golden_claims,
         "expected": ok(GOLDEN_TICKET)},
        verify("golden_verify", GOLDEN_TICKET, ok(golden_claims), max_lifetime_secs=I64_MAX),
        verify("golden_refused_by_default_lifetime_cap", GOLDEN_TICKET, err("LifetimeTooLong")),
        {"name": "store_ticket_encode", "op": "encode", "secret_base64": GOLDEN_SECRET_B64, "claims": store,
         "expected": ok(ticket(compact(store)))},
        verify("store_ticket_verify", ticket(compact(store)), ok(store)),
        verify("unknown_claims_tolerated", ticket(compact(dict(base, extra={"x": 1}))), ok(base)),
        verify("missing_sub_svc_pur_default_empty", ticket(compact({"exp": NOW, "nonce": "n"})),
               ok({"sub": "", "svc": "", "pur": "", "exp": NOW, "nonce": "n"})),
        verify("exp_equal_now_is_valid", ticket(compact(dict(base, exp=NOW))), ok(dict(base, exp=NOW))),
        verify("lifetime_at_cap", ticket(compact(dict(base, exp=NOW + 3600))), ok(dict(base, exp=NOW + 3600))),
        verify("one_part", payload, err("Malformed")),
        verify("three_parts", GOLDEN_TICKET + ".x", err("Malformed")),
        verify("empty_payload", "." + sig, err("Malformed")),
        verify("empty_signature", payload + ".", err("Malformed")),
        verify("empty", "", err("Malformed")),
        verify("oversize", "a" * 8193 + "." + "0" * 64, err("Malformed")),
        verify("wrong_secret", GOLDEN_TICKET, err("BadSignature"), secret=WRONG_SECRET_B64,
               max_lifetime_secs=I64_MAX),
        verify("tampered_payload", payload[:40] + ("A" if payload[40] != "A" else "B") + payload[41:] + "." + sig,
               err("BadSignature"), max_lifetime_secs=I64_MAX),
        verify("signature_uppercase", payload + "." + sig.upper(), err("BadSignature")),
        verify("signature_truncated", payload + "." + sig[:-1], err("BadSignature")),
        verify("signature_not_hex", payload + "." + "g" * 64, err("BadSignature")),
        verify("bad_signature_wins_over_bad_payload", "!!!." + sig, err("BadSignature")),
        verify("payload_padded", ticket_from_payload(padded), err("Undecodable")),
        verify("payload_noncanonical_trailing_bits", ticket_from_payload(noncanonical), err("Undecodable")),
        verify("payload_standard_alphabet", ticket_from_payload(std_alphabet_payload), err("Undecodable")),
        verify("payload_not_base64", ticket_from_payload("e30!"), err("Undecodable")),
        verify("trailing_garbage_after_json", ticket(base_json + "x"), err("Undecodable")),
        verify("trailing_whitespace_after_json", ticket(base_json + " "), err("Undecodable")),
        verify("two_json_objects", ticket(base_json + "{}"), err("Undecodable")),
        verify("payload_not_object", ticket("[1,2]"), err("Undecodable")),
        verify("payload_not_json", ticket("not json"), err("Undecodable")),
        verify("exp_wrong_type", ticket(compact(dict(base, exp=str(NOW + 60)))), err("Undecodable")),
        verify("duplicate_claim", ticket(base_json[:-1] + ',"exp":1}'), err("Undecodable")),
        verify("expired", ticket(compact(dict(base, exp=NOW - 1))), err("Expired")),
        verify("missing_exp_is_expired", ticket(compact({k: v for k, v in base.items() if k != "exp"})),
               err("Expired")),
        verify("expired_wins_over_missing_nonce", ticket(compact({"exp": NOW - 1})), err("Expired")),
        verify("missing_nonce", ticket(compact({k: v for k, v in base.items() if k != "nonce"})),
               err("MissingNonce")),
        verify("empty_nonce", ticket(compact(dict(base, nonce=""))), err("MissingNonce")),
        verify("null_nonce", ticket(compact(dict(base, nonce=None))), err("MissingNonce")),
        verify("lifetime_too_long", ticket(compact(dict(base, exp=NOW + 3601))), err("LifetimeTooLong")),
        verify("lifetime_too_long_without_iat",
               ticket(compact({k: v for k, v in dict(base, exp=NOW + 3601).items() if k != "iat"})),
               err("LifetimeTooLong")),
    ] + [
        # iat rules and the lifetime measured from now (issue 17, item 7); extreme values must be
        # refused without overflowing (exp + skew at 2^63-1 wrapped in an older keyholder).
        verify(name, ticket(compact(dict(base, **claims))), expected, **kw)
        for name, claims, expected, kw in iat_and_extreme_cases(ok)
    ] + [
        {"name": "scope_ok", "op": "check_scope", "claims": golden_claims,
         "allowed": ["agent_credential", "user_reveal"], "service": "github", "expected": ok("agent_credential")},
        {"name": "scope_wrong_purpose", "op": "check_scope", "claims": golden_claims, "allowed": ["store"],
         "service": "github", "expected": err("WrongPurpose")},
        {"name": "scope_unknown_purpose", "op": "check_scope", "claims": dict(golden_claims, pur="admin"),
         "allowed": ["agent_credential"], "service": "github", "expected": err("WrongPurpose")},
        {"name": "scope_wrong_service", "op": "check_scope", "claims": golden_claims,
         "allowed": ["agent_credential"], "service": "GitHub", "expected": err("WrongService")},
        {"name": "scope_empty_service", "op": "check_scope", "claims": dict(golden_claims, svc=""),
         "allowed": ["agent_credential"], "service": "github", "expected": err("WrongService")},
    ]
    write("tickets.json",
          "Tickets <unpadded base64url JSON>.<lowercase hex HMAC-SHA256 over the payload text>, PROTOCOL.md 2.2. "
          "op encode: expected.ok is the ticket. op verify: expected.ok is the claims object (absent claims "
          "omitted), else the TicketError variant; nonce replay is not part of these cases. op check_scope: "
          "expected.ok is the purpose.",
          cases)


# ---------------------------------------------------------------- documents (PROTOCOL.md 4 + our kh1 format)
KEY1 = bytes(range(32, 64))
KEY2 = bytes(range(64, 96))
PLATFORM_KEY = bytes(range(96, 128))


def aad(service, field, version):
    out = b"keyholder/v1/field"
    for part in (service.encode(), field.encode(), str(version).encode()):
        out += struct.pack(">I", len(part)) + part
    return out


def kh1(key, version, service, field, plaintext, nonce):
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), aad(service, field, version))
    return "kh1:%d:%s" % (version, b64(sealed))


def platform_v1(key, plaintext, nonce):
    return b64(nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), None))


def flip_byte(value, index):
    prefix, _, data = value.rpartition(":")
    raw = bytearray(base64.b64decode(data))
    raw[index] ^= 0x01
    return (prefix + ":" if prefix else "") + b64(bytes(raw))


def documents():
    n = lambda i: bytes([i] * 12)
    at = kh1(KEY1, 1, "github", "accessToken", "gho_exampletoken", n(1))
    rt = kh1(KEY2, 2, "github", "refreshToken", "ghr_examplerefresh", n(2))
    assert len(base64.b64decode(at.split(":")[2])) % 3 != 0
    keys = {"1": b64(KEY1), "2": b64(KEY2)}

    def dec(name, value, expected, key=KEY1, service="github", field="accessToken"):
        return {"name": name, "op": "decrypt_field", "key_base64": b64(key), "service": service, "field": field,
                "value": value, "expected": expected}

    def open_doc(name, doc, expected, service="github", platform=None, k=keys):
        return {"name": name, "op": "open_document", "keys": k, "platform_v1_key_base64": platform,
                "service": service, "document": doc, "expected": expected}

    data = at.split(":")[2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stripped = data.rstrip("=")
    noncanonical = "kh1:1:" + stripped[:-1] + alphabet[alphabet.index(stripped[-1]) | 1] + data[len(stripped):]
    assert noncanonical != at
    pv1 = platform_v1(PLATFORM_KEY, "xoxb-platform-token", n(3))
    meta = {"serviceName": "github", "tokenType": "oauth", "hasRefreshToken": True, "accessToken": "shadowed"}
    v2doc = {"v": 2, "alg": "AES-256-GCM", "fields": {"accessToken": at, "refreshToken": rt}, "meta": meta}
    v1doc = {"v": 1, "alg": "AES-256-GCM", "fields": {"accessToken": pv1}, "meta": {"serviceName": "slack"}}

    cases = [
        {"name": "encrypt_fixed_nonce", "op": "encrypt_field", "key_base64": b64(KEY1), "key_version": 1,
         "service": "github", "field": "accessToken", "plaintext": "gho_exampletoken", "nonce_hex": n(1).hex(),
         "expected": ok(at)},
        {"name": "encrypt_fixed_nonce_v2", "op": "encrypt_field", "key_base64": b64(KEY2), "key_version": 2,
         "service": "github", "field": "refreshToken", "plaintext": "ghr_examplerefresh",
         "nonce_hex": n(2).hex(), "expected": ok(rt)},
        {"name": "encrypt_unicode_plaintext", "op": "encrypt_field", "key_base64": b64(KEY1),
         "key_version": 4294967295, "service": "ünïcode svc", "field": "totpSecret",
         "plaintext": "otpauth://totp/é?secret=JBSWY3DPEHPK3PXP", "nonce_hex": n(4).hex(),
         "expected": ok(kh1(KEY1, 4294967295, "ünïcode svc", "totpSecret",
                            "otpauth://totp/é?secret=JBSWY3DPEHPK3PXP", n(4)))},
        dec("decrypt_ok", at, ok("gho_exampletoken")),
        dec("decrypt_v2_ok", rt, ok("ghr_examplerefresh"), key=KEY2, field="refreshToken"),
        dec("wrong_key", at, err("DecryptionFailed"), key=KEY2),
        dec("moved_to_other_service", at, err("DecryptionFailed"), service="gitlab"),
        dec("moved_to_other_field", at, err("DecryptionFailed"), field="refreshToken"),
        dec("key_version_label_changed", at.replace("kh1:1:", "kh1:2:", 1), err("DecryptionFailed")),
        dec("tampered_ciphertext", flip_byte(at, 12), err("DecryptionFailed")),
        dec("tampered_nonce", flip_byte(at, 0), err("DecryptionFailed")),
        dec("bad_tag", flip_byte(at, -1), err("DecryptionFailed")),
        dec("truncated_below_nonce_and_tag", "kh1:1:" + b64(bytes(27)), err("Malformed")),
        dec("noncanonical_base64", noncanonical, err("Malformed")),
        dec("missing_base64_padding", at.rstrip("="), err("Malformed")),
        dec("whitespace_in_base64", at[:20] + " " + at[20:], err("Malformed")),
        dec("urlsafe_alphabet", at.replace("+", "-").replace("/", "_") if ("+" in at or "/" in at)
            else at[:-3] + "-" + at[-2:], err("Malformed")),
        dec("version_leading_zero", at.replace("kh1:1:", "kh1:01:", 1), err("Malformed")),
        dec("version_signed", at.replace("kh1:1:", "kh1:+1:", 1), err("Malformed")),
        dec("version_overflow", at.replace("kh1:1:", "kh1:4294967296:", 1), err("Malformed")),
        dec("version_missing", at.replace("kh1:1:", "kh1::", 1), err("Malformed")),
        dec("no_version_separator", "kh1:" + data, err("Malformed")),
        dec("unknown_format_prefix", at.replace("kh1:", "kh2:", 1), err("Malformed")),
        dec("empty", "", err("Malformed")),
        {"name": "platform_v1_decrypt", "op": "decrypt_platform_v1_field", "key_base64": b64(PLATFORM_KEY),
         "value": pv1, "expected": ok("xoxb-platform-token")},
        {"name": "platform_v1_wrong_key", "op": "decrypt_platform_v1_field", "key_base64": b64(KEY1),
         "value": pv1, "expected": err("DecryptionFailed")},
        {"name": "platform_v1_tampered", "op": "decrypt_platform_v1_field", "key_base64": b64(PLATFORM_KEY),
         "value": flip_byte(pv1, 20), "expected": err("DecryptionFailed")},
        {"name": "platform_v1_not_base64", "op": "decrypt_platform_v1_field", "key_base64": b64(PLATFORM_KEY),
         "value": "not base64!", "expected": err("Malformed")},
        {"name": "format_keyholder", "op": "field_key_version", "value": rt, "expected": ok({"keyholder": 2})},
        {"name": "format_platform_v1", "op": "field_key_version", "value": pv1, "expected": ok("platform_v1")},
        {"name": "format_bad_version", "op": "field_key_version", "value": "kh1:x:AAAA",
         "expected": err("Malformed")},
        open_doc("open_v2", v2doc, ok({"token": {"accessToken": "gho_exampletoken",
                                                 "refreshToken": "ghr_examplerefresh", "serviceName": "github",
                                                 "tokenType": "oauth", "hasRefreshToken": True}})),
        open_doc("open_v2_wrong_service", v2doc, err("DecryptionFailed"), service="gitlab"),
        open_doc("open_v2_fields_swapped",
                 dict(v2doc, fields={"accessToken": kh1(KEY1, 1, "github", "refreshToken", "x", n(5))}),
                 err("DecryptionFailed")),
        open_doc("open_v2_unknown_key_version", v2doc, err("UnknownKeyVersion"), k={"1": b64(KEY1)}),
        open_doc("open_v2_with_platform_field", dict(v2doc, fields={"accessToken": pv1}), err("Malformed"),
                 platform=b64(PLATFORM_KEY)),
        open_doc("open_field_not_string", dict(v2doc, fields={"accessToken": 5}), err("NotAString")),
        open_doc("open_unsupported_version", dict(v2doc, v=3), err("UnsupportedDocument")),
        open_doc("open_unsupported_alg", dict(v2doc, alg="AES-128-CBC"), err("UnsupportedDocument")),
        open_doc("open_not_object", [v2doc], err("Malformed")),
        open_doc("open_platform_v1", v1doc, ok({"token": {"accessToken": "xoxb-platform-token",
                                                          "serviceName": "slack"}}),
                 service="slack", platform=b64(PLATFORM_KEY)),
        open_doc("open_platform_v1_without_key", v1doc, err("NoPlatformKey"), service="slack"),
        open_doc("open_plaintext", {"accessToken": "plain", "expiresIn": 3600, "meta": {"tokenType": "api_key"}},
                 ok({"token": {"accessToken": "plain", "expiresIn": 3600, "tokenType": "api_key"}})),
        {"name": "key_versions", "op": "document_key_versions", "document": v2doc, "expected": ok([1, 2])},
        {"name": "key_versions_platform", "op": "document_key_versions", "document": v1doc, "expected": ok([])},
        {"name": "iso8601_format", "op": "format_iso8601", "unix": 1700000000,
         "expected": ok("2023-11-14T22:13:20Z")},
        {"name": "iso8601_format_epoch", "op": "format_iso8601", "unix": 0, "expected": ok("1970-01-01T00:00:00Z")},
        {"name": "iso8601_parse", "op": "parse_iso8601", "text": "2023-11-14T22:13:20Z", "expected": ok(1700000000)},
        {"name": "iso8601_parse_fraction_offset", "op": "parse_iso8601", "text": "2023-11-14T23:13:20.5+01:00",
         "expected": ok(1700000000)},
        {"name": "iso8601_parse_leap_day", "op": "parse_iso8601", "text": "2024-02-29T00:00:00Z",
         "expected": ok(1709164800)},
        {"name": "iso8601_invalid_day", "op": "parse_iso8601", "text": "2023-02-29T00:00:00Z",
         "expected": err("Invalid")},
        {"name": "iso8601_no_zone", "op": "parse_iso8601", "text": "2023-11-14T22:13:20",
         "expected": err("Invalid")},
    ]
    write("documents.json",
          "Encrypted fields and documents. Our field format: kh1:<key version>:<std base64 of nonce(12) || "
          "ciphertext || tag(16)>, AES-256-GCM, AAD = \"keyholder/v1/field\" then service, field name and key "
          "version (decimal) each as u32 big-endian length + bytes. Platform v1: std base64 of IV || ct || tag, "
          "no AAD. expected.ok is the UTF-8 plaintext (decrypt), the field text (encrypt), or for "
          "open_document the /v1/credential body as JSON; errors are DocumentError variants ('Invalid' for a "
          "timestamp that does not parse). keys maps key version to std base64 key.",
          cases)


# ---------------------------------------------------------------- response signatures (issue 2)
def response_message(ts, method, path, request_id, status, body):
    return "\n".join(["keyholder-response-v1", str(ts), method + " " + path, request_id, str(status),
                      hashlib.sha256(body.encode()).hexdigest()])


def response_signatures():
    sk = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    other = Ed25519PrivateKey.from_private_bytes(bytes([7] * 32)).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(pk).hexdigest()[:16]
    identity = {"keyId": key_id, "publicKey": b64(pk), "algorithm": "Ed25519"}

    path = "/v1/credential?ticket=abc.def&service=github"
    body = '{"token":{"accessToken":"gho_exampletoken"}}'
    msg = response_message(NOW, "GET", path, "req_testfixture01", 200, body)
    sig = sk.sign(msg.encode())
    header = "keyId=%s,ts=%d,sig=%s" % (key_id, NOW, b64(sig))
    msg2 = response_message(NOW + 5, "POST", "/v1/storage", "", 404, "")
    header2 = "keyId=%s,ts=%d,sig=%s" % (key_id, NOW + 5, b64(sk.sign(msg2.encode())))
    L = 2 ** 252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + L
    malleated = "keyId=%s,ts=%d,sig=%s" % (key_id, NOW, b64(sig[:32] + s.to_bytes(32, "little")))
    bad_bits = b64(sig)
    assert bad_bits.endswith("==")
    noncanon = bad_bits[:-3] + chr(ord(bad_bits[-3]) ^ 1) + "=="

    def verify(name, expected, hdr=header, method="GET", p=path, rid="req_testfixture01", status=200, b=body,
               public=pk):
        return {"name": name, "op": "verify", "public_key_base64": b64(public), "header": hdr, "method": method,
                "path_and_query": p, "request_id": rid, "status": status, "body": b, "expected": expected}

    def parse(name, hdr, expected):
        return {"name": name, "op": "parse", "header": hdr, "expected": expected}

    cases = [
        {"name": "identity_document", "op": "identity", "seed_hex": bytes(range(32)).hex(), "expected": ok(identity)},
        {"name": "message", "op": "message", "ts": NOW, "method": "GET", "path_and_query": path,
         "request_id": "req_testfixture01", "status": 200, "body": body, "expected": ok(msg)},
        {"name": "sign", "op": "sign", "seed_hex": bytes(range(32)).hex(), "ts": NOW, "method": "GET",
         "path_and_query": path, "request_id": "req_testfixture01", "status": 200, "body": body,
         "expected": ok(header)},
        {"name": "sign_empty_request_id_and_body", "op": "sign", "seed_hex": bytes(range(32)).hex(), "ts": NOW + 5,
         "method": "POST", "path_and_query": "/v1/storage", "request_id": "", "status": 404, "body": "",
         "expected": ok(header2)},
        verify("verify_ok", ok({"keyId": key_id, "ts": NOW})),
        verify("verify_empty_request_id_and_body", ok({"keyId": key_id, "ts": NOW + 5}), hdr=header2,
               method="POST", p="/v1/storage", rid="", status=404, b=""),
        verify("different_status", err("BadSignature"), status=201),
        verify("different_body", err("BadSignature"), b=body.replace("gho", "ghp")),
        verify("different_request_id", err("BadSignature"), rid="req_testfixture02"),
        verify("different_path", err("BadSignature"), p="/v1/credential?ticket=abc.def&service=gitlab"),
        verify("different_method", err("BadSignature"), method="POST"),
        verify("different_ts", err("BadSignature"), hdr=header.replace("ts=%d" % NOW, "ts=%d" % (NOW + 1))),
        verify("malleated_signature_s_plus_l", err("BadSignature"), hdr=malleated),
        verify("other_key", err("UnknownKey"), public=other),
        verify("malformed_wins", err("Malformed"), hdr=header + ","),
        parse("parse_ok", header, ok({"keyId": key_id, "ts": NOW})),
        parse("parse_reordered", "ts=%d,keyId=%s,sig=%s" % (NOW, key_id, b64(sig)), err("Malformed")),
        parse("parse_spaces", "keyId=%s, ts=%d, sig=%s" % (key_id, NOW, b64(sig)), err("Malformed")),
        parse("parse_uppercase_key_id", header.replace(key_id, key_id.upper()) if key_id != key_id.upper()
              else header.replace("keyId=", "KEYID="), err("Malformed")),
        parse("parse_short_key_id", header.replace(key_id, key_id[:15]), err("Malformed")),
        parse("parse_ts_leading_zero", header.replace("ts=", "ts=0"), err("Malformed")),
        parse("parse_ts_not_number", header.replace("ts=%d" % NOW, "ts=now"), err("Malformed")),
        parse("parse_sig_unpadded", header.rstrip("="), err("Malformed")),
        parse("parse_sig_noncanonical", header.replace(bad_bits, noncanon), err("Malformed")),
        parse("parse_sig_urlsafe", header.replace("+", "-").replace("/", "_") if ("+" in header or "/" in header)
              else header.replace("sig=", "sig=-", 1), err("Malformed")),
        parse("parse_sig_short", "keyId=%s,ts=%d,sig=%s" % (key_id, NOW, b64(sig[:63])), err("Malformed")),
        parse("parse_extra_field", header + ",alg=ed25519", err("Malformed")),
        parse("parse_missing_field", "keyId=%s,ts=%d" % (key_id, NOW), err("Malformed")),
        parse("parse_empty", "", err("Malformed")),
    ] + batch_cases(sk, key_id, pk) + [
        {"name": "identity_verify_ok", "op": "identity_verify", "document": identity, "expected": ok(b64(pk))},
        {"name": "identity_wrong_key_id", "op": "identity_verify",
         "document": dict(identity, keyId=hashlib.sha256(other).hexdigest()[:16]), "expected": err("BadIdentity")},
        {"name": "identity_wrong_algorithm", "op": "identity_verify", "document": dict(identity, algorithm="ed25519"),
         "expected": err("BadIdentity")},
        {"name": "identity_short_key", "op": "identity_verify", "document": dict(identity, publicKey=b64(pk[:31])),
         "expected": err("BadIdentity")},
    ]
    write("response_signatures.json",
          "X-Keyholder-Signature: keyId=<16 hex>,ts=<unix s>,sig=<std base64 Ed25519 signature> over the six "
          "lines keyholder-response-v1, ts, '<METHOD> <path-and-query>', X-Request-Id, status, hex SHA-256 of "
          "the body, joined by \\n. seed_hex is the 32-byte Ed25519 seed; body is UTF-8. verify/parse "
          "expected.ok is {keyId, ts} (and batch '<index>/<size>' for the batch form); errors are "
          "ResponseSigError variants. Batch form (sign_batch: one signature over responses, salts_hex one "
          "16-byte salt each; expected.ok the headers in order): header + ',batch=<i>/<n>,salt=<std base64>,"
          "path=<std base64 of the RFC 9162 inclusion proof>', leaf SHA-256(0x00 || salt || message), node "
          "SHA-256(0x01 || left || right), signed message 'keyholder-response-batch-v1\\n<n>\\n<hex root>'.",
          cases)

# ---------------------------------------------------------------- streamed response signatures (issue 20)
def stream_head_message(ts, method, path, request_id, status, stream):
    return "\n".join(["keyholder-response-stream-v1", str(ts), method + " " + path, request_id, str(status),
                      stream, "body-follows"])


def stream_end_frame(sk, stream, body):
    digest = hashlib.sha256(body).hexdigest()
    msg = "\n".join(["keyholder-response-stream-end-v1", stream, str(len(body)), digest])
    frame = ": keyholder-end %016x %s %s\n\n" % (len(body), digest, b64(sk.sign(msg.encode())))
    assert len(frame) == 188
    return frame.encode()


def response_streams():
    seed = bytes(range(32))
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    other = Ed25519PrivateKey.from_private_bytes(bytes([7] * 32))
    key_id = hashlib.sha256(pk).hexdigest()[:16]
    stream = b64(bytes(range(100, 116)))
    stream2 = b64(bytes(range(200, 216)))
    path, rid = "/v1/proxy", "req_streamfixture1"
    head_msg = stream_head_message(NOW, "POST", path, rid, 200, stream)
    header = "keyId=%s,ts=%d,stream=%s,sig=%s" % (key_id, NOW, stream, b64(sk.sign(head_msg.encode())))
    body = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n" * 3
    frame = stream_end_frame(sk, stream, body)
    received = (body + frame).decode()

    def verify(name, expected, hdr=header, method="POST", p=path, r=rid, status=200, recv=received):
        return {"name": name, "op": "verify", "public_key_base64": b64(pk), "header": hdr, "method": method,
                "path_and_query": p, "request_id": r, "status": status, "received": recv, "expected": expected}

    other_frame = stream_end_frame(other, stream, body).decode()
    cases = [
        {"name": "head_message", "op": "head_message", "ts": NOW, "method": "POST", "path_and_query": path,
         "request_id": rid, "status": 200, "stream": stream, "expected": ok(head_msg)},
        {"name": "sign_head", "op": "sign_head", "seed_hex": seed.hex(), "ts": NOW, "method": "POST",
         "path_and_query": path, "request_id": rid, "status": 200, "stream": stream, "expected": ok(header)},
        {"name": "end_frame", "op": "end_frame", "seed_hex": seed.hex(), "stream": stream, "body": body.decode(),
         "expected": ok(frame.decode())},
        {"name": "end_frame_empty_body", "op": "end_frame", "seed_hex": seed.hex(), "stream": stream, "body": "",
         "expected": ok(stream_end_frame(sk, stream, b"").decode())},
        verify("verify_ok", ok(body.decode())),
        verify("verify_empty_body", ok(""), recv=stream_end_frame(sk, stream, b"").decode()),
        verify("truncated_no_frame", err("BadSignature"), recv=body.decode()),
        verify("truncated_inside_frame", err("BadSignature"), recv=received[:-1]),
        verify("truncated_body_kept_frame", err("BadSignature"), recv=(body[10:] + frame).decode()),
        verify("altered_body", err("BadSignature"), recv=received.replace("progress", "progresS", 1)),
        verify("appended_after_frame", err("BadSignature"), recv=received + "data: x\n\n"),
        verify("frame_of_other_stream", err("BadSignature"),
               recv=(body + stream_end_frame(sk, stream2, body)).decode()),
        verify("frame_of_other_key", err("BadSignature"), recv=body.decode() + other_frame),
        verify("head_other_status", err("BadSignature"), status=201),
        verify("head_other_request_id", err("BadSignature"), r="req_streamfixture2"),
        verify("head_other_path", err("BadSignature"), p="/v1/credential"),
        verify("head_plain_form", err("Malformed"), hdr="keyId=%s,ts=%d,sig=%s" % (
            key_id, NOW, b64(sk.sign(head_msg.encode())))),
        verify("head_stream_not_16_bytes", err("Malformed"), hdr=header.replace(stream, b64(bytes(15)))),
        verify("head_other_key_id", err("UnknownKey"), hdr=header.replace(key_id, "0" * 16)),
    ]
    write("response_streams.json",
          "Streamed form of X-Keyholder-Signature (response_stream). Head header keyId=<16 hex>,ts=<unix s>,"
          "stream=<std base64 of 16 bytes>,sig=<std base64> over the seven lines keyholder-response-stream-v1, "
          "ts, '<METHOD> <path-and-query>', X-Request-Id, status, stream, body-follows. The body is followed "
          "by the 188-byte end frame ': keyholder-end <16 hex length> <hex SHA-256 of the body> <std base64 "
          "sig>\\n\\n', sig over keyholder-response-stream-end-v1, stream, the decimal length, the hex hash. "
          "verify: 'received' is the body plus frame as received; expected.ok is the body without the frame; "
          "errors are ResponseSigError variants.",
          cases)


def merkle_root_and_proofs(leaves):
    """RFC 9162 2.1.1 tree hash and 2.1.3.1 inclusion proofs (leaf to root), written from the RFC."""
    if len(leaves) == 1:
        return leaves[0], [[]]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    left, left_proofs = merkle_root_and_proofs(leaves[:k])
    right, right_proofs = merkle_root_and_proofs(leaves[k:])
    root = hashlib.sha256(b"\x01" + left + right).digest()
    return root, [p + [right] for p in left_proofs] + [p + [left] for p in right_proofs]


def batch_cases(sk, key_id, pk):
    responses = [
        (NOW, "GET", "/v1/credential?ticket=a.b&service=github", "req_batch_1", 200, '{"token":"one"}'),
        (NOW, "POST", "/v1/proxy", "req_batch_2", 200, '{"status":200}'),
        (NOW + 1, "GET", "/v1/credential?ticket=c.d&service=slack", "req_batch_3", 403,
         '{"error":"forbidden","message":"no"}'),
    ]
    salts = [bytes([i] * 16) for i in (1, 2, 3)]
    messages = [response_message(*r) for r in responses]
    leaves = [hashlib.sha256(b"\x00" + salt + m.encode()).digest() for salt, m in zip(salts, messages)]
    root, proofs = merkle_root_and_proofs(leaves)
    sig = b64(sk.sign(("keyholder-response-batch-v1\n%d\n%s" % (len(leaves), root.hex())).encode()))
    headers = ["keyId=%s,ts=%d,sig=%s,batch=%d/%d,salt=%s,path=%s" % (
        key_id, r[0], sig, i, len(leaves), b64(salt), b64(b"".join(proof)))
        for i, (r, salt, proof) in enumerate(zip(responses, salts, proofs))]

    def verify(name, expected, i, hdr=None, status=None):
        ts, method, path, rid, st, body = responses[i]
        return {"name": name, "op": "verify", "public_key_base64": b64(pk), "header": hdr or headers[i],
                "method": method, "path_and_query": path, "request_id": rid,
                "status": st if status is None else status, "body": body, "expected": expected}

    head, rest = headers[2].split(",batch=")
    tail = rest.split(",", 1)[1]
    short_path = headers[0].split(",path=")[0] + ",path=" + b64(b"".join(proofs[0])[32:])
    return [
        {"name": "sign_batch", "op": "sign_batch", "seed_hex": bytes(range(32)).hex(),
         "responses": [{"ts": r[0], "method": r[1], "path_and_query": r[2], "request_id": r[3], "status": r[4],
                        "body": r[5]} for r in responses],
         "salts_hex": [salt.hex() for salt in salts], "expected": ok(headers)},
    ] + [verify("batch_verify_%d" % i, ok({"keyId": key_id, "ts": responses[i][0], "batch": "%d/3" % i}), i)
         for i in range(3)] + [
        verify("batch_other_responses_header", err("BadSignature"), 0, hdr=headers[1]),
        verify("batch_different_status", err("BadSignature"), 2, status=200),
        verify("batch_other_index", err("BadSignature"), 2, hdr="%s,batch=1/3,%s" % (head, tail)),
        verify("batch_other_size", err("BadSignature"), 2, hdr="%s,batch=2/4,%s" % (head, tail)),
        verify("batch_proof_too_short", err("BadSignature"), 0, hdr=short_path),
        {"name": "parse_batch_path_empty", "op": "parse", "header": headers[2].split(",path=")[0] + ",path=",
         "expected": err("Malformed")},
        verify("batch_without_batch_fields", err("BadSignature"), 2, hdr=head),
        {"name": "parse_batch_size_one", "op": "parse", "header": "%s,batch=0/1,%s" % (head, tail),
         "expected": err("Malformed")},
        {"name": "parse_batch_size_65", "op": "parse", "header": "%s,batch=2/65,%s" % (head, tail),
         "expected": err("Malformed")},
        {"name": "parse_batch_index_not_below_size", "op": "parse", "header": "%s,batch=3/3,%s" % (head, tail),
         "expected": err("Malformed")},
        {"name": "parse_batch_index_leading_zero", "op": "parse", "header": "%s,batch=02/3,%s" % (head, tail),
         "expected": err("Malformed")},
        {"name": "parse_batch_path_not_whole_hashes", "op": "parse",
         "header": headers[2].split(",path=")[0] + ",path=" + b64(b"".join(proofs[2])[1:]),
         "expected": err("Malformed")},
        {"name": "parse_batch_salt_short", "op": "parse",
         "header": headers[2].replace(b64(salts[2]), b64(salts[2][:15])), "expected": err("Malformed")},
    ]


# ---------------------------------------------------------------- request ids
def request_ids():
    cases = [{"name": name, "op": "is_valid", "id": value, "expected": ok(valid)} for name, value, valid in [
        ("platform_style", "req_testfixture01", True),
        ("all_allowed_punctuation", "a.b_c:d-e", True),
        ("max_length", "a" * 128, True),
        ("too_long", "a" * 129, False),
        ("empty", "", False),
        ("space", "req 1", False),
        ("newline", "req\n1", False),
        ("slash", "req/1", False),
        ("non_ascii", "réq", False),
    ]]
    write("request_ids.json", "Request ids a keyholder echoes: 1-128 chars of [A-Za-z0-9._:-].", cases)


# ---------------------------------------------------------------- request envelopes (issue 10)
PLATFORM_SEED = bytes(range(32, 64))
PLATFORM_SEED_2 = bytes([0x42] * 32)
ENVELOPE_NONCE = "00112233445566778899aabbccddeeff"


def raw_public(seed):
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def envelope_message(ts, nonce, method, path, body):
    return "\n".join(["keyholder-request-v1", str(ts), nonce, method + " " + path,
                      hashlib.sha256(body.encode()).hexdigest()])


def envelope_header(seed, ts, nonce, method, path, body):
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(envelope_message(ts, nonce, method, path, body).encode())
    kid = hashlib.sha256(raw_public(seed)).hexdigest()[:16]
    return "keyId=%s,ts=%d,nonce=%s,sig=%s" % (kid, ts, nonce, b64(sig))


def envelopes():
    pk, pk2 = raw_public(PLATFORM_SEED), raw_public(PLATFORM_SEED_2)
    kid = hashlib.sha256(pk).hexdigest()[:16]
    path = "/v1/storage"
    header = envelope_header(PLATFORM_SEED, NOW, ENVELOPE_NONCE, "POST", path, GOLDEN_BODY)
    sig_b64 = header.split(",sig=")[1]
    sig = base64.b64decode(sig_b64)
    L = 2 ** 252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + L
    malleated = header.replace(sig_b64, b64(sig[:32] + s.to_bytes(32, "little")))
    query_path = "/v1/credential?ticket=kh2.abc.def&service=github"
    header_get = envelope_header(PLATFORM_SEED, NOW + 7, "ffeeddccbbaa99887766554433221100", "GET", query_path, "")
    ok_parsed = {"keyId": kid, "ts": NOW, "nonce": ENVELOPE_NONCE}

    def verify(name, expected, hdr=header, method="POST", p=path, body=GOLDEN_BODY, now=NOW, keys=None):
        return {"name": name, "op": "verify", "public_keys_base64": [b64(k) for k in (keys or [pk])],
                "header": hdr, "method": method, "path_and_query": p, "body": body, "now": now,
                "max_skew_secs": 300, "expected": expected}

    def parse(name, hdr, expected):
        return {"name": name, "op": "parse", "header": hdr, "expected": expected}

    def pkey(name, text, expected):
        return {"name": name, "op": "platform_public_key", "input": text, "expected": expected}

    identity = {"keyId": kid, "publicKey": b64(pk), "algorithm": "Ed25519"}
    cases = [
        {"name": "message", "op": "message", "ts": NOW, "nonce": ENVELOPE_NONCE, "method": "POST",
         "path_and_query": path, "body": GOLDEN_BODY,
         "expected": ok(envelope_message(NOW, ENVELOPE_NONCE, "POST", path, GOLDEN_BODY))},
        {"name": "sign", "op": "sign", "seed_hex": PLATFORM_SEED.hex(), "ts": NOW, "nonce": ENVELOPE_NONCE,
         "method": "POST", "path_and_query": path, "body": GOLDEN_BODY, "expected": ok(header)},
        {"name": "sign_get_with_query_empty_body", "op": "sign", "seed_hex": PLATFORM_SEED.hex(), "ts": NOW + 7,
         "nonce": "ffeeddccbbaa99887766554433221100", "method": "GET", "path_and_query": query_path, "body": "",
         "expected": ok(header_get)},
        verify("verify_ok", ok(ok_parsed)),
        verify("verify_ok_second_of_two_keys", ok(ok_parsed), keys=[pk2, pk]),
        verify("verify_get_with_query_empty_body", ok({"keyId": kid, "ts": NOW + 7,
                                                       "nonce": "ffeeddccbbaa99887766554433221100"}),
               hdr=header_get, method="GET", p=query_path, body=""),
        verify("verify_skew_boundary_ok", ok(ok_parsed), now=NOW + 300),
        verify("verify_skew_boundary_past_ok", ok(ok_parsed), now=NOW - 300),
        verify("stale_after", err("Stale"), now=NOW + 301),
        verify("stale_before", err("Stale"), now=NOW - 301),
        verify("body_swapped", err("BadSignature"), body=GOLDEN_BODY.replace("github", "gitlab")),
        verify("body_whitespace", err("BadSignature"), body=GOLDEN_BODY + " "),
        verify("different_path", err("BadSignature"), p="/v1/proxy"),
        verify("different_query", err("BadSignature"), p=path + "?x=1"),
        verify("different_method", err("BadSignature"), method="PUT"),
        verify("different_ts", err("BadSignature"), hdr=header.replace("ts=%d" % NOW, "ts=%d" % (NOW + 1))),
        verify("different_nonce", err("BadSignature"), hdr=header.replace(ENVELOPE_NONCE, "0" * 32)),
        verify("malleated_signature_s_plus_l", err("BadSignature"), hdr=malleated),
        verify("unknown_key", err("UnknownKey"), keys=[pk2]),
        verify("unknown_key_before_stale", err("UnknownKey"), keys=[pk2], now=NOW + 1000),
        verify("stale_before_signature", err("Stale"), body="tampered", now=NOW + 1000),
        verify("missing_header", err("Missing"), hdr=None),
        verify("malformed_wins", err("Malformed"), hdr=header + ",", keys=[pk2]),
        verify("hmac_header_value_is_malformed", err("Malformed"), hdr="sha256=" + GOLDEN_SIG),
        parse("parse_ok", header, ok(ok_parsed)),
        parse("parse_reordered", "ts=%d,keyId=%s,nonce=%s,sig=%s" % (NOW, kid, ENVELOPE_NONCE, sig_b64),
              err("Malformed")),
        parse("parse_spaces", header.replace(",", ", "), err("Malformed")),
        parse("parse_uppercase_nonce", header.replace(ENVELOPE_NONCE, ENVELOPE_NONCE.upper()), err("Malformed")),
        parse("parse_short_nonce", header.replace(ENVELOPE_NONCE, ENVELOPE_NONCE[:30]), err("Malformed")),
        parse("parse_long_nonce", header.replace(ENVELOPE_NONCE, ENVELOPE_NONCE + "00"), err("Malformed")),
        parse("parse_short_key_id", header.replace(kid, kid[:15]), err("Malformed")),
        parse("parse_ts_leading_zero", header.replace("ts=", "ts=0"), err("Malformed")),
        parse("parse_ts_plus", header.replace("ts=", "ts=+"), err("Malformed")),
        parse("parse_sig_unpadded", header.rstrip("="), err("Malformed")),
        parse("parse_sig_urlsafe", header.replace(sig_b64, sig_b64.replace("+", "-").replace("/", "_"))
              if ("+" in sig_b64 or "/" in sig_b64) else header.replace("sig=", "sig=-", 1), err("Malformed")),
        parse("parse_sig_short", header.replace(sig_b64, b64(sig[:63])), err("Malformed")),
        parse("parse_extra_field", header + ",alg=ed25519", err("Malformed")),
        parse("parse_missing_nonce", "keyId=%s,ts=%d,sig=%s" % (kid, NOW, sig_b64), err("Malformed")),
        parse("parse_empty", "", err("Malformed")),
        parse("parse_too_long", header + "x" * 200, err("Malformed")),
        pkey("public_key_base64", b64(pk), ok({"keyId": kid, "publicKey": b64(pk)})),
        pkey("public_key_base64_newline", b64(pk) + "\n", ok({"keyId": kid, "publicKey": b64(pk)})),
        pkey("public_key_identity_document", compact(identity), ok({"keyId": kid, "publicKey": b64(pk)})),
        pkey("public_key_document_wrong_key_id", compact(dict(identity, keyId="0" * 16)), err("Invalid")),
        pkey("public_key_document_wrong_algorithm", compact(dict(identity, algorithm="ed25519")), err("Invalid")),
        pkey("public_key_short", b64(pk[:31]), err("Encoding")),
        pkey("public_key_unpadded", b64(pk).rstrip("="), err("Encoding")),
        pkey("public_key_weak_identity_point", b64(bytes([1] + [0] * 31)), err("Invalid")),
    ]
    write("envelopes.json",
          "X-Keyholder-Envelope: keyId=<16 hex>,ts=<unix s>,nonce=<32 lowercase hex>,sig=<std base64 Ed25519 "
          "signature> over the five lines keyholder-request-v1, ts, nonce, '<METHOD> <path-and-query>', hex "
          "SHA-256 of the body, joined by \\n. seed_hex is the platform's 32-byte Ed25519 seed; body is UTF-8; "
          "public_keys_base64 are the active platform keys. verify/parse expected.ok is {keyId, ts, nonce}; "
          "errors are EnvelopeError variants (nonce replay is the server's and not part of these cases). "
          "platform_public_key parses a key file's text (std base64 or identity document): expected.ok is "
          "{keyId, publicKey}, errors are PlatformKeyError variants.",
          cases)


def kh2(claims_json, seed=PLATFORM_SEED):
    signed = "kh2." + b64url(claims_json.encode())
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(signed.encode())
    return signed + "." + b64url(sig)


def kh2_tickets():
    pk, pk2 = raw_public(PLATFORM_SEED), raw_public(PLATFORM_SEED_2)
    golden_claims = {"sub": "user_test", "svc": "github", "pur": "agent_credential", "iat": 1700000000,
                     "exp": 9999999999, "nonce": "deadbeefdeadbeefdeadbeefdeadbeef", "aid": "agent_test"}
    golden = kh2(compact(golden_claims))
    proxy_claims = {"sub": "user_1", "svc": "github", "pur": "proxy", "iat": NOW, "exp": NOW + 60,
                    "nonce": "n-proxy-1", "pid": "proxy_1"}
    proxy = kh2(compact(proxy_claims))
    payload, sig = proxy.split(".")[1:]
    other = kh2(compact(dict(proxy_claims, svc="gitlab")))

    base = {"sub": "u", "svc": "s", "pur": "proxy", "iat": NOW, "exp": NOW + 60, "nonce": "n1"}

    def verify(name, ticket_text, expected, now=NOW, keys=None, cap=3600):
        return {"name": name, "op": "verify", "public_keys_base64": [b64(k) for k in (keys or [pk])],
                "ticket": ticket_text, "now": now, "max_lifetime_secs": cap, "expected": expected}

    sig_std = b64(base64.urlsafe_b64decode(sig + "=="))
    cases = [
        {"name": "golden_encode", "op": "encode", "seed_hex": PLATFORM_SEED.hex(), "claims": golden_claims,
         "expected": ok(golden)},
        {"name": "proxy_encode", "op": "encode", "seed_hex": PLATFORM_SEED.hex(), "claims": proxy_claims,
         "expected": ok(proxy)},
        verify("golden_verify", golden, ok(golden_claims), cap=I64_MAX),
        verify("golden_refused_by_default_lifetime_cap", golden, err("LifetimeTooLong")),
        verify("proxy_verify", proxy, ok(proxy_claims)),
        verify("second_of_two_keys", proxy, ok(proxy_claims), keys=[pk2, pk]),
        verify("wrong_key", proxy, err("BadSignature"), keys=[pk2]),
        verify("expired", proxy, err("Expired"), now=NOW + 61),
        verify("expiry_boundary_ok", proxy, ok(proxy_claims), now=NOW + 60),
        verify("payload_swapped_under_signature", other.rsplit(".", 1)[0] + "." + sig, err("BadSignature")),
        verify("signature_padded", proxy + "==", err("BadSignature")),
        verify("signature_standard_base64_padded", "kh2.%s.%s" % (payload, sig_std), err("BadSignature")),
        verify("signature_short", "kh2.%s.%s" % (payload, sig[:-2]), err("BadSignature")),
        verify("platform_hmac_ticket", GOLDEN_TICKET, err("Malformed")),
        verify("wrong_prefix", "kh1." + payload + "." + sig, err("Malformed")),
        verify("uppercase_prefix", "KH2." + payload + "." + sig, err("Malformed")),
        verify("four_parts", proxy + ".x", err("Malformed")),
        verify("empty_payload", "kh2.." + sig, err("Malformed")),
        verify("empty", "", err("Malformed")),
        verify("too_long", "kh2." + "a" * 8200 + "." + sig, err("Malformed")),
        verify("payload_padded", kh2_from_payload(payload + "="), err("Undecodable")),
        verify("payload_trailing_data", kh2(compact(proxy_claims) + "x"), err("Undecodable")),
        verify("payload_not_object", kh2("[1]"), err("Undecodable")),
        verify("missing_exp_is_expired", kh2(compact({"iat": NOW, "nonce": "n"})), err("Expired")),
        verify("missing_nonce", kh2(compact({"iat": NOW, "exp": NOW + 60})), err("MissingNonce")),
        verify("empty_nonce", kh2(compact({"iat": NOW, "exp": NOW + 60, "nonce": ""})), err("MissingNonce")),
        verify("lifetime_over_cap", kh2(compact({"iat": NOW, "exp": NOW + 3601, "nonce": "n"})),
               err("LifetimeTooLong")),
        verify("lifetime_at_cap", kh2(compact({"iat": NOW, "exp": NOW + 3600, "nonce": "n"})),
               ok({"sub": "", "svc": "", "pur": "", "iat": NOW, "exp": NOW + 3600, "nonce": "n"})),
    ] + [
        verify(name, kh2(compact(dict(base, **claims))), expected,
               cap=kw.get("max_lifetime_secs", 3600))
        for name, claims, expected, kw in iat_and_extreme_cases(ok)
    ]
    write("kh2_tickets.json",
          "kh2 tickets: kh2.<unpadded base64url of the compact JSON claims>.<unpadded base64url of the Ed25519 "
          "signature over the ASCII of 'kh2.' + payload>, signed with the platform's key (seed_hex); verified "
          "against the active platform keys (public_keys_base64, any may verify). Same claims and checks as "
          "tickets.json. op encode: expected.ok is the ticket. op verify: expected.ok is the claims object "
          "(absent claims omitted, missing strings as \"\"), else the TicketError variant; nonce replay and "
          "scope are not part of these cases.",
          cases)


def kh2_from_payload(payload, seed=PLATFORM_SEED):
    signed = "kh2." + payload
    return signed + "." + b64url(Ed25519PrivateKey.from_private_bytes(seed).sign(signed.encode()))


# ---------------------------------------------------------------- otpauth links (PROTOCOL.md 7.5)
OTP_MAX_URI = 2048
OTP_MAX_SECRET = 256
OTP_MAX_TEXT = 256


def otp_unquote(text):
    """Strict percent-decoding to UTF-8; None on a bad escape or bad UTF-8. '+' stays a plus."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        if raw[i] == 0x25:
            pair = raw[i + 1:i + 3].decode("ascii", "replace")
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                return None
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


class OtpError(Exception):
    pass


def otp_text(raw):
    text = otp_unquote(raw)
    if text is None or len(text.encode()) > OTP_MAX_TEXT or any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in text):
        raise OtpError("BadText")
    return text


def otp_parse(uri):
    """The otpauth rules of protocol/src/otpauth.rs, written again from its module doc."""
    if len(uri.encode()) > OTP_MAX_URI:
        raise OtpError("TooLong")
    if uri[:10].lower() != "otpauth://":
        raise OtpError("WrongScheme")
    rest = uri[10:]
    if "#" in rest:
        raise OtpError("Malformed")
    if "/" not in rest:
        raise OtpError("Malformed")
    kind, rest = rest.split("/", 1)
    if kind.lower() != "totp":
        raise OtpError("NotTotp")
    label, _, query = rest.partition("?")
    label = otp_text(label)
    if ":" in label:
        label_issuer, account = label.split(":", 1)
        account = account.lstrip(" ")
    else:
        label_issuer, account = None, label
    params = {}
    for piece in query.split("&"):
        if not piece:
            continue
        if "=" not in piece:
            raise OtpError("Malformed")
        name, value = piece.split("=", 1)
        if name not in ("secret", "issuer", "algorithm", "digits", "period"):
            continue
        if name in params:
            raise OtpError("DuplicateParameter")
        params[name] = value
    if "secret" not in params:
        raise OtpError("MissingSecret")
    secret = otp_unquote(params["secret"])
    if secret is None:
        raise OtpError("BadSecret")
    unpadded = secret.rstrip("=")
    if (unpadded != secret and len(secret) % 8) or not unpadded or len(unpadded) > OTP_MAX_SECRET:
        raise OtpError("BadSecret")
    upper = unpadded.upper()
    if any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for c in upper):
        raise OtpError("BadSecret")
    try:
        seed = base64.b32decode(upper + "=" * (-len(upper) % 8))
    except Exception:
        raise OtpError("BadSecret")
    if base64.b32encode(seed).decode().rstrip("=") != upper:
        raise OtpError("BadSecret")  # unused trailing bits set
    issuer = otp_text(params["issuer"]) if "issuer" in params else label_issuer
    algorithm = "SHA1"
    if "algorithm" in params:
        a = otp_unquote(params["algorithm"])
        if a is None or a.upper() not in ("SHA1", "SHA256", "SHA512"):
            raise OtpError("BadAlgorithm")
        algorithm = a.upper()

    def number(name, default, lo, hi, error):
        if name not in params:
            return default
        v = params[name]
        if not v or len(v) > 10 or any(c not in "0123456789" for c in v) or not lo <= int(v) <= hi:
            raise OtpError(error)
        return int(v)

    digits = number("digits", 6, 6, 8, "BadDigits")
    period = number("period", 30, 1, 3600, "BadPeriod")
    return {"secret": upper, "issuer": issuer, "accountName": account, "algorithm": algorithm,
            "digits": digits, "period": period}


def otpauth():
    def case(name, uri):
        try:
            expected = ok(otp_parse(uri))
        except OtpError as e:
            expected = err(str(e))
        return {"name": name, "op": "parse", "uri": uri, "expected": expected}

    seed = base64.b32encode(b"12345678901234567890").decode()  # RFC 6238's SHA1 seed
    assert seed == "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    cases = [
        case("minimal_defaults", "otpauth://totp/alice?secret=" + seed),
        case("issuer_label_and_parameter", "otpauth://totp/ACME%20Co:john%40example.com?secret=JBSWY3DPEHPK3PXP"
             "&issuer=ACME%20Co&algorithm=SHA256&digits=8&period=60"),
        case("issuer_from_label_only", "otpauth://totp/GitHub:%20me?secret=JBSWY3DPEHPK3PXP"),
        case("parameter_issuer_wins", "otpauth://totp/Old:me?secret=JBSWY3DPEHPK3PXP&issuer=New"),
        case("lowercase_seed_normalised", "otpauth://totp/a?secret=jbswy3dpehpk3pxp"),
        case("padded_seed", "otpauth://totp/a?secret=GEZDGNBVGY%3D%3D%3D%3D%3D%3D"),
        case("padding_literal", "otpauth://totp/a?secret=MZXW6===&digits=7"),
        case("uppercase_scheme_and_type", "OTPAUTH://TOTP/a?secret=JBSWY3DP"),
        case("algorithm_case_insensitive", "otpauth://totp/a?secret=JBSWY3DP&algorithm=sha512"),
        case("plus_stays_plus", "otpauth://totp/a+b?secret=JBSWY3DP&issuer=x+y"),
        case("unknown_parameters_ignored", "otpauth://totp/a?secret=JBSWY3DP&image=https%3A%2F%2Fx&counter=zz"),
        case("empty_pieces_skipped", "otpauth://totp/a?&secret=JBSWY3DP&&"),
        case("digits_6_and_period_1", "otpauth://totp/a?secret=JBSWY3DP&digits=6&period=1"),
        case("digits_8_and_period_3600", "otpauth://totp/a?secret=JBSWY3DP&digits=8&period=3600"),
        case("unicode_label", "otpauth://totp/%C3%89cole:%C3%A9l%C3%A8ve?secret=JBSWY3DP"),
        # refusals named by issue 18
        case("wrong_scheme", "https://totp/a?secret=JBSWY3DP"),
        case("wrong_scheme_otpauth_without_slashes", "otpauth:totp/a?secret=JBSWY3DP"),
        case("hotp", "otpauth://hotp/a?secret=JBSWY3DP&counter=0"),
        case("bad_base32_character", "otpauth://totp/a?secret=JBSWY3D1"),
        case("bad_base32_impossible_length", "otpauth://totp/a?secret=JBS"),
        case("bad_base32_trailing_bits", "otpauth://totp/a?secret=AB"),
        case("bad_base32_wrong_padding", "otpauth://totp/a?secret=MZXW6=="),
        case("bad_base32_empty", "otpauth://totp/a?secret="),
        case("digits_5", "otpauth://totp/a?secret=JBSWY3DP&digits=5"),
        case("digits_9", "otpauth://totp/a?secret=JBSWY3DP&digits=9"),
        case("digits_not_decimal", "otpauth://totp/a?secret=JBSWY3DP&digits=%36"),
        case("period_0", "otpauth://totp/a?secret=JBSWY3DP&period=0"),
        case("period_3601", "otpauth://totp/a?secret=JBSWY3DP&period=3601"),
        case("period_negative", "otpauth://totp/a?secret=JBSWY3DP&period=-30"),
        case("unknown_algorithm", "otpauth://totp/a?secret=JBSWY3DP&algorithm=MD5"),
        case("missing_secret", "otpauth://totp/a?issuer=x"),
        case("duplicate_secret", "otpauth://totp/a?secret=JBSWY3DP&secret=MZXW6YQ"),
        case("no_type_separator", "otpauth://totp"),
        case("fragment", "otpauth://totp/a?secret=JBSWY3DP#x"),
        case("parameter_without_value", "otpauth://totp/a?secret=JBSWY3DP&digits"),
        case("bad_percent_escape_in_label", "otpauth://totp/a%2?secret=JBSWY3DP"),
        case("control_character_in_issuer", "otpauth://totp/a?secret=JBSWY3DP&issuer=x%0Ay"),
        case("issuer_too_long", "otpauth://totp/a?secret=JBSWY3DP&issuer=" + "i" * 257),
        case("seed_too_long", "otpauth://totp/a?secret=" + "A" * 264),
        case("link_too_long", "otpauth://totp/a?secret=JBSWY3DP&image=" + "x" * 2048),
    ]
    expected_errors = {
        "wrong_scheme": "WrongScheme", "hotp": "NotTotp", "bad_base32_character": "BadSecret",
        "digits_5": "BadDigits", "digits_9": "BadDigits", "period_0": "BadPeriod",
        "period_3601": "BadPeriod", "unknown_algorithm": "BadAlgorithm",
    }
    for c in cases:
        if c["name"] in expected_errors:
            assert c["expected"] == err(expected_errors[c["name"]]), c
    write("otpauth.json",
          "otpauth://totp/ links (PROTOCOL.md 7.5) as sealed at /v1/store. op parse: ok is "
          "{secret (upper-case base32, no padding), issuer (or null), accountName, algorithm, digits, period}; "
          "error is the OtpauthError variant.",
          cases)


def ticket_constraints():
    def creation(name, cid, stored, expected):
        claims = {"sub": "u", "svc": "s", "pur": "agent_credential", "iat": NOW, "exp": NOW + 60, "nonce": "n"}
        if cid is not ABSENT:
            claims["cid"] = cid
        return {"name": name, "op": "check_creation", "claims": claims, "stored_creation_id": stored,
                "expected": expected}

    def store(name, mode, cid, expected):
        claims = {"sub": "u", "svc": "s", "pur": "store", "iat": NOW, "exp": NOW + 60, "nonce": "n"}
        if mode is not ABSENT:
            claims["mode"] = mode
        if cid is not ABSENT:
            claims["cid"] = cid
        return {"name": name, "op": "store_constraints", "claims": claims, "expected": expected}

    cases = [
        creation("no_cid_no_creation_id", ABSENT, None, ok(None)),
        creation("no_cid_any_creation_id", ABSENT, "c1", ok(None)),
        creation("cid_matches", "c1", "c1", ok(None)),
        creation("cid_differs", "other", "c1", err("StaleCreation")),
        creation("cid_but_token_has_none", "c1", None, err("StaleCreation")),
        creation("cid_empty", "", "", err("StaleCreation")),
        creation("cid_not_a_string", 1, "1", err("StaleCreation")),
        creation("cid_null_is_absent", None, "c1", ok(None)),
        creation("cid_case_differs", "C1", "c1", err("StaleCreation")),
        store("store_defaults", ABSENT, ABSENT, ok({"createOnly": False, "creationId": None})),
        store("store_create_with_cid", "create", "c7", ok({"createOnly": True, "creationId": "c7"})),
        store("store_overwrite", "overwrite", ABSENT, ok({"createOnly": False, "creationId": None})),
        store("store_mode_unknown", "replace", ABSENT, err("InvalidMode")),
        store("store_mode_case", "Create", ABSENT, err("InvalidMode")),
        store("store_mode_not_a_string", 1, ABSENT, err("InvalidMode")),
        store("store_mode_null_is_absent", None, ABSENT, ok({"createOnly": False, "creationId": None})),
        store("store_cid_empty", ABSENT, "", err("InvalidCreationId")),
        store("store_cid_not_a_string", ABSENT, 5, err("InvalidCreationId")),
        store("store_cid_null_is_absent", ABSENT, None, ok({"createOnly": False, "creationId": None})),
    ]
    write("ticket_constraints.json",
          "Ticket constraints of protocol 2.4.0 (PROTOCOL.md 7.3). op check_creation: ok null when the ticket may "
          "use a token whose creationId is stored_creation_id (null: none); op store_constraints: ok "
          "{createOnly, creationId}; errors are ConstraintError variants. A null claim counts as absent.",
          cases)


ABSENT = object()


if __name__ == "__main__":
    request_signatures()
    binding()
    tickets()
    documents()
    response_signatures()
    response_streams()
    request_ids()
    envelopes()
    kh2_tickets()
    otpauth()
    ticket_constraints()
