//! Deterministic fault injection around any backend: latency, random
//! errors at a rate, a given error, a hang or a panic on the Nth call, and
//! the wrong answers a buggy service gives to an allocation (an address or
//! id handed out before, a short or long answer, an address outside the
//! subnet), so that callers can be tested against a backend they must not
//! trust.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{AllocationRequest, InstanceMark, IpamBackend, IpamError, Lease, ListScope, Owner};

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

/// What happens on a chosen call. The answer faults (all but `Error`,
/// `Hang` and `Panic`) change what an `allocate` call returns; on any other
/// call they do nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The call fails with this error (e.g. `Throttled` with a Retry-After,
    /// or `Protocol` for an answer that is not JSON).
    Error(IpamError),
    /// The call never returns (the caller's timeout must act).
    Hang,
    /// The call panics, as a bug in a backend client would.
    Panic,
    /// The answer's last lease carries the address of the first lease this
    /// wrapper ever handed out, under its own (new) id: the service gave
    /// one address twice.
    DuplicateAddress,
    /// The answer's last lease carries the id of the first lease this
    /// wrapper ever handed out, with its own (new) address; the lease the
    /// wrapped backend created is then known to no caller
    /// ([`Faulty::hidden`]).
    ReusedId,
    /// The answer's first lease appears a second time at its end.
    Repeated,
    /// The answer has this many leases fewer than asked (the wrapped
    /// backend is asked for fewer, so nothing is hidden).
    ShortAnswer(usize),
    /// The answer has this many leases more than asked.
    LongAnswer(usize),
    /// The answer's last lease carries an address outside its subnet (the
    /// same host number in 192.0.2.0/24, or 2001:db8::/64 for IPv6: the
    /// documentation ranges), under its own id.
    OutsideSubnet,
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
    /// The first lease any allocation answered, for `DuplicateAddress` and
    /// `ReusedId`.
    first: Option<Lease>,
    /// Ids the wrapped backend created that `ReusedId` kept from callers.
    hidden: Vec<String>,
}

impl<B> Faulty<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, plan: FaultPlan) -> Self {
        let random = StdRng::seed_from_u64(plan.seed);
        Faulty {
            inner,
            plan,
            state: Mutex::new(FaultState {
                calls: 0,
                random,
                first: None,
                hidden: Vec::new(),
            }),
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

    /// The ids of leases the wrapped backend created whose id a
    /// [`Fault::ReusedId`] answer replaced: held in the backend, told to
    /// nobody (an orphan sweep finds them).
    pub fn hidden(&self) -> Vec<String> {
        self.lock().hidden.clone()
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

    /// Waits out the call's latency and acts on a fault that replaces the
    /// call; returns a fault that changes the answer instead.
    async fn before_call(&self) -> Result<Option<Fault>, IpamError> {
        let (delay, fault) = self.next_call();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match fault {
            None => Ok(None),
            Some(Fault::Error(error)) => Err(error),
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Panic) => panic!("a panic injected by the fault plan"),
            Some(answer) => Ok(Some(answer)),
        }
    }

    /// Applies an answer fault to an allocation's leases.
    fn tamper(&self, fault: Option<Fault>, mut leases: Vec<Lease>) -> Vec<Lease> {
        let mut state = self.lock();
        match (fault, state.first.clone(), leases.last_mut()) {
            (Some(Fault::DuplicateAddress), Some(first), Some(last)) => {
                last.address = first.address;
            }
            (Some(Fault::ReusedId), Some(first), Some(last)) => {
                let created = std::mem::replace(&mut last.id, first.id);
                state.hidden.push(created);
            }
            (Some(Fault::OutsideSubnet), _, Some(last)) => {
                last.address = outside(last.address);
            }
            (Some(Fault::Repeated), _, Some(_)) => {
                let again = leases.first().cloned();
                leases.extend(again);
            }
            _ => {}
        }
        if state.first.is_none() {
            state.first = leases.first().cloned();
        }
        leases
    }
}

/// The same host number in a documentation range, with the same prefix.
fn outside(address: IpNet) -> IpNet {
    let moved = match address.addr() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, v4.octets()[3])),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            v6.segments()[7],
        )),
    };
    IpNet::new(moved, address.prefix_len()).unwrap_or_else(|_| IpNet::from(moved))
}

#[async_trait::async_trait]
impl<B: IpamBackend> IpamBackend for Faulty<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn allocate(&self, request: &AllocationRequest) -> Result<Vec<Lease>, IpamError> {
        let fault = self.before_call().await?;
        let count = match fault {
            Some(Fault::ShortAnswer(fewer)) => request.count.saturating_sub(fewer),
            Some(Fault::LongAnswer(more)) => request.count.saturating_add(more),
            _ => request.count,
        };
        let leases = if count == 0 {
            Vec::new()
        } else {
            let mut asked = request.clone();
            asked.count = count;
            self.inner.allocate(&asked).await?
        };
        Ok(self.tamper(fault, leases))
    }

    async fn release(&self, id: &str) -> Result<(), IpamError> {
        self.before_call().await?;
        self.inner.release(id).await
    }

    async fn update_owner(
        &self,
        id: &str,
        owner: Option<Owner>,
        marked_by: Option<InstanceMark>,
    ) -> Result<Lease, IpamError> {
        self.before_call().await?;
        self.inner.update_owner(id, owner, marked_by).await
    }

    async fn list(&self, scope: &ListScope) -> Result<Vec<Lease>, IpamError> {
        self.before_call().await?;
        self.inner.list(scope).await
    }

    async fn health(&self) -> Result<(), IpamError> {
        self.before_call().await?;
        self.inner.health().await
    }

    /// Forwarded without a fault and not counted: plans number the calls
    /// that hand out and return addresses, and a sweep's node-level repair
    /// must not shift them.
    async fn reconcile_node(&self, node: &str, held: &[Lease]) -> Result<(), IpamError> {
        self.inner.reconcile_node(node, held).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryBackend, PoolKey};

    fn request() -> AllocationRequest {
        AllocationRequest::new(
            PoolKey::new("n", "s", Vec::<String>::new(), None),
            "node",
            1,
        )
    }

    fn backend(plan: FaultPlan) -> Faulty<MemoryBackend> {
        Faulty::new(MemoryBackend::new("10.0.0.0/24".parse().unwrap()), plan)
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

    fn many(count: usize) -> AllocationRequest {
        let mut request = request();
        request.count = count;
        request
    }

    #[tokio::test]
    async fn wrong_answers_are_given_as_planned() {
        let backend = backend(FaultPlan {
            on_call: BTreeMap::from([
                (2, Fault::DuplicateAddress),
                (3, Fault::ReusedId),
                (4, Fault::Repeated),
                (5, Fault::ShortAnswer(1)),
                (6, Fault::LongAnswer(2)),
                (7, Fault::OutsideSubnet),
                (8, Fault::ShortAnswer(5)),
            ]),
            ..FaultPlan::default()
        });
        let first = backend.allocate(&many(2)).await.unwrap();
        let duplicate = backend.allocate(&many(2)).await.unwrap();
        assert_eq!(duplicate[1].address, first[0].address);
        assert_ne!(duplicate[1].id, first[0].id, "under its own id");
        let reused = backend.allocate(&many(2)).await.unwrap();
        assert_eq!(reused[1].id, first[0].id);
        assert_ne!(reused[1].address, first[0].address);
        assert_eq!(backend.hidden().len(), 1);
        let repeated = backend.allocate(&many(2)).await.unwrap();
        assert_eq!(repeated.len(), 3);
        assert_eq!(repeated[2], repeated[0]);
        assert_eq!(backend.allocate(&many(3)).await.unwrap().len(), 2);
        assert_eq!(backend.allocate(&many(3)).await.unwrap().len(), 5);
        let outside = backend.allocate(&many(1)).await.unwrap();
        assert_eq!(outside[0].address.to_string(), "192.0.2.17/24");
        assert!(backend.allocate(&many(3)).await.unwrap().is_empty());
        // What the caller was told is all the backend holds, but for the
        // hidden lease.
        assert_eq!(backend.inner().allocated(), 2 + 2 + 2 + 2 + 2 + 5 + 1);
    }

    #[tokio::test]
    async fn answer_faults_leave_other_calls_alone_and_a_panic_panics() {
        let backend = std::sync::Arc::new(backend(FaultPlan {
            on_call: BTreeMap::from([(1, Fault::ShortAnswer(1)), (2, Fault::Panic)]),
            ..FaultPlan::default()
        }));
        assert_eq!(backend.health().await, Ok(()));
        let panicking = backend.clone();
        let outcome = tokio::spawn(async move { panicking.allocate(&request()).await }).await;
        assert!(outcome.unwrap_err().is_panic());
        assert_eq!(backend.allocate(&request()).await.unwrap().len(), 1);
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
