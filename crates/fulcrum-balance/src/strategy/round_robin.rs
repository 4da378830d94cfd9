//! `round_robin`: each eligible backend in turn, ignoring weights.
//!
//! The classic rotation (HAProxy `balance roundrobin` without weights, nginx's default
//! with equal weights). A shared atomic counter gives the starting position; ineligible
//! backends are skipped by scanning forward, so with every backend eligible each one
//! receives exactly one request in every `n` consecutive picks.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{BackendId, PoolView, RequestInfo, Strategy};

/// Round robin over the eligible backends. Lock-free: one `fetch_add` per pick.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A rotation starting at the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let picked = pool.next_eligible_from(start)?;
        if picked.0 != start {
            // Skipped ineligible backends: continue the rotation after the one picked so
            // the backend following a failed one is not picked twice in a row.
            self.next.store(picked.0 + 1, Ordering::Relaxed);
        }
        Some(picked)
    }

    /// A random other eligible backend; the rotation does not move.
    fn pick_another(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        super::random_eligible(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::testing::backends;

    #[test]
    fn rotates_exactly() {
        let b = backends(&[1, 1, 1]);
        let rr = RoundRobin::new();
        let view = PoolView::new(&b, &[], false);
        let picks: Vec<usize> = (0..9)
            .map(|_| rr.pick(&RequestInfo::new(0), &view).expect("eligible").0)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_ineligible_and_excluded() {
        let b = backends(&[1, 1, 1]);
        b[1].live.set_flag(BackendFlags::UNHEALTHY);
        let rr = RoundRobin::new();
        let excluded = [BackendId(0)];
        let view = PoolView::new(&b, &excluded, false);
        for _ in 0..6 {
            assert_eq!(rr.pick(&RequestInfo::new(0), &view), Some(BackendId(2)));
        }
        b[2].live.set_flag(BackendFlags::DRAINING);
        assert_eq!(rr.pick(&RequestInfo::new(0), &view), None);
    }

    #[test]
    fn another_attempt_takes_no_turn() {
        let b = backends(&[1, 1]);
        // Every request hedged or retried: first attempts still alternate.
        let first =
            crate::strategy::testing::first_picks_with_another_attempt(&RoundRobin::new(), &b, 6);
        assert_eq!(first, vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn extra_attempts_spread_over_the_others() {
        // One of three backends failing: its retries go to both others alike, not all
        // to its neighbour in the rotation.
        let b = backends(&[1, 1, 1]);
        let rr = RoundRobin::new();
        let tried = [BackendId(0)];
        let view = PoolView::new(&b, &tried, false);
        let mut counts = [0u32; 3];
        for _ in 0..3_000 {
            let other = rr
                .pick_another(&RequestInfo::new(0), &view)
                .expect("eligible");
            counts[other.0] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!(counts[1].abs_diff(1_500) < 200, "{counts:?}");
        assert!(counts[2].abs_diff(1_500) < 200, "{counts:?}");
    }
}
