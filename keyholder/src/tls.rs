//! Native TLS through openssl: TLS 1.2 minimum with Mozilla's "intermediate" cipher suites, the
//! certificate and key checked to match at start, and the certificate reloaded on demand (SIGHUP)
//! without dropping connections: every new handshake picks the current context in openssl's
//! server-name callback, which runs whether or not the client sent SNI; open connections keep the
//! context they started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openssl::error::ErrorStack;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    select_next_proto, AlpnError, SniError, SslAcceptor, SslAcceptorBuilder, SslContext, SslMethod,
    SslVersion,
};
use openssl::x509::X509;
use zeroize::Zeroizing;

/// The setting that names the certificate file.
pub const CERT_SETTING: &str = "--tls-cert / KEYHOLDER_TLS_CERT";
/// The setting that names the key file.
pub const KEY_SETTING: &str = "--tls-key / KEYHOLDER_TLS_KEY";

/// ALPN protocols accepted, in openssl's wire format: HTTP/1.1 only, because actix-web is built
/// without its `http2` feature (a connection that negotiated h2 would be dropped).
const ALPN: &[u8] = b"\x08http/1.1";

/// Where the certificate chain and its private key are read from (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate.
    pub key: PathBuf,
}

/// Why the certificate or key cannot be used; the text names the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("invalid setting {setting}: cannot read {path}: {source}")]
    Read {
        /// Flag and env var.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable PEM certificate or key.
    #[error("invalid setting {setting}: {path} holds no usable PEM {what}")]
    Parse {
        /// Flag and env var.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// The key is not the certificate's.
    #[error(
        "invalid setting {KEY_SETTING}: the private key in {key} does not match the certificate in {cert}"
    )]
    Mismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
    },
    /// openssl refused the context (unsupported key type, ...).
    #[error("TLS setup failed: {0}")]
    Openssl(#[from] ErrorStack),
}

struct Loaded {
    leaf: X509,
    chain: Vec<X509>,
    key: PKey<Private>,
}

fn read(setting: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsError::Read {
            setting,
            path: path.to_path_buf(),
            source,
        })
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let cert_pem = read(CERT_SETTING, &files.cert)?;
    let mut certs = X509::stack_from_pem(&cert_pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| TlsError::Parse {
            setting: CERT_SETTING,
            path: files.cert.clone(),
            what: "certificate",
        })?;
    let leaf = certs.remove(0);
    let key_pem = read(KEY_SETTING, &files.key)?;
    let key = PKey::private_key_from_pem(&key_pem).map_err(|_| TlsError::Parse {
        setting: KEY_SETTING,
        path: files.key.clone(),
        what: "private key",
    })?;
    let matches = leaf
        .public_key()
        .map(|public| public.public_eq(&key))
        .unwrap_or(false);
    if !matches {
        return Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        });
    }
    Ok(Loaded {
        leaf,
        chain: certs,
        key,
    })
}

/// An acceptor with our protocol floor, ciphers and ALPN, holding `loaded`.
fn builder_with(loaded: &Loaded) -> Result<SslAcceptorBuilder, ErrorStack> {
    // Mozilla intermediate (v5): TLS 1.2 and 1.3, ECDHE/DHE with AES-GCM or ChaCha20-Poly1305 only.
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder.set_certificate(&loaded.leaf)?;
    for extra in &loaded.chain {
        builder.add_extra_chain_cert(extra.clone())?;
    }
    builder.set_private_key(&loaded.key)?;
    builder.check_private_key()?;
    builder.set_alpn_select_callback(|_, client| {
        select_next_proto(ALPN, client).ok_or(AlpnError::NOACK)
    });
    Ok(builder)
}

/// SHA-256 of the leaf certificate (lowercase hex), for logs.
fn fingerprint(cert: &X509) -> String {
    cert.digest(openssl::hash::MessageDigest::sha256())
        .map(|d| hex::encode(d.as_ref()))
        .unwrap_or_default()
}

/// The certificate in use, replaceable while the server runs.
pub struct CertReloader {
    files: TlsFiles,
    current: Arc<RwLock<SslContext>>,
    fingerprint: RwLock<String>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Loads and checks the files (the key must belong to the certificate).
    pub fn load(files: TlsFiles) -> Result<CertReloader, TlsError> {
        let loaded = load(&files)?;
        let context = builder_with(&loaded)?.build().into_context();
        Ok(CertReloader {
            fingerprint: RwLock::new(fingerprint(&loaded.leaf)),
            files,
            current: Arc::new(RwLock::new(context)),
        })
    }

    /// Reads the files again and uses them for every new handshake; on any error the certificate
    /// in use stays. Returns the new certificate's SHA-256 fingerprint.
    pub fn reload(&self) -> Result<String, TlsError> {
        let loaded = load(&self.files)?;
        let context = builder_with(&loaded)?.build().into_context();
        let print = fingerprint(&loaded.leaf);
        if let Ok(mut current) = self.current.write() {
            *current = context;
        }
        if let Ok(mut fp) = self.fingerprint.write() {
            fp.clone_from(&print);
        }
        Ok(print)
    }

    /// SHA-256 fingerprint of the certificate in use.
    pub fn fingerprint(&self) -> String {
        self.fingerprint
            .read()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// The acceptor handed to actix: it starts with the certificate loaded now and switches every
    /// new connection to the current context before the certificate is chosen.
    pub fn acceptor(&self) -> Result<SslAcceptorBuilder, TlsError> {
        let loaded = load(&self.files)?;
        let mut builder = builder_with(&loaded)?;
        let current = Arc::clone(&self.current);
        builder.set_servername_callback(move |ssl, _alert| {
            let context = current.read().map_err(|_| SniError::ALERT_FATAL)?;
            ssl.set_ssl_context(&context)
                .map_err(|_| SniError::ALERT_FATAL)
        });
        Ok(builder)
    }
}
