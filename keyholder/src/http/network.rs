//! Who is calling: the client address (believing `X-Forwarded-For` only from trusted proxies) and
//! the rule that keeps the platform's own addresses off the agent and browser endpoints.

use std::net::{IpAddr, SocketAddr};

use actix_web::HttpRequest;
use ipnet::IpNet;

use super::error::ApiError;

/// Network rules from the configuration.
#[derive(Debug, Clone)]
pub struct NetworkRules {
    /// Platform egress addresses, refused on `/v1/credential`, `/v1/store` and `/v1/totp-code`.
    pub platform_ips: Vec<IpAddr>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // "1.2.3.4:5678" or "[::1]:5678"
    entry
        .parse::<SocketAddr>()
        .ok()
        .map(|sa| canonical(sa.ip()))
}

/// Who sent a request, as far as the network tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddress {
    /// The client's address.
    Known(IpAddr),
    /// No peer address (not a TCP connection).
    Unknown,
    /// A trusted proxy sent an `X-Forwarded-For` that cannot be read.
    Unreadable {
        /// The proxy's own address.
        peer: IpAddr,
    },
}

impl ClientAddress {
    /// The address, refusing an unreadable `X-Forwarded-For` (`400 invalid_request`).
    pub fn ip(self) -> Result<Option<IpAddr>, ApiError> {
        match self {
            ClientAddress::Known(ip) => Ok(Some(ip)),
            ClientAddress::Unknown => Ok(None),
            ClientAddress::Unreadable { .. } => Err(ApiError::InvalidRequest(
                "unreadable X-Forwarded-For".into(),
            )),
        }
    }

    /// The address where it is known (none for an unreadable header).
    pub fn known(self) -> Option<IpAddr> {
        match self {
            ClientAddress::Known(ip) => Some(ip),
            _ => None,
        }
    }

    /// The address a per-address limit counts against: an unreadable `X-Forwarded-For` from a
    /// trusted proxy counts against the proxy itself.
    pub fn accountable(self) -> Option<IpAddr> {
        match self {
            ClientAddress::Known(ip) | ClientAddress::Unreadable { peer: ip } => Some(ip),
            ClientAddress::Unknown => None,
        }
    }
}

/// The client address of `req`, as the request-context layer worked it out.
pub fn client_address(req: &HttpRequest) -> ClientAddress {
    super::layers::context(req).client
}

impl NetworkRules {
    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The caller's address: the peer, or, when the peer is a trusted proxy, the right-most
    /// address in `X-Forwarded-For` that is not itself a trusted proxy. An unreadable header from a
    /// trusted proxy is [`ClientAddress::Unreadable`] rather than guessed at. Worked out once per
    /// request by the request-context layer; read it with [`client_address`].
    pub fn client_address(&self, req: &HttpRequest) -> ClientAddress {
        let Some(peer) = req.peer_addr().map(|a| canonical(a.ip())) else {
            return ClientAddress::Unknown;
        };
        if !self.is_trusted(peer) {
            return ClientAddress::Known(peer);
        }
        let mut chain = Vec::new();
        for value in req.headers().get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else {
                return ClientAddress::Unreadable { peer };
            };
            for entry in text.split(',') {
                match parse_forwarded_entry(entry) {
                    Some(ip) => chain.push(ip),
                    None => return ClientAddress::Unreadable { peer },
                }
            }
        }
        let mut client = peer;
        for ip in chain.into_iter().rev() {
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        ClientAddress::Known(client)
    }

    /// Refuses the platform's own addresses (a compromised platform must not fetch credentials).
    pub fn refuse_platform(&self, req: &HttpRequest) -> Result<Option<IpAddr>, ApiError> {
        let client = client_address(req).ip()?;
        if let Some(ip) = client {
            if self.platform_ips.iter().any(|p| canonical(*p) == ip) {
                tracing::warn!(client = %ip, "platform address refused on an agent endpoint");
                return Err(ApiError::Forbidden(
                    "This endpoint does not accept calls from the platform's address",
                ));
            }
        }
        Ok(client)
    }
}
