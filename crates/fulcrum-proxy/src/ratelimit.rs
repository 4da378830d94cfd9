//! Local rate limits of routes (`routes[].rate_limit`): a GCRA token bucket from the
//! `governor` crate (the generic cell rate algorithm of ATM networks, equivalent to a
//! token bucket refilled one token every `per / count`), one for the route or one per
//! client IP address. Checking costs one atomic compare-and-swap (per-client: a sharded
//! map look-up first); nothing waits. A limiter survives reloads that leave its route's
//! position and settings unchanged, so a reload does not hand out a fresh burst.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use fulcrum_config::{RateLimitConfig, RateLimitKey};
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// A route's rate limiter.
#[derive(Debug)]
pub struct RouteLimiter {
    settings: RateLimitConfig,
    buckets: Buckets,
}

#[derive(Debug)]
enum Buckets {
    Route(DefaultDirectRateLimiter),
    ClientIp(DefaultKeyedRateLimiter<IpAddr>),
}

impl RouteLimiter {
    /// A limiter with `settings` (validated: rate count and burst 1..=1000000), its
    /// bucket full.
    pub fn new(settings: &RateLimitConfig) -> Self {
        // The rate's period is at least 1 s / 1000000 = 1 µs, and the burst at least 1.
        let period = settings.rate.period().max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(settings.burst()).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .expect("invariant: the period is at least 1 ns")
            .allow_burst(burst);
        let buckets = match settings.per {
            RateLimitKey::Route => Buckets::Route(governor::RateLimiter::direct(quota)),
            RateLimitKey::ClientIp => Buckets::ClientIp(governor::RateLimiter::keyed(quota)),
        };
        Self {
            settings: settings.clone(),
            buckets,
        }
    }

    /// The settings this limiter was built from.
    pub fn settings(&self) -> &RateLimitConfig {
        &self.settings
    }

    /// Takes one token for a request from `client`: `Ok` if admitted, else `Err` with
    /// how long until a token is available (for `Retry-After`).
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        // The limiter's own clock: building a clock calibrates it (microseconds).
        match &self.buckets {
            Buckets::Route(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(limiter.clock().now())),
            Buckets::ClientIp(limiter) => limiter
                .check_key(&client)
                .map_err(|not_until| not_until.wait_time_from(limiter.clock().now())),
        }
    }

    /// Drops the per-client buckets that have refilled (indistinguishable from new ones),
    /// so memory follows the clients active within a refill time. Called every 10 s.
    pub fn sweep(&self) {
        if let Buckets::ClientIp(limiter) = &self.buckets {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Client buckets held (0 for a per-route limiter).
    pub fn clients(&self) -> usize {
        match &self.buckets {
            Buckets::Route(_) => 0,
            Buckets::ClientIp(limiter) => limiter.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(count: u32, per_secs: u64, burst: Option<u32>, per: RateLimitKey) -> RouteLimiter {
        RouteLimiter::new(&RateLimitConfig {
            rate: fulcrum_config::Rate {
                count,
                per: Duration::from_secs(per_secs),
            },
            burst,
            per,
        })
    }

    #[test]
    fn a_route_bucket_admits_its_burst_then_refuses_with_a_wait() {
        let l = limit(10, 1, Some(3), RateLimitKey::Route);
        let ip: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..3 {
            assert_eq!(l.check(ip), Ok(()));
        }
        let wait = l.check(ip).expect_err("the bucket is empty");
        // One token comes back every 100 ms.
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(wait > Duration::ZERO);
        // Another client shares the route's bucket.
        assert!(l.check([10, 0, 0, 1].into()).is_err());
    }

    #[test]
    fn client_buckets_are_separate_and_swept_once_refilled() {
        let l = limit(1, 3600, Some(2), RateLimitKey::ClientIp);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(l.check(a), Ok(()));
        assert_eq!(l.check(a), Ok(()));
        let wait = l.check(a).expect_err("a's bucket is empty");
        assert!(
            wait > Duration::from_secs(1700),
            "about half an hour: {wait:?}"
        );
        assert_eq!(l.check(b), Ok(()), "b has its own bucket");
        assert_eq!(l.clients(), 2);
        // Neither bucket has refilled within the hour: both are kept.
        l.sweep();
        assert_eq!(l.clients(), 2);
    }
}
