//! Hot-path costs of the statistics the data plane updates on every request.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum_stats::{PeakEwma, WindowedHistogram};

fn bench(c: &mut Criterion) {
    let ewma = PeakEwma::new(Duration::from_secs(10), Duration::from_millis(1), 0);
    let mut now = 0u64;
    c.bench_function("peak_ewma/observe", |b| {
        b.iter(|| {
            now += 1_000;
            ewma.observe(black_box(2_000_000), now);
        })
    });
    c.bench_function("peak_ewma/estimate", |b| {
        b.iter(|| black_box(ewma.estimate_ns(black_box(now))))
    });

    let h = WindowedHistogram::new(Duration::from_secs(60), 6);
    let mut t = 0u64;
    c.bench_function("windowed_histogram/record", |b| {
        b.iter(|| {
            t += 1_000;
            h.record(black_box(t % 50_000_000), t);
        })
    });
    c.bench_function("windowed_histogram/p99", |b| {
        b.iter(|| black_box(h.quantile(0.99, t)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
