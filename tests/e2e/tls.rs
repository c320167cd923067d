//! Native TLS: https with a self-signed certificate the client trusts explicitly, TLS 1.1
//! refused, a key that is not the certificate's refused at start with the setting named, and a
//! certificate reload that new connections see while open connections keep working.

use std::net::TcpStream;

use keyholder::tls::TlsFiles;
use keyholder_protocol::paths::PATH_HEALTH;
use keyholder_tests::certs::TestCert;
use keyholder_tests::Keyholder;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};

fn client_trusting(cert: &TestCert) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert.reqwest_root())
        .https_only(true)
        .build()
        .unwrap()
}

async fn tls_keyholder(cert: &TestCert) -> (Keyholder, TlsFiles, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let files = cert.write(dir.path(), "");
    let tls = files.clone();
    let kh = Keyholder::start_with(move |c| c.tls = Some(tls)).await;
    assert!(kh.base.starts_with("https://127.0.0.1:"), "{}", kh.base);
    (kh, files, dir)
}

async fn healthy(client: &reqwest::Client, kh: &Keyholder) -> Result<(), reqwest::Error> {
    let r = client.get(kh.url(PATH_HEALTH)).send().await?;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["status"], "healthy");
    Ok(())
}

/// A raw openssl handshake limited to `max` (the client allows every old protocol and cipher,
/// so a refusal comes from the server). Returns the certificate served, or the error text.
fn handshake(port: u16, max: SslVersion) -> Result<X509Fingerprint, String> {
    let mut connector = SslConnector::builder(SslMethod::tls_client()).unwrap();
    connector.set_verify(SslVerifyMode::NONE);
    connector.set_cipher_list("DEFAULT:@SECLEVEL=0").unwrap();
    connector
        .set_min_proto_version(Some(SslVersion::TLS1))
        .unwrap();
    connector.set_max_proto_version(Some(max)).unwrap();
    let connector = connector.build();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let stream = connector
        .configure()
        .unwrap()
        .verify_hostname(false)
        .connect("localhost", tcp)
        .map_err(|e| e.to_string())?;
    let cert = stream.ssl().peer_certificate().unwrap();
    Ok(X509Fingerprint(hex::encode(
        cert.digest(openssl::hash::MessageDigest::sha256()).unwrap(),
    )))
}

#[derive(Debug, PartialEq)]
struct X509Fingerprint(String);

#[tokio::test]
async fn https_with_a_trusted_self_signed_certificate() {
    let cert = TestCert::new("keyholder test");
    let (kh, _files, _dir) = tls_keyholder(&cert).await;
    healthy(&client_trusting(&cert), &kh).await.unwrap();

    // A client that does not trust it refuses the server: the TLS is real.
    let stranger = client_trusting(&TestCert::new("someone else"));
    assert!(stranger.get(kh.url(PATH_HEALTH)).send().await.is_err());
    // Plain http on the TLS port gets no answer it could read.
    let plain = reqwest::get(kh.url(PATH_HEALTH).replace("https://", "http://")).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
}

#[tokio::test]
async fn tls_below_1_2_is_refused() {
    let cert = TestCert::new("keyholder test");
    let (kh, _files, _dir) = tls_keyholder(&cert).await;
    let port = kh.addr().port();
    let result = tokio::task::spawn_blocking(move || {
        (
            handshake(port, SslVersion::TLS1_1),
            handshake(port, SslVersion::TLS1),
            handshake(port, SslVersion::TLS1_2),
        )
    })
    .await
    .unwrap();
    let err = result.0.expect_err("TLS 1.1 must be refused");
    assert!(
        !err.contains("no protocols available"),
        "the client refused by itself: {err}"
    );
    assert!(result.1.is_err(), "TLS 1.0 must be refused");
    // The same client settings with TLS 1.2 succeed: the refusal above is the server's floor.
    assert_eq!(
        result.2.expect("TLS 1.2 works"),
        X509Fingerprint(cert.fingerprint())
    );
}

#[tokio::test]
async fn a_key_that_is_not_the_certificates_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestCert::new("a").write(dir.path(), "a-");
    let b = TestCert::new("b").write(dir.path(), "b-");
    let data = dir.path().join("data");
    let mut config = Keyholder::config_in(&data);
    config.tls = Some(TlsFiles {
        cert: a.cert.clone(),
        key: b.key.clone(),
    });
    let err = format!(
        "{:#}",
        keyholder::start(config.clone()).await.err().unwrap()
    );
    assert!(err.contains("--tls-key / KEYHOLDER_TLS_KEY"), "{err}");
    assert!(err.contains("does not match"), "{err}");
    assert!(
        !data.exists(),
        "nothing is created before the certificate is checked"
    );

    config.tls = Some(TlsFiles {
        cert: dir.path().join("missing.pem"),
        key: a.key.clone(),
    });
    let err = format!(
        "{:#}",
        keyholder::start(config.clone()).await.err().unwrap()
    );
    assert!(err.contains("--tls-cert / KEYHOLDER_TLS_CERT"), "{err}");

    std::fs::write(dir.path().join("junk.pem"), b"not a key").unwrap();
    config.tls = Some(TlsFiles {
        cert: a.cert.clone(),
        key: dir.path().join("junk.pem"),
    });
    let err = format!("{:#}", keyholder::start(config).await.err().unwrap());
    assert!(
        err.contains("--tls-key / KEYHOLDER_TLS_KEY") && err.contains("private key"),
        "{err}"
    );
}

#[tokio::test]
async fn reload_serves_the_new_certificate_and_keeps_open_connections() {
    let first = TestCert::new("first");
    let (kh, files, _dir) = tls_keyholder(&first).await;
    let old_client = client_trusting(&first);
    healthy(&old_client, &kh).await.unwrap();

    let second = TestCert::new("second");
    second.write_to(&files);
    let server = kh.server.as_ref().unwrap();
    assert_eq!(server.reload_tls().unwrap(), second.fingerprint());

    // The pooled connection made before the reload still works: a new one would be refused by
    // this client, which trusts only the first certificate.
    healthy(&old_client, &kh).await.unwrap();
    assert!(client_trusting(&first)
        .get(kh.url(PATH_HEALTH))
        .send()
        .await
        .is_err());
    healthy(&client_trusting(&second), &kh).await.unwrap();

    // A broken pair is refused and the certificate in use stays.
    std::fs::write(&files.key, TestCert::new("third").key_pem).unwrap();
    let err = server.reload_tls().unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
    healthy(&client_trusting(&second), &kh).await.unwrap();
}
