//! The SSRF guard on every outbound call: which schemes and addresses the keyholder may reach, and a
//! DNS resolver that hands reqwest only addresses it has checked (so there is no second lookup).

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Why an address or URL may not be reached. The text names the destination, never a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("egress refused: {0}")]
pub struct EgressRefused(pub String);

/// How an address is treated by the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Globally routable: always allowed.
    Public,
    /// Loopback, private, unique-local, shared (CGNAT), documentation: allowed only with
    /// `--egress-allow-private`.
    Private(&'static str),
    /// Unspecified, multicast, broadcast/reserved, link-local, cloud metadata: never allowed.
    Forbidden(&'static str),
}

/// Classifies an address; IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 forms are judged by
/// the IPv4 address they carry.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => match classify_v4(v4) {
                // `::` itself maps to 0.0.0.0; `::1` is IPv6 loopback, not 0.0.0.1.
                _ if v6 == Ipv6Addr::LOCALHOST => AddressClass::Private("loopback"),
                class => class,
            },
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    let in_net = |net: [u8; 4], bits: u32| {
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
    };
    // Cloud metadata services first: some sit inside otherwise "private" ranges.
    if ip == Ipv4Addr::new(169, 254, 169, 254)
        || ip == Ipv4Addr::new(169, 254, 170, 2)
        || ip == Ipv4Addr::new(100, 100, 100, 200)
    {
        return AddressClass::Forbidden("cloud metadata");
    }
    if in_net([0, 0, 0, 0], 8) {
        return AddressClass::Forbidden("unspecified");
    }
    if in_net([169, 254, 0, 0], 16) {
        return AddressClass::Forbidden("link-local");
    }
    if in_net([224, 0, 0, 0], 4) {
        return AddressClass::Forbidden("multicast");
    }
    if in_net([240, 0, 0, 0], 4) {
        return AddressClass::Forbidden("reserved or broadcast");
    }
    if o[0] == 127 {
        return AddressClass::Private("loopback");
    }
    for (net, bits, what) in [
        ([10, 0, 0, 0], 8, "private"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 168, 0, 0], 16, "private"),
        ([100, 64, 0, 0], 10, "shared address space"),
        ([192, 0, 0, 0], 24, "IETF protocol assignments"),
        ([192, 0, 2, 0], 24, "documentation"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([192, 88, 99, 0], 24, "6to4 relay"),
    ] {
        if in_net(net, bits) {
            return AddressClass::Private(what);
        }
    }
    AddressClass::Public
}

fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d.
    if let Some(v4) = ip.to_ipv4() {
        return Some(v4);
    }
    let v4_at =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0) {
        return Some(v4_at(s[6], s[7]));
    }
    // 6to4 2002:AABB:CCDD::/48.
    if s[0] == 0x2002 {
        return Some(v4_at(s[1], s[2]));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        return AddressClass::Forbidden("cloud metadata");
    }
    if ip.is_unspecified() {
        return AddressClass::Forbidden("unspecified");
    }
    if ip.is_multicast() {
        return AddressClass::Forbidden("multicast");
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return AddressClass::Forbidden("link-local");
    }
    if ip.is_loopback() {
        return AddressClass::Private("loopback");
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return AddressClass::Private("unique-local");
    }
    if s[0] & 0xffc0 == 0xfec0 {
        return AddressClass::Private("site-local");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return AddressClass::Private("documentation");
    }
    // Teredo tunnels (2001::/32) and discard-only (100::/64) reach places we cannot judge.
    if (s[0] == 0x2001 && s[1] == 0) || (s[0] == 0x0100 && s[1..4].iter().all(|x| *x == 0)) {
        return AddressClass::Forbidden("tunnel or discard");
    }
    AddressClass::Public
}

/// The guard's settings, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct EgressGuard {
    /// Allow plain http and private (not forbidden) addresses.
    pub allow_private: bool,
}

impl EgressGuard {
    /// Refuses an address the guard does not allow.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), EgressRefused> {
        match classify(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Private(_) if self.allow_private => Ok(()),
            AddressClass::Private(what) | AddressClass::Forbidden(what) => {
                Err(EgressRefused(format!("the URL's address is {what}")))
            }
        }
    }

    /// Checks everything about a URL that can be checked without DNS: scheme, credentials in the
    /// URL, and an IP-literal host (reqwest does no lookup for one, so the resolver never sees it).
    pub fn check_url(&self, url: &Url) -> Result<(), EgressRefused> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_private => {}
            "http" => {
                return Err(EgressRefused(
                    "plain http is refused (only with --egress-allow-private)".into(),
                ))
            }
            other => return Err(EgressRefused(format!("scheme '{other}' is refused"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EgressRefused("user info in the URL is refused".into()));
        }
        match url.host() {
            None => Err(EgressRefused("the URL has no host".into())),
            Some(Host::Ipv4(v4)) => self.check_ip(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => self.check_ip(IpAddr::V6(v6)),
            Some(Host::Domain(name)) => {
                // A trailing-dot or numeric-looking name is still resolved and checked by the resolver.
                if name.is_empty() {
                    Err(EgressRefused("the URL has no host".into()))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The resolver to install in the shared client.
    pub fn resolver(&self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver { guard: *self })
    }
}

/// Resolves with the system resolver, then refuses the name if any address it resolves to is not
/// allowed (a name mixing public and private addresses is a rebinding attempt); otherwise returns
/// exactly the checked addresses, which reqwest then connects to.
pub struct GuardedResolver {
    guard: EgressGuard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| Box::new(e) as Box<dyn StdError + Send + Sync>)?
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(EgressRefused(format!("{host} has no address")))
                    as Box<dyn StdError + Send + Sync>);
            }
            for addr in &addrs {
                // The message goes to the platform: it names the class, never the address the
                // name resolves to (that stays in the server log).
                let class = match classify(addr.ip()) {
                    AddressClass::Public => continue,
                    AddressClass::Private(_) if guard.allow_private => continue,
                    AddressClass::Private(what) | AddressClass::Forbidden(what) => what,
                };
                tracing::warn!(host = %host, address = %addr.ip(), class, "egress refused: a name resolves to a refused address");
                return Err(Box::new(EgressRefused(format!(
                    "{host} resolves to an address the egress guard refuses"
                ))) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Finds a guard refusal anywhere in an error's source chain (reqwest wraps resolver errors).
pub fn find_refusal(err: &(dyn StdError + 'static)) -> Option<EgressRefused> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<EgressRefused>() {
            return Some(refused.clone());
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn class(s: &str) -> AddressClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn address_matrix() {
        for public in [
            "8.8.8.8",
            "140.82.112.3",
            "2606:4700::1111",
            "[::ffff:8.8.8.8]",
        ] {
            let ip = public.trim_matches(['[', ']']);
            assert_eq!(class(ip), AddressClass::Public, "{ip}");
        }
        for private in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "192.0.2.1",
            "2001:db8::1",
        ] {
            assert!(
                matches!(class(private), AddressClass::Private(_)),
                "{private}"
            );
        }
        for forbidden in [
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "169.254.1.1",
            "100.100.100.200",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "fe80::1",
            "ff02::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "2001::1",
        ] {
            assert!(
                matches!(class(forbidden), AddressClass::Forbidden(_)),
                "{forbidden}"
            );
        }
    }

    #[test]
    fn guard_on_and_off() {
        let on = EgressGuard {
            allow_private: false,
        };
        let off = EgressGuard {
            allow_private: true,
        };
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(on.check_url(&url("https://api.github.com/user")).is_ok());
        assert!(on.check_url(&url("http://api.github.com/user")).is_err());
        assert!(on.check_url(&url("https://127.0.0.1/")).is_err());
        assert!(on.check_url(&url("https://2130706433/")).is_err());
        assert!(on.check_url(&url("https://0x7f.1/")).is_err());
        assert!(on.check_url(&url("https://[::ffff:7f00:1]/")).is_err());
        assert!(on.check_url(&url("ftp://example.com/")).is_err());
        assert!(on.check_url(&url("https://user:pw@example.com/")).is_err());
        assert!(off.check_url(&url("http://127.0.0.1:8080/")).is_ok());
        assert!(off.check_url(&url("http://169.254.169.254/")).is_err());
        assert!(off.check_url(&url("http://0.0.0.0:80/")).is_err());
        assert!(off.check_url(&url("file:///etc/passwd")).is_err());
    }

    #[test]
    fn refusal_found_through_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Box<dyn StdError + Send + Sync>);
        let err = Outer(Box::new(EgressRefused("x".into())));
        assert!(find_refusal(&err).is_some());
    }
}
