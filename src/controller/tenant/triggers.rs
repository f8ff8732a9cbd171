//! Why a Tenant was brought back, as far as the light reconcile cares.
//!
//! When a MigrationSet starts rolling a new version out, every follower
//! still showing the old one as `UpToDate` must come to say `RollingOut`:
//! a change to one condition, known from the set and the Tenant's own
//! status without asking Postgres. The set's watch marks such a follower
//! [`Triggers::rolling_out`]. Likewise the rate-limit writer, once it has
//! rendered a tenant's limits, brings the tenant back only for its
//! `RateLimitsApplied` condition: [`Triggers::rate_limits`] (without it,
//! every new tenant was observed in full twice: once to provision it, once
//! more when the writer caught up a second later). Every other source that
//! brings a Tenant back (its own watch event, its Secrets, a backup Job, a
//! root-key rotation, a failed reconcile's backoff) marks it
//! [`Triggers::full`]. The controller merges the requests for one Tenant
//! that wait together into one reconcile, so a reconcile is light only when
//! every request it answers was of one light kind ([`Triggers::take`]); a
//! reconcile not marked at all (the periodic resync) is full.
//!
//! A mark keeps the set as its watch event showed it (the reconcile may run
//! before the set's watch cache has that version). Takes Tenant names and
//! sets; no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::api::MigrationSet;

#[derive(Default)]
pub struct Triggers {
    marks: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    rolling_out: HashMap<String, Arc<MigrationSet>>,
    rate_limits: HashSet<String>,
    full: HashSet<String>,
}

/// What a reconcile answers, as [`Triggers::take`] finds it.
#[derive(Debug)]
pub enum Light {
    /// Anything else, or nothing marked (the resync): a full reconcile.
    Full,
    /// Only the set's watch asked: say `RollingOut` (or the versions, once
    /// the set settled), as `set` (its newest event) says.
    RollingOut(Arc<MigrationSet>),
    /// Only the rate-limit writer asked: `RateLimitsApplied`.
    RateLimits,
}

impl Triggers {
    /// The marks; a panic elsewhere while they were held leaves them
    /// usable (each change is one insert or remove).
    fn marks(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The MigrationSet's watch brings `name` back to say `RollingOut`, as
    /// `set` (the newest event of the set) says.
    pub fn rolling_out(&self, name: &str, set: Arc<MigrationSet>) {
        self.marks().rolling_out.insert(name.to_owned(), set);
    }

    /// The rate-limit writer brings `name` back: what the ConfigMaps hold
    /// of its limits changed.
    pub fn rate_limits(&self, name: &str) {
        self.marks().rate_limits.insert(name.to_owned());
    }

    /// Something else brings `name` back: its next reconcile is full.
    pub fn full(&self, name: &str) {
        self.marks().full.insert(name.to_owned());
    }

    /// [`Self::full`] for each of `names` (a root-key rotation brings every
    /// Tenant back).
    pub fn full_all<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut marks = self.marks();
        marks.full.extend(names.into_iter().map(str::to_owned));
    }

    /// At the start of a reconcile of `name`: light only when the requests
    /// since the last one were all of one light kind. Clears every mark.
    pub fn take(&self, name: &str) -> Light {
        let mut marks = self.marks();
        let rolling_out = marks.rolling_out.remove(name);
        let rate_limits = marks.rate_limits.remove(name);
        let full = marks.full.remove(name);
        match (full, rolling_out, rate_limits) {
            (false, Some(set), false) => Light::RollingOut(set),
            (false, None, true) => Light::RateLimits,
            _ => Light::Full,
        }
    }

    /// A Tenant gone from the watch: no reconcile will take its marks.
    pub fn forget(&self, name: &str) {
        let mut marks = self.marks();
        marks.rolling_out.remove(name);
        marks.rate_limits.remove(name);
        marks.full.remove(name);
    }

    /// How many names are marked.
    #[cfg(test)]
    fn len(&self) -> usize {
        let marks = self.marks();
        let mut names: HashSet<&String> = marks.rolling_out.keys().collect();
        names.extend(marks.rate_limits.iter());
        names.extend(marks.full.iter());
        names.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sets_request_alone_makes_a_light_reconcile() {
        let t = Triggers::default();
        let set = |generation: i64| {
            let s = serde_json::json!({
                "apiVersion": "tenancy.dev/v1alpha1", "kind": "MigrationSet",
                "metadata": {"name": "s", "generation": generation},
                "spec": {"migrations": []}
            });
            Arc::new(serde_json::from_value::<MigrationSet>(s).expect("a MigrationSet"))
        };
        let taken = |t: &Triggers, name: &str| match t.take(name) {
            Light::RollingOut(s) => s.metadata.generation,
            Light::RateLimits => panic!("only the set marked {name}"),
            Light::Full => None,
        };
        assert_eq!(taken(&t, "a"), None, "unmarked (a resync) is full");
        t.rolling_out("a", set(1));
        t.rolling_out("a", set(2));
        assert_eq!(taken(&t, "a"), Some(2), "the newest event of the set");
        assert_eq!(taken(&t, "a"), None, "a mark is taken once");
        // Another request waiting beside the set's, in either order.
        t.full("a");
        t.rolling_out("a", set(1));
        assert_eq!(taken(&t, "a"), None);
        t.rolling_out("a", set(1));
        t.full("a");
        assert_eq!(taken(&t, "a"), None);
        assert!(t.is_empty());
        t.rolling_out("a", set(1));
        t.rolling_out("b", set(1));
        t.full_all(["a", "c"]);
        assert_eq!(taken(&t, "a"), None);
        assert_eq!(taken(&t, "b"), Some(1));
        t.forget("c");
        assert!(t.is_empty());
    }

    #[test]
    fn the_rate_limit_writers_request_alone_makes_a_light_reconcile() {
        let t = Triggers::default();
        let set = Arc::new(
            serde_json::from_value::<MigrationSet>(serde_json::json!({
                "apiVersion": "tenancy.dev/v1alpha1", "kind": "MigrationSet",
                "metadata": {"name": "s"}, "spec": {"migrations": []}
            }))
            .expect("a MigrationSet"),
        );
        t.rate_limits("a");
        t.rate_limits("a");
        assert!(matches!(t.take("a"), Light::RateLimits));
        assert!(matches!(t.take("a"), Light::Full), "a mark is taken once");
        // Beside any other request, in either order: full.
        t.rate_limits("a");
        t.full("a");
        assert!(matches!(t.take("a"), Light::Full));
        t.full("a");
        t.rate_limits("a");
        assert!(matches!(t.take("a"), Light::Full));
        // Beside the set's: two light kinds at once are not merged.
        t.rate_limits("a");
        t.rolling_out("a", set.clone());
        assert!(matches!(t.take("a"), Light::Full));
        assert!(t.is_empty());
        t.rate_limits("b");
        t.rate_limits("c");
        t.full_all(["b"]);
        assert!(matches!(t.take("b"), Light::Full));
        t.forget("c");
        assert!(t.is_empty());
    }
}
