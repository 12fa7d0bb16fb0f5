//! [`ControllerConfig`] and [`ReleaseSettings`]: how long a node must be
//! gone, how often a pass runs, and how fast addresses go back.

use std::time::Duration;

use serde::Deserialize;

/// How the controller judges nodes gone and paces its passes. Read from
/// TOML (every field optional; unknown fields refused).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Seconds a node must have been missing from the API, counted from
    /// the first pass that missed it, before its addresses are returned
    /// (it must also be missing on at least two passes). Covers a node
    /// deleted and registered again by its kubelet, and a watch that lags.
    /// Default 300.
    pub grace_period_seconds: u64,
    /// Seconds between two passes (list the cluster's allocations, judge,
    /// release). Default 60.
    pub pass_interval_seconds: u64,
    /// How releases are paced.
    pub release: ReleaseSettings,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            grace_period_seconds: 300,
            pass_interval_seconds: 60,
            release: ReleaseSettings::default(),
        }
    }
}

impl ControllerConfig {
    /// [`ControllerConfig::grace_period_seconds`] as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_seconds)
    }

    /// [`ControllerConfig::pass_interval_seconds`] as a duration.
    pub fn pass_interval(&self) -> Duration {
        Duration::from_secs(self.pass_interval_seconds)
    }

    /// Refuses values that cannot work.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pass_interval_seconds == 0 {
            return Err(ConfigError::invalid(
                "pass_interval_seconds",
                "must be at least 1",
            ));
        }
        self.release.validate()
    }
}

/// How releases go to the backend: at most `releases_per_second` calls
/// started a second, `concurrency` at a time, each checked right before it
/// starts (still leading, node still missing), with a progress line every
/// `batch_size`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReleaseSettings {
    /// Release calls started per second, at most (no bursts: one every
    /// `1 / releases_per_second` seconds). Default 20.
    pub releases_per_second: f64,
    /// Release calls in flight at once. With a backend taking `t` seconds
    /// a call, the rate reached is `min(releases_per_second, concurrency /
    /// t)`. Default 32: the default rate with a cloud taking 1.5 s a call.
    pub concurrency: usize,
    /// Releases per batch: a progress line (done, released, already gone,
    /// failed, skipped) is logged after each. Default 100.
    pub batch_size: usize,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            releases_per_second: 20.0,
            concurrency: 32,
            batch_size: 100,
        }
    }
}

/// The most releases a second the pacing takes: beyond it a tick would be
/// shorter than a microsecond.
const MOST_PER_SECOND: f64 = 1_000_000.0;

impl ReleaseSettings {
    /// The time between two release calls' starts.
    pub fn spacing(&self) -> Duration {
        Duration::from_secs_f64(
            1.0 / self
                .releases_per_second
                .clamp(f64::MIN_POSITIVE, MOST_PER_SECOND),
        )
    }

    /// Refuses values that cannot work.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.releases_per_second.is_finite()
            && self.releases_per_second >= 0.001
            && self.releases_per_second <= MOST_PER_SECOND)
        {
            return Err(ConfigError::invalid(
                "release.releases_per_second",
                "must be between 0.001 and 1000000",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "release.concurrency",
                "must be at least 1",
            ));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::invalid(
                "release.batch_size",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct ConfigError {
    /// The field, as written in TOML (`release.concurrency`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl ConfigError {
    fn invalid(field: &'static str, problem: &'static str) -> Self {
        Self { field, problem }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fields_are_checked() {
        assert_eq!(ControllerConfig::default().validate(), Ok(()));
        let mut config = ControllerConfig::default();
        config.release.concurrency = 0;
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("release.concurrency")
        );
        let mut config = ControllerConfig::default();
        config.release.releases_per_second = f64::NAN;
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("release.releases_per_second")
        );
        let config = ControllerConfig {
            pass_interval_seconds: 0,
            ..ControllerConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|error| error.field),
            Err("pass_interval_seconds")
        );
    }

    #[test]
    fn spacing_follows_the_rate() {
        let settings = ReleaseSettings {
            releases_per_second: 4.0,
            ..ReleaseSettings::default()
        };
        assert_eq!(settings.spacing(), Duration::from_millis(250));
    }
}
