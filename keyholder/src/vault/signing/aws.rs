//! AWS Signature Version 4 on the proxy path, with the AWS SDK's own signer (`aws-sigv4`): the
//! keyholder signs the request it is about to send (method, path, query, headers, body hash), so
//! the secret access key never leaves and no caller can have arbitrary bytes signed. Optional STS
//! `AssumeRole`: short-lived session credentials minted with the stored key and cached until
//! shortly before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use sha2::{Digest, Sha256};
use url::Url;
use zeroize::Zeroizing;

use super::config::AwsConfig;
use crate::upstream::{OutboundRequest, Upstream};
use crate::vault::minting::{KeyedLocks, EXPIRY_MARGIN_SECS};
use crate::vault::VaultError;

/// Longest `accessKeyId`, `secretAccessKey` and `sessionToken` accepted at store time.
pub const MAX_ACCESS_KEY_ID: usize = 128;
/// See [`MAX_ACCESS_KEY_ID`].
pub const MAX_SECRET_ACCESS_KEY: usize = 128;
/// See [`MAX_ACCESS_KEY_ID`].
pub const MAX_SESSION_TOKEN: usize = 8192;
/// Lifetime asked of STS for assumed-role sessions (seconds).
const SESSION_SECONDS: u32 = 3600;
const MAX_CACHED: usize = 1024;

/// An AWS key (no Debug or Clone: it holds the secret).
pub struct AwsKey {
    /// The access key id (not secret; shown in meta and the audit trail).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Zeroizing<String>,
    /// The session token of temporary credentials.
    pub session_token: Option<Zeroizing<String>>,
}

impl AwsKey {
    fn fingerprint(&self, config: &AwsConfig) -> [u8; 32] {
        let mut h = Sha256::new();
        let parts = [
            self.access_key_id.as_bytes(),
            self.secret_access_key.as_bytes(),
            self.session_token
                .as_deref()
                .map_or(&b""[..], |t| t.as_bytes()),
            config.role_arn.as_deref().unwrap_or("").as_bytes(),
            config.external_id.as_deref().unwrap_or("").as_bytes(),
            config.sts_url.as_deref().unwrap_or("").as_bytes(),
        ];
        for part in parts {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

/// Checks stored AWS key material (called at store time, before anything is sealed).
pub fn validate_key(
    access_key_id: Option<&str>,
    secret_access_key: Option<&str>,
    session_token: Option<&str>,
) -> Result<(), VaultError> {
    let invalid = |what: &str| VaultError::Invalid(format!("AWS credential: {what}"));
    let id = access_key_id.ok_or_else(|| invalid("'accessKeyId' missing"))?;
    if id.len() < 16
        || id.len() > MAX_ACCESS_KEY_ID
        || !id.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(invalid(
            "'accessKeyId' must be 16 to 128 letters and digits",
        ));
    }
    let secret = secret_access_key.ok_or_else(|| invalid("'secretAccessKey' missing"))?;
    if secret.is_empty()
        || secret.len() > MAX_SECRET_ACCESS_KEY
        || !secret.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(invalid(
            "'secretAccessKey' must be 1 to 128 printable characters",
        ));
    }
    if let Some(token) = session_token {
        if token.is_empty()
            || token.len() > MAX_SESSION_TOKEN
            || !token.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid(
                "'sessionToken' must be 1 to 8192 printable characters",
            ));
        }
    }
    Ok(())
}

/// `(service, region)` from a host of the form `[...].<service>.<region>.amazonaws.com`, or the
/// global endpoints (`s3`, `sts`, `iam` on `<service>.amazonaws.com`, which sign for us-east-1).
pub fn scope_from_host(host: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let rest = host.strip_suffix(".amazonaws.com")?;
    let labels: Vec<&str> = rest.split('.').collect();
    match labels.as_slice() {
        [.., service, region] if region.contains('-') => {
            Some((service.to_string(), region.to_string()))
        }
        [.., service] if matches!(*service, "s3" | "sts" | "iam") => {
            Some((service.to_string(), "us-east-1".to_string()))
        }
        _ => None,
    }
}

/// The signing scope of a request to `url`: the owner's settings first, then the host's form.
pub fn scope_for(url: &Url, config: Option<&AwsConfig>) -> Result<(String, String), VaultError> {
    let from_host = url.host_str().and_then(scope_from_host);
    let service = config
        .and_then(|c| c.service.clone())
        .or_else(|| from_host.as_ref().map(|(s, _)| s.clone()));
    let region = config
        .and_then(|c| c.region.clone())
        .or_else(|| from_host.as_ref().map(|(_, r)| r.clone()));
    match (service, region) {
        (Some(service), Some(region)) => Ok((service, region)),
        _ => Err(VaultError::Invalid(
            "cannot tell the AWS region and service from the upstream host; the owner sets them \
             with `keyholder sign-config set SERVICE --aws-region R --aws-service S`"
                .into(),
        )),
    }
}

/// Headers a caller must not supply on a signed request (the signer sets them).
fn signer_owned(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "x-amz-date" | "x-amz-security-token" | "x-amz-content-sha256"
    )
}

/// Signs `request` in place (headers), as `service` in `region`, at `time`.
pub fn sign_request(
    request: &mut OutboundRequest,
    key: &AwsKey,
    service: &str,
    region: &str,
    unsigned_payload: bool,
    time: SystemTime,
) -> Result<(), VaultError> {
    let names: Vec<HeaderName> = request
        .headers
        .keys()
        .filter(|n| signer_owned(n))
        .cloned()
        .collect();
    for name in names {
        request.headers.remove(name);
    }
    let identity: Identity = Credentials::new(
        key.access_key_id.clone(),
        key.secret_access_key.as_str(),
        key.session_token.as_ref().map(|t| t.to_string()),
        None,
        "keyholder",
    )
    .into();
    let mut settings = SigningSettings::default();
    // W3C trace context is ours (OpenTelemetry) and may be rewritten on the way, as the AWS SDKs
    // (botocore's SIGNED_HEADERS_BLACKLIST) assume: not signed.
    if let Some(excluded) = settings.excluded_headers.as_mut() {
        excluded.extend([
            std::borrow::Cow::Borrowed("traceparent"),
            std::borrow::Cow::Borrowed("tracestate"),
        ]);
    }
    if service == "s3" {
        // S3 signs the path as sent (no second encoding, no normalization) and wants the payload
        // hash in x-amz-content-sha256.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|_| VaultError::Invalid("AWS signing parameters are incomplete".into()))?
        .into();
    let mut headers = Vec::with_capacity(request.headers.len());
    for (name, value) in request.headers.iter() {
        let value = value.to_str().map_err(|_| {
            VaultError::Invalid(format!(
                "header '{name}' is not visible ASCII and cannot be signed"
            ))
        })?;
        headers.push((name.as_str(), value));
    }
    let body = match (&request.body, unsigned_payload && service == "s3") {
        (_, true) => SignableBody::UnsignedPayload,
        (Some(body), false) => SignableBody::Bytes(body),
        (None, false) => SignableBody::Bytes(&[]),
    };
    let signable = SignableRequest::new(
        request.method.as_str(),
        request.url.as_str(),
        headers.into_iter(),
        body,
    )
    .map_err(|_| VaultError::Invalid("the upstream request cannot be signed".into()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|_| VaultError::Invalid("the upstream request cannot be signed".into()))?
        .into_parts();
    let (signed_headers, _params) = instructions.into_parts();
    for header in signed_headers {
        let mut value = HeaderValue::from_str(header.value())
            .map_err(|_| VaultError::Invalid("AWS signature header".into()))?;
        value.set_sensitive(header.sensitive() || header.name() == "authorization");
        request
            .headers
            .insert(HeaderName::from_static(header.name()), value);
    }
    Ok(())
}

struct CachedSession {
    fingerprint: [u8; 32],
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Zeroizing<String>,
    expires_at: i64,
}

/// Assumed-role sessions by service (memory only).
#[derive(Default)]
pub struct SessionCache {
    sessions: Mutex<HashMap<String, CachedSession>>,
    flights: KeyedLocks,
}

impl SessionCache {
    fn cached(&self, service: &str, fingerprint: &[u8; 32], now: i64) -> Option<AwsKey> {
        let sessions = self.sessions.lock().ok()?;
        let s = sessions.get(service)?;
        (s.fingerprint == *fingerprint && now < s.expires_at - EXPIRY_MARGIN_SECS).then(|| AwsKey {
            access_key_id: s.access_key_id.clone(),
            secret_access_key: s.secret_access_key.clone(),
            session_token: Some(s.session_token.clone()),
        })
    }

    /// The session credentials of the role in `config`, assumed with `key` (cached). The STS
    /// endpoint `sts_url` was checked against the egress policy by the caller.
    pub async fn assume_role(
        &self,
        upstream: &Upstream,
        service: &str,
        key: &AwsKey,
        config: &AwsConfig,
        sts_url: Url,
    ) -> Result<AwsKey, VaultError> {
        let fingerprint = key.fingerprint(config);
        if let Some(hit) = self.cached(service, &fingerprint, crate::clock::now_unix()) {
            return Ok(hit);
        }
        let flight = self.flights.get(&format!("aws:{service}"));
        let _guard = flight.lock().await;
        if let Some(hit) = self.cached(service, &fingerprint, crate::clock::now_unix()) {
            return Ok(hit);
        }
        let session = call_sts(upstream, service, key, config, sts_url).await?;
        tracing::info!(
            service,
            expires_at = session.expires_at,
            "assumed an AWS role (session credentials cached)"
        );
        let minted = AwsKey {
            access_key_id: session.access_key_id.clone(),
            secret_access_key: session.secret_access_key.clone(),
            session_token: Some(session.session_token.clone()),
        };
        if let Ok(mut sessions) = self.sessions.lock() {
            if sessions.len() >= MAX_CACHED {
                sessions.clear();
            }
            sessions.insert(
                service.to_string(),
                CachedSession {
                    fingerprint,
                    ..session
                },
            );
        }
        Ok(minted)
    }
}

/// The STS endpoint of `config` (its `stsUrl`, else regional, else global).
pub fn sts_endpoint(config: &AwsConfig) -> Result<Url, VaultError> {
    let text = match (&config.sts_url, &config.region) {
        (Some(url), _) => url.clone(),
        (None, Some(region)) => format!("https://sts.{region}.amazonaws.com/"),
        (None, None) => "https://sts.amazonaws.com/".to_string(),
    };
    Url::parse(&text).map_err(|_| VaultError::Invalid("the STS URL is not a URL".into()))
}

/// The text of the first `<tag>` element in `xml` (STS answers are small and flat).
fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(xml[start..end].trim())
}

async fn call_sts(
    upstream: &Upstream,
    service: &str,
    key: &AwsKey,
    config: &AwsConfig,
    url: Url,
) -> Result<CachedSession, VaultError> {
    let session_name = format!(
        "keyholder-{}",
        service
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "=,.@-".contains(*c))
            .take(48)
            .collect::<String>()
    );
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("Action", "AssumeRole")
        .append_pair("Version", "2011-06-15")
        .append_pair("RoleArn", config.role_arn.as_deref().unwrap_or(""))
        .append_pair("RoleSessionName", &session_name)
        .append_pair("DurationSeconds", &SESSION_SECONDS.to_string());
    if let Some(id) = &config.external_id {
        form.append_pair("ExternalId", id);
    }
    let body = form.finish();
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
    );
    headers.insert(ACCEPT, HeaderValue::from_static("text/xml"));
    let region = url
        .host_str()
        .and_then(scope_from_host)
        .map(|(_, r)| r)
        .or_else(|| config.region.clone())
        .unwrap_or_else(|| "us-east-1".into());
    let mut request = OutboundRequest {
        method: Method::POST,
        url,
        headers,
        body: Some(bytes::Bytes::from(body)),
    };
    sign_request(&mut request, key, "sts", &region, false, SystemTime::now())?;
    let response = upstream
        .send_provider(request)
        .await
        .map_err(VaultError::Provider)?;
    if !response.status.is_success() {
        return Err(VaultError::ProviderRejected(format!(
            "STS AssumeRole answered HTTP {}",
            response.status.as_u16()
        )));
    }
    let text = Zeroizing::new(String::from_utf8_lossy(&response.body).into_owned());
    let missing = || VaultError::ProviderRejected("STS AssumeRole sent no credentials".into());
    let access_key_id = xml_text(&text, "AccessKeyId").ok_or_else(missing)?;
    let secret = xml_text(&text, "SecretAccessKey").ok_or_else(missing)?;
    let token = xml_text(&text, "SessionToken").ok_or_else(missing)?;
    validate_key(Some(access_key_id), Some(secret), Some(token))
        .map_err(|_| VaultError::ProviderRejected("STS sent malformed credentials".into()))?;
    let now = crate::clock::now_unix();
    let expires_at = xml_text(&text, "Expiration")
        .and_then(|e| {
            jiff::Timestamp::strptime("%Y-%m-%dT%H:%M:%S%.fZ", e)
                .or_else(|_| jiff::Timestamp::strptime("%Y-%m-%dT%H:%M:%SZ", e))
                .ok()
        })
        .map(|t| t.as_second())
        .unwrap_or(now + i64::from(SESSION_SECONDS))
        .min(now + i64::from(SESSION_SECONDS));
    Ok(CachedSession {
        fingerprint: [0; 32],
        access_key_id: access_key_id.to_string(),
        secret_access_key: Zeroizing::new(secret.to_string()),
        session_token: Zeroizing::new(token.to_string()),
        expires_at,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn scopes_from_hosts() {
        let s = |h: &str| scope_from_host(h);
        assert_eq!(
            s("s3.us-west-2.amazonaws.com"),
            Some(("s3".into(), "us-west-2".into()))
        );
        assert_eq!(
            s("bucket.s3.eu-central-1.amazonaws.com"),
            Some(("s3".into(), "eu-central-1".into()))
        );
        assert_eq!(
            s("bedrock-runtime.us-east-1.amazonaws.com"),
            Some(("bedrock-runtime".into(), "us-east-1".into()))
        );
        assert_eq!(
            s("sts.amazonaws.com"),
            Some(("sts".into(), "us-east-1".into()))
        );
        assert_eq!(s("amazonaws.com.evil.example"), None);
        assert_eq!(s("example.com"), None);
    }

    #[test]
    fn store_time_validation() {
        validate_key(
            Some("AKIDEXAMPLE12345"),
            Some("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            None,
        )
        .unwrap();
        assert!(validate_key(None, Some("x"), None).is_err());
        assert!(validate_key(Some("AKIDEXAMPLE12345"), None, None).is_err());
        assert!(validate_key(Some("short"), Some("x"), None).is_err());
        assert!(validate_key(Some("AKIDEXAMPLE12345"), Some(&"x".repeat(129)), None).is_err());
        assert!(validate_key(Some("AKIDEXAMPLE12345"), Some("a b"), None).is_err());
        assert!(
            validate_key(Some("AKIDEXAMPLE12345"), Some("x"), Some(&"t".repeat(9000))).is_err()
        );
    }

    /// Cases of AWS's published SigV4 test suite (`aws-signing-test-suite/v4/<case>`: request.txt,
    /// context.json and the Authorization of header-signed-request.txt; key `AKIDEXAMPLE`, region
    /// us-east-1, service `service`, 2015-08-30T12:36:00Z), run through our request handling.
    #[test]
    fn aws_signing_test_suite_cases() {
        // (case, method, target, headers, session token, signed headers, signature)
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<&'a str>,
            &'a str,
            &'a str,
        );
        let cases: [Case; 5] = [
            (
                "get-vanilla-query-order-key-case",
                "GET",
                "/?Param2=value2&Param1=value1",
                &[],
                None,
                "host;x-amz-date",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
            (
                "post-vanilla-query",
                "POST",
                "/?Param1=value1",
                &[],
                None,
                "host;x-amz-date",
                "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
            ),
            (
                "get-unreserved",
                "GET",
                "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                &[],
                None,
                "host;x-amz-date",
                "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
            ),
            (
                "post-header-key-sort",
                "POST",
                "/",
                &[("my-header1", "value1")],
                None,
                "host;my-header1;x-amz-date",
                "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
            ),
            (
                "get-vanilla-with-session-token",
                "GET",
                "/",
                &[],
                Some("6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"),
                "host;x-amz-date;x-amz-security-token",
                "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8",
            ),
        ];
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        for (name, method, target, headers, token, signed, signature) in cases {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let mut request = OutboundRequest {
                method: Method::from_bytes(method.as_bytes()).unwrap(),
                url: Url::parse(&format!("https://example.amazonaws.com{target}")).unwrap(),
                headers: map,
                body: None,
            };
            let key = AwsKey {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: Zeroizing::new(
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
                ),
                session_token: token.map(|t| Zeroizing::new(t.to_string())),
            };
            sign_request(&mut request, &key, "service", "us-east-1", false, time).unwrap();
            assert_eq!(
                request.headers["authorization"].to_str().unwrap(),
                format!(
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                     SignedHeaders={signed}, Signature={signature}"
                ),
                "{name}"
            );
        }
    }

    /// The example of AWS's documentation ("Signature Version 4 signing process", the
    /// `GET /?Action=ListUsers&Version=2010-05-08` IAM request of 2015-08-30T12:36:00Z, key
    /// `AKIDEXAMPLE` / `wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY`), whose published signature is
    /// `5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7`.
    #[test]
    fn published_aws_example() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        // Trace context (added by OpenTelemetry) is not signed: the published signature holds.
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let mut request = OutboundRequest {
            method: Method::GET,
            url: Url::parse("https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08")
                .unwrap(),
            headers,
            body: None,
        };
        let key = AwsKey {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: None,
        };
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        sign_request(&mut request, &key, "iam", "us-east-1", false, time).unwrap();
        let auth = request.headers["authorization"].to_str().unwrap();
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
        assert_eq!(request.headers["x-amz-date"], "20150830T123600Z");
    }
}
