//! The plumbing every controller shares, so that each reads the same way:
//! status writes (Server-Side Apply of the status subresource, only when
//! the status changed), writes of owned objects (Server-Side Apply with the
//! operator's field manager, so labels and annotations other tools add
//! survive), deletes and reads where "gone" is no error, Events, and the
//! reconcile wrapper and error policy (backoff, metrics, log fields).
//!
//! The leaves [`labels`], [`conditions`] and [`events`] import nothing of
//! the controllers.

pub mod conditions;
pub mod events;
pub mod labels;

use std::fmt::Debug;
use std::future::Future;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::ClusterResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Error as ControllerError};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::Context;
use labels::FIELD_MANAGER;

/// An error of one reconcile, with a fixed word for logs and metrics labels.
pub trait ReconcileError: std::error::Error {
    fn label(&self) -> &'static str;
}

/// Runs one reconcile of `controller` (inside `span`, whose fields name the
/// object in every log line), records it in the metrics, and forgets the
/// object's failures when it succeeds.
pub async fn reconcile<E: ReconcileError>(
    ctx: &Context,
    controller: &'static str,
    name: &str,
    span: tracing::Span,
    run: impl Future<Output = Result<Action, E>>,
) -> Result<Action, E> {
    let started = std::time::Instant::now();
    let result = tracing::Instrument::instrument(run, span.clone()).await;
    if result.is_ok() {
        span.in_scope(|| tracing::debug!(controller, "reconciled"));
    }
    ctx.metrics
        .reconciled(controller, started.elapsed(), result.as_ref().err().map(|e| e.label()));
    if result.is_ok() {
        ctx.reset_backoff(&backoff_key(controller, name));
    }
    result
}

/// The error policy of every controller: retry `name` after an exponential
/// backoff of its consecutive failures (2 s, 4 s, ... 5 min).
pub fn error_policy<E: ReconcileError>(ctx: &Context, controller: &'static str, name: &str, err: &E) -> Action {
    let delay = ctx.backoff(&backoff_key(controller, name));
    tracing::warn!(controller, object = %name, error = %err, kind = err.label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The settings of a controller's queue: at most `concurrency` reconciles
/// at once, each object's events merged over `debounce`.
pub fn queue(concurrency: u16, debounce: std::time::Duration) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default()
        .concurrency(concurrency)
        .debounce(debounce)
}

/// What `take` hands out of `src`, as a stream: asked at once, again each
/// time `wake(src)` is told, and at the time `take` named with its answer
/// (`None`: only when told). For the queues of names the Tenant controller
/// reads (`tenant::resync`, `tenant::gate`).
pub fn handed_out<S, T>(
    src: std::sync::Arc<S>,
    wake: fn(&S) -> &tokio::sync::Notify,
    take: fn(&S, tokio::time::Instant) -> (Vec<T>, Option<tokio::time::Instant>),
) -> impl futures::Stream<Item = T> + Send + 'static
where
    S: Send + Sync + 'static,
    T: Send + 'static,
{
    use futures::StreamExt;
    futures::stream::unfold(src, move |s| async move {
        loop {
            // Made before the look, so a change in between wakes it.
            let told = wake(&s).notified();
            let (taken, next) = take(&s, tokio::time::Instant::now());
            if !taken.is_empty() {
                drop(told);
                return Some((futures::stream::iter(taken), s));
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = told => {}
                    }
                }
                None => told.await,
            }
        }
    })
    .flatten()
}

/// `signals` at most once per `every`: a signal after a quiet `every` passes
/// at once; those that come within `every` of the last one passed are
/// merged into one, passed when `every` has gone by. For a controller
/// re-run on a burst of changes elsewhere (`reconcile_all_on`), when
/// catching up a few seconds late is fine and a run per second is not.
pub fn throttle(
    signals: impl futures::Stream<Item = ()> + Send + 'static,
    every: std::time::Duration,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    use futures::{FutureExt, StreamExt};
    let state = (signals.boxed(), None::<tokio::time::Instant>);
    futures::stream::unfold(state, move |(mut signals, last)| async move {
        signals.next().await?;
        if let Some(last) = last {
            tokio::time::sleep_until(last + every).await;
        }
        // What came in meanwhile is merged into this one.
        while let Some(Some(())) = signals.next().now_or_never() {}
        Some(((), (signals, Some(tokio::time::Instant::now()))))
    })
}

/// Drives a controller's stream of outcomes to its end (a success was
/// logged by [`reconcile`] in the object's span, a failure with its cause
/// by [`error_policy`]).
pub async fn drain<K, E, Q>(
    controller: &'static str,
    outcomes: impl futures::Stream<Item = Result<(ObjectRef<K>, Action), ControllerError<E, Q>>>,
) where
    K: Resource,
    E: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    use futures::StreamExt;
    outcomes
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(controller, error = %e, "reconcile failed");
            }
        })
        .await
}

fn backoff_key(controller: &str, name: &str) -> String {
    format!("{controller}/{name}")
}

/// `Ok(None)` for a 404: the object is gone, which the caller wanted or
/// does not mind.
pub fn gone_is_none<T>(result: Result<T, kube::Error>) -> Result<Option<T>, kube::Error> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `name`; returns whether it was there (gone already is fine).
pub async fn delete<K>(api: &Api<K>, name: &str, params: &DeleteParams) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    Ok(gone_is_none(api.delete(name, params).await)?.is_some())
}

/// Writes an object the operator owns with Server-Side Apply under its field
/// manager (forced: the operator is the authority on what it sets). Labels,
/// annotations and other fields that other tools set stay; keys of `data`
/// and `binaryData` that `desired` does not hold are removed, as a replace
/// removed them. The caller compares first, so that a reconcile with
/// nothing to change sends nothing.
pub async fn apply<K>(api: &Api<K>, desired: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let written = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await?;
    let (Ok(have), Ok(want)) = (serde_json::to_value(&written), serde_json::to_value(desired)) else {
        return Ok(written);
    };
    let Some(patch) = foreign_data_keys(&have, &want) else {
        return Ok(written);
    };
    let cleaned = api.patch(&name, &write_params(), &Patch::Merge(&patch)).await?;
    Ok(cleaned)
}

/// A merge patch removing the keys of `data` and `binaryData` that `have`
/// holds and `want` does not (set by another writer, or by an older
/// operator that replaced the object); None when there are none. Pure.
pub fn foreign_data_keys(have: &Value, want: &Value) -> Option<Value> {
    let mut patch = serde_json::Map::new();
    for field in ["data", "binaryData"] {
        let Some(have) = have.get(field).and_then(Value::as_object) else {
            continue;
        };
        let want = want.get(field).and_then(Value::as_object);
        let gone: serde_json::Map<String, Value> = have
            .keys()
            .filter(|k| want.is_none_or(|w| !w.contains_key(*k)))
            .map(|k| (k.clone(), Value::Null))
            .collect();
        if want.is_none() && !gone.is_empty() {
            patch.insert(field.into(), Value::Null);
        } else if !gone.is_empty() {
            patch.insert(field.into(), Value::Object(gone));
        }
    }
    (!patch.is_empty()).then_some(Value::Object(patch))
}

/// Creates an object the operator writes once and never changes (a Job),
/// under its field manager.
pub async fn create<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    api.create(&params, obj).await
}

/// Adds `finalizer` to the cluster-scoped `obj` with a JSON patch guarded by
/// a `test`, so a concurrent writer makes it fail instead of clobbering the
/// list.
pub async fn add_finalizer<K>(ctx: &Context, obj: &K, finalizer: &str) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = (), Scope = ClusterResourceScope> + Clone + DeserializeOwned + Debug,
{
    let patch = if obj.meta().finalizers.is_none() {
        json!([{ "op": "test", "path": "/metadata/finalizers", "value": null },
               { "op": "add", "path": "/metadata/finalizers", "value": [finalizer] }])
    } else {
        json!([{ "op": "test", "path": "/metadata/finalizers", "value": obj.finalizers() },
               { "op": "add", "path": "/metadata/finalizers/-", "value": finalizer }])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    Api::<K>::all(ctx.client.clone())
        .patch(&obj.name_any(), &write_params(), &Patch::<()>::Json(patch))
        .await
}

/// Removes `finalizer` from `obj` (guarded like [`add_finalizer`]); the
/// object gone already is fine.
pub async fn remove_finalizer<K>(ctx: &Context, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = ClusterResourceScope> + Clone + DeserializeOwned + Debug,
{
    let Some(i) = obj.finalizers().iter().position(|f| f == finalizer) else {
        return Ok(());
    };
    let patch = json!([{ "op": "test", "path": format!("/metadata/finalizers/{i}"), "value": finalizer },
                       { "op": "remove", "path": format!("/metadata/finalizers/{i}") }]);
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    gone_is_none(
        Api::<K>::all(ctx.client.clone())
            .patch(&obj.name_any(), &write_params(), &Patch::<()>::Json(patch))
            .await,
    )?;
    Ok(())
}

/// Patch parameters of the operator's other writes (finalizers, leftovers).
pub fn write_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Writes `status` to `obj`'s status subresource when it differs from
/// `current` (no request otherwise), with Server-Side Apply under the
/// operator's field manager: a field the operator wrote before and leaves
/// out now is removed. Returns whether it wrote; an object gone meanwhile
/// (its finalizer was just removed) is no write and no error.
pub async fn write_status<K, S>(ctx: &Context, obj: &K, current: Option<&S>, status: &S) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = (), Scope = ClusterResourceScope> + Clone + DeserializeOwned + Serialize + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let status = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
    apply_status::<K>(ctx, &obj.name_any(), FIELD_MANAGER, status, true)
        .await
        .map(|w| w.is_some())
}

/// Applies `status` (the part of the status `manager` owns) to the status
/// subresource of the cluster-scoped object `name`. When it is the `whole`
/// status the operator writes, fields only a merge patch of an older
/// operator wrote, and that `status` leaves out, are removed. Returns
/// whether it wrote (false: the object is gone).
pub async fn apply_status<K>(
    ctx: &Context,
    name: &str,
    manager: &str,
    status: Value,
    whole: bool,
) -> Result<Option<K>, kube::Error>
where
    K: Resource<DynamicType = (), Scope = ClusterResourceScope> + Clone + DeserializeOwned + Serialize + Debug,
{
    let api: Api<K> = Api::all(ctx.client.clone());
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    let params = PatchParams::apply(manager).force();
    let Some(written) = gone_is_none(api.patch_status(name, &params, &Patch::Apply(&body)).await)? else {
        return Ok(None);
    };
    let value = serde_json::to_value(&written).unwrap_or_default();
    if let Some(patch) = legacy_status_keys(&value, &status).filter(|_| whole) {
        return gone_is_none(api.patch_status(name, &write_params(), &Patch::Merge(&patch)).await);
    }
    Ok(Some(written))
}

/// A merge patch removing the top-level status fields of `written` that
/// `applied` leaves out and no Server-Side Apply manager owns: left by the
/// merge patches of an operator from before status writes were applies
/// (they would never go away otherwise). None when there are none. Pure.
pub fn legacy_status_keys(written: &Value, applied: &Value) -> Option<Value> {
    let status = written.get("status")?.as_object()?;
    let applied_owned = |key: &str| {
        written
            .pointer("/metadata/managedFields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m.get("operation").and_then(Value::as_str) == Some("Apply"))
            .filter(|m| m.get("subresource").and_then(Value::as_str) == Some("status"))
            .any(|m| m.pointer(&format!("/fieldsV1/f:status/f:{key}")).is_some())
    };
    let gone: serde_json::Map<String, Value> = status
        .keys()
        .filter(|k| applied.get(k.as_str()).is_none() && !applied_owned(k))
        .map(|k| (k.clone(), Value::Null))
        .collect();
    (!gone.is_empty()).then(|| json!({ "status": gone }))
}

/// Publishes an Event about `object`. Events are best effort: a failure is
/// logged and never fails the reconcile.
///
/// A `Recorder` per Event, as kube-runtime intends (one per reconcile): a
/// `Recorder` keeps every Event it published in the last 6 minutes, whole,
/// to count repeats as a series, and scans them all at each publish. One
/// for the whole process held a hash table of some 1.4 KB a slot plus the
/// Events' strings: 5.9 MB of the 20.7 MB heap peak with 1,000 tenants
/// (heaptrack, docs/scale.md), several times that in a 10,000-tenant burst.
/// The operator publishes on changes (a steady state publishes nothing),
/// so a repeat within 6 minutes is a new Event rather than a series count.
pub async fn publish(ctx: &Context, object: &ObjectReference, warning: bool, reason: &str, note: String) {
    let ev = events::event_of(warning, reason, note);
    let recorder = kube::runtime::events::Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(e) = recorder.publish(&ev, object).await {
        tracing::warn!(
            kind = object.kind.as_deref().unwrap_or_default(),
            object = object.name.as_deref().unwrap_or_default(),
            reason,
            error = %e,
            "publishing an event failed"
        );
    }
}

/// [`publish`] about the object `obj`.
pub async fn event<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, warning: bool, reason: &str, note: String) {
    publish(ctx, &obj.object_ref(&()), warning, reason, note).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_the_operator_does_not_want_are_removed_and_nothing_else() {
        let want = json!({ "data": { "a": "1", "b": "2" } });
        assert_eq!(
            foreign_data_keys(&json!({ "data": { "a": "1", "b": "9" } }), &want),
            None
        );
        assert_eq!(
            foreign_data_keys(
                &json!({ "data": { "a": "1", "b": "2", "x": "3" }, "binaryData": { "y": "4" } }),
                &want
            ),
            Some(json!({ "data": { "x": null }, "binaryData": null }))
        );
        // Labels and annotations are never touched.
        let have = json!({ "metadata": { "labels": { "team": "x" } }, "data": { "a": "1", "b": "2" } });
        assert_eq!(foreign_data_keys(&have, &want), None);
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_passes_a_quiet_signal_at_once_and_merges_a_burst() {
        use futures::StreamExt;
        use std::time::Duration;
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(throttle(rx, Duration::from_secs(5)));
        let start = tokio::time::Instant::now();
        // The first passes at once.
        tx.unbounded_send(()).unwrap();
        assert_eq!(out.next().await, Some(()));
        assert_eq!(start.elapsed(), Duration::ZERO);
        // A burst within the window: one signal, at its end.
        for _ in 0..100 {
            tx.unbounded_send(()).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.unbounded_send(()).unwrap();
        assert_eq!(out.next().await, Some(()));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Nothing came after it: nothing more is passed.
        assert!(tokio::time::timeout(Duration::from_secs(60), out.next()).await.is_err());
        // After a quiet window, at once again.
        let at = tokio::time::Instant::now();
        tx.unbounded_send(()).unwrap();
        assert_eq!(out.next().await, Some(()));
        assert_eq!(at.elapsed(), Duration::ZERO);
        // The source ends: so does the throttle.
        drop(tx);
        assert_eq!(out.next().await, None);
    }

    #[test]
    fn only_status_fields_no_apply_manager_owns_are_legacy() {
        let written = json!({
            "metadata": { "managedFields": [
                { "manager": "tenant-operator", "operation": "Apply", "subresource": "status",
                  "fieldsV1": { "f:status": { "f:phase": {}, "f:conditions": {} } } },
                { "manager": "tenant-operator-usage", "operation": "Apply", "subresource": "status",
                  "fieldsV1": { "f:status": { "f:usage": {} } } },
                { "manager": "unknown", "operation": "Update", "subresource": "status",
                  "fieldsV1": { "f:status": { "f:failed": {}, "f:usage": {} } } },
            ] },
            "status": { "phase": "Complete", "conditions": [], "usage": {}, "failed": [] },
        });
        let applied = json!({ "phase": "Complete", "conditions": [] });
        assert_eq!(
            legacy_status_keys(&written, &applied),
            Some(json!({ "status": { "failed": null } }))
        );
        let applied = json!({ "phase": "Complete", "conditions": [], "failed": [] });
        assert_eq!(legacy_status_keys(&written, &applied), None);
    }
}
