//! The controller's judgement as a pure function: [`plan`] takes what the
//! API lists (nodes, and pod UIDs when asked for), what the backend lists
//! for this cluster, and what the previous passes saw, and returns which
//! leases to release and why. No I/O: the runner ([`crate::Controller`])
//! lists, calls [`plan`] and applies the [`Plan`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use hulk_ipam::Lease;

/// What the Kubernetes API lists now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Every Node object's name, whatever its conditions (a NotReady node
    /// still exists and keeps its addresses).
    pub nodes: BTreeSet<String>,
    /// The UIDs of every pod in the cluster, when they were listed on
    /// this pass; `None`: not listed, so no lease is released for its
    /// holder alone.
    pub pod_uids: Option<HashSet<String>>,
}

impl NodeView {
    /// The view of these nodes, pods not listed.
    pub fn new(nodes: impl IntoIterator<Item = String>) -> Self {
        Self {
            nodes: nodes.into_iter().collect(),
            pod_uids: None,
        }
    }

    /// The same view with the cluster's pod UIDs.
    pub fn with_pod_uids(mut self, pod_uids: HashSet<String>) -> Self {
        self.pod_uids = Some(pod_uids);
        self
    }
}

/// Since when, and on how many consecutive passes, a node named by
/// leases has been missing from the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    /// The pass that first missed it.
    pub since: Instant,
    /// Consecutive passes that missed it, this one included.
    pub passes: u32,
}

/// What the previous passes saw: the nodes named by leases but missing
/// from the API. A new leader starts with an empty memory, so it too needs
/// two passes before it releases anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GoneMemory {
    /// Missing nodes by name.
    pub nodes: BTreeMap<String, Missing>,
}

/// Why a lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Its node has been missing from the API on two passes or more,
    /// spanning the grace period.
    NodeGone,
    /// Its node has been missing on two passes or more (the grace period
    /// not yet over) and the pod its holder mark names (by UID) exists
    /// nowhere in the cluster.
    HolderGone,
    /// The cluster is being deleted ([`crate::teardown`]).
    Teardown,
}

impl Reason {
    /// The reason as a metric label and audit field: `node_gone`,
    /// `holder_gone`, `teardown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeGone => "node_gone",
            Self::HolderGone => "holder_gone",
            Self::Teardown => "teardown",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One lease to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The lease as the backend listed it.
    pub lease: Lease,
    /// Why.
    pub reason: Reason,
}

/// A node whose leases the backend lists but which the API does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingNode {
    /// The node's name.
    pub name: String,
    /// Since when and on how many passes.
    pub missing: Missing,
    /// How many of the listed leases name it.
    pub leases: usize,
    /// Whether its leases are released on this pass ([`Reason::NodeGone`]).
    pub gone: bool,
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The leases to release, by node name then lease id.
    pub releases: Vec<Release>,
    /// Every node named by leases but missing from the API, by name.
    pub missing: Vec<MissingNode>,
    /// The memory the next pass starts from.
    pub memory: GoneMemory,
    /// Some lease could go for [`Reason::HolderGone`] but the view has no
    /// pod UIDs: list them and plan again.
    pub wants_pod_uids: bool,
}

/// Judges one pass at `now`. `leases` are what the backend lists for this
/// cluster (`ListScope::Cluster`: the backends list by the tags
/// `hulk-vpc` and `hulk-cluster=<cluster>`, so neither another cluster's
/// addresses nor ones hulk-vpc did not create are ever in it).
///
/// The rules:
/// - a lease whose node the API lists (Ready, NotReady, any condition) is
///   never released;
/// - a lease without a node name is never released (nothing to judge by);
/// - a node missing on this pass is remembered; missing on two
///   consecutive passes or more, and for at least `grace` since the first,
///   its leases are released ([`Reason::NodeGone`]);
/// - before that, once missing on two consecutive passes, a lease whose
///   holder mark names a pod UID that the listed pod UIDs do not contain
///   is released ([`Reason::HolderGone`]); without a pod list nothing is,
///   and [`Plan::wants_pod_uids`] asks for one;
/// - a node listed again, or named by no lease any more, is forgotten.
pub fn plan(
    view: &NodeView,
    leases: &[Lease],
    memory: &GoneMemory,
    now: Instant,
    grace: Duration,
) -> Plan {
    let mut by_node: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    for lease in leases {
        if !lease.node.is_empty() && !view.nodes.contains(&lease.node) {
            by_node.entry(lease.node.as_str()).or_default().push(lease);
        }
    }
    let mut result = Plan::default();
    for (node, mut held) in by_node {
        let missing = match memory.nodes.get(node) {
            Some(before) => Missing {
                since: before.since,
                passes: before.passes.saturating_add(1),
            },
            None => Missing {
                since: now,
                passes: 1,
            },
        };
        result.memory.nodes.insert(node.to_owned(), missing);
        held.sort_by(|a, b| a.id.cmp(&b.id));
        let twice = missing.passes >= 2;
        let gone = twice && now.saturating_duration_since(missing.since) >= grace;
        if gone {
            result.releases.extend(held.iter().map(|lease| Release {
                lease: (*lease).clone(),
                reason: Reason::NodeGone,
            }));
        } else if twice {
            for lease in &held {
                let Some(uid) = holder_uid(lease) else {
                    continue;
                };
                match &view.pod_uids {
                    Some(uids) if !uids.contains(uid) => result.releases.push(Release {
                        lease: (*lease).clone(),
                        reason: Reason::HolderGone,
                    }),
                    Some(_) => {}
                    None => result.wants_pod_uids = true,
                }
            }
        }
        result.missing.push(MissingNode {
            name: node.to_owned(),
            missing,
            leases: held.len(),
            gone,
        });
    }
    result
}

/// The pod UID a lease's holder mark names, if any.
fn holder_uid(lease: &Lease) -> Option<&str> {
    lease
        .owner
        .as_ref()
        .and_then(|owner| owner.pod_uid.as_deref())
        .filter(|uid| !uid.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hulk_ipam::Owner;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(300);

    fn lease(id: usize, node: &str, uid: Option<&str>) -> Lease {
        Lease {
            id: format!("l-{id:05}"),
            address: format!("10.{}.{}.{}/8", id / 65536 % 256, id / 256 % 256, id % 256)
                .parse()
                .unwrap_or_else(|error| panic!("address: {error}")),
            network: "net".into(),
            subnet: "sub".into(),
            gateway: None,
            mac: None,
            mtu: None,
            gateway_mac: None,
            security_groups: Vec::new(),
            qos_policy: None,
            node: node.into(),
            owner: uid.map(|uid| Owner {
                pod: Some(format!("default/pod-{id}")),
                pod_uid: Some(uid.into()),
                ..Owner::new(format!("c-{id}"), "eth0")
            }),
            marked_by: None,
        }
    }

    fn ids(plan: &Plan) -> Vec<(&str, Reason)> {
        plan.releases
            .iter()
            .map(|release| (release.lease.id.as_str(), release.reason))
            .collect()
    }

    #[test]
    fn a_node_gone_once_is_remembered_not_swept() {
        let leases = [lease(1, "a", None), lease(2, "b", None)];
        let now = Instant::now();
        let first = plan(
            &NodeView::new(["a".to_owned()]),
            &leases,
            &GoneMemory::default(),
            now,
            Duration::ZERO,
        );
        assert!(first.releases.is_empty());
        assert_eq!(
            first.memory.nodes.get("b"),
            Some(&Missing {
                since: now,
                passes: 1
            })
        );
        assert_eq!(first.missing.len(), 1);
        assert!(!first.missing[0].gone);
    }

    #[test]
    fn a_node_gone_on_two_passes_past_the_grace_is_swept() {
        let leases = [
            lease(1, "a", None),
            lease(2, "b", Some("u2")),
            lease(3, "b", None),
        ];
        let view = NodeView::new(["a".to_owned()]);
        let start = Instant::now();
        let first = plan(&view, &leases, &GoneMemory::default(), start, GRACE);
        // Second pass within the grace: kept.
        let early = plan(&view, &leases, &first.memory, start + GRACE / 2, GRACE);
        assert!(early.releases.is_empty());
        assert!(early.wants_pod_uids, "l-00002 names a pod UID");
        let late = plan(&view, &leases, &early.memory, start + GRACE, GRACE);
        assert_eq!(
            ids(&late),
            [("l-00002", Reason::NodeGone), ("l-00003", Reason::NodeGone)]
        );
        assert!(late.missing[0].gone);
        assert_eq!(late.memory.nodes["b"].passes, 3);
    }

    #[test]
    fn a_long_first_gap_still_needs_a_second_pass() {
        let leases = [lease(1, "b", None)];
        let view = NodeView::default();
        let first = plan(
            &view,
            &leases,
            &GoneMemory::default(),
            Instant::now(),
            Duration::ZERO,
        );
        assert!(first.releases.is_empty());
    }

    #[test]
    fn a_node_back_is_forgotten() {
        let leases = [lease(1, "b", None)];
        let start = Instant::now();
        let first = plan(
            &NodeView::default(),
            &leases,
            &GoneMemory::default(),
            start,
            GRACE,
        );
        let back = plan(
            &NodeView::new(["b".to_owned()]),
            &leases,
            &first.memory,
            start + GRACE,
            GRACE,
        );
        assert!(back.releases.is_empty());
        assert!(back.memory.nodes.is_empty());
        // Missing again: counted from scratch.
        let again = plan(
            &NodeView::default(),
            &leases,
            &back.memory,
            start + 2 * GRACE,
            GRACE,
        );
        assert!(again.releases.is_empty());
        assert_eq!(again.memory.nodes["b"].passes, 1);
    }

    #[test]
    fn holders_whose_pod_exists_nowhere_go_before_the_grace() {
        let leases = [
            lease(1, "b", Some("alive")),
            lease(2, "b", Some("dead")),
            lease(3, "b", None),
            lease(4, "a", Some("dead-too")),
        ];
        let view = NodeView::new(["a".to_owned()]);
        let start = Instant::now();
        let first = plan(&view, &leases, &GoneMemory::default(), start, GRACE);
        let pods: HashSet<String> = ["alive".to_owned()].into();
        let with_pods = view.clone().with_pod_uids(pods.clone());
        // One pass is not enough even with the pod gone.
        let once = plan(&with_pods, &leases, &GoneMemory::default(), start, GRACE);
        assert!(once.releases.is_empty());
        let second = plan(
            &with_pods,
            &leases,
            &first.memory,
            start + Duration::from_secs(1),
            GRACE,
        );
        // The lease of the existing node "a" is never touched, whatever its
        // holder; no holder mark: waits for the grace.
        assert_eq!(ids(&second), [("l-00002", Reason::HolderGone)]);
        assert!(!second.wants_pod_uids);
    }

    #[test]
    fn leases_without_a_node_are_left_alone() {
        let leases = [lease(1, "", None)];
        let start = Instant::now();
        let first = plan(
            &NodeView::default(),
            &leases,
            &GoneMemory::default(),
            start,
            Duration::ZERO,
        );
        let second = plan(
            &NodeView::default(),
            &leases,
            &first.memory,
            start,
            Duration::ZERO,
        );
        assert!(second.releases.is_empty());
        assert!(second.memory.nodes.is_empty());
    }

    /// A pass: which nodes the API lists and which pod UIDs (if listed),
    /// and the seconds since the previous pass.
    #[derive(Debug, Clone)]
    struct Pass {
        listed: Vec<bool>,
        pods: Option<Vec<bool>>,
        after: u64,
    }

    const NODES: usize = 6;

    fn passes() -> impl Strategy<Value = Vec<Pass>> {
        prop::collection::vec(
            (
                prop::collection::vec(any::<bool>(), NODES),
                prop::option::of(prop::collection::vec(any::<bool>(), NODES * 3)),
                0u64..400,
            )
                .prop_map(|(listed, pods, after)| Pass {
                    listed,
                    pods,
                    after,
                }),
            1..8,
        )
    }

    proptest! {
        /// Over any sequence of passes: a lease whose node is listed on
        /// this pass is never released; a node's leases go only after it
        /// was missing on this pass and the one before, and for the
        /// grace unless its holder's pod is in no listed UID; and only
        /// leases the backend listed are ever released.
        #[test]
        fn only_nodes_missing_twice_lose_addresses(passes in passes(), grace in 0u64..600) {
            let grace = Duration::from_secs(grace);
            // Three leases a node: no holder, a holder, another holder.
            let leases: Vec<Lease> = (0..NODES * 3)
                .map(|index| {
                    let uid = format!("uid-{index}");
                    lease(index, &format!("n{}", index / 3), (!index.is_multiple_of(3)).then_some(uid.as_str()))
                })
                .collect();
            let mut memory = GoneMemory::default();
            let mut now = Instant::now();
            // Per node: the previous pass listed it (None: no pass yet),
            // and since when it is missing.
            let mut listed_before: Vec<Option<bool>> = vec![None; NODES];
            let mut missing_since: Vec<Option<Instant>> = vec![None; NODES];
            for pass in passes {
                now += Duration::from_secs(pass.after);
                let nodes = (0..NODES).filter(|node| pass.listed[*node]).map(|node| format!("n{node}"));
                let mut view = NodeView::new(nodes);
                if let Some(pods) = &pass.pods {
                    view = view.with_pod_uids(
                        (0..NODES * 3).filter(|index| pods[*index]).map(|index| format!("uid-{index}")).collect(),
                    );
                }
                let result = plan(&view, &leases, &memory, now, grace);
                for (since, listed) in missing_since.iter_mut().zip(&pass.listed) {
                    if *listed {
                        *since = None;
                    } else if since.is_none() {
                        *since = Some(now);
                    }
                }
                for release in &result.releases {
                    let index: usize = release.lease.id[2..].parse().unwrap_or(usize::MAX);
                    let node = index / 3;
                    prop_assert!(leases.contains(&release.lease));
                    prop_assert!(!pass.listed[node], "listed node {node} swept");
                    prop_assert_eq!(listed_before[node], Some(false), "node {} swept on its first miss", node);
                    let since = missing_since[node].unwrap_or(now);
                    match release.reason {
                        Reason::NodeGone => prop_assert!(now.duration_since(since) >= grace),
                        Reason::HolderGone => {
                            let pods = pass.pods.as_ref();
                            prop_assert!(pods.is_some_and(|pods| !pods[index]));
                            prop_assert!(!index.is_multiple_of(3));
                        }
                        Reason::Teardown => prop_assert!(false, "plan never tears down"),
                    }
                }
                // And what must go does.
                for node in 0..NODES {
                    let due = listed_before[node] == Some(false)
                        && !pass.listed[node]
                        && missing_since[node].is_some_and(|since| now.duration_since(since) >= grace);
                    let released = result.releases.iter().filter(|release| release.lease.node == format!("n{node}")).count();
                    if due {
                        prop_assert_eq!(released, 3);
                    }
                }
                for (before, listed) in listed_before.iter_mut().zip(&pass.listed) {
                    *before = Some(*listed);
                }
                memory = result.memory;
            }
        }
    }
}
