//! Client-certificate TLS to an upstream: one outbound client per credential (its certificate,
//! chain and key, plus any CA the owner trusts for that service), built on first use and cached
//! by a fingerprint of all of it. Each client has its own connection pool, so a connection opened
//! with one credential's certificate never carries another credential's request.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{build_client_with, UpstreamError, UpstreamSettings};

/// Most per-credential clients kept (each holds a pool); beyond it the cache starts afresh.
const MAX_CLIENTS: usize = 256;

/// A credential's TLS client identity (no Debug or Clone: it holds the private key).
pub struct ClientIdentity {
    /// Certificate, chain and key, PEM, in that order (what `reqwest::Identity::from_pem` reads).
    pem: Zeroizing<Vec<u8>>,
    /// PEM CA certificates the owner trusts for this upstream.
    ca_pem: Option<String>,
    fingerprint: [u8; 32],
}

impl ClientIdentity {
    /// Builds the identity of `service` from its stored fields; refuses what does not parse.
    pub fn new(
        service: &str,
        certificate: &str,
        chain: Option<&str>,
        private_key: &str,
        ca_pem: Option<&str>,
    ) -> Result<ClientIdentity, String> {
        let mut pem = Zeroizing::new(Vec::with_capacity(
            certificate.len() + chain.map_or(0, str::len) + private_key.len() + 2,
        ));
        for part in [Some(certificate), chain, Some(private_key)]
            .into_iter()
            .flatten()
        {
            pem.extend_from_slice(part.trim().as_bytes());
            pem.push(b'\n');
        }
        check_identity(&pem)?;
        let mut h = Sha256::new();
        for part in [
            service.as_bytes(),
            &pem[..],
            ca_pem.unwrap_or("").as_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Ok(ClientIdentity {
            pem,
            ca_pem: ca_pem.map(str::to_string),
            fingerprint: h.finalize().into(),
        })
    }

    /// SHA-256 of the leaf certificate's DER, hex (what the audit trail names; not secret).
    pub fn certificate_fingerprint(certificate: &str) -> Option<String> {
        let der = pem_blocks(certificate, "CERTIFICATE").into_iter().next()?;
        Some(hex::encode(Sha256::digest(&der)))
    }
}

/// Checks that `pem` holds at least one certificate and a private key that reqwest accepts.
pub fn check_identity(pem: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the certificate is not PEM text")?;
    if pem_blocks(text, "CERTIFICATE").is_empty() {
        return Err("'certificateData' holds no PEM certificate".into());
    }
    reqwest::Identity::from_pem(pem)
        .map(drop)
        .map_err(|_| "'certificateData' and 'privateKeyData' are not a usable PEM certificate and private key (PKCS#8, RSA or EC)".into())
}

fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let Some(stop) = after.find(&end) else {
            break;
        };
        let body: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[stop + end.len()..];
    }
    out
}

/// The per-credential clients.
#[derive(Default)]
pub struct IdentityClients {
    clients: Mutex<HashMap<[u8; 32], reqwest::Client>>,
}

impl IdentityClients {
    /// The client of `identity`, built on first use.
    pub fn get(
        &self,
        settings: &UpstreamSettings,
        identity: &ClientIdentity,
    ) -> Result<reqwest::Client, UpstreamError> {
        if let Some(client) = self
            .clients
            .lock()
            .ok()
            .and_then(|c| c.get(&identity.fingerprint).cloned())
        {
            return Ok(client);
        }
        let tls_identity = reqwest::Identity::from_pem(&identity.pem)
            .map_err(|_| UpstreamError::Failed("unusable client certificate".into()))?;
        let roots = match &identity.ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|_| UpstreamError::Failed("unusable CA certificates".into()))?,
            None => Vec::new(),
        };
        let client = build_client_with(settings, Some(tls_identity), roots)?;
        if let Ok(mut clients) = self.clients.lock() {
            if clients.len() >= MAX_CLIENTS {
                clients.clear();
            }
            clients.insert(identity.fingerprint, client.clone());
        }
        Ok(client)
    }
}
