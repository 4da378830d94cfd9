//! Cost of a route's rate-limit check, the only work a limit adds to a request.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum_config::{Rate, RateLimitConfig, RateLimitKey};
use fulcrum_proxy::ratelimit::RouteLimiter;

fn limiter(count: u32, per: RateLimitKey) -> RouteLimiter {
    RouteLimiter::new(&RateLimitConfig {
        rate: Rate {
            count,
            per: Duration::from_secs(1),
        },
        burst: None,
        per,
    })
}

fn checks(c: &mut Criterion) {
    let client: IpAddr = [10, 0, 0, 1].into();
    // Admitted: a rate far above what one thread can ask for.
    let route = limiter(1_000_000, RateLimitKey::Route);
    c.bench_function("rate_limit/route/admitted", |b| {
        b.iter(|| black_box(route.check(black_box(client))))
    });
    // Refused: one token per second, long spent.
    let empty = limiter(1, RateLimitKey::Route);
    let _ = empty.check(client);
    c.bench_function("rate_limit/route/refused", |b| {
        b.iter(|| black_box(empty.check(black_box(client))))
    });
    // Per client, 1000 clients in the map, admitted.
    let per_client = limiter(1_000_000, RateLimitKey::ClientIp);
    let clients: Vec<IpAddr> = (0..1000u32)
        .map(|i| IpAddr::from([10, 1, (i >> 8) as u8, i as u8]))
        .collect();
    for ip in &clients {
        let _ = per_client.check(*ip);
    }
    let mut i = 0;
    c.bench_function("rate_limit/client_ip/admitted_1000_clients", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            black_box(per_client.check(black_box(clients[i])))
        })
    });
}

criterion_group!(benches, checks);
criterion_main!(benches);
