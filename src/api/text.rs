//! [`Text`]: a string of a status the operator holds for every tenant and
//! whose values repeat across tenants (a condition's type, status, reason,
//! message and transition time). Equal values share one allocation.
//!
//! The Tenant cache holds one status per tenant, each with seven
//! conditions: as `String`s, five allocations per condition, most of them
//! the same few values (`Ready`, `True`, `Converged`, "schema, roles,
//! privileges and caps match the spec", the second a burst wrote them in).
//! A `Text` read from the API server is interned: looked up in one
//! process-wide set and shared with every equal value held. Values no one
//! holds any more are dropped from the set as it grows (each purge at twice
//! the size the last one left), so the set stays within twice what is
//! held.
//!
//! A `Text` is one pointer wide (an `Arc` of a boxed `str`: the value's
//! bytes are a second allocation, made once per distinct value): a
//! condition holds five of them, seven conditions per tenant, and the
//! pointer's width counts 35 times per cached Tenant (a `Condition` is 56
//! bytes, 96 with a two-word `Arc<str>`).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable string, shared with every equal one read ([`Text::interned`]).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(Arc<Box<str>>);

/// A value in the set, found by its text (its hash is the `str`'s).
#[derive(PartialEq, Eq, Hash)]
struct Held(Arc<Box<str>>);

impl Borrow<str> for Held {
    fn borrow(&self) -> &str {
        &self.0
    }
}

struct Interner {
    held: HashSet<Held>,
    purge_at: usize,
}

/// Purges start once the set holds this many values.
const FIRST_PURGE: usize = 4096;

static INTERNER: Mutex<Option<Interner>> = Mutex::new(None);

impl Text {
    /// `s`, sharing the allocation of an equal value held anywhere in the
    /// process.
    pub fn interned(s: &str) -> Self {
        let mut guard = INTERNER.lock().unwrap_or_else(|p| p.into_inner());
        let set = guard.get_or_insert_with(|| Interner {
            held: HashSet::new(),
            purge_at: FIRST_PURGE,
        });
        if let Some(v) = set.held.get(s) {
            return Self(v.0.clone());
        }
        if set.held.len() >= set.purge_at {
            // Only the set holds them: no one will ask for them again soon.
            set.held.retain(|v| Arc::strong_count(&v.0) > 1);
            set.purge_at = (set.held.len() * 2).max(FIRST_PURGE);
        }
        let v: Arc<Box<str>> = Arc::new(Box::from(s));
        set.held.insert(Held(v.clone()));
        Self(v)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// How many distinct values the process-wide set holds (tests).
    #[cfg(test)]
    fn interned_len() -> usize {
        INTERNER
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |i| i.held.len())
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self::interned(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self::interned(&s)
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Self {
        Self::interned(s)
    }
}

impl From<Text> for String {
    fn from(t: Text) -> Self {
        t.0.to_string()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text::interned(v))
            }
        }
        d.deserialize_str(Visit)
    }
}

impl JsonSchema for Text {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        String::schema_name()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(g)
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_allocation_and_compare_as_strings() {
        let a: Text = serde_json::from_str("\"schema, roles, privileges and caps match the spec\"").unwrap();
        let b = Text::from(String::from("schema, roles, privileges and caps match the spec"));
        assert!(Arc::ptr_eq(&a.0, &b.0), "two reads of one value: two allocations");
        assert_eq!(a, "schema, roles, privileges and caps match the spec");
        assert_eq!(a.as_str(), b.as_str());
        assert_ne!(a, Text::from("other"));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            "\"schema, roles, privileges and caps match the spec\""
        );
        assert_eq!(format!("{a}"), "schema, roles, privileges and caps match the spec");
        assert_eq!(
            format!("{a:?}"),
            "\"schema, roles, privileges and caps match the spec\""
        );
        // Not a string: refused as String would be.
        assert!(serde_json::from_str::<Text>("42").is_err());
    }

    #[test]
    fn a_text_is_one_pointer_wide() {
        assert_eq!(std::mem::size_of::<Text>(), std::mem::size_of::<usize>());
        assert_eq!(std::mem::size_of::<Option<Text>>(), std::mem::size_of::<usize>());
        assert_eq!(Text::default(), "");
    }

    #[test]
    fn values_no_one_holds_are_dropped_as_the_set_grows() {
        // Many distinct values, each dropped at once (messages naming a
        // tenant, times): the set does not keep them all.
        for i in 0..(FIRST_PURGE * 4) {
            let _ = Text::interned(&format!("unheld value {i}"));
        }
        let kept = Text::interned("held value");
        for i in 0..(FIRST_PURGE * 4) {
            let _ = Text::interned(&format!("another unheld value {i}"));
        }
        assert!(
            Text::interned_len() <= FIRST_PURGE * 2 + 64,
            "the set grew to {} values",
            Text::interned_len()
        );
        // A value still held is still shared.
        assert!(Arc::ptr_eq(&kept.0, &Text::interned("held value").0));
    }
}
