//! The opt-in per-client-address request limit (`serve --rate-limit-per-ip N/min`, protocol 2.4.0's
//! `429 rate_limited` with `Retry-After`), applied to every route before anything else is done.
//!
//! Each address gets a GCRA bucket: up to `N` requests at once, then one more every `60/N` s. The
//! table holds at most [`MAX_TRACKED_ADDRESSES`] addresses; buckets that have refilled are dropped
//! when it is full, and should it still be full (a flood from very many addresses), the addresses
//! not in it share one bucket, so memory stays bounded and the flood is limited too. IPv6 addresses
//! are counted per /64, the smallest block a client is usually given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Most client addresses tracked at once.
pub const MAX_TRACKED_ADDRESSES: usize = 65_536;

const WINDOW_MS: u64 = 60_000;

/// The limiter of one server.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    /// Milliseconds each request adds to its bucket.
    interval_ms: u64,
    /// How far ahead of now a bucket may run before requests are refused.
    tolerance_ms: u64,
    started: Instant,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// Theoretical arrival time (ms since start) per address.
    by_address: HashMap<IpAddr, u64>,
    /// The shared bucket of addresses that found the table full.
    overflow: u64,
}

/// The key of an address: IPv4 as is, IPv6 by its /64.
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::from(segments)
        }
        v4 => v4,
    }
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests per minute per address (at least 1).
    pub fn new(per_minute: u32) -> RateLimiter {
        let per_minute = per_minute.max(1);
        let interval_ms = (WINDOW_MS / u64::from(per_minute)).max(1);
        RateLimiter {
            per_minute,
            interval_ms,
            tolerance_ms: WINDOW_MS.saturating_sub(interval_ms),
            started: Instant::now(),
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// The configured requests per minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Counts a request from `ip` now: `Err(retry_after_secs)` when it is over the limit.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.check_at(ip, now)
    }

    /// [`RateLimiter::check`] at `now_ms` (milliseconds on the limiter's clock).
    pub fn check_at(&self, ip: IpAddr, now_ms: u64) -> Result<(), u64> {
        let mut guard = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let buckets = &mut *guard;
        let key = bucket_key(ip);
        if !buckets.by_address.contains_key(&key)
            && buckets.by_address.len() >= MAX_TRACKED_ADDRESSES
        {
            // A refilled bucket is the same as none.
            buckets.by_address.retain(|_, tat| *tat > now_ms);
        }
        let tat = if buckets.by_address.len() < MAX_TRACKED_ADDRESSES
            || buckets.by_address.contains_key(&key)
        {
            buckets.by_address.entry(key).or_insert(0)
        } else {
            &mut buckets.overflow
        };
        let start = (*tat).max(now_ms);
        let ahead = start - now_ms;
        if ahead > self.tolerance_ms {
            let wait_ms = ahead - self.tolerance_ms;
            return Err(wait_ms.div_ceil(1000).max(1));
        }
        *tat = start.saturating_add(self.interval_ms);
        Ok(())
    }

    /// Number of addresses tracked (tests of the memory bound).
    pub fn tracked(&self) -> usize {
        match self.buckets.lock() {
            Ok(guard) => guard.by_address.len(),
            Err(poisoned) => poisoned.into_inner().by_address.len(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_minute_then_one_per_interval() {
        let limiter = RateLimiter::new(3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.check_at(ip, 1_000), Ok(()));
        }
        assert_eq!(limiter.check_at(ip, 1_000), Err(20));
        // Another address has its own bucket.
        assert_eq!(
            limiter.check_at("192.0.2.2".parse().unwrap(), 1_000),
            Ok(())
        );
        assert_eq!(limiter.check_at(ip, 20_999), Err(1));
        assert_eq!(limiter.check_at(ip, 21_000), Ok(()));
        assert!(limiter.check_at(ip, 21_000).is_err());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let limiter = RateLimiter::new(1);
        assert_eq!(limiter.check_at("2001:db8::1".parse().unwrap(), 0), Ok(()));
        assert!(limiter
            .check_at("2001:db8::ffff:1".parse().unwrap(), 0)
            .is_err());
        assert_eq!(
            limiter.check_at("2001:db8:0:1::1".parse().unwrap(), 0),
            Ok(())
        );
        // An IPv4-mapped address is the IPv4 address.
        assert_eq!(limiter.check_at("192.0.2.9".parse().unwrap(), 0), Ok(()));
        assert!(limiter
            .check_at("::ffff:192.0.2.9".parse().unwrap(), 0)
            .is_err());
    }

    #[test]
    fn memory_is_bounded() {
        let limiter = RateLimiter::new(1);
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 10) {
            let _ = limiter.check_at(IpAddr::from(i.to_be_bytes()), 0);
        }
        assert_eq!(limiter.tracked(), MAX_TRACKED_ADDRESSES);
        // Untracked addresses share the overflow bucket, which is now used up.
        assert!(limiter.check_at(IpAddr::from([250, 0, 0, 1]), 0).is_err());
        // Once buckets have refilled, the table makes room again.
        assert_eq!(
            limiter.check_at(IpAddr::from([250, 0, 0, 2]), 120_000),
            Ok(())
        );
        assert_eq!(limiter.tracked(), 1);
    }
}
