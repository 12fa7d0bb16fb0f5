//! Prometheus metrics of the pools (prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use hulk_ipam::{IpamError, PoolKey};

/// Labels naming a pool.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The subnet.
    pub subnet: String,
    /// The sorted security groups, comma-separated.
    pub security_groups: String,
    /// The QoS policy, or empty.
    pub qos_policy: String,
}

impl From<&PoolKey> for PoolLabels {
    fn from(key: &PoolKey) -> Self {
        PoolLabels {
            subnet: key.subnet.clone(),
            security_groups: key.security_groups.join(","),
            qos_policy: key.qos_policy.clone().unwrap_or_default(),
        }
    }
}

/// Labels of a backend call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `allocate`, `release` or `list`.
    pub operation: String,
}

/// Labels of a failed backend call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `allocate`, `release` or `list`.
    pub operation: String,
    /// The error kind (`exhausted`, `quota`, `throttled`, ...).
    pub kind: String,
}

/// Labels of a wrong answer of the backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabels {
    /// What was wrong: [`crate::core::Anomaly::kind`] (`duplicate_address`,
    /// `duplicate_id`, `short_answer`, `long_answer`, `outside_subnet`,
    /// `wrong_address`, `over_cap`).
    pub kind: String,
}

/// Labels of an address the backend no longer has while the pool held it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    /// The pool's subnet.
    pub subnet: String,
    /// The pool's sorted security groups, comma-separated.
    pub security_groups: String,
    /// The pool's QoS policy, or empty.
    pub qos_policy: String,
    /// The record's state when the loss was found: `idle` or `cooldown`
    /// (dropped from the pool) or `assigned` (a pod still uses it).
    pub state: String,
}

/// The kind of an error, as a metric label.
pub fn error_kind(error: &IpamError) -> &'static str {
    match error {
        IpamError::Exhausted { .. } => "exhausted",
        IpamError::Quota(_) => "quota",
        IpamError::Throttled { .. } => "throttled",
        IpamError::NotFound(_) => "not_found",
        IpamError::Conflict(_) => "conflict",
        IpamError::Auth(_) => "auth",
        IpamError::Transient(_) => "transient",
        IpamError::InvalidRequest(_) => "invalid_request",
        IpamError::Protocol(_) => "protocol",
    }
}

/// Every metric of a [`crate::PoolManager`]. Handles are shared: clone
/// freely. Pool gauges are refreshed by [`crate::PoolManager::refresh_metrics`]
/// (call it before each scrape), so the hot path only touches counters.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    /// Idle addresses per pool.
    pub idle: Family<PoolLabels, Gauge>,
    /// Assigned addresses per pool.
    pub assigned: Family<PoolLabels, Gauge>,
    /// All addresses per pool (idle, assigned, cooling, releasing).
    pub total: Family<PoolLabels, Gauge>,
    /// 1 while a pool is degraded.
    pub degraded: Family<PoolLabels, Gauge>,
    /// Seconds an assignment took, including any wait for a refill.
    pub assign_seconds: Family<PoolLabels, Histogram>,
    /// Seconds per backend call.
    pub backend_seconds: Family<CallLabels, Histogram>,
    /// Failed backend calls by kind.
    pub backend_errors: Family<ErrorLabels, Counter>,
    /// Successful refills.
    pub refills: Family<PoolLabels, Counter>,
    /// Assignments released by reconciliation (pod gone).
    pub gc_releases: Counter,
    /// Leases of the backend's answers the pool refused, and pods'
    /// addresses adopted beyond `max_total`, by kind.
    pub backend_anomalies: Family<AnomalyLabels, Counter>,
    /// Refillers restarted after they panicked or ended unexpectedly.
    pub refiller_restarts: Family<PoolLabels, Counter>,
    /// Addresses an orphan sweep found gone from the backend while the
    /// pool held them (the cloud took them back), by pool and the record's
    /// state then; each is counted once.
    pub leases_lost: Family<LostLabels, Counter>,
    /// Listings of this node's addresses that showed another agent
    /// instance's fresh marks (a second agent under this node name).
    pub held_elsewhere: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics {
            idle: Family::default(),
            assigned: Family::default(),
            total: Family::default(),
            degraded: Family::default(),
            assign_seconds: Family::new_with_constructor(latency_histogram),
            backend_seconds: Family::new_with_constructor(latency_histogram),
            backend_errors: Family::default(),
            refills: Family::default(),
            gc_releases: Counter::default(),
            backend_anomalies: Family::default(),
            refiller_restarts: Family::default(),
            leases_lost: Family::default(),
            held_elsewhere: Counter::default(),
        }
    }
}

impl PoolMetrics {
    /// Registers every metric under the prefix `hulk_pool`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("hulk_pool");
        registry.register(
            "idle_addresses",
            "Idle addresses per pool",
            self.idle.clone(),
        );
        registry.register(
            "assigned_addresses",
            "Addresses held by pods",
            self.assigned.clone(),
        );
        registry.register("addresses", "All addresses per pool", self.total.clone());
        registry.register(
            "degraded",
            "1 while refills are paused after a backend refusal",
            self.degraded.clone(),
        );
        registry.register(
            "assign_seconds",
            "Time to assign an address",
            self.assign_seconds.clone(),
        );
        registry.register(
            "backend_call_seconds",
            "Time per backend call",
            self.backend_seconds.clone(),
        );
        registry.register(
            "backend_errors",
            "Failed backend calls by kind",
            self.backend_errors.clone(),
        );
        registry.register(
            "refills",
            "Successful refill allocations",
            self.refills.clone(),
        );
        registry.register(
            "gc_releases",
            "Addresses released because their pod was gone",
            self.gc_releases.clone(),
        );
        registry.register(
            "backend_anomalies",
            "Wrong answers of the backend the pool refused (or, over_cap, kept for a pod), by kind",
            self.backend_anomalies.clone(),
        );
        registry.register(
            "refiller_restarts",
            "Refillers restarted after a panic or an unexpected end",
            self.refiller_restarts.clone(),
        );
        registry.register(
            "leases_lost",
            "Addresses the backend no longer had while the pool held them, by the record's state",
            self.leases_lost.clone(),
        );
        registry.register(
            "held_elsewhere",
            "Listings of this node's addresses showing another agent instance's fresh marks",
            self.held_elsewhere.clone(),
        );
    }

    pub(crate) fn anomaly(&self, anomaly: crate::core::Anomaly) {
        self.backend_anomalies
            .get_or_create(&AnomalyLabels {
                kind: anomaly.kind().to_owned(),
            })
            .inc();
    }

    /// Counts one address of `key`'s pool found gone from the backend
    /// while in `state` (a [`LostLabels::state`] value).
    pub(crate) fn lease_lost(&self, key: &PoolKey, state: &str) {
        let pool = PoolLabels::from(key);
        self.leases_lost
            .get_or_create(&LostLabels {
                subnet: pool.subnet,
                security_groups: pool.security_groups,
                qos_policy: pool.qos_policy,
                state: state.to_owned(),
            })
            .inc();
    }

    pub(crate) fn backend_call<T>(
        &self,
        operation: &str,
        started: std::time::Instant,
        result: &Result<T, IpamError>,
    ) {
        self.backend_seconds
            .get_or_create(&CallLabels {
                operation: operation.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
        if let Err(error) = result {
            self.backend_errors
                .get_or_create(&ErrorLabels {
                    operation: operation.to_owned(),
                    kind: error_kind(error).to_owned(),
                })
                .inc();
        }
    }
}
