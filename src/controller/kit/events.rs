//! The shape of the operator's Events, and references to Tenants by name
//! and uid. Pure; a leaf (the backup CLI publishes Events too).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use kube::Resource;

/// An Event of the operator: Warning or Normal, with `reason` as its action
/// too, and the note cut to the API's 1 kB limit.
pub fn event_of(warning: bool, reason: &str, note: String) -> Event {
    Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    }
}

/// A reference to the Tenant `name` with `uid` (cluster-scoped), for Events
/// about a tenant known by its registry row rather than its object.
pub fn tenant_ref(name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(crate::api::Tenant::api_version(&()).into_owned()),
        kind: Some(crate::api::Tenant::kind(&()).into_owned()),
        name: Some(name.to_owned()),
        uid: Some(uid.to_owned()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_cut_to_a_thousand_characters() {
        let ev = event_of(true, "Failed", "x".repeat(1500));
        assert_eq!(ev.note.map(|n| n.chars().count()), Some(1000));
        assert!(matches!(ev.type_, EventType::Warning));
        assert_eq!((ev.reason.as_str(), ev.action.as_str()), ("Failed", "Failed"));
    }

    #[test]
    fn the_reference_names_the_tenant_object() {
        let r = tenant_ref("acme", "u-1");
        assert_eq!(
            (
                r.api_version.as_deref(),
                r.kind.as_deref(),
                r.name.as_deref(),
                r.uid.as_deref()
            ),
            (Some("tenancy.dev/v1alpha1"), Some("Tenant"), Some("acme"), Some("u-1"))
        );
    }
}
