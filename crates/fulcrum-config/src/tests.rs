//! Tests of the whole pipeline: text in, `Config` or located diagnostics out. The
//! per-error-class examples are files in `tests/invalid/`.

use std::collections::BTreeMap;
use std::time::Duration;

use fulcrum_balance::{OutlierPolicy, StrategyKind};
use proptest::prelude::*;

use super::*;

const FULL: &str = include_str!("../tests/valid/full.yaml");

const MINIMAL: &str = "\
listeners:
  - name: web
    listen: 127.0.0.1:8080
    routes:
      - pool: app
pools:
  app:
    backends:
      - address: 127.0.0.1:8081
";

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_ok(src: &str) -> Config {
    parse_with_env(src, "t.yaml", &no_env).unwrap_or_else(|e| panic!("{e}"))
}

/// The diagnostics of a rejected `src`, as `(line, column, path, message)`.
fn diags(src: &str) -> Vec<(usize, usize, String, String)> {
    parse_with_env(src, "t.yaml", &no_env)
        .expect_err("config should be rejected")
        .diagnostics
        .into_iter()
        .map(|d| (d.line, d.column, d.path, d.message))
        .collect()
}

/// `MINIMAL` with `extra` lines appended inside pool `app` (4-space indented keys).
fn with_pool_keys(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn minimal_config_gets_every_default() {
    let c = parse_ok(MINIMAL);
    let expected = Config {
        listeners: vec![ListenerConfig {
            name: "web".into(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            routes: vec![RouteConfig {
                r#match: None,
                pool: "app".into(),
                backend_tags: BTreeMap::new(),
                rate_limit: None,
            }],
            ..ListenerConfig::default()
        }],
        pools: [(
            "app".to_owned(),
            PoolConfig {
                backends: vec![BackendConfig::new("127.0.0.1:8081")],
                ..PoolConfig::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Config::default()
    };
    assert_eq!(c, expected);

    // And the defaults are the documented ones, spelt out.
    assert_eq!(c.runtime.threads, 0);
    assert_eq!(c.runtime.drain_timeout, secs(30));
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
    assert_eq!(c.admin.token, None);
    let l = &c.listeners[0];
    assert_eq!(l.protocol, Protocol::Http);
    assert_eq!(l.timeouts.request_header, secs(10));
    assert_eq!(l.timeouts.idle, secs(60));
    let p = &c.pools["app"];
    assert_eq!(p.strategy, StrategyKind::RoundRobin);
    assert_eq!(p.backends[0].weight, 1);
    assert!(p.backends[0].tags.is_empty());
    assert_eq!(p.timeouts.connect, secs(1));
    assert_eq!(p.timeouts.response_header, secs(30));
    assert_eq!(p.timeouts.idle, secs(60));
    assert_eq!(p.retry.attempts, 2);
    assert_eq!(p.retry.budget_percent, 20);
    assert_eq!(p.retry.min_retry_concurrency, 3);
    assert_eq!(p.retry.retry_on, [RetryOn::ConnectFailure, RetryOn::Reset]);
    assert!(!p.retry.retry_non_idempotent);
    assert_eq!(p.health_check, None);
    assert_eq!(p.outlier_detection.consecutive_failures, 5);
    assert_eq!(p.outlier_detection.base_ejection_time, secs(30));
    assert_eq!(p.outlier_detection.max_ejection_time, secs(300));
    assert_eq!(p.outlier_detection.max_ejection_percent, 10);
    assert_eq!(p.panic_threshold, 0);
    assert_eq!(p.default_max_requests, 0);
    assert_eq!(p.backends[0].max_requests, 0);
    assert_eq!(
        (p.queue.max_size, p.queue.timeout, p.queue.priority),
        (1024, secs(5), QueuePriority::Class)
    );
    assert_eq!(p.stats.ewma_decay, secs(10));
    assert_eq!(p.stats.latency_window, secs(60));
    assert_eq!(p.stats.stats_window, 5);
    assert_eq!(p.stats.max_endpoints, 1000);
    assert_eq!(p.stats.long_request_threshold, Duration::from_millis(5000));
    assert_eq!(p.stats.long_request_hysteresis, 0.2);
    let a = &p.analysis;
    assert_eq!(a.horizon, secs(300));
    assert_eq!(
        (a.holt_alpha, a.holt_beta, a.anomaly_threshold, a.min_rate),
        (0.5, 0.1, 4.0, 5.0)
    );
    assert!(!p.dynamic_weights.enabled);
    assert_eq!(p.dynamic_weights.interval, secs(1));
    assert_eq!(p.dynamic_weights.smoothing, 0.3);
    assert_eq!(p.slow_start.window, Duration::ZERO);
    assert_eq!(p.slow_start.aggression, 1.0);
    assert_eq!(p.slow_start.min_weight_percent, 10);
    assert_eq!(p.hash.key, HashKey::ClientIp);
    assert_eq!(p.hash.name, None);
    assert_eq!(p.hash.bounded_load, 1.25);
    assert_eq!(
        (
            p.hash.table_size,
            p.hash.points_per_weight,
            p.hash.ring_size
        ),
        (65537, 160, 0)
    );
    assert_eq!(p.duration_class.mode, DurationClassMode::Static);
    assert!(p.duration_class.short_backends.is_empty());
    assert_eq!(p.tail_aware.target_p99, Duration::from_millis(200));
    assert_eq!((p.tail_aware.beta, p.tail_aware.gamma), (1.0, 1.0));
    assert!(p.tail_aware.adapt);
    assert_eq!(p.response_time.exploration, 0.05);
    assert_eq!(p.hedge, None);

    let hc = HealthCheckConfig::default();
    assert_eq!(hc.r#type, HealthCheckKind::Http);
    assert_eq!(hc.path, "/health");
    assert_eq!(hc.host, None);
    assert_eq!(
        hc.expected_status,
        StatusRange {
            start: 200,
            end: 299
        }
    );
    assert_eq!(
        (hc.interval, hc.timeout, hc.rise, hc.fall),
        (secs(2), secs(1), 2, 3)
    );
}

#[test]
fn an_empty_hedge_block_turns_hedging_on_with_the_defaults() {
    let c = parse_ok(&with_pool_keys("    hedge: {}\n"));
    let h = c.pools["app"].hedge.clone().unwrap();
    assert_eq!(h, HedgeConfig::default());
    assert_eq!(h.delay, HedgeDelay::P95);
    assert_eq!(h.min_delay, Duration::from_millis(5));
    assert_eq!((h.budget_percent, h.max_body_bytes), (10, 65536));
    // `hedge:` alone is YAML null: no hedging.
    assert_eq!(
        parse_ok(&with_pool_keys("    hedge:\n")).pools["app"].hedge,
        None
    );
}

#[test]
fn an_empty_health_check_block_gets_the_check_defaults() {
    let c = parse_ok(&with_pool_keys("    health_check: {}\n"));
    assert_eq!(
        c.pools["app"].health_check,
        Some(HealthCheckConfig::default())
    );
}

#[test]
fn full_config_has_every_value() {
    let c = parse_ok(FULL);
    assert_eq!(
        c.runtime,
        RuntimeConfig {
            threads: 4,
            drain_timeout: secs(45)
        }
    );
    assert_eq!(
        c.log,
        LogConfig {
            level: "info,fulcrum_proxy=debug".into(),
            format: LogFormat::Json
        }
    );
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9902");
    assert_eq!(c.admin.token.as_deref(), Some("s3cret"));

    assert_eq!(c.listeners.len(), 2);
    let web = &c.listeners[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(
        web.timeouts,
        ListenerTimeouts {
            request_header: secs(5),
            idle: secs(90),
            send: secs(120),
        }
    );
    assert_eq!(web.max_connections, 20000);
    assert_eq!(c.listeners[1].max_connections, 0);
    assert_eq!(
        web.routes,
        [
            RouteConfig {
                r#match: Some(RouteMatch {
                    host: Some("*.example.com".into()),
                    path_prefix: Some("/api".into()),
                    header: Some(HeaderMatch {
                        name: "x-canary".into(),
                        value: Some("1".into())
                    }),
                }),
                pool: "api".into(),
                backend_tags: BTreeMap::new(),
                rate_limit: None,
            },
            RouteConfig {
                r#match: Some(RouteMatch {
                    header: Some(HeaderMatch {
                        name: "x-debug".into(),
                        value: None
                    }),
                    ..RouteMatch::default()
                }),
                pool: "api".into(),
                backend_tags: BTreeMap::new(),
                rate_limit: Some(RateLimitConfig {
                    rate: Rate {
                        count: 30,
                        per: Duration::from_secs(60),
                    },
                    burst: Some(10),
                    per: RateLimitKey::ClientIp,
                }),
            },
            RouteConfig {
                r#match: None,
                pool: "app".into(),
                backend_tags: BTreeMap::new(),
                rate_limit: None,
            },
        ]
    );
    let pg = &c.listeners[1];
    assert_eq!((pg.name.as_str(), pg.protocol), ("postgres", Protocol::Tcp));
    assert_eq!(pg.listen.to_string(), "[::1]:5433");

    assert_eq!(c.pools.keys().collect::<Vec<_>>(), ["app", "api", "db"]);
    let app = &c.pools["app"];
    assert_eq!(app.strategy, StrategyKind::PeakEwma);
    assert_eq!(app.default_max_requests, 32);
    assert_eq!(
        app.queue,
        QueueConfig {
            max_size: 500,
            timeout: secs(2),
            priority: QueuePriority::Fifo,
        }
    );
    assert_eq!(
        app.backends,
        [
            BackendConfig {
                address: "127.0.0.1:8081".into(),
                weight: 3,
                tags: BTreeMap::from([("rack".into(), "7".into()), ("zone".into(), "a".into())]),
                max_requests: 64,
            },
            BackendConfig::new("[::1]:8082"),
            BackendConfig {
                weight: 2,
                ..BackendConfig::new("app-3.internal:8083")
            },
        ]
    );
    assert_eq!(
        app.timeouts,
        UpstreamTimeouts {
            connect: Duration::from_millis(250),
            response_header: secs(10),
            read: secs(60),
            idle: secs(30),
        }
    );
    assert_eq!(
        app.retry,
        RetryConfig {
            attempts: 3,
            budget_percent: 25,
            min_retry_concurrency: 5,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::Timeout,
                RetryOn::Status(502),
                RetryOn::Status(503),
            ],
            retry_non_idempotent: true,
            max_body_bytes: 131_072,
        }
    );
    assert_eq!(
        app.health_check,
        Some(HealthCheckConfig {
            r#type: HealthCheckKind::Http,
            path: "/healthz".into(),
            host: Some("app.internal".into()),
            expected_status: StatusRange {
                start: 200,
                end: 399
            },
            interval: secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 2,
        })
    );
    assert_eq!(
        app.outlier_detection,
        OutlierDetectionConfig {
            consecutive_failures: 3,
            base_ejection_time: secs(5),
            max_ejection_time: secs(60),
            max_ejection_percent: 50,
        }
    );
    assert_eq!(app.panic_threshold, 30);
    assert_eq!(
        app.stats,
        StatsConfig {
            ewma_decay: secs(5),
            latency_window: secs(120),
            stats_window: 8,
            max_endpoints: 500,
            long_request_threshold: secs(2),
            long_request_hysteresis: 0.25,
        }
    );
    assert_eq!(
        app.analysis,
        AnalysisConfig {
            horizon: secs(600),
            holt_alpha: 0.4,
            holt_beta: 0.2,
            anomaly_threshold: 3.5,
            min_rate: 1.0,
        }
    );
    assert_eq!(
        app.dynamic_weights,
        DynamicWeightsConfig {
            enabled: true,
            interval: secs(2),
            smoothing: 0.5,
        }
    );
    assert_eq!(
        app.slow_start,
        SlowStartConfig {
            window: secs(30),
            aggression: 2.0,
            min_weight_percent: 20,
        }
    );
    assert_eq!(
        app.hash,
        HashConfig {
            key: HashKey::Header,
            name: Some("x-user-id".into()),
            bounded_load: 1.5,
            table_size: 655_373,
            points_per_weight: 160,
            ring_size: 0,
        }
    );
    assert_eq!(
        app.duration_class,
        DurationClassConfig {
            mode: DurationClassMode::Static,
            short_backends: vec!["[::1]:8082".into()],
        }
    );
    assert_eq!(
        app.tail_aware,
        TailAwareConfig {
            target_p99: Duration::from_millis(150),
            beta: 0.5,
            gamma: 2.0,
            adapt: false,
        }
    );
    assert_eq!(app.response_time, ResponseTimeConfig { exploration: 0.1 });
    assert_eq!(
        app.hedge,
        Some(HedgeConfig {
            delay: HedgeDelay::P95,
            min_delay: Duration::from_millis(10),
            budget_percent: 5,
            max_body_bytes: 0,
        })
    );

    let api = &c.pools["api"];
    assert_eq!(api.protocol, crate::UpstreamProtocol::Http2);
    assert_eq!(c.pools["app"].protocol, crate::UpstreamProtocol::Http1);
    assert_eq!(api.strategy, StrategyKind::P2c);
    let hc = api.health_check.as_ref().unwrap();
    assert_eq!(
        (hc.r#type, hc.interval, hc.timeout, hc.rise, hc.fall),
        (HealthCheckKind::Tcp, secs(5), secs(2), 3, 3)
    );
    assert_eq!(
        api.hash,
        HashConfig {
            key: HashKey::Cookie,
            name: Some("session".into()),
            bounded_load: 0.0,
            ..HashConfig::default()
        }
    );
    assert_eq!(
        api.hedge,
        Some(HedgeConfig {
            delay: HedgeDelay::Fixed(Duration::from_millis(50)),
            ..HedgeConfig::default()
        })
    );
    assert_eq!(c.pools["db"].hedge, None);
    assert_eq!(c.pools["db"].outlier_detection.consecutive_failures, 0);
}

#[test]
fn serialized_config_parses_back_to_itself() {
    for src in [FULL, MINIMAL] {
        let c = parse_ok(src);
        let yaml = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(parse_ok(&yaml), c, "{yaml}");
    }
}

#[test]
fn code_built_config_validates_without_positions() {
    let mut c = parse_ok(MINIMAL);
    assert_eq!(c.validate(), Ok(()));
    c.pools.get_mut("app").unwrap().backends.clear();
    c.listeners[0].routes[0].pool = "nope".into();
    let err = c.validate().unwrap_err();
    assert_eq!(
        err.to_string(),
        "config: listeners[0].routes[0].pool: route names pool `nope`, which is not defined \
         (defined pools: app)\nconfig: pools.app.backends: pool `app` has no backends; add at \
         least one, or discover them (`discovery.source: dns | registry`)"
    );
    assert_eq!(
        Config::default().validate().unwrap_err().diagnostics.len(),
        2
    );
}

#[test]
fn outlier_detection_converts_to_the_policy() {
    let c = parse_ok(FULL);
    let policy: OutlierPolicy = (&c.pools["app"].outlier_detection).into();
    assert_eq!(
        policy,
        OutlierPolicy {
            consecutive_failures: 3,
            base_ejection_time: secs(5),
            max_ejection_time: secs(60),
            max_ejection_percent: 50,
        }
    );
    assert_eq!(
        OutlierPolicy::from(OutlierDetectionConfig::default()),
        OutlierPolicy::default()
    );
}

#[test]
fn env_references_expand_and_keep_columns() {
    let env = |name: &str| match name {
        "BACKEND_HOST" => Some("a-long-backend-host-name.internal".to_owned()),
        "WEIGHT" => Some("x".to_owned()),
        _ => None,
    };
    let src = MINIMAL.replace("127.0.0.1:8081", "${BACKEND_HOST}:${PORT:-8081}");
    let c = parse_with_env(&src, "t.yaml", &env).unwrap();
    assert_eq!(
        c.pools["app"].backends[0].address,
        "a-long-backend-host-name.internal:8081"
    );

    // An error after an expansion on the same line points at the original column.
    let src = format!("{MINIMAL}        tags: {{ a: ${{BACKEND_HOST}} }}\n        weight: 0\n");
    let err = parse_with_env(&src, "t.yaml", &env).unwrap_err();
    assert_eq!(err.diagnostics[0].line, 11);
    assert_eq!(err.diagnostics[0].column, 17);
    let src = format!("{MINIMAL}        tags: {{ a: ${{BACKEND_HOST}}, b: [] }}\n");
    let err = parse_with_env(&src, "t.yaml", &env).unwrap_err();
    let d = &err.diagnostics[0];
    assert_eq!(
        (d.line, d.column, d.path.as_str()),
        (10, 40, "pools.app.backends[0].tags.b")
    );

    // `$${` is a literal `${`.
    let src = format!("admin: {{ token: \"$${{literal}}\" }}\n{MINIMAL}");
    assert_eq!(parse_ok(&src).admin.token.as_deref(), Some("${literal}"));
}

#[test]
fn every_unset_variable_is_reported_with_its_field() {
    let src = MINIMAL
        .replace("127.0.0.1:8080", "127.0.0.1:${LISTEN_PORT}")
        .replace("127.0.0.1:8081", "${HOST}:${PORT}");
    let d = diags(&src);
    let got: Vec<_> = d.iter().map(|(l, c, p, _)| (*l, *c, p.as_str())).collect();
    assert_eq!(
        got,
        [
            (3, 23, "listeners[0].listen"),
            (9, 18, "pools.app.backends[0].address"),
            (9, 26, "pools.app.backends[0].address"),
        ]
    );
    assert!(d[0].3.contains("`LISTEN_PORT` is not set"), "{}", d[0].3);
}

#[test]
fn unknown_strategy_lists_every_valid_name() {
    let d = diags(&with_pool_keys("    strategy: fastest\n"));
    assert_eq!(d.len(), 1);
    let (line, column, path, message) = &d[0];
    assert_eq!(
        (*line, *column, path.as_str()),
        (10, 15, "pools.app.strategy")
    );
    for name in StrategyKind::NAMES {
        assert!(message.contains(name), "{message}");
    }
}

#[test]
fn every_strategy_name_is_accepted() {
    for name in StrategyKind::NAMES {
        let c = parse_ok(&with_pool_keys(&format!("    strategy: {name}\n")));
        assert_eq!(c.pools["app"].strategy.name(), *name);
    }
}

#[test]
fn wrong_types_name_the_field() {
    let cases = [
        (
            "    panic_threshold: lots\n",
            "pools.app.panic_threshold",
            "invalid type: string \"lots\", expected a whole number, 0 or more",
        ),
        (
            "    panic_threshold: 300\n",
            "pools.app.panic_threshold",
            "expected an integer 0..=255",
        ),
        (
            "    retry: { retry_non_idempotent: maybe }\n",
            "pools.app.retry.retry_non_idempotent",
            "expected a boolean",
        ),
        (
            "    retry: { retry_on: [404] }\n",
            "pools.app.retry.retry_on[0]",
            "status 404 is not retriable",
        ),
        (
            "    retry: { retry_on: [oops] }\n",
            "pools.app.retry.retry_on[0]",
            "unknown retry condition `oops`",
        ),
        (
            "    retry: 3\n",
            "pools.app.retry",
            "invalid type: integer `3`, expected a mapping",
        ),
        (
            "    retry: { retry_on: reset }\n",
            "pools.app.retry.retry_on",
            "invalid type: string \"reset\", expected a sequence",
        ),
        (
            "    health_check: { type: grpc }\n",
            "pools.app.health_check.type",
            "unknown variant `grpc`, expected `http` or `tcp`",
        ),
        (
            "    health_check: { expected_status: 2xx }\n",
            "pools.app.health_check.expected_status",
            "invalid status range `2xx`",
        ),
        (
            "    stats: { ewma_decay: 1.5 }\n",
            "pools.app.stats.ewma_decay",
            "invalid duration `1.5`: missing unit",
        ),
        (
            "    stats: { stats_window: -1 }\n",
            "pools.app.stats.stats_window",
            "integer `-1`, expected a whole number, 0 or more",
        ),
        (
            "    analysis: { holt_alpha: high }\n",
            "pools.app.analysis.holt_alpha",
            "invalid type: string \"high\", expected a number",
        ),
        (
            "    slow_start: { windw: 1s }\n",
            "pools.app.slow_start.windw",
            "unknown field `windw`, expected one of `window`, `aggression`",
        ),
        (
            "    hash: { key: ip }\n",
            "pools.app.hash.key",
            "unknown variant `ip`, expected one of `header`, `cookie`, `path`, `client_ip`",
        ),
        (
            "    duration_class: { mode: dynamic }\n",
            "pools.app.duration_class.mode",
            "unknown variant `dynamic`, expected `static` or `adaptive`",
        ),
        (
            "    duration_class: { short_backends: 127.0.0.1:8081 }\n",
            "pools.app.duration_class.short_backends",
            "invalid type: string \"127.0.0.1:8081\", expected a sequence",
        ),
        (
            "    tail_aware: { adapt: sometimes }\n",
            "pools.app.tail_aware.adapt",
            "expected a boolean",
        ),
        (
            "    hedge: { delay: 50 }\n",
            "pools.app.hedge.delay",
            "invalid hedge delay `50`: missing unit, e.g. 50ms; or `p95`",
        ),
        (
            "    hedge: { delay: P99 }\n",
            "pools.app.hedge.delay",
            "invalid duration `P99`",
        ),
        (
            "    hedge: { max_body_bytes: lots }\n",
            "pools.app.hedge.max_body_bytes",
            "expected a whole number, 0 or more",
        ),
        (
            "    hedge: true\n",
            "pools.app.hedge",
            "invalid type: boolean `true`, expected a mapping",
        ),
    ];
    for (extra, path, message) in cases {
        let d = diags(&with_pool_keys(extra));
        assert_eq!(d.len(), 1, "{extra}: {d:?}");
        assert_eq!(d[0].0, 10, "{extra}: {d:?}");
        assert_eq!(d[0].2, path, "{extra}");
        assert!(d[0].3.contains(message), "{extra}: {}", d[0].3);
    }
}

#[test]
fn semantic_checks_of_pool_fields() {
    let cases = [
        (
            "    health_check: { path: health }\n",
            "pools.app.health_check.path",
            "health check path `health` must start with `/`",
        ),
        (
            "    health_check: { interval: 500ms }\n",
            "pools.app.health_check.interval",
            "health check timeout (1s) must be less than its interval (500ms)",
        ),
        (
            "    health_check: { rise: 0 }\n",
            "pools.app.health_check.rise",
            "must be at least 1",
        ),
        (
            "    health_check: { type: tcp, path: /x }\n",
            "pools.app.health_check.path",
            "`path` applies to http health checks only",
        ),
        (
            "    health_check: { type: tcp, expected_status: 204 }\n",
            "pools.app.health_check.expected_status",
            "`expected_status` applies to http health checks only",
        ),
        (
            "    timeouts: { connect: 0s }\n",
            "pools.app.timeouts.connect",
            "must be greater than 0",
        ),
        (
            "    retry: { budget_percent: 101 }\n",
            "pools.app.retry.budget_percent",
            "101 is not a percentage",
        ),
        (
            "    outlier_detection: { max_ejection_percent: 200 }\n",
            "pools.app.outlier_detection.max_ejection_percent",
            "200 is not a percentage",
        ),
        (
            "    outlier_detection: { base_ejection_time: 0s }\n",
            "pools.app.outlier_detection.base_ejection_time",
            "must be greater than 0",
        ),
        (
            "    stats: { latency_window: 0ms }\n",
            "pools.app.stats.latency_window",
            "must be greater than 0",
        ),
        (
            "    stats: { stats_window: 1025 }\n",
            "pools.app.stats.stats_window",
            "1025 is out of range; must be 1..=1024",
        ),
        (
            "    stats: { max_endpoints: 0 }\n",
            "pools.app.stats.max_endpoints",
            "0 is out of range; must be 1..=100000",
        ),
        (
            "    stats: { long_request_hysteresis: -0.1 }\n",
            "pools.app.stats.long_request_hysteresis",
            "-0.1 is out of range; must be at least 0 and less than 1",
        ),
        (
            "    analysis: { horizon: 1h 1s }\n",
            "pools.app.analysis.horizon",
            "1h 1s is out of range; must be 10s..=3600s",
        ),
        (
            "    analysis: { horizon: 10500ms }\n",
            "pools.app.analysis.horizon",
            "10s 500ms is not a whole number of seconds",
        ),
        (
            "    analysis: { holt_beta: 1.01 }\n",
            "pools.app.analysis.holt_beta",
            "1.01 is out of range; must be greater than 0 and at most 1",
        ),
        (
            "    analysis: { holt_beta: -.inf }\n",
            "pools.app.analysis.holt_beta",
            "-.inf is not a finite number",
        ),
        (
            "    analysis: { anomaly_threshold: 0 }\n",
            "pools.app.analysis.anomaly_threshold",
            "0 is out of range; must be greater than 0",
        ),
        (
            "    analysis: { min_rate: -1 }\n",
            "pools.app.analysis.min_rate",
            "-1 is out of range; must be at least 0",
        ),
        (
            "    dynamic_weights: { interval: 0s }\n",
            "pools.app.dynamic_weights.interval",
            "must be greater than 0",
        ),
        (
            "    dynamic_weights: { smoothing: 0 }\n",
            "pools.app.dynamic_weights.smoothing",
            "0 is out of range; must be greater than 0 and at most 1",
        ),
        (
            "    slow_start: { aggression: 0 }\n",
            "pools.app.slow_start.aggression",
            "0 is out of range; must be greater than 0",
        ),
        (
            "    slow_start: { min_weight_percent: 101 }\n",
            "pools.app.slow_start.min_weight_percent",
            "101 is out of range; must be 1..=100",
        ),
        (
            "    hash: { key: header, name: \"x y\" }\n",
            "pools.app.hash.name",
            "`x y` is not a valid HTTP header name",
        ),
        (
            "    hash: { key: cookie, name: \"\" }\n",
            "pools.app.hash.name",
            "`` is not a valid cookie name",
        ),
        (
            "    hash: { key: cookie }\n",
            "pools.app.hash.name",
            "hash key `cookie` needs `name`, the cookie to hash",
        ),
        (
            "    hash: { name: x-user-id }\n",
            "pools.app.hash.name",
            "`name` applies to hash keys `header` and `cookie` only; this key is `client_ip`",
        ),
        (
            "    hash: { bounded_load: 100.5 }\n",
            "pools.app.hash.bounded_load",
            "100.5 is out of range; must be 0 (unbounded) or 1.0..=100",
        ),
        (
            "    hash: { table_size: 5 }\n",
            "pools.app.hash.table_size",
            "5 is out of range; must be a prime in 7..=1000003",
        ),
        (
            "    hash: { table_size: 1000001 }\n",
            "pools.app.hash.table_size",
            "1000001 is not a prime; the Maglev table size must be prime (the next one is 1000003)",
        ),
        (
            "    hash: { ring_size: 1000001 }\n",
            "pools.app.hash.ring_size",
            "1000001 is out of range; must be 0 (no minimum) or 64..=1000000",
        ),
        (
            "    hash: { ring_size: 63 }\n",
            "pools.app.hash.ring_size",
            "63 is out of range; must be 0 (no minimum) or 64..=1000000",
        ),
        (
            "    hash: { points_per_weight: 0 }\n",
            "pools.app.hash.points_per_weight",
            "0 is out of range; must be 1..=10000",
        ),
        (
            "    duration_class: { short_backends: [\"127.0.0.1:8082\"] }\n",
            "pools.app.duration_class.short_backends[0]",
            "`127.0.0.1:8082` is not a backend of pool `app` (backends: 127.0.0.1:8081)",
        ),
        (
            "    tail_aware: { target_p99: 0s }\n",
            "pools.app.tail_aware.target_p99",
            "must be greater than 0",
        ),
        (
            "    tail_aware: { gamma: -1 }\n",
            "pools.app.tail_aware.gamma",
            "-1 is out of range; must be at least 0",
        ),
        (
            "    response_time: { exploration: -0.01 }\n",
            "pools.app.response_time.exploration",
            "-0.01 is out of range; must be 0..=0.5",
        ),
        (
            "    response_time: { exploration: .nan }\n",
            "pools.app.response_time.exploration",
            ".nan is not a finite number; must be 0..=0.5",
        ),
        (
            "    hedge: { delay: 0s }\n",
            "pools.app.hedge.delay",
            "must be greater than 0",
        ),
        (
            "    hedge: { budget_percent: 101 }\n",
            "pools.app.hedge.budget_percent",
            "101 is out of range; must be 1..=100",
        ),
        (
            "    hedge: { max_body_bytes: 16777217 }\n",
            "pools.app.hedge.max_body_bytes",
            "16777217 is out of range; must be 0..=16777216 (16 MiB)",
        ),
        (
            "    protocol: http3\n",
            "pools.app.protocol",
            "unknown variant `http3`",
        ),
        (
            "    default_max_requests: 1000001\n",
            "pools.app.default_max_requests",
            "1000001 is out of range; must be 0..=1000000",
        ),
        (
            "    queue: { max_size: 0 }\n",
            "pools.app.queue.max_size",
            "0 is out of range; must be 1..=1000000",
        ),
        (
            "    queue: { timeout: 0s }\n",
            "pools.app.queue.timeout",
            "must be greater than 0",
        ),
    ];
    for (extra, path, message) in cases {
        let d = diags(&with_pool_keys(extra));
        assert_eq!(d.len(), 1, "{extra}: {d:?}");
        assert_eq!(d[0].0, 10, "{extra}: {d:?}");
        assert_eq!(d[0].2, path, "{extra}");
        assert!(d[0].3.starts_with(message), "{extra}: {}", d[0].3);
    }
}

#[test]
fn edge_values_of_the_tuning_blocks_are_accepted() {
    for extra in [
        "    stats: { stats_window: 1, max_endpoints: 100000, long_request_hysteresis: 0 }\n",
        "    stats: { stats_window: 1024, max_endpoints: 1 }\n",
        "    analysis: { horizon: 10s, holt_alpha: 1, holt_beta: 1, min_rate: 0 }\n",
        "    analysis: { horizon: 1h }\n",
        "    dynamic_weights: { smoothing: 1 }\n",
        "    slow_start: { window: 0s, aggression: 0.1, min_weight_percent: 100 }\n",
        "    hash: { key: path, bounded_load: 1, table_size: 7, ring_size: 64 }\n",
        "    hash: { bounded_load: 100, table_size: 1000003, ring_size: 1000000 }\n",
        "    hash: { points_per_weight: 1, ring_size: 0 }\n",
        "    hash: { points_per_weight: 10000 }\n",
        "    hash: { key: header, name: X-User-Id }\n",
        "    duration_class: { short_backends: [\"127.0.0.1:8081\"] }\n",
        "    tail_aware: { beta: 0, gamma: 0 }\n",
        "    response_time: { exploration: 0.5 }\n",
        "    response_time: { exploration: 0 }\n",
        "    hedge: { delay: 1ms, budget_percent: 100, max_body_bytes: 16777216 }\n",
        "    hedge: { min_delay: 0s, budget_percent: 1 }\n",
    ] {
        parse_ok(&with_pool_keys(extra));
    }
}

#[test]
fn short_backends_compare_as_backend_addresses() {
    let src = format!(
        "{MINIMAL}      - address: Api.Internal.:8080\n      - address: \"[::1]:9\"\n    \
         duration_class: {{ short_backends: [api.internal:8080, \"[0::1]:9\"] }}\n"
    );
    let c = parse_ok(&src);
    assert_eq!(c.pools["app"].duration_class.short_backends.len(), 2);
    // With one backend, it may be the short one (it then serves every request).
    parse_ok(&with_pool_keys(
        "    duration_class: { short_backends: [127.0.0.1:8081] }\n",
    ));
}

#[test]
fn code_built_config_rejects_non_finite_numbers() {
    let mut c = parse_ok(MINIMAL);
    let pool = c.pools.get_mut("app").unwrap();
    pool.stats.long_request_hysteresis = f64::NAN;
    pool.hash.bounded_load = f64::INFINITY;
    pool.hedge = Some(HedgeConfig {
        delay: HedgeDelay::Fixed(Duration::ZERO),
        ..HedgeConfig::default()
    });
    let err = c.validate().unwrap_err();
    assert_eq!(
        err.to_string(),
        "config: pools.app.stats.long_request_hysteresis: .nan is not a finite number; must be \
         at least 0 and less than 1\nconfig: pools.app.hash.bounded_load: .inf is not a finite \
         number; must be 0 (unbounded) or 1.0..=100\nconfig: pools.app.hedge.delay: must be \
         greater than 0"
    );
}

#[test]
fn route_match_checks() {
    let route = |m: &str| {
        MINIMAL.replace(
            "      - pool: app\n",
            &format!("      - match: {m}\n        pool: app\n"),
        )
    };
    assert!(parse_with_env(&route("{ host: \"*.example.com\" }"), "t", &no_env).is_ok());
    assert!(parse_with_env(&route("{}"), "t", &no_env).is_ok());
    let cases = [
        (
            "{ host: \"a b\" }",
            "listeners[0].routes[0].match.host",
            "invalid host `a b`",
        ),
        (
            "{ host: \"*\" }",
            "listeners[0].routes[0].match.host",
            "invalid host `*`: `*` alone",
        ),
        (
            "{ host: \"a.com:80\" }",
            "listeners[0].routes[0].match.host",
            "invalid host `a.com:80`: a host to match has no port",
        ),
        (
            "{ header: { name: \"x y\" } }",
            "listeners[0].routes[0].match.header.name",
            "`x y` is not a valid HTTP header name",
        ),
        (
            "{ header: { value: v } }",
            "listeners[0].routes[0].match.header",
            "missing field `name`",
        ),
        (
            "{ paths: /x }",
            "listeners[0].routes[0].match.paths",
            "unknown field `paths`",
        ),
    ];
    for (m, path, message) in cases {
        let d = diags(&route(m));
        assert_eq!(d.len(), 1, "{m}: {d:?}");
        assert_eq!(d[0].0, 5, "{m}: {d:?}");
        assert_eq!(d[0].2, path, "{m}");
        assert!(d[0].3.starts_with(message), "{m}: {}", d[0].3);
    }
}

#[test]
fn admin_and_log_checks() {
    let d = diags(&format!(
        "admin: {{ token: \"\" }}\nlog: {{ level: \"info,=\" }}\n{MINIMAL}"
    ));
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!((d[0].0, d[0].2.as_str()), (1, "admin.token"));
    assert!(d[0].3.starts_with("is empty"), "{}", d[0].3);
    assert_eq!((d[1].0, d[1].2.as_str()), (2, "log.level"));
    assert!(d[1].3.starts_with("invalid log filter"), "{}", d[1].3);
    // `null` (or `~`) means no token; an env default can produce it.
    let c = parse_ok(&format!(
        "admin: {{ token: ${{NO_TOKEN:-null}} }}\n{MINIMAL}"
    ));
    assert_eq!(c.admin.token, None);
    // The token never shows in Debug output.
    let c = parse_ok(&format!("admin: {{ token: hunter2 }}\n{MINIMAL}"));
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn missing_blocks_are_reported_at_the_start() {
    let d = diags("");
    let got: Vec<_> = d.iter().map(|(l, c, p, _)| (*l, *c, p.as_str())).collect();
    assert_eq!(got, [(1, 1, "listeners"), (1, 1, "pools")]);
    let d = diags("listeners:\n  - { name: web, listen: 127.0.0.1:1 }\npools: {}\n");
    let got: Vec<_> = d.iter().map(|(l, c, p, _)| (*l, *c, p.as_str())).collect();
    assert_eq!(got, [(2, 5, "listeners[0].routes"), (3, 1, "pools")]);
}

#[test]
fn a_second_document_is_refused() {
    let d = diags(&format!("{MINIMAL}---\n{MINIMAL}"));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].3.contains("more than one document"), "{}", d[0].3);
}

#[test]
fn tabs_in_indentation_get_a_hint() {
    let d = diags("listeners:\n\t- name: web\n");
    assert_eq!((d[0].0, d[0].2.as_str()), (2, ""));
    assert!(
        d[0].3.starts_with("invalid YAML: ") && d[0].3.ends_with("not tabs)"),
        "{}",
        d[0].3
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("listeners: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    assert!(parse_with_env(&deep, "t", &no_env).is_err());
    let deep = format!("a: {}1{}\n", "{a: ".repeat(5_000), "}".repeat(5_000));
    assert!(parse_with_env(&deep, "t", &no_env).is_err());
}

#[test]
fn aliases_resolve_and_locate_at_the_alias() {
    let src = format!(
        "{MINIMAL}  other:\n    backends: &b\n      - address: 127.0.0.1:9\n  third:\n    backends: *b\n"
    );
    let c = parse_ok(&src);
    assert_eq!(c.pools["third"].backends, c.pools["other"].backends);
}

#[test]
fn docs_example_is_the_full_config() {
    let doc = include_str!("../../../docs/CONFIG.md");
    let body: String = FULL.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert!(
        doc.contains(&body),
        "docs/CONFIG.md's complete example differs from tests/valid/full.yaml"
    );
    // Every whole config the reference shows is valid.
    let whole: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter(|block| block.lines().any(|l| l == "pools:"))
        .collect();
    assert_eq!(whole.len(), 2, "the minimal and the complete example");
    for block in whole {
        parse_ok(block);
    }
}

/// A few mutations of a valid config: cut, duplicate or replace a slice of it.
fn garble(base: &str, at: usize, len: usize, with: &str) -> String {
    let chars: Vec<char> = base.chars().collect();
    let at = at % (chars.len() + 1);
    let end = (at + len).min(chars.len());
    let mut out: String = chars[..at].iter().collect();
    out.push_str(with);
    out.extend(&chars[end..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(src in "\\PC{0,200}") {
        let _ = parse_with_env(&src, "t", &no_env);
    }

    #[test]
    fn yamlish_text_never_panics(src in "[ \\t\\n:\\-\\[\\]{},#&*!|>'\"%@`?$a-z0-9.]{0,200}") {
        let _ = parse_with_env(&src, "t", &no_env);
    }

    #[test]
    fn garbled_configs_never_panic_and_errors_are_located(
        at in 0usize..3000,
        len in 0usize..40,
        with in "[ \\t\\n:\\-\\[\\]{},#&*!|>'\"$a-z0-9.]{0,12}",
    ) {
        let src = garble(FULL, at, len, &with);
        if let Err(err) = parse_with_env(&src, "t", &|_| Some("v".to_owned())) {
            let lines = src.lines().count().max(1);
            for d in &err.diagnostics {
                prop_assert!(d.line >= 1 && d.line <= lines + 1, "{d} in\n{src}");
                prop_assert!(d.column >= 1, "{d}");
            }
        }
    }
}

#[test]
fn a_cluster_block_parses_with_defaults() {
    let c = parse_ok(&format!(
        "{MINIMAL}cluster:\n  node_id: n1\n  gossip: {{ seeds: [127.0.0.1:7947] }}\n  coordination: {{ backend: redis, url: \"redis://127.0.0.1:6379\" }}\n"
    ));
    let cluster = c.cluster.expect("cluster block");
    assert_eq!(cluster.node_id, "n1");
    assert_eq!(cluster.gossip.interval, Duration::from_millis(200));
    assert_eq!(cluster.gossip.seeds, ["127.0.0.1:7947"]);
    assert_eq!(
        cluster.coordination.backend,
        crate::CoordinationBackend::Redis
    );
    assert_eq!(cluster.coordination.lease_ttl, secs(3));
    assert_eq!(cluster.health_merge, crate::HealthMergeRule::Any);
}

#[test]
fn cluster_and_discovery_mistakes_name_their_field() {
    let cases: [(&str, &str, &str); 7] = [
        (
            "cluster:\n  node_id: n1\n  coordination: { backend: redis }\n",
            "cluster.coordination",
            "needs a `url`",
        ),
        (
            "cluster:\n  node_id: n1\n  coordination: { backend: etcd }\n",
            "cluster.coordination",
            "needs `endpoints`",
        ),
        (
            "cluster:\n  node_id: n1\n  gossip: { listen: 0.0.0.0:7946 }\n",
            "cluster.gossip.listen",
            "cluster.gossip.advertise",
        ),
        (
            "cluster:\n  node_id: n1\n  coordination: { backend: none, lease_ttl: 500ms }\n",
            "cluster.coordination.lease_ttl",
            "1s..=60s",
        ),
        ("cluster:\n  node_id: \"bad id\"\n", "cluster.node_id", ""),
        (
            "cluster:\n  node_id: n1\n  gossip: { seeds: [nohost] }\n",
            "cluster.gossip.seeds[0]",
            "",
        ),
        (
            "cluster:\n  node_id: n1\n  assignments: { bounded_load: 0.5 }\n",
            "cluster.assignments.bounded_load",
            "1.0..=10.0",
        ),
    ];
    for (extra, path, words) in cases {
        let d = diags(&format!("{MINIMAL}{extra}"));
        assert_eq!(d.len(), 1, "{extra}: {d:?}");
        assert_eq!(d[0].2, path, "{extra}: {d:?}");
        assert!(d[0].3.contains(words), "{extra}: {d:?}");
    }
    // `registry` discovery needs a store; `dns` needs a name.
    let d = diags(&with_pool_keys("    discovery: { source: registry }\n"));
    assert_eq!(d[0].2, "pools.app.discovery.source", "{d:?}");
    assert!(d[0].3.contains("coordination store"), "{d:?}");
    let d = diags(&with_pool_keys("    discovery: { source: dns }\n"));
    assert_eq!(d[0].2, "pools.app.discovery", "{d:?}");
    // Name servers: each `ip:port` or `ip`, and only for `dns`.
    let d = diags(&with_pool_keys(
        "    discovery: { source: dns, name: \"localhost:80\", nameservers: [\"127.0.0.1:8600\", \"dns.local\"] }\n",
    ));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].2, "pools.app.discovery.nameservers[1]", "{d:?}");
    assert!(d[0].3.contains("\"dns.local\" is not `ip:port`"), "{d:?}");
    let d = diags(&with_pool_keys(
        "    discovery: { source: static, nameservers: [\"10.0.0.2\"] }\n",
    ));
    assert_eq!(d[0].2, "pools.app.discovery.nameservers", "{d:?}");
    assert!(d[0].3.contains("only used with `source: dns`"), "{d:?}");
    // A pool may list no backends when it discovers them.
    let c = parse_ok(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:8080\n    routes: [{ pool: app }]\npools:\n  app:\n    backends: []\n    discovery: { source: dns, name: \"localhost:80\", nameservers: [\"127.0.0.1:8600\", \"10.0.0.2\"] }\n",
    );
    assert!(c.pools["app"].backends.is_empty());
    let servers: Vec<_> = c.pools["app"]
        .discovery
        .nameservers
        .iter()
        .filter_map(|s| crate::parse_nameserver(s))
        .collect();
    assert_eq!(
        servers,
        [
            "127.0.0.1:8600".parse().expect("literal"),
            "10.0.0.2:53".parse().expect("literal")
        ]
    );
}

/// A directory with PEM-shaped `cert.pem` and `key.pem` (the validator checks the PEM
/// framing and block types; the data plane's rustls checks the contents).
fn tls_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write cert");
    std::fs::write(
        dir.path().join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write key");
    dir
}

fn tls_listener(protocol: &str, dir: &std::path::Path, key: &str, extra: &str) -> String {
    format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:8443\n    protocol: {protocol}\n    tls:\n      certificate: {}\n      private_key: {}\n{extra}    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: 127.0.0.1:8081\n",
        dir.join("cert.pem").display(),
        dir.join(key).display(),
    )
}

#[test]
fn tls_settings_parse_with_an_unquoted_version() {
    let dir = tls_files();
    let config = parse_ok(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        "      min_version: 1.3\n",
    ));
    let tls = config.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.min_version, TlsVersion::V1_3);
    assert_eq!(tls.certificate, dir.path().join("cert.pem"));
    assert!(parse_ok(MINIMAL).listeners[0].tls.is_none());
}

#[test]
fn tls_errors_name_the_field_and_the_file() {
    let dir = tls_files();
    // Not on a tcp listener.
    let d = diags(&tls_listener("tcp", dir.path(), "key.pem", ""));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].0, d[0].2.as_str()), (5, "listeners[0].tls"));
    assert!(
        d[0].3.contains("supported on `http` listeners only"),
        "{d:?}"
    );
    // A key file with no key in it (here: the certificate).
    let d = diags(&tls_listener("http", dir.path(), "cert.pem", ""));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        (d[0].0, d[0].2.as_str()),
        (7, "listeners[0].tls.private_key")
    );
    assert!(d[0].3.contains("holds no private key"), "{d:?}");
    // A missing file.
    let d = diags(&tls_listener("http", dir.path(), "absent.pem", ""));
    assert_eq!(d[0].2, "listeners[0].tls.private_key");
    assert!(
        d[0].3.contains("cannot read") && d[0].3.contains("absent.pem"),
        "{d:?}"
    );
    // An unsupported version.
    let d = diags(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        "      min_version: 1.1\n",
    ));
    assert!(d[0].3.contains("unsupported TLS version `1.1`"), "{d:?}");
}

#[test]
fn rate_limits_parse_and_bad_ones_are_located() {
    let route = |limit: &str| {
        format!(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:8080\n    routes:\n      - pool: app\n        rate_limit: {limit}\npools:\n  app:\n    backends:\n      - address: 127.0.0.1:8081\n"
        )
    };
    let config = parse_ok(&route("{ rate: 30/m, per: client_ip }"));
    let limit = config.listeners[0].routes[0]
        .rate_limit
        .as_ref()
        .expect("a limit");
    assert_eq!(limit.rate.count, 30);
    assert_eq!(limit.rate.period(), Duration::from_secs(2));
    assert_eq!(limit.burst(), 30, "burst defaults to the rate's count");
    assert_eq!(limit.per, RateLimitKey::ClientIp);
    assert_eq!(limit.rate.to_string(), "30/m");
    for (bad, message) in [
        ("{ rate: 100 }", "missing `/unit`"),
        ("{ rate: 10/d }", "the unit must be s, m or h"),
        ("{ rate: 0/s }", "the count must be 1..=1000000"),
        ("{ rate: 1.5/s }", "the count must be a whole number"),
    ] {
        let d = diags(&route(bad));
        assert_eq!(d.len(), 1, "{bad}: {d:?}");
        assert_eq!(d[0].0, 6, "{bad}: {d:?}");
        assert!(d[0].3.contains(message), "{bad}: {d:?}");
    }
    let d = diags(&route("{ rate: 1/s, burst: 0 }"));
    assert_eq!(d[0].2, "listeners[0].routes[0].rate_limit.burst", "{d:?}");
}

#[test]
fn pool_tls_errors_name_the_field() {
    let dir = tls_files();
    let ok = parse_ok(&with_pool_keys(&format!(
        "    tls: {{ ca_file: {}, server_name: api.internal }}\n",
        dir.path().join("cert.pem").display()
    )));
    let tls = ok.pools["app"].tls.as_ref().expect("tls");
    assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
    let d = diags(&with_pool_keys(&format!(
        "    tls: {{ ca_file: {}, server_name: \"not a name\" }}\n",
        dir.path().join("key.pem").display()
    )));
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[0].2, "pools.app.tls.ca_file");
    assert!(d[0].3.contains("holds no certificate"), "{d:?}");
    assert_eq!(d[1].2, "pools.app.tls.server_name");
    assert!(d[1].3.contains("not a DNS name or IP address"), "{d:?}");
    // A directory opens but cannot be read: said so, not "not valid PEM".
    let d = diags(&with_pool_keys(&format!(
        "    tls: {{ ca_file: {} }}\n",
        dir.path().display()
    )));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].3.starts_with("cannot read"), "{d:?}");
    assert!(d[0].3.contains("directory"), "{d:?}");
}

/// A self-signed certificate for `names` (DNS names or IP addresses) written to
/// `dir/file` with its key beside it (`file.key`).
fn real_cert(dir: &std::path::Path, file: &str, names: &[&str]) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    std::fs::write(dir.join(file), cert.pem()).expect("write cert");
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).expect("write key");
}

#[test]
fn sni_certificates_and_client_auth_are_checked_at_their_keys() {
    let dir = tls_files();
    real_cert(
        dir.path(),
        "api.pem",
        &["api.example.test", "*.apps.example.test"],
    );
    real_cert(dir.path(), "ip.pem", &["127.0.0.1"]);
    let extra = |file: &str, more: &str| {
        format!(
            "      certificates:\n        - certificate: {0}\n          private_key: {0}.key\n{more}",
            dir.path().join(file).display()
        )
    };
    let ca = dir.path().join("api.pem");
    let ok = parse_ok(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        &extra(
            "api.pem",
            &format!(
                "      strict_sni: true\n      client_ca: {}\n      client_auth: optional\n",
                ca.display()
            ),
        ),
    ));
    let tls = ok.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.certificates.len(), 1);
    assert!(tls.strict_sni);
    assert_eq!(tls.client_auth, Some(crate::ClientAuth::Optional));
    let pairs: Vec<String> = tls.pairs().map(|(at, _, _)| at).collect();
    assert_eq!(pairs, ["", "certificates[0]."]);

    // A certificate no SNI can select, one that is not X.509, client_auth alone.
    let d = diags(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        &extra("ip.pem", ""),
    ));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].2, "listeners[0].tls.certificates[0].certificate");
    assert!(d[0].3.contains("has no DNS name"), "{d:?}");
    std::fs::copy(dir.path().join("key.pem"), dir.path().join("cert.pem.key")).expect("copy");
    let d = diags(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        &extra("cert.pem", ""),
    ));
    assert_eq!(
        d[0].2, "listeners[0].tls.certificates[0].certificate",
        "{d:?}"
    );
    assert!(d[0].3.contains("cannot be parsed"), "{d:?}");
    let d = diags(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        "      client_auth: required\n",
    ));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        (d[0].0, d[0].2.as_str()),
        (8, "listeners[0].tls.client_auth")
    );
    assert!(d[0].3.contains("needs `client_ca`"), "{d:?}");
    let d = diags(&tls_listener(
        "http",
        dir.path(),
        "key.pem",
        &format!(
            "      client_ca: {}\n",
            dir.path().join("key.pem").display()
        ),
    ));
    assert_eq!(d[0].2, "listeners[0].tls.client_ca", "{d:?}");
    assert!(d[0].3.contains("holds no certificate"), "{d:?}");
}

#[test]
fn a_pool_client_certificate_needs_both_files() {
    let dir = tls_files();
    real_cert(dir.path(), "client.pem", &["client.test"]);
    let client = dir.path().join("client.pem");
    let ok = parse_ok(&with_pool_keys(&format!(
        "    tls: {{ certificate: {0}, private_key: {0}.key }}\n",
        client.display()
    )));
    let tls = ok.pools["app"].tls.as_ref().expect("tls");
    assert_eq!(tls.certificate.as_deref(), Some(client.as_path()));
    let d = diags(&with_pool_keys(&format!(
        "    tls: {{ certificate: {} }}\n",
        client.display()
    )));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].2, "pools.app.tls.certificate");
    assert!(d[0].3.contains("needs `private_key`"), "{d:?}");
    let d = diags(&with_pool_keys(&format!(
        "    tls: {{ certificate: {0}, private_key: {0} }}\n",
        client.display()
    )));
    assert_eq!(d[0].2, "pools.app.tls.private_key", "{d:?}");
    assert!(d[0].3.contains("holds no private key"), "{d:?}");
}
