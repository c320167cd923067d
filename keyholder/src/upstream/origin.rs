//! The one meaning of "origin" on the outbound side: scheme, host and port of a destination, the
//! port always written out (`https://api.example.com:443`). The egress policy compares, pins and
//! allows origins in this form, and the audit entry of a proxied call names its upstream in it, so
//! what the trail shows is exactly what `keyholder egress allow` takes and what a pin holds.

use std::fmt;

use url::Url;

/// A destination's origin in its one canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

/// Why a URL has no origin of this form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    /// No host (`data:`, `mailto:` ...).
    #[error("the upstream URL has no host")]
    NoHost,
    /// No port given and none known for the scheme.
    #[error("the upstream URL has no port")]
    NoPort,
}

impl Origin {
    /// The origin of `url`: its scheme, its host in lower case without a trailing dot (IPv6 in
    /// brackets), and its port or the scheme's default one.
    pub fn of(url: &Url) -> Result<Origin, OriginError> {
        let host = url.host_str().ok_or(OriginError::NoHost)?;
        let port = url.port_or_known_default().ok_or(OriginError::NoPort)?;
        Ok(Origin {
            scheme: url.scheme().to_owned(),
            host: host.trim_end_matches('.').to_ascii_lowercase(),
            port,
        })
    }

    /// The scheme (`https`).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The host (IPv6 literals in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, the scheme's default one written out.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// `scheme://host:port`, the form stored in pins and allowlists and written to the audit trail.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn origin(text: &str) -> String {
        Origin::of(&Url::parse(text).unwrap()).unwrap().to_string()
    }

    #[test]
    fn the_default_port_is_written_out_and_the_host_normalised() {
        assert_eq!(
            origin("https://API.Example.com./v1?x=1"),
            "https://api.example.com:443"
        );
        assert_eq!(
            origin("https://api.example.com:443/"),
            "https://api.example.com:443"
        );
        assert_eq!(origin("http://example.com/"), "http://example.com:80");
        assert_eq!(origin("http://127.0.0.1:8080/x"), "http://127.0.0.1:8080");
        assert_eq!(origin("https://[::1]:8443/"), "https://[::1]:8443");
        assert_eq!(
            origin("https://user:pw@host.example/"),
            "https://host.example:443"
        );
    }

    #[test]
    fn urls_without_host_or_port_have_none() {
        assert_eq!(
            Origin::of(&Url::parse("data:text/plain,x").unwrap()),
            Err(OriginError::NoHost)
        );
        assert_eq!(
            Origin::of(&Url::parse("gopher://host.example/").unwrap()),
            Err(OriginError::NoPort)
        );
    }
}
