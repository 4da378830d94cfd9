//! Hot-path costs of the statistics the data plane updates on every request.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum_stats::{
    EndpointConfig, EndpointTable, PeakEwma, RateCounter, WindowedHistogram, endpoint_hash,
};

fn latency(c: &mut Criterion) {
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

const PATH: &str = "/v1/users/12345/orders/3f2504e0-4f89-11d3-9a0c-0305e82c3301";

fn endpoints(c: &mut Criterion) {
    c.bench_function("endpoint_hash", |b| {
        b.iter(|| black_box(endpoint_hash(black_box("GET"), black_box(PATH))))
    });

    // A realistic table: 200 endpoints present, lookups hit an existing one.
    let table = EndpointTable::new(EndpointConfig::default());
    for i in 0..200 {
        table.get("GET", &format!("/api/r{i}/items/{i}"));
    }
    table.get("GET", PATH);
    c.bench_function("endpoint_table/get_hit", |b| {
        b.iter(|| black_box(table.get(black_box("GET"), black_box(PATH))))
    });
    c.bench_function("endpoint_table/get_hit_class", |b| {
        b.iter(|| black_box(table.get(black_box("GET"), black_box(PATH)).class()))
    });

    let stats = table.get("GET", PATH);
    let mut now = 0u64;
    c.bench_function("endpoint_stats/record", |b| {
        b.iter(|| {
            now += 10_000;
            stats.record(black_box(3_000_000), false, now);
        })
    });

    // Four threads hammering the same endpoint's lookup and record (contention on the
    // endpoint, not the table): the cost per request seen by one of them.
    let table = Arc::new(table);
    c.bench_function("endpoint_table/get_record_4_threads", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..4 {
                    let table = Arc::clone(&table);
                    s.spawn(move || {
                        for i in 0..iters {
                            let e = table.get("GET", PATH);
                            black_box(e.class());
                            e.record(3_000_000, false, i * 10_000);
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
}

fn rate(c: &mut Criterion) {
    let counter = RateCounter::new(Duration::from_secs(300));
    let mut now = 0u64;
    c.bench_function("rate_counter/record", |b| {
        b.iter(|| {
            now += 1_000;
            counter.record(black_box(now));
        })
    });
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = benches;
    config = config();
    targets = latency, endpoints, rate
}
criterion_main!(benches);
