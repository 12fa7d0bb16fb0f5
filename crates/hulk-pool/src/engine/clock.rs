//! Wall-clock time for the pools: cooldowns and pauses are stored
//! durably, so they are Unix milliseconds, not a monotonic clock.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::millis;

/// Wall-clock milliseconds; cooldowns are stored durably, so they use the
/// wall clock, not a monotonic one.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis)
    }
}

/// A clock that follows tokio's time from a fixed start: with tokio's
/// clock paused (`tokio::time::pause`), cooldowns, pauses and the pool's
/// estimates follow simulated time, so a simulation of hours of pod churn
/// runs in seconds. Not for an agent: its times are not Unix times.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    started: tokio::time::Instant,
    /// What [`Clock::now_ms`] says at `started`.
    base_ms: u64,
}

impl TokioClock {
    /// A clock reading `base_ms` now and moving with tokio's time.
    pub fn starting_at(base_ms: u64) -> Self {
        TokioClock {
            started: tokio::time::Instant::now(),
            base_ms,
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.base_ms.saturating_add(millis(self.started.elapsed()))
    }
}
