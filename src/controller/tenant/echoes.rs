//! The Tenant controller's own writes, told apart from everyone else's.
//!
//! Every write to a Tenant (the finalizer, the placement, the status) or to
//! one of its Secrets (connection, sealed) comes back through a watch as an
//! event, and every such event starts a reconcile. A reconcile that made the
//! write and went on to its end knew what it wrote: the reconcile the echo
//! starts observes the whole tenant (seven catalog queries) and finds
//! nothing to do (observations per tenant in a provisioning burst of 1,000:
//! 3.2 before, 2.5 after; docs/scale.md).
//!
//! So the reconcile notes the `resourceVersion` each such write returned,
//! and the Tenant stream drops the one event that shows exactly that
//! version. The API server may send the event before the write's answer
//! arrives: an event of a Tenant or Secret with a write in flight waits for
//! it (at most [`WAIT_FOR_WRITE`]) before it is judged. Only that event: a change
//! made by anyone else has a version of its own (the API server gives every write a new one), so it still starts
//! a reconcile, and so does a relist that finds a newer object. Notes are
//! made only for writes the reconcile acts on itself:
//!
//! - the finalizer, the placement and the Secrets, which the same reconcile
//!   goes on from (if it fails later, the backoff brings the tenant back);
//! - a status saying `Ready` is `True`, written at the end of a reconcile
//!   that converged everything. A status saying anything else (waiting,
//!   failed, provisioning) is not noted: its echo brings the tenant back as
//!   before, for whatever may rely on it;
//! - the usage sampler's `status.usage`, which no reconcile reads (its echo
//!   was a full reconcile of each new tenant in a provisioning burst, and of
//!   each migrated one in a rollout, finding nothing to do).
//!
//! The moves' status writes are never noted: a move goes step by step.
//! A deleted object's event carries the version of its deletion, never a
//! noted one. Memory: one entry per object between a write and its echo,
//! gone when the echo is seen (or the Tenant is deleted); at most
//! [`PER_OBJECT`] versions each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use kube::{Resource, ResourceExt};

/// Versions kept per object; older ones give way (their echo then starts a
/// reconcile, as without this).
const PER_OBJECT: usize = 4;

/// The object's kind, namespace and name.
fn name_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.name_any()
    )
}

/// The object's kind, namespace and name, and its version: what an event
/// is judged by.
pub fn key<K: Resource<DynamicType = ()>>(obj: &K) -> Option<(String, String)> {
    let rv = obj.meta().resource_version.clone()?;
    Some((name_key(obj), rv))
}

/// How long an event waits for a write to its object in flight to return
/// (the API server may send the event before the write's answer arrives).
const WAIT_FOR_WRITE: Duration = Duration::from_secs(5);

/// The versions of this process's own writes whose echo has not been seen
/// yet, by kind, namespace and name, and the writes still in flight.
#[derive(Default)]
pub struct OwnWrites {
    noted: Mutex<HashMap<String, Vec<String>>>,
    in_flight: Mutex<HashMap<String, usize>>,
    returned: Notify,
}

/// A write in flight ([`OwnWrites::writing`]); dropping it (after
/// [`OwnWrites::note`]) lets the events waiting for it be told.
pub struct Writing<'a> {
    own: &'a OwnWrites,
    key: String,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut map = self.own.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
        drop(map);
        self.own.returned.notify_waiters();
    }
}

impl OwnWrites {
    /// Marks a write to `obj` as under way until the returned guard is
    /// dropped: an event of `obj` arriving meanwhile waits for it
    /// ([`Self::is_echo_after_writes`]). Drop the guard after noting.
    pub fn writing<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Writing<'_> {
        let key = name_key(obj);
        *self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        Writing { own: self, key }
    }

    /// Notes that `written` (what a write returned) is this process's, and
    /// that the reconcile that made it needs no other for it.
    pub fn note<K: Resource<DynamicType = ()>>(&self, written: &K) {
        let Some((key, rv)) = key(written) else {
            return;
        };
        let mut map = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        let versions = map.entry(key).or_default();
        if versions.len() >= PER_OBJECT {
            versions.remove(0);
        }
        versions.push(rv);
    }

    /// Whether `obj` is the echo of a noted write (which is then
    /// forgotten). Versions of the same object older than it are forgotten
    /// too: a watch delivers an object's versions in order, so theirs are
    /// past.
    pub fn is_echo<K: Resource<DynamicType = ()>>(&self, obj: &K) -> bool {
        self.is_echo_of(key(obj))
    }

    /// [`Self::is_echo`] of the object with this [`key`].
    fn is_echo_of(&self, key: Option<(String, String)>) -> bool {
        let Some((name, rv)) = key else {
            return false;
        };
        let rv = rv.as_str();
        let mut map = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        let Some(versions) = map.get_mut(&name) else {
            return false;
        };
        let Some(i) = versions.iter().position(|v| v == rv) else {
            return false;
        };
        versions.drain(..=i);
        if versions.is_empty() {
            map.remove(&name);
        }
        true
    }

    /// [`Self::is_echo`], once the writes to `obj` in flight have returned
    /// (waiting at most [`WAIT_FOR_WRITE`]): the watch can bring a write's
    /// echo before the write's own answer, which holds the version.
    /// Takes the object's [`key`], so that the event need not be kept.
    pub async fn is_echo_after_writes(&self, key: Option<(String, String)>) -> bool {
        let Some((name, _)) = &key else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + WAIT_FOR_WRITE;
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if !self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(name)
            {
                break;
            }
            if tokio::time::timeout_at(deadline, returned).await.is_err() {
                break;
            }
        }
        self.is_echo_of(key)
    }

    /// Forgets `obj`'s notes (it is gone).
    pub fn forget<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.noted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name_key(obj));
    }

    /// Objects with a noted write whose echo is still to come.
    pub fn pending(&self) -> usize {
        self.noted.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Tenant;
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::PartialObjectMeta;

    fn tenant(name: &str, rv: &str) -> Tenant {
        let mut t = Tenant::new(name, serde_json::from_value(serde_json::json!({})).unwrap());
        t.metadata.resource_version = Some(rv.into());
        t
    }

    #[test]
    fn only_the_noted_version_of_the_noted_tenant_is_an_echo() {
        let own = OwnWrites::default();
        own.note(&tenant("acme", "10"));
        // Someone else's write (another version), another tenant: not echoes.
        assert!(!own.is_echo(&tenant("acme", "11")));
        assert!(!own.is_echo(&tenant("globex", "10")));
        assert!(own.is_echo(&tenant("acme", "10")));
        // Seen once: the same version again (a relist) starts a reconcile.
        assert!(!own.is_echo(&tenant("acme", "10")));
        assert_eq!(own.pending(), 0);
    }

    #[test]
    fn an_echo_forgets_the_earlier_versions_and_memory_stays_bounded() {
        let own = OwnWrites::default();
        for rv in 1..=10 {
            own.note(&tenant("acme", &rv.to_string()));
        }
        // Only the last PER_OBJECT are kept.
        assert!(!own.is_echo(&tenant("acme", "6")));
        assert!(own.is_echo(&tenant("acme", "8")));
        assert!(!own.is_echo(&tenant("acme", "7")), "older than an echo seen: forgotten");
        assert!(own.is_echo(&tenant("acme", "10")));
        assert_eq!(own.pending(), 0);
        // An object without a version is never an echo.
        let mut t = tenant("acme", "1");
        t.metadata.resource_version = None;
        own.note(&t);
        assert!(!own.is_echo(&t));
        assert_eq!(own.pending(), 0);
    }

    #[test]
    fn a_secret_written_is_known_by_its_metadata_alone_and_kinds_do_not_mix() {
        let own = OwnWrites::default();
        let mut s = Secret::default();
        s.metadata.name = Some("acme".into());
        s.metadata.namespace = Some("tenancy".into());
        s.metadata.resource_version = Some("7".into());
        own.note(&s);
        // A Tenant of the same name and version is not that Secret.
        assert!(!own.is_echo(&tenant("acme", "7")));
        // The Secret watch sees metadata only.
        let meta = PartialObjectMeta::<Secret> {
            types: None,
            metadata: s.metadata.clone(),
            _phantom: Default::default(),
        };
        assert!(own.is_echo(&meta));
        own.note(&s);
        own.forget(&s);
        assert_eq!(own.pending(), 0);
    }

    #[tokio::test]
    async fn an_echo_that_comes_before_its_writes_answer_waits_for_it() {
        let own = std::sync::Arc::new(OwnWrites::default());
        let writing = own.writing(&tenant("acme", "1"));
        // The watch shows version 5 while the write's answer is on its way.
        let waiting = tokio::spawn({
            let own = own.clone();
            async move { own.is_echo_after_writes(key(&tenant("acme", "5"))).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the event did not wait for the write");
        own.note(&tenant("acme", "5"));
        drop(writing);
        assert!(waiting.await.unwrap(), "the echo was not recognised");
        // No write in flight: no wait, and another tenant's write holds no one.
        let _other = own.writing(&tenant("globex", "1"));
        assert!(!own.is_echo_after_writes(key(&tenant("acme", "6"))).await);
    }

    /// The Secret watch sees metadata only, the write holds the whole
    /// Secret: the event of a Secret whose write is still on its way waits
    /// for it too (before, it was judged at once, and a new tenant's
    /// connection Secret could start a second full reconcile).
    #[tokio::test]
    async fn a_secrets_event_before_its_writes_answer_waits_for_it() {
        let own = std::sync::Arc::new(OwnWrites::default());
        let mut s = Secret::default();
        s.metadata.name = Some("tenant-acme-db".into());
        s.metadata.namespace = Some("tenancy".into());
        let writing = own.writing(&s);
        let mut meta = PartialObjectMeta::<Secret> {
            types: None,
            metadata: s.metadata.clone(),
            _phantom: Default::default(),
        };
        meta.metadata.resource_version = Some("9".into());
        let waiting = tokio::spawn({
            let own = own.clone();
            let key = key(&meta);
            async move { own.is_echo_after_writes(key).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the Secret's event did not wait for its write");
        s.metadata.resource_version = Some("9".into());
        own.note(&s);
        drop(writing);
        assert!(waiting.await.unwrap(), "the Secret's echo was not recognised");
        assert_eq!(own.pending(), 0);
    }
}
