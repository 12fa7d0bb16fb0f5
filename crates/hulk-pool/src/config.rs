//! Pool knobs, with defaults and validation.

use std::time::Duration;

/// How one pool behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Refill when fewer addresses than this are idle.
    pub min_idle: usize,
    /// Return idle addresses beyond this to the backend.
    pub max_idle: usize,
    /// Addresses asked for in one (bulk) backend call.
    pub batch: usize,
    /// Addresses allocated when the pool starts.
    pub warm_up: usize,
    /// The most addresses assigned to pods at once: the node's pod
    /// capacity (kubelet's `--max-pods`). An ADD beyond it is refused at
    /// once ([`crate::PoolError::Full`]).
    pub max_total: usize,
    /// The most addresses the pool holds from the backend in any state
    /// (idle, assigned, cooling down, being returned or allocated): the
    /// cloud cost bound. `None`: twice `max_total`, so that every pod at
    /// capacity can be replaced within one `reuse_cooldown` while the old
    /// addresses cool down ([`PoolConfig::held_cap`]).
    pub max_held: Option<usize>,
    /// How long a released address waits before it is handed out again,
    /// so Service endpoints pointing at the old pod converge first.
    pub reuse_cooldown: Duration,
    /// Idle addresses beyond `min_idle` unused this long go back to the backend.
    pub idle_reclaim_after: Option<Duration>,
    /// How long an assignment waits for a refill before "try again later".
    pub assign_timeout: Duration,
    /// How long the pool stays degraded (no refills) after the backend says
    /// exhausted, quota or throttled without a Retry-After.
    pub backoff: Duration,
    /// How often the refiller looks at the pool without being woken.
    pub refill_interval: Duration,
    /// Backend calls per second allowed to the whole manager (a token
    /// bucket). Taken from the manager's default configuration only.
    pub backend_calls_per_second: f64,
    /// Calls the token bucket lets through at once after a quiet spell.
    pub backend_burst: u32,
    /// Opt-in adaptive sizing: the ADD wait (from the ADD reaching the
    /// pool to its address) that at most 1 % of ADDs may exceed. When set,
    /// the pool estimates the ADD arrival rate and the backend's
    /// allocation time and keeps as many idle addresses as a Poisson model
    /// of arrivals says that takes, within `min_idle` and `max_idle`
    /// (see [`crate::core::PoolCore::adaptive_target`]). `None` (the
    /// default): the static watermarks alone. Zero: as few ADDs as the
    /// model allows wait at all.
    pub target_add_p99: Option<Duration>,
    /// The adaptive mode's budget of backend calls per pool, per minute
    /// (allocations and returns counted together): refills beyond the
    /// static demand (`min_idle`, or the waiting ADDs) and returns below
    /// `max_idle` are made only while the pool made fewer calls in the
    /// last minute. Calls for waiting ADDs, `min_idle` and `max_idle` are
    /// never held back. Unused without `target_add_p99`; at least 1.
    pub adaptive_calls_per_minute: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_idle: 4,
            max_idle: 16,
            batch: 8,
            warm_up: 8,
            max_total: 110,
            max_held: None,
            reuse_cooldown: Duration::from_secs(30),
            idle_reclaim_after: Some(Duration::from_secs(3600)),
            assign_timeout: Duration::from_secs(30),
            backoff: Duration::from_secs(60),
            refill_interval: Duration::from_secs(5),
            backend_calls_per_second: 10.0,
            backend_burst: 20,
            target_add_p99: None,
            adaptive_calls_per_minute: 30,
        }
    }
}

impl PoolConfig {
    /// The most addresses the pool holds from the backend: `max_held`, or
    /// twice `max_total` (saturating).
    pub fn held_cap(&self) -> usize {
        self.max_held
            .unwrap_or_else(|| self.max_total.saturating_mul(2))
    }

    /// Checks the knobs against each other; the message names the fields.
    pub fn validate(&self) -> Result<(), String> {
        let problems: Vec<String> = [
            (self.min_idle > self.max_idle).then(|| {
                format!(
                    "min_idle ({}) is above max_idle ({})",
                    self.min_idle, self.max_idle
                )
            }),
            (self.max_idle > self.max_total).then(|| {
                format!(
                    "max_idle ({}) is above max_total ({})",
                    self.max_idle, self.max_total
                )
            }),
            (self.warm_up > self.max_total).then(|| {
                format!(
                    "warm_up ({}) is above max_total ({})",
                    self.warm_up, self.max_total
                )
            }),
            (self.held_cap() < self.max_total).then(|| {
                format!(
                    "max_held ({}) is below max_total ({}): pods could never fill the node",
                    self.held_cap(),
                    self.max_total
                )
            }),
            (self.batch == 0).then(|| "batch must be at least 1".to_owned()),
            (self.max_total == 0).then(|| "max_total must be at least 1".to_owned()),
            self.assign_timeout
                .is_zero()
                .then(|| "assign_timeout must be above zero".to_owned()),
            self.refill_interval
                .is_zero()
                .then(|| "refill_interval must be above zero".to_owned()),
            (self.backend_calls_per_second.is_nan() || self.backend_calls_per_second <= 0.0)
                .then(|| "backend_calls_per_second must be above zero".to_owned()),
            (self.backend_burst == 0).then(|| "backend_burst must be at least 1".to_owned()),
            (self.adaptive_calls_per_minute == 0)
                .then(|| "adaptive_calls_per_minute must be at least 1".to_owned()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(PoolConfig::default().validate(), Ok(()));
    }

    #[test]
    fn nonsense_is_refused_with_every_reason() {
        let config = PoolConfig {
            min_idle: 10,
            max_idle: 5,
            batch: 0,
            ..PoolConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert!(
            error.contains("min_idle (10) is above max_idle (5)"),
            "{error}"
        );
        assert!(error.contains("batch must be at least 1"), "{error}");
    }

    #[test]
    fn an_adaptive_pool_needs_a_call_budget() {
        let config = PoolConfig {
            target_add_p99: Some(Duration::from_millis(500)),
            adaptive_calls_per_minute: 0,
            ..PoolConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert!(
            error.contains("adaptive_calls_per_minute must be at least 1"),
            "{error}"
        );
        let budgeted = PoolConfig {
            adaptive_calls_per_minute: 1,
            ..config
        };
        assert_eq!(budgeted.validate(), Ok(()));
    }
}
