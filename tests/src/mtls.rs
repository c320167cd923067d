//! A TLS server on 127.0.0.1 that requires a client certificate issued by a test CA (openssl),
//! and answers each request with the certificate's common name and the id of the connection it
//! came on, so that a test sees which certificate every request was sent with.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use openssl::x509::{X509NameBuilder, X509};
use serde_json::json;

use crate::certs::TestCert;

/// A certificate authority made by the test.
pub struct TestCa {
    pub cert: X509,
    key: PKey<Private>,
}

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> openssl::x509::X509Name {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    name.build()
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    serial.to_asn1_integer().unwrap()
}

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let key = new_key();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(&name(cn)).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        TestCa {
            cert: b.build(),
            key,
        }
    }

    /// A client certificate for `cn` and its key, as PEM (certificate, PKCS#8 key).
    pub fn issue_client(&self, cn: &str) -> (String, String) {
        let key = new_key();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap())
            .unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        let cert = b.build();
        (
            String::from_utf8(cert.to_pem().unwrap()).unwrap(),
            String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        )
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct MtlsRequest {
    pub connection: u64,
    pub common_name: String,
    pub authorization: Option<String>,
}

/// The server; stops when dropped.
pub struct MtlsServer {
    pub port: u16,
    requests: Arc<Mutex<Vec<MtlsRequest>>>,
    handshakes_refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl MtlsServer {
    /// Serves with `server_cert`, requiring client certificates issued by `ca`.
    pub fn start(server_cert: &TestCert, ca: &TestCa) -> MtlsServer {
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_private_key(&server_cert.key).unwrap();
        acceptor.set_certificate(&server_cert.cert).unwrap();
        acceptor.cert_store_mut().add_cert(ca.cert.clone()).unwrap();
        acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handshakes_refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(AtomicU64::new(0));
        {
            let (requests, refused, stop) =
                (requests.clone(), handshakes_refused.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (acceptor, requests, refused, ids) = (
                        acceptor.clone(),
                        requests.clone(),
                        refused.clone(),
                        ids.clone(),
                    );
                    std::thread::spawn(move || {
                        serve(stream, &acceptor, &requests, &refused, &ids);
                    });
                }
            });
        }
        MtlsServer {
            port,
            requests,
            handshakes_refused,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub fn origin(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<MtlsRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// TLS handshakes that failed (no certificate, or one the CA did not issue).
    pub fn handshakes_refused(&self) -> usize {
        self.handshakes_refused.load(Ordering::SeqCst)
    }
}

impl Drop for MtlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    stream: TcpStream,
    acceptor: &SslAcceptor,
    requests: &Mutex<Vec<MtlsRequest>>,
    refused: &AtomicUsize,
    ids: &AtomicU64,
) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let tls = match acceptor.accept(stream) {
        Ok(tls) => tls,
        Err(_) => {
            refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let common_name = tls
        .ssl()
        .peer_certificate()
        .and_then(|c| {
            c.subject_name()
                .entries_by_nid(Nid::COMMONNAME)
                .next()
                .and_then(|e| e.data().to_string().ok())
        })
        .unwrap_or_default();
    let connection = ids.fetch_add(1, Ordering::SeqCst) + 1;
    let mut reader = BufReader::new(tls);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(value.trim().to_string()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.lock().unwrap().push(MtlsRequest {
            connection,
            common_name: common_name.clone(),
            authorization: authorization.clone(),
        });
        let answer = json!({"cn": common_name, "connection": connection}).to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        let out = reader.get_mut();
        if out.write_all(head.as_bytes()).is_err() || out.write_all(answer.as_bytes()).is_err() {
            return;
        }
        let _ = out.flush();
    }
}
