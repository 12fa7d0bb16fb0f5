//! Deterministic fault injection around any backend: latency, random
//! errors at a rate, a given error or a hang on the Nth call.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{AllocationRequest, IpamBackend, IpamError, Lease, ListScope, Owner};

/// How long each call takes before it reaches the wrapped backend.
#[derive(Debug, Clone, PartialEq)]
pub enum Latency {
    /// No added delay.
    None,
    /// The same delay every call.
    Fixed(Duration),
    /// A delay drawn uniformly from `min..=max`.
    Uniform {
        /// The shortest delay.
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
}

/// What happens on a chosen call.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The call fails with this error.
    Error(IpamError),
    /// The call never returns (the caller's timeout must act).
    Hang,
}

/// The faults to inject. Calls are numbered from 1 across every method.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Added latency.
    pub latency: Latency,
    /// The fraction of calls (0.0 to 1.0) that fail with `random_error`.
    pub error_rate: f64,
    /// The error those calls fail with.
    pub random_error: IpamError,
    /// Faults for specific call numbers, applied before the random ones.
    pub on_call: BTreeMap<u64, Fault>,
    /// Seed of the random draws: the same seed, the same faults.
    pub seed: u64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            latency: Latency::None,
            error_rate: 0.0,
            random_error: IpamError::Transient("injected failure".into()),
            on_call: BTreeMap::new(),
            seed: 0,
        }
    }
}

impl FaultPlan {
    /// Only a fixed latency on every call: a stand-in for a slow cloud.
    pub fn fixed_latency(delay: Duration) -> Self {
        FaultPlan {
            latency: Latency::Fixed(delay),
            ..FaultPlan::default()
        }
    }
}

/// A backend wrapped with a [`FaultPlan`].
#[derive(Debug)]
pub struct Faulty<B> {
    inner: B,
    plan: FaultPlan,
    state: Mutex<FaultState>,
}

#[derive(Debug)]
struct FaultState {
    calls: u64,
    random: StdRng,
}

impl<B> Faulty<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, plan: FaultPlan) -> Self {
        let random = StdRng::seed_from_u64(plan.seed);
        Faulty {
            inner,
            plan,
            state: Mutex::new(FaultState { calls: 0, random }),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// How many calls were made so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides this call's fate up front, so draws do not depend on timing.
    fn next_call(&self) -> (Duration, Option<Fault>) {
        let mut state = self.lock();
        state.calls += 1;
        let delay = match &self.plan.latency {
            Latency::None => Duration::ZERO,
            Latency::Fixed(delay) => *delay,
            Latency::Uniform { min, max } => {
                let (low, high) = (
                    min.as_nanos() as u64,
                    max.as_nanos().max(min.as_nanos()) as u64,
                );
                Duration::from_nanos(state.random.random_range(low..=high))
            }
        };
        let random_failure = self.plan.error_rate > 0.0
            && state.random.random_range(0.0..1.0) < self.plan.error_rate;
        let fault = self
            .plan
            .on_call
            .get(&state.calls)
            .cloned()
            .or_else(|| random_failure.then(|| Fault::Error(self.plan.random_error.clone())));
        (delay, fault)
    }

    async fn before_call(&self) -> Result<(), IpamError> {
        let (delay, fault) = self.next_call();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match fault {
            None => Ok(()),
            Some(Fault::Error(error)) => Err(error),
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

#[async_trait::async_trait]
impl<B: IpamBackend> IpamBackend for Faulty<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError> {
        self.before_call().await?;
        self.inner.allocate(request).await
    }

    async fn release(&self, id: &str) -> Result<(), IpamError> {
        self.before_call().await?;
        self.inner.release(id).await
    }

    async fn update_owner(&self, id: &str, owner: Option<Owner>) -> Result<Lease, IpamError> {
        self.before_call().await?;
        self.inner.update_owner(id, owner).await
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError> {
        self.before_call().await?;
        self.inner.list(scope).await
    }

    async fn health(&self) -> Result<(), IpamError> {
        self.before_call().await?;
        self.inner.health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MockBackend, PoolKey};

    fn request() -> AllocationRequest {
        AllocationRequest::new(
            PoolKey::new("n", "s", Vec::<String>::new(), None),
            "node",
            1,
        )
    }

    fn backend(plan: FaultPlan) -> Faulty<MockBackend> {
        Faulty::new(MockBackend::new("10.0.0.0/24".parse().unwrap()), plan)
    }

    #[tokio::test]
    async fn the_nth_call_fails_as_planned_and_nothing_is_allocated() {
        let plan = FaultPlan {
            on_call: BTreeMap::from([(2, Fault::Error(IpamError::Quota("ports".into())))]),
            ..FaultPlan::default()
        };
        let backend = backend(plan);
        assert!(backend.allocate(&request()).await.is_ok());
        assert_eq!(
            backend.allocate(&request()).await,
            Err(IpamError::Quota("ports".into()))
        );
        assert!(backend.allocate(&request()).await.is_ok());
        assert_eq!(backend.inner().allocated(), 2);
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test]
    async fn random_errors_follow_the_seed() {
        let outcomes = |seed| async move {
            let backend = backend(FaultPlan {
                error_rate: 0.3,
                seed,
                ..FaultPlan::default()
            });
            let mut failed = Vec::new();
            for _ in 0..200 {
                failed.push(backend.health().await.is_err());
            }
            failed
        };
        let first = outcomes(7).await;
        assert_eq!(first, outcomes(7).await, "same seed, same faults");
        assert_ne!(first, outcomes(8).await);
        let rate = first.iter().filter(|failed| **failed).count() as f64 / 200.0;
        assert!((0.2..0.4).contains(&rate), "rate {rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_added_and_a_hang_never_returns() {
        let backend = backend(FaultPlan {
            latency: Latency::Uniform {
                min: Duration::from_secs(9),
                max: Duration::from_secs(11),
            },
            on_call: BTreeMap::from([(2, Fault::Hang)]),
            ..FaultPlan::default()
        });
        let started = tokio::time::Instant::now();
        backend.allocate(&request()).await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(9) && waited <= Duration::from_secs(11),
            "{waited:?}"
        );
        let hung =
            tokio::time::timeout(Duration::from_secs(3600), backend.allocate(&request())).await;
        assert!(hung.is_err(), "a hang must not return");
    }

    #[tokio::test]
    async fn mockall_mocks_stand_in_for_a_backend() {
        let mut mock = crate::MockIpamBackend::new();
        mock.expect_release()
            .withf(|id| id == "port-1")
            .times(1)
            .returning(|_| Err(IpamError::NotFound("port-1".into())));
        let backend: &dyn IpamBackend = &mock;
        assert_eq!(
            backend.release("port-1").await,
            Err(IpamError::NotFound("port-1".into()))
        );
    }
}
