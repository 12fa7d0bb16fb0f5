//! The ADD arrival rate the adaptive mode sizes a pool by, and the
//! Poisson stock that serves it.

use std::time::Duration;

/// The time constant of the burst rate of ADD arrivals: ten seconds, the
/// scale of a rollout's burst (50-200 ADDs within seconds) and of a cloud
/// allocation. An arrival counts `exp(-age / ARRIVAL_BURST_TIME_CONSTANT)`.
pub const ARRIVAL_BURST_TIME_CONSTANT: Duration = Duration::from_secs(10);

/// How long the adaptive mode remembers the highest burst rate: its time
/// constant, five minutes. Long enough that a rollout's next wave (minutes
/// later) finds the pool sized for the last one, short enough that an idle
/// hour takes the pool back to `min_idle`.
pub const ARRIVAL_MEMORY: Duration = Duration::from_secs(300);

/// The ADD arrival rate the adaptive mode sizes the pool by: the peak of
/// a burst rate, forgotten slowly.
///
/// The burst rate is an exponentially decaying count: each arrival adds
/// `1 / τb` per second (τb: [`ARRIVAL_BURST_TIME_CONSTANT`]) and the sum
/// decays by `exp(-elapsed / τb)`, so a steady stream of `r` ADDs a second
/// reads about `r`. The estimate is the highest burst rate seen, decaying
/// by `exp(-elapsed / τm)` (τm: [`ARRIVAL_MEMORY`]). A plain five-minute
/// average would read a burst of 150 ADDs in ten seconds as half an ADD a
/// second, and size the pool for a trickle; the peak reads it as the
/// burst it was (measured in docs/pool.md).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArrivalRate {
    /// The burst rate (ADDs per second) at `at_ms`.
    burst: f64,
    /// The remembered peak (ADDs per second) at `at_ms`.
    peak: f64,
    /// When the rates were last brought up to date (Unix milliseconds).
    at_ms: u64,
}

/// `exp(-elapsed / tau)`, the decay of an exponentially weighted count.
fn decay(elapsed_ms: u64, tau: Duration) -> f64 {
    (-(elapsed_ms as f64) / (tau.as_secs_f64() * 1_000.0)).exp()
}

impl ArrivalRate {
    /// The estimate (ADDs per second) at `now_ms` (Unix milliseconds); a
    /// clock that went back counts as no time passed.
    pub fn per_second_at(&self, now_ms: u64) -> f64 {
        // The peak is at least the burst rate, and decays slower.
        self.peak * decay(now_ms.saturating_sub(self.at_ms), ARRIVAL_MEMORY)
    }

    /// The burst rate alone (ADDs per second) at `now_ms`.
    pub fn burst_at(&self, now_ms: u64) -> f64 {
        self.burst
            * decay(
                now_ms.saturating_sub(self.at_ms),
                ARRIVAL_BURST_TIME_CONSTANT,
            )
    }

    /// Counts one arrival at `now_ms` (Unix milliseconds).
    pub fn note(&mut self, now_ms: u64) {
        let burst = self.burst_at(now_ms) + 1.0 / ARRIVAL_BURST_TIME_CONSTANT.as_secs_f64();
        self.peak = self.per_second_at(now_ms).max(burst);
        self.burst = burst;
        self.at_ms = self.at_ms.max(now_ms);
    }
}

/// The smallest `s` (at most `cap`) such that a Poisson count of mean
/// `mean` is at least `s` with probability at most `late`: how many idle
/// addresses serve all the ADDs of a window that many arrive in on
/// average, but for a fraction `late` of windows. `cap` when even `cap`
/// is not enough. Summed in log space, so a mean of thousands (whose
/// `exp(-mean)` is zero in an f64) still finds its quantile.
pub fn poisson_stock(mean: f64, late: f64, cap: usize) -> usize {
    if mean.is_nan() || mean <= 0.0 {
        // Nobody arrives: the ADD that does needs one address.
        return 1.min(cap);
    }
    let log_mean = mean.ln();
    // ln P(N = k), from k = 0 up.
    let mut log_pmf = -mean;
    let mut below = 0.0; // P(N < s)
    for s in 0..cap {
        if s > 0 {
            log_pmf += log_mean - (s as f64).ln();
        }
        // P(N >= s) = 1 - P(N < s); with s addresses, the ADD that finds
        // s others ahead of it in the window waits.
        if 1.0 - below <= late {
            return s;
        }
        below += log_pmf.exp();
    }
    cap
}
