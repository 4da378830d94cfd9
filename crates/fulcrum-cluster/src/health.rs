//! Cluster-wide backend health: merges every node's view of one backend into the view the
//! cluster acts on. Pure, no I/O: the membership layer gossips each node's
//! [`BackendHealth`] (see [`crate::membership::BackendSummary`]); the data plane calls
//! [`merge`] with its own view and the others' when it rebuilds a pool's eligible set.
//!
//! # Why merge at all
//! Envoy's and HAProxy's health views are local: each proxy probes and ejects on its own,
//! so a backend that one node cannot reach stays in rotation everywhere else, and a
//! backend that fails its health check is rediscovered by every node separately, one
//! check interval after another. Consul and Serf share health instead: Consul marks a
//! service instance critical as soon as any of its checks is critical, and Serf/memberlist
//! (Lifeguard, Dadgar et al. 2018) declares a member dead only after a suspicion is
//! confirmed by independent members, because one observer's view can be its own network
//! path's fault. Fulcrum applies the same two ideas to backends:
//!
//! - an **active** check failure ([`BackendHealth::Unhealthy`]) is a deliberate probe of a
//!   health endpoint that failed `fall` times in a row: a precise signal, so one node's
//!   vote is enough under [`HealthMerge::Any`];
//! - a **passive** ejection ([`BackendHealth::Ejected`]) comes from outlier detection on
//!   live traffic, which depends on the node's request mix and network path: a noisy
//!   signal, so under `Any` it takes the backend out cluster-wide only when another node
//!   confirms it ("passive ejections stay local unless confirmed");
//! - [`BackendHealth::Draining`] and [`BackendHealth::Disabled`] are operator decisions, not
//!   health observations: a node in those states casts no vote.
//!
//! A node's own passive ejection always applies to its own traffic anyway (the data plane
//! handles that); [`merge`] decides only whether the *cluster* view takes the backend out.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::membership::BackendHealth;

/// How the nodes' views of one backend combine (`cluster.health_merge` in the config).
///
/// Serialized lowercase (`any`, `majority`, `local`); parses from the same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthMerge {
    /// Down if any node's active check fails, or if a passive ejection is confirmed by at
    /// least one other node (two or more down votes of any kind). Fast and the default:
    /// active checks are precise, passive ejections need a second opinion.
    #[default]
    Any,
    /// Down if more than half of the voting nodes say down (active or passive). Robust
    /// against one node with a bad network path (a partial partition), at the cost of
    /// reacting only once most nodes have noticed.
    Majority,
    /// Own view only: the cluster's votes are ignored (HAProxy/Envoy behaviour).
    Local,
}

impl HealthMerge {
    /// The rule's config name: `any`, `majority` or `local`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthMerge::Any => "any",
            HealthMerge::Majority => "majority",
            HealthMerge::Local => "local",
        }
    }
}

impl fmt::Display for HealthMerge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A health-merge rule name that is not `any`, `majority` or `local`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown health merge rule `{0}`: expected any, majority or local")]
pub struct UnknownHealthMerge(pub String);

impl FromStr for HealthMerge {
    type Err = UnknownHealthMerge;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(HealthMerge::Any),
            "majority" => Ok(HealthMerge::Majority),
            "local" => Ok(HealthMerge::Local),
            other => Err(UnknownHealthMerge(other.to_string())),
        }
    }
}

/// The cluster's verdict on one backend, with the tally behind it (for the API and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MergedHealth {
    /// Take the backend out of rotation cluster-wide.
    pub down: bool,
    /// Votes saying down, active ([`BackendHealth::Unhealthy`]) and passive
    /// ([`BackendHealth::Ejected`]) together; under [`HealthMerge::Local`] only the own vote.
    pub down_votes: usize,
    /// The passive part of `down_votes`.
    pub passive_votes: usize,
    /// Nodes that cast a health vote (every view but `draining` and `disabled`); under
    /// [`HealthMerge::Local`] 0 or 1.
    pub voters: usize,
    /// Why, in a few words (`"active check failing"`, `"unconfirmed passive ejection"`, ...).
    pub reason: &'static str,
}

/// One tally of health votes.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    voters: usize,
    active: usize,
    passive: usize,
}

impl Tally {
    fn add(&mut self, view: BackendHealth) {
        match view {
            BackendHealth::Healthy => self.voters += 1,
            BackendHealth::Unhealthy => {
                self.voters += 1;
                self.active += 1;
            }
            BackendHealth::Ejected => {
                self.voters += 1;
                self.passive += 1;
            }
            // Operator decisions, not observations of the backend.
            BackendHealth::Draining | BackendHealth::Disabled => {}
        }
    }

    fn of(local: BackendHealth, remote: &[BackendHealth]) -> Tally {
        let mut tally = Tally::default();
        tally.add(local);
        for &view in remote {
            tally.add(view);
        }
        tally
    }

    /// Why a backend without down votes is up.
    fn up_reason(&self) -> &'static str {
        if self.voters == 0 {
            "no health votes"
        } else {
            "healthy"
        }
    }

    fn down_votes(&self) -> usize {
        self.active + self.passive
    }

    fn verdict(&self, down: bool, reason: &'static str) -> MergedHealth {
        MergedHealth {
            down,
            down_votes: self.down_votes(),
            passive_votes: self.passive,
            voters: self.voters,
            reason,
        }
    }
}

/// Merges this node's view of a backend (`local`) with the other live nodes' views
/// (`remote`, one per node, in any order) under `rule`. See the module docs for the
/// reasoning; the rules are:
///
/// | rule | down when |
/// | --- | --- |
/// | `local` | the own view is `unhealthy` or `ejected` |
/// | `any` | ≥ 1 active down vote, or ≥ 2 down votes of any kind |
/// | `majority` | down votes (active + passive) > voters / 2 |
///
/// `draining` and `disabled` views cast no vote. With no voters at all the backend is
/// not down (there is no evidence against it). Pure; O(number of views).
pub fn merge(rule: HealthMerge, local: BackendHealth, remote: &[BackendHealth]) -> MergedHealth {
    match rule {
        HealthMerge::Local => {
            let mut own = Tally::default();
            own.add(local);
            match local {
                BackendHealth::Unhealthy => own.verdict(true, "local view: active check failing"),
                BackendHealth::Ejected => own.verdict(true, "local view: ejected"),
                BackendHealth::Healthy => own.verdict(false, "local view: healthy"),
                BackendHealth::Draining | BackendHealth::Disabled => {
                    own.verdict(false, "local view: no health vote")
                }
            }
        }
        HealthMerge::Any => {
            let tally = Tally::of(local, remote);
            if tally.active > 0 {
                tally.verdict(true, "active check failing")
            } else if tally.down_votes() >= 2 {
                tally.verdict(true, "passive ejection confirmed")
            } else if tally.passive == 1 {
                tally.verdict(false, "unconfirmed passive ejection")
            } else {
                tally.verdict(false, tally.up_reason())
            }
        }
        HealthMerge::Majority => {
            let tally = Tally::of(local, remote);
            if tally.down_votes() * 2 > tally.voters {
                tally.verdict(true, "majority down")
            } else if tally.down_votes() > 0 {
                tally.verdict(false, "minority down")
            } else {
                tally.verdict(false, tally.up_reason())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use BackendHealth::{Disabled, Draining, Ejected, Healthy, Unhealthy};

    fn any_health() -> impl Strategy<Value = BackendHealth> {
        prop_oneof![
            Just(Healthy),
            Just(Unhealthy),
            Just(Ejected),
            Just(Draining),
            Just(Disabled),
        ]
    }

    fn any_rule() -> impl Strategy<Value = HealthMerge> {
        prop_oneof![
            Just(HealthMerge::Any),
            Just(HealthMerge::Majority),
            Just(HealthMerge::Local),
        ]
    }

    /// Moves a view one step towards "down": a healthy or admin vote becomes passive down,
    /// a passive vote becomes active down.
    fn worse(view: BackendHealth) -> BackendHealth {
        match view {
            Healthy | Draining | Disabled => Ejected,
            Ejected | Unhealthy => Unhealthy,
        }
    }

    #[test]
    fn local_uses_only_the_own_view() {
        assert!(!merge(HealthMerge::Local, Healthy, &[Unhealthy, Unhealthy]).down);
        assert!(merge(HealthMerge::Local, Unhealthy, &[Healthy, Healthy]).down);
        assert!(merge(HealthMerge::Local, Ejected, &[]).down);
        let draining = merge(HealthMerge::Local, Draining, &[Unhealthy]);
        assert!(!draining.down);
        assert_eq!(draining.voters, 0);
    }

    #[test]
    fn any_takes_out_on_one_active_failure() {
        let m = merge(HealthMerge::Any, Healthy, &[Healthy, Unhealthy, Healthy]);
        assert!(m.down);
        assert_eq!((m.down_votes, m.passive_votes, m.voters), (1, 0, 4));
        assert_eq!(m.reason, "active check failing");
    }

    #[test]
    fn any_keeps_a_single_passive_ejection_local() {
        let own = merge(HealthMerge::Any, Ejected, &[Healthy, Healthy]);
        assert!(!own.down);
        assert_eq!(own.reason, "unconfirmed passive ejection");
        let remote = merge(HealthMerge::Any, Healthy, &[Ejected]);
        assert!(!remote.down);
        let alone = merge(HealthMerge::Any, Ejected, &[]);
        assert!(
            !alone.down,
            "a lone node's ejection is its data plane's business"
        );
    }

    #[test]
    fn any_takes_out_a_confirmed_passive_ejection() {
        let m = merge(HealthMerge::Any, Ejected, &[Healthy, Ejected]);
        assert!(m.down);
        assert_eq!((m.down_votes, m.passive_votes, m.voters), (2, 2, 3));
        assert_eq!(m.reason, "passive ejection confirmed");
    }

    #[test]
    fn majority_needs_more_than_half_of_the_voters() {
        assert!(
            !merge(HealthMerge::Majority, Unhealthy, &[Healthy]).down,
            "1 of 2"
        );
        assert!(merge(HealthMerge::Majority, Unhealthy, &[Ejected, Healthy]).down);
        assert!(
            !merge(
                HealthMerge::Majority,
                Healthy,
                &[Unhealthy, Healthy, Healthy]
            )
            .down
        );
        // Admin states are not voters: 1 down of 1 voter.
        let m = merge(HealthMerge::Majority, Draining, &[Unhealthy, Disabled]);
        assert!(m.down);
        assert_eq!(m.voters, 1);
    }

    #[test]
    fn no_voters_is_not_down() {
        for rule in [HealthMerge::Any, HealthMerge::Majority, HealthMerge::Local] {
            let m = merge(rule, Disabled, &[Draining, Disabled]);
            assert!(!m.down, "{rule}");
            assert_eq!(m.voters, 0);
        }
    }

    #[test]
    fn rule_names_round_trip() {
        for rule in [HealthMerge::Any, HealthMerge::Majority, HealthMerge::Local] {
            assert_eq!(rule.as_str().parse::<HealthMerge>(), Ok(rule));
            let json = serde_json::to_string(&rule).expect("a unit enum serializes");
            assert_eq!(json, format!("\"{rule}\""));
        }
        assert_eq!(HealthMerge::default(), HealthMerge::Any);
        let err = "quorum".parse::<HealthMerge>().expect_err("not a rule");
        assert!(err.to_string().contains("quorum"));
    }

    proptest! {
        #[test]
        fn tally_counts_every_health_vote(
            rule in any_rule(), local in any_health(),
            remote in proptest::collection::vec(any_health(), 0..12),
        ) {
            let m = merge(rule, local, &remote);
            let views: Vec<BackendHealth> = if rule == HealthMerge::Local {
                vec![local]
            } else {
                std::iter::once(local).chain(remote.iter().copied()).collect()
            };
            let voters = views.iter().filter(|v| !matches!(v, Draining | Disabled)).count();
            let passive = views.iter().filter(|v| **v == Ejected).count();
            let active = views.iter().filter(|v| **v == Unhealthy).count();
            prop_assert_eq!(m.voters, voters);
            prop_assert_eq!(m.passive_votes, passive);
            prop_assert_eq!(m.down_votes, active + passive);
            prop_assert!(m.down_votes <= m.voters);
        }

        #[test]
        fn order_of_remote_views_does_not_matter(
            rule in any_rule(), local in any_health(),
            remote in proptest::collection::vec(any_health(), 0..12),
        ) {
            let mut reversed = remote.clone();
            reversed.reverse();
            prop_assert_eq!(merge(rule, local, &remote), merge(rule, local, &reversed));
        }

        #[test]
        fn local_ignores_remote_views(
            local in any_health(),
            a in proptest::collection::vec(any_health(), 0..12),
            b in proptest::collection::vec(any_health(), 0..12),
        ) {
            prop_assert_eq!(merge(HealthMerge::Local, local, &a), merge(HealthMerge::Local, local, &b));
        }

        #[test]
        fn a_worse_view_never_brings_a_backend_back(
            rule in any_rule(), local in any_health(),
            remote in proptest::collection::vec(any_health(), 1..12),
            pick in any::<prop::sample::Index>(),
        ) {
            // Any and local are monotone in each vote. Majority is monotone when a vote
            // only changes kind (passive -> active) or a healthy voter turns down; an admin
            // state turning into a vote adds a voter, which can dilute a majority, so it is
            // excluded there.
            let i = pick.index(remote.len());
            let before = merge(rule, local, &remote);
            if rule == HealthMerge::Majority && matches!(remote[i], Draining | Disabled) {
                return Ok(());
            }
            let mut worse_remote = remote.clone();
            worse_remote[i] = worse(remote[i]);
            let after = merge(rule, local, &worse_remote);
            prop_assert!(!before.down || after.down, "{before:?} -> {after:?}");
        }

        #[test]
        fn any_is_down_iff_an_active_vote_or_two_down_votes(
            local in any_health(), remote in proptest::collection::vec(any_health(), 0..12),
        ) {
            let m = merge(HealthMerge::Any, local, &remote);
            let active = m.down_votes - m.passive_votes;
            prop_assert_eq!(m.down, active >= 1 || m.down_votes >= 2);
        }

        #[test]
        fn majority_is_down_iff_more_than_half(
            local in any_health(), remote in proptest::collection::vec(any_health(), 0..12),
        ) {
            let m = merge(HealthMerge::Majority, local, &remote);
            prop_assert_eq!(m.down, m.voters > 0 && 2 * m.down_votes > m.voters);
        }
    }
}
