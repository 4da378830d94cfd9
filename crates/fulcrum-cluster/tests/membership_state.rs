//! The typed node state gossiped through membership: backend summaries and node load
//! survive an encode/decode round trip up to their documented rounding.

use std::collections::BTreeMap;

use fulcrum_cluster::membership::{
    BackendHealth, BackendSummary, KEY_ADMIN, KEY_LOAD, Member, MemberState, NodeLoad, backends_of,
};
use proptest::prelude::*;

fn health() -> impl Strategy<Value = BackendHealth> {
    prop_oneof![
        Just(BackendHealth::Healthy),
        Just(BackendHealth::Unhealthy),
        Just(BackendHealth::Ejected),
        Just(BackendHealth::Draining),
        Just(BackendHealth::Disabled),
    ]
}

/// Mostly ordinary values, sometimes anything (NaN, infinities, negatives, huge).
fn float(typical: std::ops::Range<f64>) -> impl Strategy<Value = f64> {
    prop_oneof![4 => typical, 1 => any::<f64>()]
}

fn summary() -> impl Strategy<Value = BackendSummary> {
    (
        "[a-z][a-z0-9_./-]{0,15}",
        "[a-z0-9.-]{1,20}:[0-9]{1,5}",
        health(),
        float(0.0..10_000.0),
        float(0.0..1.0),
        any::<u64>(),
    )
        .prop_map(
            |(pool, address, health, ewma_ms, error_rate, in_flight)| BackendSummary {
                pool,
                address,
                health,
                ewma_ms,
                error_rate,
                in_flight,
            },
        )
}

/// What the encoding keeps of a number: clamped into `0..=max`, NaN as 0.
fn clamped(x: f64, max: f64) -> f64 {
    if x > 0.0 { x.min(max) } else { 0.0 }
}

fn close(a: f64, b: f64, step: f64) -> bool {
    (a - b).abs() <= step / 2.0 + 1e-9 * b.abs().max(1.0)
}

fn member(values: &[(&str, &str)]) -> Member {
    Member {
        node_id: "n1".into(),
        gossip_addr: ([127, 0, 0, 1], 7946).into(),
        generation: 1,
        state: MemberState::Alive,
        is_self: false,
        values: values
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        last_seen_ms: None,
    }
}

proptest! {
    #[test]
    fn backend_summaries_round_trip(s in summary()) {
        let value = s.encode();
        let back = BackendSummary::decode(&s.key(), &value).expect("an encoded summary decodes");
        prop_assert_eq!(&back.pool, &s.pool);
        prop_assert_eq!(&back.address, &s.address);
        prop_assert_eq!(back.health, s.health);
        prop_assert_eq!(back.in_flight, s.in_flight);
        prop_assert!(close(back.ewma_ms, clamped(s.ewma_ms, 1e9), 0.1), "{} vs {}", back.ewma_ms, s.ewma_ms);
        prop_assert!(close(back.error_rate, clamped(s.error_rate, 1.0), 0.001));
        // Decoding loses nothing the encoding kept.
        prop_assert_eq!(back.encode(), value);
    }

    #[test]
    fn node_loads_round_trip(
        in_flight in any::<u64>(),
        rate in float(0.0..100_000.0),
        cpu in proptest::option::of(float(0.0..1.0)),
    ) {
        let load = NodeLoad { in_flight, requests_per_sec: rate, cpu_hint: cpu };
        let value = load.encode();
        let back = NodeLoad::decode(&value).expect("an encoded load decodes");
        prop_assert_eq!(back.in_flight, in_flight);
        prop_assert!(close(back.requests_per_sec, clamped(rate, 1e12), 0.1));
        match (back.cpu_hint, cpu) {
            (Some(b), Some(c)) => prop_assert!(close(b, clamped(c, 1.0), 0.001)),
            (None, None) => {}
            other => prop_assert!(false, "cpu hint changed: {other:?}"),
        }
        prop_assert_eq!(back.encode(), value);
    }

    #[test]
    fn garbage_never_decodes_to_a_panic(key in ".{0,40}", value in ".{0,40}") {
        let _ = BackendSummary::decode(&key, &value);
        let _ = NodeLoad::decode(&value);
    }
}

#[test]
fn backends_of_decodes_only_backend_keys() {
    let a = BackendSummary {
        pool: "api".into(),
        address: "10.0.0.1:80".into(),
        health: BackendHealth::Ejected,
        ewma_ms: 3.5,
        error_rate: 0.25,
        in_flight: 2,
    };
    let b = BackendSummary {
        pool: "app".into(),
        address: "10.0.0.2:80".into(),
        health: BackendHealth::Healthy,
        ewma_ms: 1.0,
        error_rate: 0.0,
        in_flight: 0,
    };
    let load = NodeLoad {
        in_flight: 7,
        requests_per_sec: 120.5,
        cpu_hint: None,
    };
    let m = member(&[
        (KEY_ADMIN, "127.0.0.1:9901"),
        (KEY_LOAD, &load.encode()),
        (&b.key(), &b.encode()),
        (&a.key(), &a.encode()),
        ("backend:broken", "h|1|0|0"),
        ("backend:api/10.0.0.3:80", "not a summary"),
    ]);
    assert_eq!(backends_of(&m), vec![a, b]);
    assert_eq!(NodeLoad::of(&m), Some(load));
    assert_eq!(NodeLoad::of(&member(&[])), None);
}

#[test]
fn wire_words_are_stable() {
    // The admin API and other nodes read these; renaming one is a breaking change.
    let words: Vec<String> = [
        BackendHealth::Healthy,
        BackendHealth::Unhealthy,
        BackendHealth::Ejected,
        BackendHealth::Draining,
        BackendHealth::Disabled,
    ]
    .iter()
    .map(|h| serde_json::to_string(h).expect("a unit enum serializes"))
    .collect();
    assert_eq!(
        words,
        [
            "\"healthy\"",
            "\"unhealthy\"",
            "\"ejected\"",
            "\"draining\"",
            "\"disabled\""
        ]
    );
    assert_eq!(
        serde_json::to_string(&MemberState::Failed).expect("a unit enum serializes"),
        "\"failed\""
    );
}
