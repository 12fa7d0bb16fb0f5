//! Prometheus metrics of the controller (prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::plan::Reason;

/// How one release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend released the address.
    Released,
    /// The backend no longer had it.
    AlreadyGone,
    /// The backend refused or failed.
    Failed,
}

impl Outcome {
    /// The outcome as a label: `released`, `already_gone`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::AlreadyGone => "already_gone",
            Self::Failed => "failed",
        }
    }
}

/// Labels of a release.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// [`Outcome::as_str`].
    pub outcome: String,
    /// [`Reason::as_str`].
    pub reason: String,
}

/// Labels of a pass.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    /// `ok`, or `failed` (the backend's or the API's list failed; nothing
    /// was judged).
    pub result: String,
}

/// Every metric of the controller; handles are shared, clone freely.
#[derive(Debug, Clone, Default)]
pub struct ControllerMetrics {
    /// `hulk_controller_releases_total{outcome, reason}`.
    pub releases: Family<ReleaseLabels, Counter>,
    /// `hulk_controller_passes_total{result}`.
    pub passes: Family<PassLabels, Counter>,
    /// `hulk_controller_missing_nodes`: nodes named by the cluster's
    /// allocations that the API does not list, on the last pass.
    pub missing_nodes: Gauge,
    /// `hulk_controller_gone_nodes`: those of them judged gone (their
    /// addresses returned) on the last pass.
    pub gone_nodes: Gauge,
    /// `hulk_controller_leader`: 1 while this replica holds the leader
    /// lease.
    pub leader: Gauge,
}

impl ControllerMetrics {
    /// Registers every metric under `hulk_controller_`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("hulk_controller");
        registry.register(
            "releases",
            "Addresses the controller returned or tried to, by outcome and reason",
            self.releases.clone(),
        );
        registry.register(
            "passes",
            "Reconciliation passes, by result",
            self.passes.clone(),
        );
        registry.register(
            "missing_nodes",
            "Nodes named by the cluster's allocations that the API does not list",
            self.missing_nodes.clone(),
        );
        registry.register(
            "gone_nodes",
            "Missing nodes judged gone on the last pass",
            self.gone_nodes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            self.leader.clone(),
        );
    }

    pub(crate) fn count_release(&self, outcome: Outcome, reason: Reason) {
        self.releases
            .get_or_create(&ReleaseLabels {
                outcome: outcome.as_str().to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    pub(crate) fn count_pass(&self, ok: bool) {
        self.passes
            .get_or_create(&PassLabels {
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// How many releases ended with `outcome` for `reason` so far.
    pub fn releases_of(&self, outcome: Outcome, reason: Reason) -> u64 {
        self.releases
            .get_or_create(&ReleaseLabels {
                outcome: outcome.as_str().to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .get()
    }
}
