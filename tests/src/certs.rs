//! Self-signed certificates made by the tests themselves (openssl): P-256 keys, a SAN for
//! 127.0.0.1, no CA flag, so rustls accepts one as its own trust anchor.

use std::path::Path;

use keyholder::tls::TlsFiles;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{ExtendedKeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

/// A certificate and its key, in memory and as PEM.
pub struct TestCert {
    pub cert: X509,
    pub key: PKey<Private>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TestCert {
    /// A new self-signed certificate for 127.0.0.1, valid for two days.
    pub fn new(common_name: &str) -> TestCert {
        Self::valid_for_days(common_name, 2)
    }

    /// A new self-signed certificate for 127.0.0.1, valid for `days` days from now.
    pub fn valid_for_days(common_name: &str, days: u32) -> TestCert {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", common_name).unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        let mut serial = BigNum::new().unwrap();
        serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
        builder
            .set_serial_number(&serial.to_asn1_integer().unwrap())
            .unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(days).unwrap())
            .unwrap();
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&builder.x509v3_context(None, None))
            .unwrap();
        builder.append_extension(san).unwrap();
        builder
            .append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
            .unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = builder.build();
        TestCert {
            cert_pem: cert.to_pem().unwrap(),
            key_pem: key.private_key_to_pem_pkcs8().unwrap(),
            cert,
            key,
        }
    }

    /// Writes `cert.pem` and `key.pem` (named with `prefix`) into `dir`.
    pub fn write(&self, dir: &Path, prefix: &str) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join(format!("{prefix}cert.pem")),
            key: dir.join(format!("{prefix}key.pem")),
        };
        self.write_to(&files);
        files
    }

    /// Overwrites the files with this certificate and key.
    pub fn write_to(&self, files: &TlsFiles) {
        std::fs::write(&files.cert, &self.cert_pem).unwrap();
        std::fs::write(&files.key, &self.key_pem).unwrap();
    }

    /// For reqwest's `add_root_certificate`.
    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(&self.cert_pem).unwrap()
    }

    /// SHA-256 of the certificate, lowercase hex (as the server logs it).
    pub fn fingerprint(&self) -> String {
        hex::encode(self.cert.digest(MessageDigest::sha256()).unwrap())
    }
}
