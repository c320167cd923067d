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

impl NetworkRules {
    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The caller's address: the peer, or, when the peer is a trusted proxy, the right-most
    /// address in `X-Forwarded-For` that is not itself a trusted proxy. An unreadable header from a
    /// trusted proxy is refused rather than guessed at.
    pub fn client_ip(&self, req: &HttpRequest) -> Result<Option<IpAddr>, ApiError> {
        let Some(peer) = req.peer_addr().map(|a| canonical(a.ip())) else {
            return Ok(None);
        };
        if !self.is_trusted(peer) {
            return Ok(Some(peer));
        }
        let mut chain = Vec::new();
        for value in req.headers().get_all("x-forwarded-for") {
            let text = value
                .to_str()
                .map_err(|_| ApiError::InvalidRequest("unreadable X-Forwarded-For".into()))?;
            for entry in text.split(',') {
                let ip = parse_forwarded_entry(entry)
                    .ok_or_else(|| ApiError::InvalidRequest("unreadable X-Forwarded-For".into()))?;
                chain.push(ip);
            }
        }
        let mut client = peer;
        for ip in chain.into_iter().rev() {
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        Ok(Some(client))
    }

    /// Refuses the platform's own addresses (a compromised platform must not fetch credentials).
    pub fn refuse_platform(&self, req: &HttpRequest) -> Result<Option<IpAddr>, ApiError> {
        let client = self.client_ip(req)?;
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
