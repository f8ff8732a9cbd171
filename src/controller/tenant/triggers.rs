//! Why a Tenant was brought back, as far as the light reconcile cares.
//!
//! When a MigrationSet starts rolling a new version out, every follower
//! still showing the old one as `UpToDate` must come to say `RollingOut`:
//! a change to one condition, known from the set and the Tenant's own
//! status without asking Postgres. The set's watch marks such a follower
//! [`Triggers::rolling_out`]; every other source that brings a Tenant back
//! (its own watch event, its Secrets, a backup Job, the rate-limit writer,
//! a root-key rotation, a failed reconcile's backoff) marks it
//! [`Triggers::full`]. The controller merges the requests for one Tenant
//! that wait together into one reconcile, so a reconcile is light only when
//! every request it answers was the set's ([`Triggers::take`]); a reconcile
//! not marked at all (the periodic resync) is full.
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
    full: HashSet<String>,
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

    /// At the start of a reconcile of `name`: the set, when only the set's
    /// watch asked for it since the last one. Clears both marks.
    pub fn take(&self, name: &str) -> Option<Arc<MigrationSet>> {
        let mut marks = self.marks();
        let rolling_out = marks.rolling_out.remove(name);
        let full = marks.full.remove(name);
        rolling_out.filter(|_| !full)
    }

    /// A Tenant gone from the watch: no reconcile will take its marks.
    pub fn forget(&self, name: &str) {
        let mut marks = self.marks();
        marks.rolling_out.remove(name);
        marks.full.remove(name);
    }

    /// How many names are marked.
    #[cfg(test)]
    fn len(&self) -> usize {
        let marks = self.marks();
        let mut names: HashSet<&String> = marks.rolling_out.keys().collect();
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
        let taken = |t: &Triggers, name: &str| t.take(name).and_then(|s| s.metadata.generation);
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
}
