//! Cost of one `Strategy::pick` for every strategy, by pool size.
//!
//! Pools of 10, 100 and 10,000 backends, all eligible, with weights 1..=4 and 0..=3
//! requests in flight (varied so least-connections and P2C compare real loads rather than
//! breaking ties everywhere). One benchmark group per strategy, the backend count as the
//! parameter: `cargo bench -p fulcrum-balance --bench pick -- p2c` runs one strategy.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_balance::{
    Backend, InFlightGuard, LiveBackend, LiveBackendConfig, PoolView, RequestInfo, StrategyKind,
    StrategyParams, build_strategy,
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

criterion_group!(benches, pick);
criterion_main!(benches);
