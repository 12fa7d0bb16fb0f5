//! Pacing of backend calls: the token bucket every rate-limited call
//! waits on, and the jitter that spreads back-off retries of many nodes.

use std::time::Duration;

use hulk_ipam::IpamError;

use super::PoolManager;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub(super) struct RateLimiter {
    rate: f64,
    burst: f64,
    /// Tokens and when they were counted; the async lock queues callers.
    bucket: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimiter {
    pub(super) fn new(rate: f64, burst: u32) -> Self {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            bucket: tokio::sync::Mutex::new((f64::from(burst), tokio::time::Instant::now())),
        }
    }

    pub(super) async fn acquire(&self) {
        let mut bucket = self.bucket.lock().await;
        let now = tokio::time::Instant::now();
        let (tokens, counted) = *bucket;
        let mut tokens =
            (tokens + now.duration_since(counted).as_secs_f64() * self.rate).min(self.burst);
        let mut at = now;
        if tokens < 1.0 {
            // A rate near zero asks for a wait no Duration holds: wait
            // "forever" rather than panic.
            let wait =
                Duration::try_from_secs_f64((1.0 - tokens) / self.rate).unwrap_or(Duration::MAX);
            tokio::time::sleep(wait).await;
            at = tokio::time::Instant::now();
            tokens = 1.0;
        }
        *bucket = (tokens - 1.0, at);
    }
}

/// A draw in [0, 1) for back-off jitter. std's hasher keys are random per
/// process and differ for every `RandomState`, which is all jitter needs.
pub(super) fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // The top 53 bits, as many as an f64 holds exactly.
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

impl PoolManager {
    /// Runs a backend call once the rate limit allows, recording its
    /// latency and failure kind.
    pub(super) async fn timed<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, IpamError>>,
    ) -> Result<T, IpamError> {
        self.rate.acquire().await;
        self.metered(operation, call).await
    }
}
