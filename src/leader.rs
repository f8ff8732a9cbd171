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
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timings: Timings) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_owned(), identity: identity.to_owned(), timings, observed: None }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&mut self) {
        let mut logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
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
    /// took it, or no renewal succeeded for `renew_deadline`. Returns why.
    pub async fn hold(&mut self) -> String {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.timings.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => return "another replica holds the lease".into(),
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "renewing the leader lease failed");
                    if last_ok.elapsed() >= self.timings.renew_deadline {
                        return format!("no renewal succeeded for {:?}: {e}", self.timings.renew_deadline);
                    }
                }
            }
        }
    }

    /// Gives the Lease up (at a clean shutdown) so a standby need not wait
    /// for it to expire. Best effort.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
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
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
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
            let their_duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64);
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
