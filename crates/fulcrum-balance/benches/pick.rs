//! Cost of one `Strategy::pick` for every strategy, by pool size.
//!
//! Pools of 10, 100 and 10,000 backends, all eligible, with weights 1..=4 and 0..=3
//! requests in flight (varied so least-connections and P2C compare real loads rather than
//! breaking ties everywhere). One benchmark group per strategy, the backend count as the
//! parameter: `cargo bench -p fulcrum-balance --bench pick -- p2c` runs one strategy.
//! Groups named `strategy/case` (`duration_class/long`, `tail_aware/ticked`) bench picks
//! that depend on the request class or on what a tick computed.
//! `rendezvous/keyed`, `ring_hash/keyed`, `maglev/keyed` (and `…/keyed_unbounded`) bench
//! the hashing strategies on requests that carry an affinity key (without one they only
//! round-robin). `contended/…` runs the strategies that read a shared table or
//! reservation on every pick from two threads at once (100 backends): the time is wall
//! time per pick, so perfect scaling is half the single-thread figure and shared-cache-line
//! writes (a lock's reader count) show up as more.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_balance::{
    Backend, DurationClassMode, InFlightGuard, LiveBackend, LiveBackendConfig, PoolView,
    RequestClass, RequestInfo, StrategyKind, StrategyParams, build_strategy,
};

const POOL_SIZES: [usize; 3] = [10, 100, 10_000];

/// Clock time of every pick: 1 s after the backends were created.
const NOW_NS: u64 = 1_000_000_000;

/// `n` backends with varied weights, and the guards holding their in-flight requests.
fn pool(n: usize) -> (Vec<Backend>, Vec<InFlightGuard>) {
    let backends: Vec<Backend> = (0..n)
        .map(|i| {
            let port = 10_000 + u16::try_from(i).expect("bench pools have < 55k backends");
            Backend {
                address: format!("10.0.0.1:{port}").into(),
                addr: ([10, 0, 0, 1], port).into(),
                weight: u32::try_from(i % 4 + 1).expect("1..=4 fits in u32"),
                live: Arc::new(LiveBackend::new(LiveBackendConfig::default(), 0)),
            }
        })
        .collect();
    let guards = backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| (0..(i * 7) % 4).map(|_| b.live.begin(0)))
        .collect();
    (backends, guards)
}

fn pick(c: &mut Criterion) {
    let pools: Vec<_> = POOL_SIZES.iter().map(|&n| pool(n)).collect();
    let req = RequestInfo::new(NOW_NS);
    for &kind in StrategyKind::ALL {
        let mut group = c.benchmark_group(kind.name());
        for (backends, _guards) in &pools {
            let strategy = build_strategy(kind, backends, &StrategyParams::default());
            let view = PoolView::new(backends, &[], false);
            group.bench_with_input(
                BenchmarkId::from_parameter(backends.len()),
                &view,
                |b, view| b.iter(|| strategy.pick(black_box(&req), black_box(view))),
            );
        }
        group.finish();
    }
}

/// The strategies whose pick depends on the request class or on state built by `tick`:
/// `duration_class` (static and adaptive, short and long requests, after a tick with a
/// sixth of the pool's requests long) and `tail_aware` after a tick.
fn pick_after_tick(c: &mut Criterion) {
    let pools: Vec<_> = POOL_SIZES
        .iter()
        .map(|&n| {
            let (backends, mut guards) = pool(n);
            guards.extend(
                backends
                    .iter()
                    .step_by(6)
                    .map(|b| b.live.begin_classified(0, true)),
            );
            (backends, guards)
        })
        .collect();
    let adaptive = StrategyParams {
        duration_class_mode: DurationClassMode::Adaptive,
        ..StrategyParams::default()
    };
    let cases = [
        (
            "duration_class/short",
            StrategyKind::DurationClass,
            StrategyParams::default(),
            RequestClass::Short,
        ),
        (
            "duration_class/long",
            StrategyKind::DurationClass,
            StrategyParams::default(),
            RequestClass::Long,
        ),
        (
            "duration_class/adaptive_short",
            StrategyKind::DurationClass,
            adaptive.clone(),
            RequestClass::Short,
        ),
        (
            "duration_class/adaptive_long",
            StrategyKind::DurationClass,
            adaptive,
            RequestClass::Long,
        ),
        (
            "tail_aware/ticked",
            StrategyKind::TailAware,
            StrategyParams::default(),
            RequestClass::Unknown,
        ),
    ];
    for (name, kind, params, class) in cases {
        let mut group = c.benchmark_group(name);
        let req = RequestInfo::new(NOW_NS).with_class(class);
        for (backends, _guards) in &pools {
            let strategy = build_strategy(kind, backends, &params);
            let view = PoolView::new(backends, &[], false);
            strategy.tick(&view, NOW_NS);
            group.bench_with_input(
                BenchmarkId::from_parameter(backends.len()),
                &view,
                |b, view| b.iter(|| strategy.pick(black_box(&req), black_box(view))),
            );
        }
        group.finish();
    }
}

/// The hashing strategies (`rendezvous`, `ring_hash`, `maglev`) on requests with an
/// affinity key, as the proxy calls them: a different key each pick (cycling through 4,096
/// keys, so table lookups miss the cache as they would in production) and the pool's
/// total in flight given in O(1). `keyed`: bounded load at its default factor 1.25; the
/// bench pool's loads do not follow its weights, so many backends are at their bound and
/// picks often walk past them or fall back to the O(n) least-loaded scan. `keyed_unbounded`:
/// the hashing alone.
fn pick_keyed(c: &mut Criterion) {
    let pools: Vec<_> = POOL_SIZES.iter().map(|&n| pool(n)).collect();
    let keys: Vec<u64> = (0..4_096u64)
        .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let unbounded = StrategyParams {
        bounded_load: None,
        ..StrategyParams::default()
    };
    let cases = [
        ("keyed", StrategyParams::default()),
        ("keyed_unbounded", unbounded),
    ];
    let kinds = StrategyKind::ALL.iter().filter(|k| k.uses_hash_key());
    for (&kind, (case, params)) in kinds.flat_map(|k| cases.iter().map(move |c| (k, c))) {
        let mut group = c.benchmark_group(format!("{}/{case}", kind.name()));
        for (backends, _guards) in &pools {
            let strategy = build_strategy(kind, backends, params);
            let total = backends.iter().map(|b| b.live.in_flight()).sum();
            let view = PoolView::new(backends, &[], false).with_total_in_flight(total);
            strategy.tick(&view, NOW_NS);
            let mut next = keys.iter().copied().cycle();
            group.bench_with_input(
                BenchmarkId::from_parameter(backends.len()),
                &view,
                |b, view| {
                    b.iter(|| {
                        let req = RequestInfo::new(NOW_NS).with_hash_key(next.next().unwrap_or(0));
                        strategy.pick(black_box(&req), black_box(view))
                    });
                },
            );
        }
        group.finish();
    }
}

/// Two threads picking at once from one strategy (see the module doc).
fn pick_contended(c: &mut Criterion) {
    const THREADS: u64 = 2;
    let (backends, _guards) = pool(100);
    let total = backends.iter().map(|b| b.live.in_flight()).sum();
    let unbounded = StrategyParams {
        bounded_load: None,
        ..StrategyParams::default()
    };
    let adaptive = StrategyParams {
        duration_class_mode: DurationClassMode::Adaptive,
        ..StrategyParams::default()
    };
    let cases = [
        ("ring_hash", StrategyKind::RingHash, unbounded.clone()),
        ("maglev", StrategyKind::Maglev, unbounded),
        (
            "duration_class_adaptive",
            StrategyKind::DurationClass,
            adaptive,
        ),
    ];
    let mut group = c.benchmark_group("contended");
    for (name, kind, params) in cases {
        let strategy = build_strategy(kind, &backends, &params);
        let view = PoolView::new(&backends, &[], false).with_total_in_flight(total);
        strategy.tick(&view, NOW_NS);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(THREADS);
                let start = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..THREADS {
                        let (strategy, view) = (&strategy, &view);
                        scope.spawn(move || {
                            for i in 0..per_thread {
                                let key = (i ^ (t << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                                let req = RequestInfo::new(NOW_NS)
                                    .with_hash_key(key)
                                    .with_class(RequestClass::Long);
                                black_box(strategy.pick(black_box(&req), view));
                            }
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, pick, pick_after_tick, pick_keyed, pick_contended);
criterion_main!(benches);
