//! Apply: the idempotent Kubernetes writes of a reconcile (finalizer,
//! Secret, status, events). Each checks before writing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::Error;
use crate::api::{Tenant, TenantStatus, FINALIZER};
use crate::controller::{Context, Stats};
use crate::names::TenantName;

pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tenant-operator");
pub const TENANT_LABEL: &str = "tenancy.dev/tenant";

pub fn has_finalizer(t: &Tenant) -> bool {
    t.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the cleanup finalizer with a JSON patch guarded by a `test`, so a
/// concurrent writer makes it fail instead of clobbering the list.
pub async fn add_finalizer(ctx: &Context, t: &Tenant) -> Result<(), Error> {
    let api: Api<Tenant> = Api::all(ctx.client.clone());
    let patch = if t.metadata.finalizers.is_none() {
        json!([{ "op": "test", "path": "/metadata/finalizers", "value": null },
               { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }])
    } else {
        json!([{ "op": "test", "path": "/metadata/finalizers", "value": t.finalizers() },
               { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER }])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Serialize)?;
    api.patch(&t.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch)).await.map_err(Error::PatchFinalizer)?;
    Stats::add(&ctx.stats.kube_writes, 1);
    Ok(())
}

pub async fn remove_finalizer(ctx: &Context, t: &Tenant) -> Result<(), Error> {
    let Some(i) = t.finalizers().iter().position(|f| f == FINALIZER) else { return Ok(()) };
    let api: Api<Tenant> = Api::all(ctx.client.clone());
    let patch = json!([{ "op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER },
                       { "op": "remove", "path": format!("/metadata/finalizers/{i}") }]);
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Serialize)?;
    match api.patch(&t.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(Error::PatchFinalizer(e)),
    }
    Stats::add(&ctx.stats.kube_writes, 1);
    Ok(())
}

/// Creates or replaces the tenant's connection Secret when its data, labels
/// or owner differ from what is wanted. Returns whether it wrote.
pub async fn converge_secret(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    existing: Option<&Secret>,
    data: BTreeMap<String, String>,
) -> Result<bool, Error> {
    let data: BTreeMap<String, ByteString> = data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect();
    let owner = t.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (TENANT_LABEL.to_string(), name.to_string()),
    ]);
    if let Some(s) = existing {
        let same_data = s.data.as_ref() == Some(&data);
        let same_owner = s.metadata.owner_references.iter().flatten().any(|o| o.uid == owner.uid);
        let same_labels = labels.iter().all(|(k, v)| s.labels().get(k) == Some(v));
        if same_data && same_owner && same_labels && s.type_.as_deref() == Some("Opaque") {
            return Ok(false);
        }
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.db_secret()),
            namespace: Some(ctx.settings.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    match existing {
        None => {
            api.create(&PostParams::default(), &secret).await.map_err(Error::WriteSecret)?;
        }
        Some(s) => {
            secret.metadata.resource_version = s.metadata.resource_version.clone();
            api.replace(&name.db_secret(), &PostParams::default(), &secret).await.map_err(Error::WriteSecret)?;
        }
    }
    Stats::add(&ctx.stats.kube_writes, 1);
    Ok(true)
}

pub async fn delete_secret(ctx: &Context, name: &TenantName) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    match api.delete(&name.db_secret(), &DeleteParams::default()).await {
        Ok(_) => {
            Stats::add(&ctx.stats.kube_writes, 1);
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::DeleteSecret(e)),
    }
}

/// Writes the status when it differs from the current one; returns whether
/// it wrote.
pub async fn write_status(ctx: &Context, t: &Tenant, status: TenantStatus) -> Result<bool, Error> {
    if t.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<Tenant> = Api::all(ctx.client.clone());
    let patch = json!({ "status": status });
    match api.patch_status(&t.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {}
        // The Tenant went away meanwhile (its finalizer was just removed).
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
        Err(e) => return Err(Error::PatchStatus(e)),
    }
    Stats::add(&ctx.stats.kube_writes, 1);
    Ok(true)
}

/// Publishes an Event about the tenant. Events are best effort: a failure is
/// logged, never fails the reconcile.
pub async fn event(ctx: &Context, t: &Tenant, warning: bool, reason: &'static str, note: String) {
    let ev = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    match ctx.recorder.publish(&ev, &t.object_ref(&())).await {
        Ok(()) => Stats::add(&ctx.stats.kube_writes, 1),
        Err(e) => tracing::warn!(tenant = %t.name_any(), reason, error = %e, "publishing an event failed"),
    }
}
