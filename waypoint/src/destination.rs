//! What a DestinationRule asks of requests to a service: how endpoints are chosen (round robin,
//! least request, random), how many requests may be in flight and wait (beyond that: `503`, flag
//! `UO`, like Envoy's circuit breaker), and which endpoints are ejected for failing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::api::ambient::waypoint::v1::{
    ConnectionPool, DestinationPolicy, OutlierDetection, UpstreamTls, destination_policy,
};
use proto::state::Workload;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::origination::Origination;

/// Requests that may wait for a slot when the policy sets a limit but not this one.
const DEFAULT_MAX_PENDING: usize = 1024;

/// One endpoint's recent history.
#[derive(Debug, Default)]
struct Health {
    consecutive_errors: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// How requests reach a destination's endpoints: as they are, or in TLS the waypoint originates;
/// or not at all, when the TLS its DestinationRule asks for cannot be originated.
#[derive(Debug, Clone)]
pub enum UpstreamTransport {
    /// No TLS of the waypoint's own (HBONE to mesh pods, plain TCP outside).
    Plain,
    /// TLS originated to the endpoint.
    Tls(Arc<Origination>),
    /// Refused; the reason (logged when the policy arrived).
    Refused(Arc<str>),
}

/// A destination's TLS settings as the policy gave them (to notice a change) and as built.
#[derive(Debug, Default)]
struct TlsSettings {
    given: (Option<UpstreamTls>, HashMap<u32, UpstreamTls>),
    default: Option<UpstreamTransport>,
    by_port: HashMap<u32, UpstreamTransport>,
}

impl TlsSettings {
    fn new(policy: Option<&DestinationPolicy>) -> Self {
        let Some(p) = policy else { return TlsSettings::default() };
        let build = |tls: &UpstreamTls| match Origination::new(tls, &p.hostname) {
            Ok(o) => UpstreamTransport::Tls(Arc::new(o)),
            Err(e) => {
                let reason = proto::error_chain(&e);
                warn!(destination = %p.hostname, policy = %p.name, %reason,
                    "TLS to the destination cannot be originated; its requests are refused");
                UpstreamTransport::Refused(reason.into())
            }
        };
        TlsSettings {
            given: (p.tls.clone(), p.port_tls.clone()),
            default: p.tls.as_ref().map(build),
            by_port: p.port_tls.iter().map(|(port, t)| (*port, build(t))).collect(),
        }
    }

    fn same_as(&self, policy: Option<&DestinationPolicy>) -> bool {
        match policy {
            Some(p) => self.given.0 == p.tls && self.given.1 == p.port_tls,
            None => self.given.0.is_none() && self.given.1.is_empty(),
        }
    }
}

/// The state of one destination service.
#[derive(Debug)]
pub struct ServiceState {
    tls: TlsSettings,
    pool: Option<ConnectionPool>,
    slots: Option<Arc<Semaphore>>,
    max_pending: usize,
    waiting: AtomicUsize,
    next: AtomicUsize,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    health: Mutex<HashMap<String, Health>>,
}

/// A request's place in the service's limits; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Counts one request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn nonzero(v: u32) -> Option<usize> {
    (v > 0).then_some(v as usize)
}

impl ServiceState {
    fn new(policy: Option<&DestinationPolicy>) -> Self {
        let pool = policy.and_then(|p| p.connection_pool.as_ref());
        let limit = pool.and_then(|p| match (nonzero(p.max_connections), nonzero(p.max_requests)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        });
        ServiceState {
            tls: TlsSettings::new(policy),
            pool: pool.cloned(),
            slots: limit.map(|n| Arc::new(Semaphore::new(n))),
            max_pending: pool.and_then(|p| nonzero(p.max_pending_requests)).unwrap_or(DEFAULT_MAX_PENDING),
            waiting: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            in_flight: Mutex::default(),
            health: Mutex::default(),
        }
    }

    /// Waits for a slot; `None` when the service is at its limit and the waiting line is full.
    pub async fn admit(&self) -> Option<Slot> {
        let Some(slots) = &self.slots else { return Some(Slot { _permit: None }) };
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Some(Slot { _permit: Some(p) });
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = slots.clone().acquire_owned().await.ok();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        Some(Slot { _permit: Some(permit?) })
    }

    /// How requests to service port `port` reach the endpoints.
    pub fn transport(&self, port: u16) -> UpstreamTransport {
        self.tls
            .by_port
            .get(&u32::from(port))
            .or(self.tls.default.as_ref())
            .cloned()
            .unwrap_or(UpstreamTransport::Plain)
    }

    /// Whether connections to endpoints carry one request each.
    pub fn one_request_per_connection(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.max_requests_per_connection == 1)
    }

    fn in_flight_of(&self, uid: &str) -> Arc<AtomicUsize> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).entry(uid.to_owned()).or_default().clone()
    }

    /// Counts a request to `uid` until the guard drops.
    pub fn start(&self, uid: &str) -> InFlight {
        let n = self.in_flight_of(uid);
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }

    /// Picks an endpoint among `candidates` by `policy`, skipping ejected ones (unless all are)
    /// and, when there is a choice, those in `avoid` (tried already).
    pub fn pick<'a, T: AsRef<Workload>>(
        &self,
        candidates: &'a [T],
        policy: Option<&DestinationPolicy>,
        avoid: &[String],
    ) -> Option<&'a T> {
        let now = Instant::now();
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let ejected = |w: &Workload| health.get(&w.uid).and_then(|h| h.ejected_until).is_some_and(|t| t > now);
        let mut usable: Vec<&T> = candidates.iter().filter(|w| !ejected(w.as_ref())).collect();
        drop(health);
        if usable.is_empty() {
            usable = candidates.iter().collect();
        }
        if usable.len() > 1 {
            let fresh: Vec<&T> = usable.iter().copied().filter(|w| !avoid.contains(&w.as_ref().uid)).collect();
            if !fresh.is_empty() {
                usable = fresh;
            }
        }
        let lb = policy
            .and_then(|p| destination_policy::LoadBalancer::try_from(p.load_balancer).ok())
            .unwrap_or(destination_policy::LoadBalancer::RoundRobin);
        let n = usable.len();
        if n == 0 {
            return None;
        }
        let i = match lb {
            destination_policy::LoadBalancer::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            destination_policy::LoadBalancer::Random => rand::rng().random_range(0..n),
            destination_policy::LoadBalancer::LeastRequest => {
                // Two random choices, the less busy one wins.
                let (a, b) = (rand::rng().random_range(0..n), rand::rng().random_range(0..n));
                let load = |i: usize| self.in_flight_of(&usable[i].as_ref().uid).load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        Some(usable[i])
    }

    /// Records how a request to `uid` went (`status` 0: no answer, e.g. connection refused), and
    /// ejects the endpoint when `outlier` says so. `endpoints` is how many the service has.
    pub fn record(&self, uid: &str, status: u16, outlier: Option<&OutlierDetection>, endpoints: usize) {
        let Some(o) = outlier.filter(|o| o.consecutive_errors > 0) else { return };
        let error = if o.gateway_errors_only { matches!(status, 0 | 502..=504) } else { status == 0 || status >= 500 };
        let now = Instant::now();
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_now = health.values().filter(|h| h.ejected_until.is_some_and(|t| t > now)).count();
        let h = health.entry(uid.to_owned()).or_default();
        if !error {
            h.consecutive_errors = 0;
            return;
        }
        h.consecutive_errors += 1;
        let allowed = (endpoints * o.max_ejection_percent as usize / 100).max(1);
        if h.consecutive_errors >= o.consecutive_errors
            && h.ejected_until.is_none_or(|t| t <= now)
            && ejected_now < allowed
        {
            h.ejections += 1;
            let base = Duration::from_millis(if o.base_ejection_ms == 0 { 30_000 } else { o.base_ejection_ms });
            // Saturating: a bad duration from the control plane must not panic the proxy.
            let length = base.saturating_mul(h.ejections).min(Duration::from_millis(proto::duration::MAX_MILLIS));
            h.ejected_until = Some(now.checked_add(length).unwrap_or(now));
            h.consecutive_errors = 0;
            warn!(endpoint = uid, ?length, ejections = h.ejections, "endpoint ejected: consecutive errors");
        }
    }
}

/// Every destination's state, following the policies as they change.
#[derive(Debug, Default)]
pub struct Destinations(Mutex<HashMap<String, Arc<ServiceState>>>);

impl Destinations {
    /// The state for service `key` under `policy` (rebuilt when its limits or TLS change).
    pub fn state(&self, key: &str, policy: Option<&DestinationPolicy>) -> Arc<ServiceState> {
        let pool = policy.and_then(|p| p.connection_pool.as_ref());
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(s) if s.pool.as_ref() == pool && s.tls.same_as(policy) => s.clone(),
            _ => {
                let s = Arc::new(ServiceState::new(policy));
                map.insert(key.to_owned(), s.clone());
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn w(uid: &str) -> Arc<Workload> {
        let w = proto::api::istio::workload::Workload { uid: uid.into(), namespace: "t".into(), ..Default::default() };
        Arc::new(Workload::from_pb(w).unwrap())
    }

    #[tokio::test]
    async fn limits_admit_then_queue_then_overflow() {
        let pool = ConnectionPool { max_connections: 1, max_pending_requests: 1, ..Default::default() };
        let policy = DestinationPolicy { connection_pool: Some(pool), ..Default::default() };
        let s = Arc::new(ServiceState::new(Some(&policy)));
        let first = s.admit().await.unwrap();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.admit().await.is_some() }
        });
        tokio::task::yield_now().await;
        while s.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(s.admit().await.is_none(), "a third request overflows");
        drop(first);
        assert!(waiter.await.unwrap(), "the queued request gets the freed slot");
    }

    #[test]
    fn failing_endpoints_are_ejected_and_skipped() {
        let s = ServiceState::new(None);
        let eps = vec![w("a"), w("b")];
        let o = OutlierDetection {
            consecutive_errors: 3,
            base_ejection_ms: 60_000,
            max_ejection_percent: 10,
            ..Default::default()
        };
        for _ in 0..3 {
            s.record("a", 0, Some(&o), 2);
        }
        for _ in 0..20 {
            assert_eq!(s.pick(&eps, None, &[]).unwrap().uid, "b");
        }
        // At least one may always be ejected, but not both at 10 %.
        for _ in 0..3 {
            s.record("b", 503, Some(&o), 2);
        }
        let picked: std::collections::BTreeSet<_> =
            (0..10).map(|_| s.pick(&eps, None, &[]).unwrap().uid.clone()).collect();
        assert_eq!(picked.into_iter().collect::<Vec<_>>(), vec!["b".to_owned()]);
        // A success resets the count.
        s.record("b", 502, Some(&o), 2);
        s.record("b", 200, Some(&o), 2);
        s.record("b", 502, Some(&o), 2);
        assert_eq!(s.health.lock().unwrap()["b"].consecutive_errors, 1);
    }

    #[test]
    fn retries_avoid_the_endpoint_already_tried() {
        let s = ServiceState::new(None);
        let eps = vec![w("a"), w("b")];
        for _ in 0..10 {
            assert_eq!(s.pick(&eps, None, &["a".to_owned()]).unwrap().uid, "b");
        }
    }
}
