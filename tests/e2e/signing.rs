//! Decrypt-and-sign for keys that are not bearer tokens (issue 24), against independent verifiers
//! on loopback: AWS SigV4 checked by botocore (`tests/sigv4/verifier.py`), client-certificate TLS
//! by an openssl server that requires a certificate from a test CA, JWT assertions by a token
//! endpoint and an upstream that verify them with the public key. Hostile-platform attacks: a
//! ticket steering the signed request elsewhere, platform-written documents and headers trying to
//! change what is signed, malformed key material; `inject-only` refusing every key type.

use base64::Engine as _;
use clap::Parser;
use keyholder::cli::sign_config::{SignConfigAction, SignConfigArgs};
use keyholder_protocol::Purpose;
use keyholder_tests::certs::TestCert;
use keyholder_tests::mtls::{MtlsServer, TestCa};
use keyholder_tests::sigv4::SigV4Verifier;
use keyholder_tests::upstream::{MockServer, Reply, TestRsa};
use keyholder_tests::*;
use serde_json::{json, Value};
use sha2::Digest as _;

const KEY_ID: &str = "AKIDEXAMPLE0000001";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const TEMP_KEY_ID: &str = "ASIATEMPEXAMPLE0002";
const TEMP_SECRET: &str = "tempSecret/0123456789abcdefghijklmnopqrstuv";
const TEMP_TOKEN: &str = "FwoGZXIvYXdzEXAMPLEsessionTOKEN0123456789abcdef";

#[derive(Parser)]
struct SignConfigCli {
    #[command(subcommand)]
    action: SignConfigAction,
}

/// `keyholder sign-config LINE --data-dir ...`, LINE split at white space.
async fn sign_config(kh: &Keyholder, line: &str) -> anyhow::Result<String> {
    sign_config_args(kh, &line.split_whitespace().collect::<Vec<_>>()).await
}

/// `keyholder sign-config ARGS --data-dir ...`, as the owner runs it.
async fn sign_config_args(kh: &Keyholder, args: &[&str]) -> anyhow::Result<String> {
    kh.owner_command("sign-config", args, |argv| {
        let parsed = SignConfigCli::try_parse_from(&argv)?;
        keyholder::cli::sign_config::run(&SignConfigArgs {
            action: parsed.action,
        })
    })
    .await
}

async fn keyholder() -> Keyholder {
    let mut kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    kh.bind().await;
    kh
}

async fn audit_results(kh: &Keyholder) -> Vec<String> {
    kh.audit_entries(None)
        .await
        .into_iter()
        .map(|e| e.event.result)
        .collect()
}

fn aws_credential() -> Value {
    json!({"tokenType": "aws", "accessKeyId": KEY_ID, "secretAccessKey": SECRET})
}

async fn aws_keyholder(verifier: &SigV4Verifier, service: &str, region: &str) -> Keyholder {
    let kh = keyholder().await;
    assert_eq!(kh.store("aws", aws_credential()).await.status, 200);
    sign_config(
        &kh,
        &format!("set aws --aws-region {region} --aws-service {service}"),
    )
    .await
    .unwrap();
    kh.egress("allow", "aws", &[&verifier.origin()], false)
        .await;
    kh
}

fn verifier_config(service: &str, region: &str) -> Value {
    json!({
        "region": region,
        "service": service,
        "keys": [
            {"accessKeyId": KEY_ID, "secretAccessKey": SECRET},
            {"accessKeyId": TEMP_KEY_ID, "secretAccessKey": TEMP_SECRET, "sessionToken": TEMP_TOKEN},
        ],
    })
}

fn upstream_status(answer: &Answer) -> u16 {
    answer.header("x-upstream-status").unwrap().parse().unwrap()
}

// ---------------------------------------------------------------- AWS SigV4

#[tokio::test]
async fn aws_s3_list_and_put_are_signed_as_botocore_verifies() {
    let verifier = SigV4Verifier::start(verifier_config("s3", "us-east-1")).await;
    let kh = aws_keyholder(&verifier, "s3", "us-east-1").await;
    // The S3 list of the README, through the proxy: no header template at all.
    let list = kh
        .proxy(
            "aws",
            json!({"url": verifier.url("/?list-type=2&prefix=hello"), "method": "GET"}),
            json!({}),
        )
        .await;
    list.assert_ok();
    assert!(String::from_utf8_lossy(&list.body).contains("<Key>hello.txt</Key>"));
    // A PUT with a body and a path that needs encoding.
    let body = b"hello world, signed";
    let put = kh
        .proxy(
            "aws",
            json!({
                "url": verifier.url("/demo/a%20file%2Bplus.txt"),
                "method": "PUT",
                "headers": {"Content-Type": "text/plain", "x-amz-meta-owner": "alice"},
                "body": base64::engine::general_purpose::STANDARD.encode(body),
            }),
            json!({}),
        )
        .await;
    put.assert_ok();
    let records = verifier.records().await;
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record["ok"], true, "{record}");
        let headers = &record["headers"];
        let auth = headers["authorization"].as_str().unwrap();
        assert!(auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/")));
        assert!(auth.contains("/us-east-1/s3/aws4_request"));
        assert!(!record.to_string().contains(SECRET));
    }
    assert_eq!(
        records[1]["headers"]["x-amz-content-sha256"],
        hex::encode(sha2::Sha256::digest(body))
    );
    // The audit entry names the key id and scope, never the secret or a signature.
    let results = audit_results(&kh).await;
    let signed: Vec<&String> = results
        .iter()
        .filter(|r| r.contains("signed=aws-sigv4"))
        .collect();
    assert_eq!(signed.len(), 2, "{results:?}");
    assert!(signed[0].contains(&format!("key={KEY_ID} scope=us-east-1/s3")));
    for r in &results {
        assert!(!r.contains(SECRET) && !r.contains("Signature="), "{r}");
    }
}

#[tokio::test]
async fn aws_unsigned_payload_only_for_s3_and_only_when_the_owner_chose_it() {
    let verifier = SigV4Verifier::start(verifier_config("s3", "us-east-1")).await;
    let kh = aws_keyholder(&verifier, "s3", "us-east-1").await;
    sign_config(&kh, "set aws --aws-unsigned-payload")
        .await
        .unwrap();
    let put = kh
        .proxy(
            "aws",
            json!({"url": verifier.url("/demo/big.bin"), "method": "PUT", "body": "AAECAw=="}),
            json!({}),
        )
        .await;
    put.assert_ok();
    let record = verifier.records().await.remove(0);
    assert_eq!(record["ok"], true, "{record}");
    assert_eq!(
        record["headers"]["x-amz-content-sha256"],
        "UNSIGNED-PAYLOAD"
    );
    // The CLI refuses it for another signing service.
    assert!(sign_config(
        &kh,
        "set other --aws-service execute-api --aws-unsigned-payload"
    )
    .await
    .is_err());
}

#[tokio::test]
async fn a_lone_session_token_field_is_sealed_but_not_an_aws_key() {
    let kh = keyholder().await;
    let stored = kh
        .store(
            "app",
            json!({"accessToken": "gho_app_session_1", "sessionToken": "opaque-session-value"}),
        )
        .await;
    assert_eq!(stored.status, 200);
    assert!(!String::from_utf8_lossy(&stored.body).contains("opaque-session-value"));
}

#[tokio::test]
async fn aws_secret_is_sealed_never_listed_or_echoed() {
    let kh = keyholder().await;
    let stored = kh
        .store(
            "aws",
            json!({"tokenType": "aws", "accessKeyId": TEMP_KEY_ID, "secretAccessKey": TEMP_SECRET, "sessionToken": TEMP_TOKEN}),
        )
        .await;
    assert_eq!(stored.status, 200);
    let text = String::from_utf8_lossy(&stored.body).to_string();
    assert!(
        !text.contains(TEMP_SECRET) && !text.contains(TEMP_TOKEN),
        "{text}"
    );
    assert_eq!(stored.json()["meta"]["accessKeyId"], TEMP_KEY_ID);
    assert_eq!(stored.json()["meta"]["tokenType"], "aws");
    let doc = kh
        .storage(json!({"operation": "get", "collection": "tokens", "key": "aws"}))
        .await;
    let doc_text = String::from_utf8_lossy(&doc.body).to_string();
    assert!(!doc_text.contains(TEMP_SECRET) && !doc_text.contains(TEMP_TOKEN));
    assert!(doc.json()["data"]["fields"]["secretAccessKey"].is_string());
    assert!(doc.json()["data"]["fields"]["sessionToken"].is_string());
    let list = kh
        .storage(json!({"operation": "list", "collection": "tokens"}))
        .await;
    let list_text = String::from_utf8_lossy(&list.body).to_string();
    assert!(!list_text.contains(TEMP_SECRET) && !list_text.contains(TEMP_TOKEN));
    assert!(!list_text.contains("secretAccessKey") && !list_text.contains("sessionToken"));
}

#[tokio::test]
async fn aws_session_token_is_signed_and_redacted_from_the_answer() {
    let verifier = SigV4Verifier::start(verifier_config("execute-api", "eu-west-1")).await;
    let kh = keyholder().await;
    kh.store(
        "aws",
        json!({"tokenType": "aws", "accessKeyId": TEMP_KEY_ID, "secretAccessKey": TEMP_SECRET, "sessionToken": TEMP_TOKEN}),
    )
    .await;
    sign_config(
        &kh,
        "set aws --aws-region eu-west-1 --aws-service execute-api",
    )
    .await
    .unwrap();
    kh.egress("allow", "aws", &[&verifier.origin()], false)
        .await;
    let answer = kh
        .proxy(
            "aws",
            json!({"url": verifier.url("/prod/items?b=2&a=1"), "method": "POST", "body": "e30="}),
            json!({}),
        )
        .await;
    answer.assert_ok();
    let records = verifier.records().await;
    assert_eq!(records[0]["ok"], true, "{}", records[0]);
    assert_eq!(records[0]["headers"]["x-amz-security-token"], TEMP_TOKEN);
    // The upstream echoed the session token: it comes back redacted.
    assert_eq!(answer.json()["token"], "[REDACTED]");
}

#[tokio::test]
async fn aws_tampered_body_and_wrong_region_are_refused_by_the_verifier() {
    let verifier = SigV4Verifier::start(verifier_config("execute-api", "us-east-1")).await;
    let kh = aws_keyholder(&verifier, "execute-api", "us-east-1").await;
    let body = br#"{"amount":10}"#;
    let ok = kh
        .proxy(
            "aws",
            json!({
                "url": verifier.url("/prod/pay"),
                "method": "POST",
                "headers": {"Content-Type": "application/json"},
                "body": base64::engine::general_purpose::STANDARD.encode(body),
            }),
            json!({}),
        )
        .await;
    ok.assert_ok();
    // The signed request, replayed with another body: botocore's check fails.
    let record = verifier.records().await.remove(0);
    let mut replay = reqwest::Client::new().post(verifier.url("/prod/pay"));
    for (name, value) in record["headers"].as_object().unwrap() {
        if name != "content-length" {
            replay = replay.header(name.as_str(), value.as_str().unwrap());
        }
    }
    let tampered = replay
        .body(&br#"{"amount":99999}"#[..])
        .send()
        .await
        .unwrap();
    assert_eq!(tampered.status(), 403);
    assert!(tampered
        .text()
        .await
        .unwrap()
        .contains("SignatureDoesNotMatch"));
    // The owner's region differs from the endpoint's: the verifier refuses the signature.
    sign_config(&kh, "set aws --aws-region eu-west-1")
        .await
        .unwrap();
    let wrong = kh
        .proxy(
            "aws",
            json!({"url": verifier.url("/prod/pay"), "method": "POST", "body": "e30="}),
            json!({}),
        )
        .await;
    assert_eq!(upstream_status(&wrong), 403);
    let records = verifier.records().await;
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["ok"], false);
    assert!(records[2]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .contains("/eu-west-1/execute-api/aws4_request"));
}

#[tokio::test]
async fn a_hostile_platform_cannot_steer_unsign_or_rescope_the_signed_request() {
    let verifier = SigV4Verifier::start(verifier_config("s3", "us-east-1")).await;
    let kh = aws_keyholder(&verifier, "s3", "us-east-1").await;
    let attacker = MockServer::ok().await;
    // 1. A ticket steering the signed request to the attacker's host: refused, nothing sent.
    let steered = kh
        .proxy(
            "aws",
            json!({"url": attacker.url("/?list-type=2"), "method": "GET"}),
            json!({}),
        )
        .await;
    steered.assert_error(403, "egress_denied");
    // 2. Another region's AWS host than the owner's: refused before anything is sent.
    let other_region = kh
        .proxy(
            "aws",
            json!({"url": "https://s3.eu-west-1.amazonaws.com/?list-type=2", "method": "GET"}),
            json!({}),
        )
        .await;
    other_region.assert_error(403, "egress_denied");
    assert!(other_region.json()["message"]
        .as_str()
        .unwrap()
        .contains("region"));
    // 3. Platform headers trying to pick the payload hash, the date or the signature: replaced.
    let body = b"the real body";
    let answer = kh
        .proxy(
            "aws",
            json!({
                "url": verifier.url("/demo/x.txt"),
                "method": "PUT",
                "headers": {
                    "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
                    "X-Amz-Date": "20000101T000000Z",
                    "Authorization": "AWS4-HMAC-SHA256 Credential=EVIL",
                    "X-Amz-Security-Token": "platform-token",
                },
                "body": base64::engine::general_purpose::STANDARD.encode(body),
            }),
            json!({}),
        )
        .await;
    answer.assert_ok();
    let record = verifier.records().await.remove(0);
    assert_eq!(record["ok"], true, "{record}");
    assert_eq!(
        record["headers"]["x-amz-content-sha256"],
        hex::encode(sha2::Sha256::digest(body))
    );
    assert!(record["headers"].get("x-amz-security-token").is_none());
    // 4. A platform-written document (sealed fields copied, meta rewritten to name another
    //    region, service and a sign config): the owner's configuration still decides.
    let doc = kh
        .storage(json!({"operation": "get", "collection": "tokens", "key": "aws"}))
        .await
        .json()["data"]
        .clone();
    let mut forged = doc.clone();
    forged["meta"]["awsRegion"] = json!("eu-west-1");
    forged["meta"]["region"] = json!("eu-west-1");
    forged["meta"]["awsService"] = json!("iam");
    forged["meta"]["signConfig"] = json!({"aws": {"region": "eu-west-1", "unsignedPayload": true}});
    forged["meta"]["tokenType"] = json!("oauth");
    let set = kh
        .storage(json!({"operation": "set", "collection": "tokens", "key": "aws", "data": forged}))
        .await;
    assert_eq!(set.status, 200);
    let after = kh
        .proxy(
            "aws",
            json!({"url": verifier.url("/?list-type=2"), "method": "GET"}),
            json!({}),
        )
        .await;
    after.assert_ok();
    let records = verifier.records().await;
    assert_eq!(records[1]["ok"], true);
    assert!(records[1]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .contains("/us-east-1/s3/aws4_request"));
    // A platform cannot turn the signing key into a bearer token either: ${TOKEN} has nothing.
    let bearer = kh
        .proxy(
            "aws",
            json!({"url": attacker.url("/"), "method": "GET"}),
            json!({"Authorization": "Bearer ${TOKEN}"}),
        )
        .await;
    assert!(bearer.status >= 400 && bearer.status < 500);
    // Nothing ever reached the attacker.
    assert_eq!(attacker.count(), 0);
    assert_eq!(verifier.records().await.len(), 2);
}

#[tokio::test]
async fn aws_default_egress_is_the_catalogue_not_any_host() {
    let verifier = SigV4Verifier::start(verifier_config("s3", "us-east-1")).await;
    let kh = keyholder().await;
    kh.store("aws", aws_credential()).await;
    sign_config(&kh, "set aws --aws-region us-east-1 --aws-service s3")
        .await
        .unwrap();
    // Mode `known`, nothing allowed by the owner: a loopback host is not an AWS origin.
    let refused = kh
        .proxy(
            "aws",
            json!({"url": verifier.url("/"), "method": "GET"}),
            json!({}),
        )
        .await;
    refused.assert_error(403, "egress_denied");
    assert!(refused.json()["message"].as_str().unwrap().contains("AWS"));
    assert!(verifier.records().await.is_empty());
}

#[tokio::test]
async fn malformed_or_oversized_key_material_is_refused_at_store_time() {
    let kh = keyholder().await;
    let cases = [
        json!({"tokenType": "aws", "accessKeyId": KEY_ID}),
        json!({"tokenType": "aws", "secretAccessKey": SECRET}),
        json!({"tokenType": "aws", "accessKeyId": "AKID EXAMPLE 000", "secretAccessKey": SECRET}),
        json!({"tokenType": "aws", "accessKeyId": KEY_ID, "secretAccessKey": "x".repeat(10_000)}),
        json!({"tokenType": "aws", "accessKeyId": KEY_ID, "secretAccessKey": SECRET, "sessionToken": 42}),
        json!({"tokenType": "aws", "accessKeyId": KEY_ID, "secretAccessKey": SECRET, "sessionToken": "t".repeat(9000)}),
        json!({"accessKeyId": KEY_ID, "secretAccessKey": "line\nbreak"}),
        json!({"certificateData": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----", "privateKeyData": "junk"}),
        json!({"certificateData": "plain text", "privateKeyData": TestRsa::generate().private_pem()}),
    ];
    for (i, case) in cases.iter().enumerate() {
        let service = format!("bad{i}");
        let answer = kh.store(&service, case.clone()).await;
        answer.assert_error(400, "invalid_request");
        assert!(!String::from_utf8_lossy(&answer.body).contains(SECRET));
        kh.credential(&service)
            .await
            .assert_error(404, "token_not_found");
    }
    // Larger than the store endpoint takes at all: 413 JSON.
    let huge = kh
        .store(
            "huge",
            json!({"certificateData": "A".repeat(70_000), "privateKeyData": "k"}),
        )
        .await;
    assert_eq!(huge.status, 413);
    assert!(huge.json()["error"].is_string());
}

#[tokio::test]
async fn sts_assume_role_session_is_minted_once_and_signs_the_calls() {
    let mut config = verifier_config("execute-api", "us-east-1");
    config["keys"] = json!([{"accessKeyId": KEY_ID, "secretAccessKey": SECRET}]);
    config["sts"] = json!({
        "accessKeyId": TEMP_KEY_ID, "secretAccessKey": TEMP_SECRET, "sessionToken": TEMP_TOKEN,
        "roleArn": "arn:aws:iam::123456789012:role/reader",
    });
    let verifier = SigV4Verifier::start(config).await;
    let kh = aws_keyholder(&verifier, "execute-api", "us-east-1").await;
    let sts_url = verifier.url("/");
    sign_config(
        &kh,
        &format!(
            "set aws --aws-role-arn arn:aws:iam::123456789012:role/reader --aws-sts-url {sts_url}"
        ),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let answer = kh
            .proxy(
                "aws",
                json!({"url": verifier.url("/prod/items"), "method": "GET"}),
                json!({}),
            )
            .await;
        answer.assert_ok();
        assert_eq!(answer.json()["accessKeyId"], TEMP_KEY_ID);
    }
    let records = verifier.records().await;
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sts", "api", "api"], "{records:?}");
    assert!(records.iter().all(|r| r["ok"] == true));
    assert!(records[0]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .contains(&format!("{KEY_ID}/")));
    let results = audit_results(&kh).await;
    assert!(results
        .iter()
        .any(|r| r.contains(&format!("key={TEMP_KEY_ID}")) && r.contains("via=sts-assume-role")));
    // The session credentials never come out of the answer or the trail.
    assert!(!results
        .iter()
        .any(|r| r.contains(TEMP_SECRET) || r.contains(TEMP_TOKEN)));
}

// ---------------------------------------------------------------- client-certificate TLS

struct MtlsSetup {
    kh: Keyholder,
    server: MtlsServer,
    server_cert: TestCert,
    _dir: tempfile::TempDir,
}

async fn mtls_setup() -> MtlsSetup {
    let ca = TestCa::new("keyholder test CA");
    let server_cert = TestCert::new("127.0.0.1");
    let server = MtlsServer::start(&server_cert, &ca);
    let kh = keyholder().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("server-ca.pem");
    std::fs::write(&ca_file, &server_cert.cert_pem).unwrap();
    for (service, cn, token) in [
        ("bank-a", "client-a", Some("bank_token_aaaaaaaa")),
        ("bank-b", "client-b", None),
    ] {
        let (cert, key) = ca.issue_client(cn);
        let mut data =
            json!({"tokenType": "certificate", "certificateData": cert, "privateKeyData": key});
        if let Some(token) = token {
            data["accessToken"] = json!(token);
        }
        assert_eq!(kh.store(service, data).await.status, 200);
        sign_config(
            &kh,
            &format!("set {service} --tls-ca {}", ca_file.to_str().unwrap()),
        )
        .await
        .unwrap();
        kh.egress("allow", service, &[&server.origin()], false)
            .await;
    }
    // A certificate from a CA the server does not trust.
    let rogue = TestCa::new("rogue CA");
    let (cert, key) = rogue.issue_client("client-a");
    kh.store(
        "rogue",
        json!({"certificateData": cert, "privateKeyData": key}),
    )
    .await;
    sign_config(
        &kh,
        &format!("set rogue --tls-ca {}", ca_file.to_str().unwrap()),
    )
    .await
    .unwrap();
    kh.egress("allow", "rogue", &[&server.origin()], false)
        .await;
    MtlsSetup {
        kh,
        server,
        server_cert,
        _dir: dir,
    }
}

#[tokio::test]
async fn mtls_presents_the_stored_certificate_and_fails_without_it() {
    let MtlsSetup {
        kh,
        server,
        server_cert,
        ..
    } = mtls_setup().await;
    // Combined with a header template: the certificate and the token both arrive.
    let answer = kh
        .proxy(
            "bank-a",
            json!({"url": server.url("/accounts"), "method": "GET"}),
            json!({"Authorization": "Bearer ${TOKEN}"}),
        )
        .await;
    answer.assert_ok();
    assert_eq!(answer.json()["cn"], "client-a");
    let seen = server.requests();
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer bank_token_aaaaaaaa")
    );
    // Without a client certificate the server refuses the handshake (a client that trusts it).
    let plain = reqwest::Client::builder()
        .add_root_certificate(server_cert.reqwest_root())
        .build()
        .unwrap();
    let refused_before = server.handshakes_refused();
    let without = plain.get(server.url("/accounts")).send().await;
    match without {
        Err(_) => {}
        Ok(r) => panic!(
            "the server answered a client without a certificate: {}",
            r.status()
        ),
    }
    // A certificate the CA did not issue: the proxied call fails as an upstream error.
    let rogue = kh
        .proxy(
            "rogue",
            json!({"url": server.url("/accounts"), "method": "GET"}),
            json!({}),
        )
        .await;
    rogue.assert_error(502, "upstream_error");
    assert!(server.handshakes_refused() >= refused_before + 2);
    assert_eq!(server.requests().len(), 1);
    // The audit entry names the certificate by fingerprint only.
    let results = audit_results(&kh).await;
    assert!(results
        .iter()
        .any(|r| r.starts_with("ok") && r.contains("signed=tls-client-cert cert=sha256:")));
}

#[tokio::test]
async fn two_credentials_never_share_a_connection() {
    let MtlsSetup { kh, server, .. } = mtls_setup().await;
    for round in 0..3 {
        for (service, cn) in [("bank-a", "client-a"), ("bank-b", "client-b")] {
            let answer = kh
                .proxy(
                    service,
                    json!({"url": server.url(&format!("/r{round}")), "method": "GET"}),
                    json!({}),
                )
                .await;
            answer.assert_ok();
            assert_eq!(answer.json()["cn"], cn, "round {round}");
        }
    }
    let seen = server.requests();
    assert_eq!(seen.len(), 6);
    let conns = |cn: &str| -> std::collections::BTreeSet<u64> {
        seen.iter()
            .filter(|r| r.common_name == cn)
            .map(|r| r.connection)
            .collect()
    };
    let (a, b) = (conns("client-a"), conns("client-b"));
    assert_eq!(
        seen.iter().filter(|r| r.common_name == "client-a").count(),
        3
    );
    assert!(
        a.is_disjoint(&b),
        "a connection carried both credentials: {a:?} {b:?}"
    );
    // Each credential's connections are pooled (reused across its calls).
    assert!(a.len() < 3 && b.len() < 3, "{a:?} {b:?}");
}

// ---------------------------------------------------------------- JWT assertions

fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_in_a_header_template_is_fresh_and_verifies_with_the_public_key() {
    let kh = keyholder().await;
    let key = std::sync::Arc::new(TestRsa::generate());
    let verify_key = key.clone();
    let upstream = MockServer::start(move |r| {
        let jwt = r
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        match verify_key.verify_jwt(jwt) {
            // Echoes the assertion, as a careless upstream might: it must come back redacted.
            Some(_) => Reply::json(200, json!({"ok": true, "echo": jwt})),
            None => Reply::json(401, json!({"error": "bad jwt"})),
        }
    })
    .await;
    // A Snowflake-style key pair: the platform's document names another issuer, which is ignored.
    kh.store(
        "snowflake",
        json!({"privateKeyData": key.private_pem(), "iss": "ATTACKER", "aud": "evil"}),
    )
    .await;
    sign_config(&kh, "set snowflake --iss MYORG-ACCT.ALICE.SHA256:abc= --sub MYORG-ACCT.ALICE --aud snowflake --lifetime 120")
    .await
    .unwrap();
    kh.egress("allow", "snowflake", &[&upstream.origin()], false)
        .await;
    for _ in 0..2 {
        let answer = kh
            .proxy(
                "snowflake",
                json!({"url": upstream.url("/api/v2/statements"), "method": "POST", "body": "e30="}),
                json!({"Authorization": "Bearer ${JWT}", "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT"}),
            )
            .await;
        answer.assert_ok();
        assert_eq!(answer.json()["echo"], "[REDACTED]");
    }
    let requests = upstream.requests();
    let jwts: Vec<&str> = requests
        .iter()
        .map(|r| {
            r.header("authorization")
                .unwrap()
                .strip_prefix("Bearer ")
                .unwrap()
        })
        .collect();
    assert_ne!(jwts[0], jwts[1], "each request gets a fresh assertion");
    let claims = key.verify_jwt(jwts[0]).unwrap();
    assert_eq!(claims["iss"], "MYORG-ACCT.ALICE.SHA256:abc=");
    assert_eq!(claims["sub"], "MYORG-ACCT.ALICE");
    assert_eq!(claims["aud"], "snowflake");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120
    );
    assert_eq!(
        requests[0].header("x-snowflake-authorization-token-type"),
        Some("KEYPAIR_JWT")
    );
    let results = audit_results(&kh).await;
    assert!(results
        .iter()
        .any(|r| r.contains("signed=jwt-RS256 iss=MYORG-ACCT.ALICE.SHA256:abc= use=header")));
    assert!(!results.iter().any(|r| r.contains(jwts[0])));
}

#[tokio::test]
async fn jwt_es256_and_eddsa_assertions_verify() {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    let kh = keyholder().await;
    let upstream = MockServer::ok().await;
    let ec = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap();
    let ed = PKey::generate_ed25519().unwrap();
    for (service, alg, key) in [("appstore", "ES256", &ec), ("ed", "EdDSA", &ed)] {
        let pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        kh.store(service, json!({"privateKeyData": pem})).await;
        sign_config(&kh, &format!("set {service} --iss issuer-1 --sub subject-1 --aud appstoreconnect-v1 --alg {alg} --kid KEY123"))
        .await
        .unwrap();
        kh.egress("allow", service, &[&upstream.origin()], false)
            .await;
        let answer = kh
            .proxy(
                service,
                json!({"url": upstream.url("/v1/apps"), "method": "GET"}),
                json!({"Authorization": "Bearer ${JWT}"}),
            )
            .await;
        answer.assert_ok();
        let request = upstream.requests().pop().unwrap();
        let jwt = request
            .header("authorization")
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap()
            .to_string();
        let parts: Vec<&str> = jwt.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], alg);
        assert_eq!(header["kid"], "KEY123");
        let signed = format!("{}.{}", parts[0], parts[1]);
        let signature = b64.decode(parts[2]).unwrap();
        let public = PKey::public_key_from_pem(&key.public_key_to_pem().unwrap()).unwrap();
        let valid = if alg == "ES256" {
            // JOSE's r||s, turned into DER for openssl.
            let r = openssl::bn::BigNum::from_slice(&signature[..32]).unwrap();
            let s = openssl::bn::BigNum::from_slice(&signature[32..]).unwrap();
            let der = openssl::ecdsa::EcdsaSig::from_private_components(r, s)
                .unwrap()
                .to_der()
                .unwrap();
            let mut v =
                openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &public)
                    .unwrap();
            v.update(signed.as_bytes()).unwrap();
            v.verify(&der).unwrap()
        } else {
            let mut v = openssl::sign::Verifier::new_without_digest(&public).unwrap();
            v.verify_oneshot(&signature, signed.as_bytes()).unwrap()
        };
        assert!(valid, "{alg} assertion does not verify");
        assert_eq!(jwt_claims(&jwt)["aud"], "appstoreconnect-v1");
    }
}

#[tokio::test]
async fn rfc7523_exchange_at_the_owners_token_url_is_cached_and_injected_as_token() {
    let kh = keyholder().await;
    let key = std::sync::Arc::new(TestRsa::generate());
    let verify_key = key.clone();
    let token_endpoint = MockServer::start(move |r| {
        let form = r.form();
        let claims = form.get("assertion").and_then(|a| verify_key.verify_jwt(a));
        match claims {
            Some(c)
                if form.get("grant_type").map(String::as_str)
                    == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
                    && c["aud"] == "https://login.example/token" =>
            {
                Reply::json(
                    200,
                    json!({"access_token": "exchanged_token_123", "expires_in": 3600}),
                )
            }
            _ => Reply::json(400, json!({"error": "invalid_grant"})),
        }
    })
    .await;
    let api = MockServer::ok().await;
    kh.store("svc", json!({"privateKeyData": key.private_pem()}))
        .await;
    let token_url = token_endpoint.url("/token");
    sign_config(&kh, &format!("set svc --iss client-1 --sub client-1 --aud https://login.example/token --token-url {token_url} --scope read"))
    .await
    .unwrap();
    // The token endpoint is under the egress policy too: refused until the owner allows it.
    kh.egress("allow", "svc", &[&api.origin()], false).await;
    let refused = kh
        .proxy(
            "svc",
            json!({"url": api.url("/data"), "method": "GET"}),
            json!({"Authorization": "Bearer ${TOKEN}"}),
        )
        .await;
    refused.assert_error(403, "egress_denied");
    assert_eq!(token_endpoint.count(), 0);
    kh.egress("allow", "svc", &[&token_endpoint.origin()], false)
        .await;
    for _ in 0..2 {
        let answer = kh
            .proxy(
                "svc",
                json!({"url": api.url("/data"), "method": "GET"}),
                json!({"Authorization": "Bearer ${TOKEN}"}),
            )
            .await;
        answer.assert_ok();
    }
    assert_eq!(token_endpoint.count(), 1, "the access token is cached");
    assert_eq!(token_endpoint.requests()[0].form()["scope"], "read");
    for request in api.requests() {
        assert_eq!(
            request.header("authorization"),
            Some("Bearer exchanged_token_123")
        );
    }
}

#[tokio::test]
async fn jwt_needs_the_owners_template_and_a_usable_key() {
    let kh = keyholder().await;
    let upstream = MockServer::ok().await;
    kh.store(
        "nokey",
        json!({"privateKeyData": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}),
    )
    .await;
    kh.store(
        "notemplate",
        json!({"privateKeyData": TestRsa::generate().private_pem(), "accessToken": "tok_abcdefgh"}),
    )
    .await;
    for service in ["nokey", "notemplate"] {
        kh.egress("allow", service, &[&upstream.origin()], false)
            .await;
    }
    sign_config(&kh, "set nokey --iss i --sub s --aud a")
        .await
        .unwrap();
    let bad_key = kh
        .proxy(
            "nokey",
            json!({"url": upstream.url("/"), "method": "GET"}),
            json!({"Authorization": "Bearer ${JWT}"}),
        )
        .await;
    bad_key.assert_error(400, "invalid_request");
    // A platform cannot make a JWT without the owner's template (it cannot write one).
    let no_template = kh
        .proxy(
            "notemplate",
            json!({"url": upstream.url("/"), "method": "GET"}),
            json!({"Authorization": "Bearer ${JWT}"}),
        )
        .await;
    no_template.assert_error(400, "invalid_request");
    assert_eq!(upstream.count(), 0);
    // The CLI refuses incomplete or invalid templates.
    assert!(sign_config(&kh, "set x --iss i").await.is_err());
    assert!(
        sign_config(&kh, "set x --iss i --sub s --aud a --alg HS256")
            .await
            .is_err()
    );
    assert!(
        sign_config(&kh, "set x --iss i --sub s --aud a --lifetime 99999")
            .await
            .is_err()
    );
    assert!(
        sign_config_args(&kh, &["set", "x", "--aws-region", "Not A Region"])
            .await
            .is_err()
    );
    assert!(sign_config(&kh, "set x").await.is_err());
}

// ---------------------------------------------------------------- owner commands, custody

#[tokio::test]
async fn sign_config_list_show_remove() {
    let kh = keyholder().await;
    sign_config(&kh, "set aws --aws-region us-east-1 --aws-service s3")
        .await
        .unwrap();
    sign_config(&kh, "set aws --iss i --sub s --aud a --alg ES256")
        .await
        .unwrap();
    let shown: Value =
        serde_json::from_str(&sign_config(&kh, "show aws --json").await.unwrap()).unwrap();
    assert_eq!(shown["service"], "aws");
    assert_eq!(shown["aws"]["region"], "us-east-1");
    assert_eq!(shown["jwt"]["alg"], "ES256");
    assert_eq!(shown["jwt"]["lifetime"], 300);
    let text = sign_config(&kh, "show aws").await.unwrap();
    assert!(
        text.contains("region=us-east-1") && text.contains("alg=ES256"),
        "{text}"
    );
    sign_config(&kh, "remove aws --part jwt").await.unwrap();
    let listed: Value =
        serde_json::from_str(&sign_config(&kh, "list --json").await.unwrap()).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(listed[0].get("jwt").is_none());
    sign_config(&kh, "remove aws").await.unwrap();
    assert_eq!(
        sign_config(&kh, "list").await.unwrap(),
        "No signing configurations."
    );
    assert!(sign_config(&kh, "remove aws").await.is_err());
    assert!(sign_config(&kh, "show aws").await.is_err());
    // Each change is an owner entry of the audit trail.
    let entries = kh.audit_entries(None).await;
    let owner: Vec<&str> = entries
        .iter()
        .map(|e| e.event.endpoint.as_str())
        .filter(|e| e.starts_with("owner:sign-config"))
        .collect();
    assert_eq!(owner.len(), 4, "{owner:?}");
}

#[tokio::test]
async fn inject_only_refuses_every_signing_key_type_on_credential() {
    let kh = keyholder().await;
    let ca = TestCa::new("ca");
    let (cert, key) = ca.issue_client("c");
    let rsa = TestRsa::generate();
    kh.store("aws", aws_credential()).await;
    kh.store(
        "mtls",
        json!({"certificateData": cert, "privateKeyData": key}),
    )
    .await;
    kh.store("jwt", json!({"privateKeyData": rsa.private_pem()}))
        .await;
    sign_config(&kh, "set jwt --iss i --sub s --aud a")
        .await
        .unwrap();
    // Without a policy the protocol hands a stored credential out (what inject-only is for).
    let handed = kh.credential("aws").await;
    assert_eq!(handed.status, 200);
    let run = |args: Vec<String>| {
        let argv: Vec<String> = ["policy".to_string()]
            .into_iter()
            .chain(args)
            .chain(["--data-dir".to_string(), kh.data_dir.display().to_string()])
            .collect();
        #[derive(Parser)]
        struct PolicyCli {
            #[command(subcommand)]
            action: keyholder::cli::policy::PolicyAction,
        }
        let parsed = PolicyCli::try_parse_from(&argv).unwrap();
        keyholder::cli::policy::run(&keyholder::cli::policy::PolicyArgs {
            action: parsed.action,
        })
        .unwrap();
    };
    run(["create", "inject", "--delivery", "inject-only"]
        .map(String::from)
        .to_vec());
    for service in ["aws", "mtls", "jwt"] {
        run(["attach", "inject", "--service", service]
            .map(String::from)
            .to_vec());
    }
    kh.server
        .as_ref()
        .unwrap()
        .state
        .reload
        .follow_owner_changes()
        .await
        .unwrap();
    for service in ["aws", "mtls", "jwt"] {
        for purpose in [Purpose::AgentCredential, Purpose::UserReveal] {
            let ticket = kh.ticket(purpose, service);
            let answer = kh.credential_with(&ticket, service).await;
            answer.assert_error(403, "policy_denied");
            let text = String::from_utf8_lossy(&answer.body).to_string();
            assert!(
                !text.contains(SECRET) && !text.contains("PRIVATE KEY"),
                "{text}"
            );
        }
    }
}

// ---------------------------------------------------------------- the SDK

#[tokio::test]
async fn the_sdk_stores_an_aws_key_and_proxies_a_signed_call() {
    use keyholder_client::{ProxyCall, TokenData};
    let verifier = SigV4Verifier::start(verifier_config("s3", "us-east-1")).await;
    let kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    let code = kh.issue_code(false);
    let platform = kh.sdk_builder().bind(&code.code).await.unwrap();
    let issuer = platform.ticket_issuer().subject("user_test");
    let agent = kh.sdk_builder().agent().unwrap();
    let stored = agent
        .store(
            issuer.store("s3").expose(),
            "s3",
            &TokenData::aws(TEMP_KEY_ID, TEMP_SECRET).session_token(TEMP_TOKEN),
        )
        .await
        .unwrap();
    assert_eq!(stored.meta["tokenType"], "aws");
    assert!(stored.meta.get("secretAccessKey").is_none());
    sign_config(&kh, "set s3 --aws-region us-east-1 --aws-service s3")
        .await
        .unwrap();
    kh.egress("allow", "s3", &[&verifier.origin()], false).await;
    let answer = platform
        .proxy(
            issuer.proxy("s3").expose(),
            "s3",
            &ProxyCall::new(verifier.url("/?list-type=2")),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert!(String::from_utf8_lossy(&answer.body).contains("hello.txt"));
    assert_eq!(verifier.records().await[0]["ok"], true);
}
