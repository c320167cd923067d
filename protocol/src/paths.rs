//! Path, header, timing and capability constants of the webhook protocol (version 2.4.0).

/// The protocol version the keyholder reports.
pub const PROTOCOL_VERSION: &str = "2.4.0";
/// The previous protocol version (no ticket constraints, no sealed TOTP links); checkers name it.
pub const PROTOCOL_VERSION_2_2: &str = "2.2.0";

/// `POST /v1/exchange`: bind-code exchange for the HMAC secret.
pub const PATH_EXCHANGE: &str = "/v1/exchange";
/// `GET|HEAD|POST /v1/health`.
pub const PATH_HEALTH: &str = "/v1/health";
/// `POST /v1/storage` (signed).
pub const PATH_STORAGE: &str = "/v1/storage";
/// `GET|POST /v1/credential` (ticket).
pub const PATH_CREDENTIAL: &str = "/v1/credential";
/// `POST /v1/store` (ticket).
pub const PATH_STORE: &str = "/v1/store";
/// `POST /v1/proxy` (signed and ticket).
pub const PATH_PROXY: &str = "/v1/proxy";
/// `POST /v1/refresh-notify` (signed).
pub const PATH_REFRESH_NOTIFY: &str = "/v1/refresh-notify";
/// `POST /v1/refresh` (signed, capability `tv-refresh`).
pub const PATH_REFRESH: &str = "/v1/refresh";
/// `GET|POST /v1/totp-code` (ticket).
pub const PATH_TOTP_CODE: &str = "/v1/totp-code";
/// `POST /v1/admin/migrate` (signed, 2.4.0): seals every stored `totpUri` link.
pub const PATH_ADMIN_MIGRATE: &str = "/v1/admin/migrate";
/// `GET /v1/identity` (Keyholder extension): the response-signing identity document.
pub const PATH_IDENTITY: &str = "/v1/identity";
/// `/bind` (Keyholder extension): the owner's bind page.
pub const PATH_BIND: &str = "/bind";
/// `GET /store?ticket=..&service=..` (Keyholder extension): the keyholder's own page where the
/// owner pastes a credential, so no script of the platform's ever sees it.
pub const PATH_STORE_PAGE: &str = "/store";
/// The keyholder's own page behind a notified one-time approval link (custody policies).
pub const PATH_APPROVAL_PAGE: &str = "/approval";
/// `GET /store.js` (Keyholder extension): the store page's script.
pub const PATH_STORE_PAGE_SCRIPT: &str = "/store.js";

/// HMAC request signature header (`sha256=<hex>`).
pub const HEADER_SIGNATURE: &str = "X-TokenVault-Signature";
/// Unix-seconds timestamp header of signed requests.
pub const HEADER_TIMESTAMP: &str = "X-TokenVault-Timestamp";
/// The platform's request id header.
pub const HEADER_PLATFORM_REQUEST_ID: &str = "X-TokenVault-Request-Id";
/// The request id header the keyholder returns.
pub const HEADER_REQUEST_ID: &str = "X-Request-Id";
/// Ed25519 response signature header (Keyholder extension).
pub const HEADER_KEYHOLDER_SIGNATURE: &str = "X-Keyholder-Signature";
/// The proxied upstream's status code.
pub const HEADER_UPSTREAM_STATUS: &str = "X-Upstream-Status";
/// Seconds until a rate-limited caller may try again (with `429 rate_limited`).
pub const HEADER_RETRY_AFTER: &str = "Retry-After";
/// Envelope header (Keyholder extension).
pub const HEADER_ENVELOPE: &str = "X-Keyholder-Envelope";

/// Largest accepted `|now - timestamp|` for signed requests, in seconds.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// How long a seen request id is remembered, in seconds.
pub const REQUEST_ID_TTL_SECS: i64 = 600;
/// Lifetime of a bind code, in seconds.
pub const BIND_CODE_TTL_SECS: i64 = 300;
/// Default cap on a ticket's lifetime (`exp - iat`), in seconds.
pub const DEFAULT_MAX_TICKET_LIFETIME_SECS: i64 = 3600;

/// The platform backend's fixed egress IP.
pub const PLATFORM_EGRESS_IP: &str = "34.12.35.243";
/// The platform frontend used in registration URLs by default.
pub const DEFAULT_FRONTEND: &str = "https://tokenvault.uk";

/// Capability: `/v1/store`.
pub const CAP_STORE: &str = "store";
/// Capability: `/v1/credential`.
pub const CAP_CREDENTIAL: &str = "credential";
/// Capability: `/v1/proxy`.
pub const CAP_PROXY: &str = "proxy";
/// Capability: `/v1/refresh-notify`.
pub const CAP_REFRESH: &str = "refresh";
/// Capability: `/v1/refresh` (opt-in: hands a refresh token to the platform).
pub const CAP_TV_REFRESH: &str = "tv-refresh";
/// Capability: `/v1/storage`.
pub const CAP_STORAGE: &str = "storage";
/// Capability (2.4.0): `/v1/totp-code` and TOTP codes on the credential path.
pub const CAP_TOTP: &str = "totp";
/// Capability (2.4.0): the ticket claims `cid` and `mode` are honoured.
pub const CAP_TICKET_CONSTRAINTS: &str = "ticketConstraints";

/// Every capability name in the canonical order of PROTOCOL.md §7.2.
pub const CANONICAL_CAPABILITIES: &[&str] = &[
    CAP_STORE,
    CAP_CREDENTIAL,
    CAP_PROXY,
    CAP_REFRESH,
    CAP_TV_REFRESH,
    CAP_STORAGE,
    CAP_TOTP,
    CAP_TICKET_CONSTRAINTS,
];

/// The capability list reported by exchange and health, in canonical order: everything the keyholder
/// offers, `tv-refresh` only when the owner enabled it.
pub fn capabilities(tv_refresh: bool) -> Vec<String> {
    CANONICAL_CAPABILITIES
        .iter()
        .filter(|c| tv_refresh || **c != CAP_TV_REFRESH)
        .map(|c| (*c).to_owned())
        .collect()
}

/// True when `list` names known capabilities only, each once, in canonical order.
pub fn is_canonical_order(list: &[String]) -> bool {
    let positions: Option<Vec<usize>> = list
        .iter()
        .map(|c| CANONICAL_CAPABILITIES.iter().position(|k| k == c))
        .collect();
    positions.is_some_and(|p| p.windows(2).all(|w| w[0] < w[1]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn capability_lists() {
        assert_eq!(
            capabilities(false),
            [
                "store",
                "credential",
                "proxy",
                "refresh",
                "storage",
                "totp",
                "ticketConstraints"
            ]
        );
        assert_eq!(
            capabilities(true),
            [
                "store",
                "credential",
                "proxy",
                "refresh",
                "tv-refresh",
                "storage",
                "totp",
                "ticketConstraints"
            ]
        );
        assert!(is_canonical_order(&capabilities(true)));
        assert!(is_canonical_order(&capabilities(false)));
        let swapped: Vec<String> = ["credential", "store"].map(String::from).to_vec();
        assert!(!is_canonical_order(&swapped));
        let doubled: Vec<String> = ["store", "store"].map(String::from).to_vec();
        assert!(!is_canonical_order(&doubled));
        let unknown: Vec<String> = ["store", "bogus"].map(String::from).to_vec();
        assert!(!is_canonical_order(&unknown));
    }
}
