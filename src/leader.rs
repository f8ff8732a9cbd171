//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! replicas only one runs the controllers.
//!
//! Takes a Kubernetes client, the Lease's namespace and name, and this
//! process's identity. Gives [`Elector::acquire`] (returns once this process
//! holds the Lease), [`Elector::hold`] (renews until the Lease is lost, then
//! returns why) and [`Elector::release`] (hands the Lease over at a clean
//! shutdown). Side effects: creates and replaces the Lease.
//!
//! The algorithm is client-go's: every write is a replace carrying the
//! resourceVersion that was read, so two candidates never both win (the
//! slower one gets 409 Conflict). A Lease held by someone else is taken over
//! only after its record has not changed for the lease duration, measured on
//! this process's own clock from when it first saw that record, so clock
//! skew between nodes does not matter.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

/// Lease timings.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How long a Lease whose record does not change stays the holder's.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How long the leader keeps trying to renew before it gives up
    /// leadership (less than `lease_duration`, so it stops before a standby
    /// may take over).
    pub renew_deadline: Duration,
    /// How often a standby tries to acquire.
    pub retry_every: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// This process's identity: `POD_NAME` when set (the Deployment passes it
/// through the downward API), else `<hostname>-<pid>`.
pub fn default_identity() -> String {
    if let Ok(p) = std::env::var("POD_NAME") {
        if !p.is_empty() {
            return p;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "tenant-operator".into());
    format!("{host}-{}", std::process::id())
}

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// The resourceVersion of the Lease record last seen, and when it was
    /// first seen (on the local clock).
    observed: Option<(String, Instant)>,
    /// When the last round that left this process holding the Lease began
    /// (on the local clock): the Lease is ours until `renew_deadline` after.
    held_since: Option<Instant>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timings: Timings) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
            observed: None,
            held_since: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&mut self) {
        let mut logged = false;
        loop {
            let started = Instant::now();
            // A hung API server must not keep a standby stuck in one round.
            let round = tokio::time::timeout(self.timings.renew_deadline, self.try_acquire_or_renew()).await;
            match round.unwrap_or(Ok(false)) {
                Ok(true) => {
                    self.held_since = Some(started);
                    tracing::info!(lease = %self.name, identity = %self.identity, "acquired the leader lease");
                    return;
                }
                Ok(false) => {
                    if !logged {
                        tracing::info!(lease = %self.name, identity = %self.identity, "standing by: another replica holds the leader lease");
                        logged = true;
                    }
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "trying to acquire the leader lease failed"),
            }
            tokio::time::sleep(self.timings.retry_every).await;
        }
    }

    /// Renews the Lease every `renew_every` until it is lost: another holder
    /// took it, or no renewal succeeded within `renew_deadline` of the start
    /// of the last one that did. Returns why, at the latest at that deadline:
    /// a renewal still in flight then is abandoned (its request dropped).
    pub async fn hold(&mut self) -> String {
        let deadline = self.timings.renew_deadline;
        let mut held_since = self.held_since.unwrap_or_else(Instant::now);
        let mut last_error = String::from("no renewal was attempted");
        loop {
            let expires = held_since + deadline;
            let next = (Instant::now() + self.timings.renew_every).min(expires);
            tokio::time::sleep_until(next.into()).await;
            let started = Instant::now();
            let left = expires.saturating_duration_since(started);
            if left.is_zero() {
                self.held_since = None;
                return format!("no renewal succeeded within {deadline:?}: {last_error}");
            }
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    held_since = started;
                    self.held_since = Some(started);
                }
                Ok(Ok(false)) => {
                    self.held_since = None;
                    return "another replica holds the lease".into();
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e, "renewing the leader lease failed");
                    last_error = e.to_string();
                }
                Err(_) => {
                    self.held_since = None;
                    return format!(
                        "no renewal succeeded within {deadline:?}: the last renewal request did not answer in time"
                    );
                }
            }
        }
    }

    /// Gives the Lease up (at a clean shutdown) so a standby need not wait
    /// for it to expire. Best effort.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.name, "released the leader lease"),
            Err(e) => tracing::warn!(lease = %self.name, error = %e, "releasing the leader lease failed"),
        }
    }

    /// One round: create the Lease, renew it, or take it over when it is
    /// free or expired. Ok(true): this process holds it now.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration_secs = self.timings.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(&lease);
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() {
            let their_duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64);
            let unchanged_for = self.observed.as_ref().map(|(_, at)| at.elapsed()).unwrap_or_default();
            if unchanged_for < their_duration {
                return Ok(false);
            }
            tracing::info!(lease = %self.name, previous = ?holder, "the leader lease expired: taking over");
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            if holder.is_some() {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(now);
        // The replace carries the resourceVersion read above: a concurrent
        // writer makes it fail with 409 instead of both winning.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn observe(&mut self, lease: &Lease) {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().map(|(v, _)| v) != Some(&rv) {
            self.observed = Some((rv, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a stub API server on loopback that can be told to stop
    //! answering Lease requests (a hung connection, a stalled apiserver).
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    use axum::Router;

    #[derive(Default)]
    struct Stub {
        lease: Mutex<Option<serde_json::Value>>,
        rv: AtomicU64,
        stall_get: AtomicBool,
        stall_put: AtomicBool,
        /// When the last PUT was answered successfully.
        last_put: Mutex<Option<Instant>>,
    }

    type S = State<Arc<Stub>>;
    type Reply = (StatusCode, [(header::HeaderName, &'static str); 1], String);

    fn reply(code: StatusCode, v: serde_json::Value) -> Reply {
        (code, [(header::CONTENT_TYPE, "application/json")], v.to_string())
    }

    fn body(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    fn store(stub: &Stub, mut lease: serde_json::Value) -> serde_json::Value {
        let rv = stub.rv.fetch_add(1, Ordering::SeqCst) + 1;
        lease["metadata"]["resourceVersion"] = rv.to_string().into();
        lease["apiVersion"] = "coordination.k8s.io/v1".into();
        lease["kind"] = "Lease".into();
        *stub.lease.lock().unwrap() = Some(lease.clone());
        lease
    }

    async fn get_lease(State(stub): S) -> Reply {
        if stub.stall_get.load(Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        match stub.lease.lock().unwrap().clone() {
            Some(l) => reply(StatusCode::OK, l),
            None => reply(
                StatusCode::NOT_FOUND,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        }
    }

    async fn create_lease(State(stub): S, lease: Bytes) -> Reply {
        reply(StatusCode::CREATED, store(&stub, body(&lease)))
    }

    async fn put_lease(State(stub): S, lease: Bytes) -> Reply {
        if stub.stall_put.load(Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        let out = store(&stub, body(&lease));
        *stub.last_put.lock().unwrap() = Some(Instant::now());
        reply(StatusCode::OK, out)
    }

    async fn serve() -> (Arc<Stub>, Client) {
        let stub = Arc::new(Stub::default());
        let app = Router::new()
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                axum::routing::post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                get(get_lease).put(put_lease),
            )
            .with_state(stub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        (stub, Client::try_from(config).unwrap())
    }

    fn timings() -> Timings {
        Timings {
            lease_duration: Duration::from_secs(3),
            renew_every: Duration::from_millis(200),
            renew_deadline: Duration::from_secs(1),
            retry_every: Duration::from_millis(100),
        }
    }

    /// Holds the lease through a few renewals, then stalls the API server
    /// the way `stall` says; `hold` must return within the renew deadline
    /// (plus scheduling slack) of the last renewal that got through.
    async fn hold_returns_in_time_when(stall: impl FnOnce(&Stub)) {
        let (stub, client) = serve().await;
        let mut e = Elector::new(client, "ns", "leader", "me", timings());
        tokio::time::timeout(Duration::from_secs(5), e.acquire())
            .await
            .expect("acquired");
        let held = tokio::spawn(async move { (e.hold().await, Instant::now()) });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            stub.last_put.lock().unwrap().is_some(),
            "no renewal got through before the stall"
        );
        stall(&stub);
        let stalled_at = Instant::now();
        // Without the per-request timeout, hold() waits on the hung request
        // for ever.
        let (why, returned_at) = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("hold() returned")
            .unwrap();
        let last_ok = stub.last_put.lock().unwrap().expect("a renewal");
        assert!(last_ok <= stalled_at);
        let after_last_ok = returned_at - last_ok;
        assert!(
            after_last_ok <= timings().renew_deadline + Duration::from_millis(250),
            "hold() returned {after_last_ok:?} after the last renewal"
        );
        assert!(why.contains("no renewal succeeded"), "{why}");
    }

    #[tokio::test]
    async fn a_renewal_put_that_hangs_ends_leadership_within_the_deadline() {
        hold_returns_in_time_when(|s| s.stall_put.store(true, Ordering::SeqCst)).await;
    }

    #[tokio::test]
    async fn a_lease_get_that_hangs_ends_leadership_within_the_deadline() {
        hold_returns_in_time_when(|s| s.stall_get.store(true, Ordering::SeqCst)).await;
    }

    #[tokio::test]
    async fn another_holder_ends_leadership_at_once() {
        let (stub, client) = serve().await;
        let mut e = Elector::new(client, "ns", "leader", "me", timings());
        e.acquire().await;
        let mut lease = stub.lease.lock().unwrap().clone().unwrap();
        lease["spec"]["holderIdentity"] = "someone-else".into();
        store(&stub, lease);
        let why = tokio::time::timeout(Duration::from_secs(2), e.hold())
            .await
            .expect("hold() returned");
        assert_eq!(why, "another replica holds the lease");
    }
}
