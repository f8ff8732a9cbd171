//! Apply: the idempotent Kubernetes writes of a reconcile (finalizer,
//! Secret, status). Each checks before writing; owned objects are written
//! with Server-Side Apply ([`crate::controller::kit`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::DeleteParams;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::Error;
use crate::api::{Tenant, TenantStatus, FINALIZER};
use crate::controller::kit::labels::{self, FIELD_MANAGER, TENANT_LABEL, USAGE_FIELD_MANAGER};
use crate::controller::kit::{self, conditions::Cond};
use crate::controller::Context;
use crate::names::TenantName;

pub fn has_finalizer(t: &Tenant) -> bool {
    t.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the cleanup finalizer ([`kit::add_finalizer`]).
pub async fn add_finalizer(ctx: &Context, t: &Tenant) -> Result<(), Error> {
    let writing = ctx.own_writes.writing(t);
    let written = kit::add_finalizer(ctx, t, FINALIZER)
        .await
        .map_err(Error::PatchFinalizer)?;
    // The reconcile goes on from here: its echo brings nothing new.
    ctx.own_writes.note(&written);
    drop(writing);
    Ok(())
}

pub async fn remove_finalizer(ctx: &Context, t: &Tenant) -> Result<(), Error> {
    kit::remove_finalizer(ctx, t, FINALIZER)
        .await
        .map_err(Error::PatchFinalizer)
}

/// Applies the tenant's connection Secret when its data, labels or owner
/// differ from what is wanted. Returns whether it wrote.
pub async fn converge_secret(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    existing: Option<&Secret>,
    data: BTreeMap<String, String>,
) -> Result<bool, Error> {
    // The values (password, URI) move into the Secret without a copy; it
    // and what the API server sends back are wiped when dropped.
    let data: BTreeMap<String, ByteString> = data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect();
    let owner = t.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let secret = Wiped(Secret {
        metadata: ObjectMeta {
            name: Some(name.db_secret()),
            namespace: Some(ctx.settings.namespace.clone()),
            labels: Some(labels::of_tenant(name.as_str())),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    });
    if existing.is_some_and(|s| same_secret(s, &secret.0)) {
        return Ok(false);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let writing = ctx.own_writes.writing(&secret.0);
    let written = Wiped(kit::apply(&api, &secret.0).await.map_err(Error::WriteSecret)?);
    // The reconcile goes on from here: the echo brings nothing new.
    ctx.own_writes.note(&written.0);
    drop(writing);
    drop(written);
    Ok(true)
}

/// Whether `existing` already is `wanted`: the same data and type, the
/// owner and labels of `wanted` among its own (others' labels are theirs).
/// Pure.
pub fn same_secret(existing: &Secret, wanted: &Secret) -> bool {
    let owners = |s: &Secret| -> Vec<String> {
        s.metadata
            .owner_references
            .iter()
            .flatten()
            .map(|o| o.uid.clone())
            .collect()
    };
    existing.data == wanted.data
        && existing.type_ == wanted.type_
        && owners(wanted).iter().all(|u| owners(existing).contains(u))
        && labels::carries(existing.labels(), wanted.labels())
}

/// A Secret whose data is zeroized when it is dropped.
struct Wiped(Secret);

impl Drop for Wiped {
    fn drop(&mut self) {
        super::observe::wipe_secret(&mut self.0);
    }
}

/// Deletes the tenant's Secrets (connection and sealed); gone already is fine.
pub async fn delete_secrets(ctx: &Context, name: &TenantName) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    ctx.sources.set(name.as_str(), &[]);
    for secret in [name.db_secret(), name.sealed_secret()] {
        kit::delete(&api, &secret, &DeleteParams::default())
            .await
            .map_err(Error::DeleteSecret)?;
    }
    Ok(())
}

/// Writes the status when it differs from the current one; returns whether
/// it wrote. `status.usage` is carried over, not sent: it is the usage
/// sampler's, under a field manager of its own.
pub async fn write_status(ctx: &Context, t: &Tenant, status: TenantStatus) -> Result<bool, Error> {
    if t.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let owned = TenantStatus {
        usage: None,
        shard: None,
        moving: None,
        last_move: None,
        ..status
    };
    let ready = owned.is_ready();
    let owned = serde_json::to_value(owned).map_err(Error::Serialize)?;
    // Ready: the reconcile that wrote it converged everything, so the echo
    // of this write needs no reconcile of its own (`super::echoes`).
    let writing = ready.then(|| ctx.own_writes.writing(t));
    let written = kit::apply_status::<Tenant>(ctx, &t.name_any(), FIELD_MANAGER, owned, true)
        .await
        .map_err(Error::PatchStatus)?;
    if let (Some(w), true) = (&written, ready) {
        ctx.own_writes.note(w);
    }
    drop(writing);
    Ok(written.is_some())
}

/// Writes `status.usage` alone (the usage sampler's figures,
/// src/controller/usage.rs) of `t` (the cached Tenant); returns whether it
/// wrote. The write is noted as the operator's own (`super::echoes`): the
/// Tenant controller reads nothing of `status.usage`, so its echo starts no
/// reconcile (it started a full one, a second observation of each new
/// tenant during a provisioning burst and of each migrated one during a
/// rollout, whose sizes the sampler writes).
pub async fn write_usage(ctx: &Context, t: &Tenant, usage: &crate::api::TenantUsage) -> Result<bool, Error> {
    let writing = ctx.own_writes.writing(t);
    let written = kit::apply_status::<Tenant>(
        ctx,
        &t.name_any(),
        USAGE_FIELD_MANAGER,
        json!({ "usage": usage }),
        false,
    )
    .await
    .map_err(Error::PatchStatus)?;
    if let Some(w) = &written {
        ctx.own_writes.note(w);
    }
    drop(writing);
    Ok(written.is_some())
}

/// Annotations on the sealed Secret: the root key version and fingerprint.
pub const KEY_VERSION_ANNOTATION: &str = "tenancy.dev/key-version";
pub const KEY_FINGERPRINT_ANNOTATION: &str = "tenancy.dev/key-fingerprint";

/// The outcome of converging the sealed secrets.
pub struct Sealed {
    pub cond: Cond,
    /// The root key version and fingerprint in use, for the status.
    pub key: Option<(String, String)>,
}

/// Reads the sources, seals what changed and converges
/// `tenant-<name>-sealed` (deleting it when the spec lists no secrets).
/// Writes nothing when nothing changed.
pub async fn converge_sealed(
    ctx: &Context,
    pool: &sqlx::PgPool,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
) -> Result<Sealed, Error> {
    use super::sealing;
    let spec = &t.spec.secrets;
    ctx.sources.set(name.as_str(), spec);
    let existing = super::observe::sealed_secret(ctx, name).await?;
    if spec.is_empty() {
        if existing.is_some() {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
            kit::delete(&api, &name.sealed_secret(), &DeleteParams::default())
                .await
                .map_err(Error::DeleteSecret)?;
        }
        crate::pg::registry::set_key_version(pool, uid, None).await?;
        return Ok(Sealed {
            cond: Cond::new("SecretsSealed", true, "NoSecrets", "spec.secrets is empty"),
            key: None,
        });
    }
    if let Err(msg) = sealing::validate(spec) {
        return Ok(Sealed {
            cond: Cond::new("SecretsSealed", false, "InvalidSpec", msg),
            key: None,
        });
    }
    let Some(ring) = ctx.keys.current() else {
        return Ok(Sealed {
            cond: Cond::new(
                "SecretsSealed",
                false,
                "NoRootKeys",
                "the operator has no root keys loaded",
            ),
            key: None,
        });
    };
    let Some(salt) = crate::pg::registry::key_salt(pool, uid).await? else {
        return Ok(Sealed {
            cond: Cond::new(
                "SecretsSealed",
                false,
                "NotProvisioned",
                "the tenant has no registry row yet",
            ),
            key: None,
        });
    };
    let sources = super::observe::read_sources(ctx, name.as_str(), spec).await?;
    let existing_data: BTreeMap<String, Vec<u8>> = existing
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let plan = sealing::plan_sealed(
        &ring,
        &salt,
        uid,
        name.as_str(),
        &ctx.settings.secret_sources,
        spec,
        &sources,
        &existing_data,
    )
    .map_err(Error::Seal)?;
    drop(sources);
    let version = ring.active_version();
    let fingerprint = ring.active_fingerprint().to_string();
    let versions = sealing::versions_of(&plan.data);
    let annotations = BTreeMap::from([
        (
            KEY_VERSION_ANNOTATION.to_string(),
            versions.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
        ),
        (KEY_FINGERPRINT_ANNOTATION.to_string(), fingerprint.clone()),
    ]);
    let owner = t.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let same_meta = existing.as_ref().is_some_and(|s| {
        annotations.iter().all(|(k, v)| s.annotations().get(k) == Some(v))
            && s.metadata.owner_references.iter().flatten().any(|o| o.uid == owner.uid)
            && s.labels().get(TENANT_LABEL).map(String::as_str) == Some(name.as_str())
    });
    if plan.changed || !same_meta || existing.is_none() {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.sealed_secret()),
                namespace: Some(ctx.settings.namespace.clone()),
                labels: Some(labels::of_tenant(name.as_str())),
                annotations: Some(annotations),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            data: Some(
                plan.data
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        let writing = ctx.own_writes.writing(&secret);
        let written = kit::apply(&api, &secret).await.map_err(Error::WriteSecret)?;
        ctx.own_writes.note(&written);
        drop(writing);
        if plan.sealed > 0 {
            // Envelopes under another root key were re-sealed: a key rotation.
            let previous: Vec<String> = sealing::versions_of(&existing_data)
                .iter()
                .filter(|v| **v != version)
                .map(|v| v.to_string())
                .collect();
            let (action, reason) = if previous.is_empty() {
                ("SecretsSealed", "SecretsSealed")
            } else {
                ("KeyRotated", "KeyRotated")
            };
            let detail =
                json!({ "sealed": plan.sealed, "key_version": version.to_string(), "previous_versions": previous });
            let actor = if previous.is_empty() {
                super::plan::last_spec_manager(t)
            } else {
                "tenant-operator (root key rotation)".to_string()
            };
            crate::pg::registry::record_event(pool, uid, Some(name.as_str()), action, &actor, detail).await?;
            let note = if previous.is_empty() {
                format!("sealed {} secret(s) under root key {version}", plan.sealed)
            } else {
                format!(
                    "re-sealed {} secret(s) from root key {} to {version}",
                    plan.sealed,
                    previous.join(", ")
                )
            };
            kit::event(ctx, t, false, reason, note).await;
        }
    }
    // The oldest version still used is what rotation bookkeeping needs.
    crate::pg::registry::set_key_version(pool, uid, versions.iter().next().map(|v| v.get())).await?;
    let cond = if let Some(refused) = ctx.keys.refused() {
        Cond::new("SecretsSealed", false, "KeyRemovalRefused", refused)
    } else if !plan.not_allowed.is_empty() {
        let all: Vec<&str> = plan
            .not_allowed
            .iter()
            .chain(&plan.missing)
            .map(String::as_str)
            .collect();
        Cond::new(
            "SecretsSealed",
            false,
            "SourceNotAllowed",
            format!("not sealed: {}; the others are sealed", all.join("; ")),
        )
    } else if !plan.missing.is_empty() {
        Cond::new(
            "SecretsSealed",
            false,
            "SourceMissing",
            format!("not sealed: {}; the others are sealed", plan.missing.join("; ")),
        )
    } else {
        Cond::new(
            "SecretsSealed",
            true,
            "Sealed",
            format!(
                "{} secret(s) sealed in Secret {}/{} under root key {version}",
                plan.data.len(),
                ctx.settings.namespace,
                name.sealed_secret()
            ),
        )
    };
    Ok(Sealed {
        cond,
        key: Some((version.to_string(), fingerprint)),
    })
}
