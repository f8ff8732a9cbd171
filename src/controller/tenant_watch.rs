//! The one Tenant watch of the operator and what its cache keeps.
//!
//! Takes the Kubernetes client; gives one reflector store of every Tenant,
//! shared by the Tenant controller (which drives the watch, through
//! `Controller::for_stream`), the MigrationSet controller, the rate-limit
//! writer and the metrics, plus a small signal stream per other reader
//! ([`TenantWatch::listen`]). Every object is [`slim`]med before it is
//! stored: at 10,000 tenants the cache is most of the operator's memory.

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use crate::api::Tenant;

/// The annotation `kubectl apply` (client side) writes: the whole applied
/// manifest again, as JSON. Nothing in the operator reads it.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Reduces a Tenant to what the operator reads, in place: drops the
/// `last-applied-configuration` annotation, and of `managedFields` keeps
/// only the entry [`last_spec_manager`](crate::controller::tenant::plan::last_spec_manager)
/// names (manager, operation, time; without its `fieldsV1`, which the API
/// server sets on every entry it records, so an entry without one is the
/// slim one), so the actor it gives is the same on the slim object. Spec, status,
/// labels, other annotations, finalizers and the rest of the metadata are
/// kept (reconciles read them and write patches guarded by them).
pub fn slim(t: &mut Tenant) {
    if let Some(annotations) = t.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            t.metadata.annotations = None;
        }
    }
    let kept = crate::controller::tenant::plan::spec_manager_entry(t).map(|m| ManagedFieldsEntry {
        manager: m.manager.clone(),
        operation: m.operation.clone(),
        time: m.time.clone(),
        ..ManagedFieldsEntry::default()
    });
    t.metadata.managed_fields = kept.map(|m| vec![m]);
}

/// A Tenant watch event, as the readers other than the Tenant controller
/// see it: by reference, before it reaches the controller.
type Listener = Box<dyn FnMut(&watcher::Event<Tenant>) + Send>;

/// The one watch of every Tenant, with its store, before it is started.
pub struct TenantWatch {
    store: Store<Tenant>,
    writer: reflector::store::Writer<Tenant>,
    api: Api<Tenant>,
    listeners: Vec<Listener>,
}

impl TenantWatch {
    pub fn new(client: Client) -> Self {
        let (store, writer) = reflector::store::<Tenant>();
        Self {
            store,
            writer,
            api: Api::all(client),
            listeners: Vec::new(),
        }
    }

    /// The cache every reader shares (filled once the watch runs).
    pub fn store(&self) -> Store<Tenant> {
        self.store.clone()
    }

    /// A stream of what `f` makes of each event, after the store applied
    /// it. The channel is unbounded so that no reader ever holds up the
    /// watch (the rate-limit writer does not read while it writes): keep
    /// the messages small, and say only what the reader needs.
    pub fn listen<T: Send + 'static>(
        &mut self,
        mut f: impl FnMut(&watcher::Event<Tenant>) -> Option<T> + Send + 'static,
    ) -> mpsc::UnboundedReceiver<T> {
        let (tx, rx) = mpsc::unbounded();
        self.listeners.push(Box::new(move |ev| {
            if let Some(msg) = f(ev) {
                let _ = tx.unbounded_send(msg);
            }
        }));
        rx
    }

    /// The watch itself: what `Controller::for_stream` takes (the Tenants
    /// applied, each once the store holds it). Nothing is watched until it
    /// is polled; the listeners hear nothing before either.
    pub fn into_stream(self) -> impl Stream<Item = Result<Tenant, watcher::Error>> + Send + 'static {
        let Self {
            writer, api, listeners, ..
        } = self;
        reflect(
            writer,
            listeners,
            watcher(api, watcher::Config::default().any_semantic()).default_backoff(),
        )
    }
}

/// Slims the events of `events`, applies them to the store, tells the
/// listeners, and yields the applied Tenants.
fn reflect(
    writer: reflector::store::Writer<Tenant>,
    mut listeners: Vec<Listener>,
    events: impl Stream<Item = watcher::Result<watcher::Event<Tenant>>> + Send + 'static,
) -> impl Stream<Item = Result<Tenant, watcher::Error>> + Send + 'static {
    reflector::reflector(writer, events.modify(slim))
        .inspect(move |ev| match ev {
            Ok(ev) => listeners.iter_mut().for_each(|l| l(ev)),
            Err(e) => tracing::warn!(error = %e, "watching Tenants failed; retrying"),
        })
        .applied_objects()
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::tenant::plan::last_spec_manager;
    use serde_json::{json, Value};

    /// A Tenant as the API server returns it after `kubectl apply`, the
    /// operator's finalizer and status writes and a `kubectl edit`.
    fn applied() -> Value {
        serde_json::from_str(include_str!("../../tests/golden/tenant-kubectl-apply.json")).expect("the fixture parses")
    }

    fn tenant(v: Value) -> Tenant {
        serde_json::from_value(v).expect("a Tenant")
    }

    fn slimmed(t: &Tenant) -> Tenant {
        let mut s = t.clone();
        slim(&mut s);
        s
    }

    fn entry(manager: &str, operation: &str, subresource: Option<&str>, time: Option<&str>, fields: Value) -> Value {
        let mut e = json!({ "apiVersion": "tenancy.dev/v1alpha1", "fieldsType": "FieldsV1", "fieldsV1": fields, "manager": manager, "operation": operation });
        if let Some(s) = subresource {
            e["subresource"] = json!(s);
        }
        if let Some(t) = time {
            e["time"] = json!(t);
        }
        e
    }

    fn client_side_apply(time: &str) -> Value {
        entry(
            "kubectl-client-side-apply",
            "Update",
            None,
            Some(time),
            json!({ "f:metadata": { "f:annotations": { ".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {} } },
                    "f:spec": { ".": {}, "f:displayName": {}, "f:database": { ".": {}, "f:connectionLimit": {}, "f:workMem": {} } } }),
        )
    }

    fn finalizer(time: &str) -> Value {
        entry(
            "tenant-operator",
            "Update",
            None,
            Some(time),
            json!({ "f:metadata": { "f:finalizers": { ".": {}, "v:\"tenancy.dev/cleanup\"": {} } } }),
        )
    }

    fn status(time: &str) -> Value {
        entry(
            "tenant-operator",
            "Update",
            Some("status"),
            Some(time),
            json!({ "f:status": { ".": {}, "f:conditions": {}, "f:phase": {}, "f:schema": {} } }),
        )
    }

    fn spec_write(manager: &str, operation: &str, time: Option<&str>) -> Value {
        entry(
            manager,
            operation,
            None,
            time,
            json!({ "f:spec": { "f:database": { "f:connectionLimit": {} } } }),
        )
    }

    /// Realistic managedFields, and who last changed the spec.
    fn histories() -> Vec<(&'static str, Vec<Value>, &'static str)> {
        let t = |s: u32| format!("2026-03-02T10:00:{s:02}Z");
        vec![
            (
                "kubectl apply, then the operator",
                vec![client_side_apply(&t(0)), finalizer(&t(1)), status(&t(2))],
                "kubectl-client-side-apply",
            ),
            (
                "then kubectl edit, then a status write",
                vec![
                    client_side_apply(&t(0)),
                    finalizer(&t(1)),
                    spec_write("kubectl-edit", "Update", Some(&t(5))),
                    status(&t(9)),
                ],
                "kubectl-edit",
            ),
            (
                "Argo CD server-side apply with labels",
                vec![
                    entry(
                        "argocd-controller",
                        "Apply",
                        None,
                        Some(&t(0)),
                        json!({ "f:metadata": { "f:labels": { "f:app.kubernetes.io/instance": {} } }, "f:spec": { "f:displayName": {}, "f:state": {} } }),
                    ),
                    finalizer(&t(1)),
                    status(&t(30)),
                ],
                "argocd-controller",
            ),
            (
                "a later metadata-only write (kubectl label) is not a spec change",
                vec![
                    client_side_apply(&t(0)),
                    spec_write("kubectl-edit", "Update", Some(&t(5))),
                    entry(
                        "kubectl-label",
                        "Update",
                        None,
                        Some(&t(7)),
                        json!({ "f:metadata": { "f:labels": { ".": {}, "f:team": {} } } }),
                    ),
                    status(&t(8)),
                ],
                "kubectl-edit",
            ),
            (
                "a spec under a subresource does not count",
                vec![
                    spec_write("helm", "Update", Some(&t(0))),
                    entry("odd", "Update", Some("status"), Some(&t(9)), json!({ "f:spec": {} })),
                ],
                "helm",
            ),
            (
                "two spec writes in the same second: the later entry",
                vec![
                    client_side_apply(&t(3)),
                    spec_write("helm", "Update", Some(&t(3))),
                    status(&t(4)),
                ],
                "helm",
            ),
            (
                "an entry without a time loses to one with",
                vec![
                    spec_write("untimed", "Update", None),
                    spec_write("timed", "Update", Some(&t(0))),
                ],
                "timed",
            ),
            (
                "only an untimed one",
                vec![spec_write("untimed", "Update", None), status(&t(1))],
                "untimed",
            ),
            (
                "only status and finalizer writes",
                vec![finalizer(&t(0)), status(&t(1))],
                "unknown",
            ),
            ("no managedFields", vec![], "unknown"),
        ]
    }

    #[test]
    fn the_slim_tenant_names_the_same_actor_as_the_full_one() {
        for (what, fields, actor) in histories() {
            let mut v = applied();
            v["metadata"]["managedFields"] = Value::Array(fields);
            let full = tenant(v);
            assert_eq!(last_spec_manager(&full), actor, "{what}: the fixture");
            let slim = slimmed(&full);
            assert_eq!(last_spec_manager(&slim), actor, "{what}: the slim Tenant");
            assert_eq!(last_spec_manager(&slimmed(&slim)), actor, "{what}: slimmed twice");
            assert!(
                slim.metadata.managed_fields.as_ref().is_none_or(|m| m.len() == 1),
                "{what}: more than one entry kept"
            );
        }
        // The golden object itself: applied, then edited.
        let full = tenant(applied());
        assert_eq!(last_spec_manager(&full), "kubectl-edit");
        assert_eq!(last_spec_manager(&slimmed(&full)), "kubectl-edit");
    }

    #[test]
    fn slim_drops_the_last_applied_annotation_and_the_field_sets_and_keeps_the_rest() {
        let mut v = applied();
        v["metadata"]["annotations"]["tenancy.dev/last-backup"] = json!("20260302T100000Z");
        v["metadata"]["labels"] = json!({ "team": "payments" });
        let full = tenant(v);
        let slim = slimmed(&full);

        let annotations = slim.metadata.annotations.clone().unwrap_or_default();
        assert!(
            !annotations.contains_key(LAST_APPLIED),
            "the last-applied annotation was kept"
        );
        assert_eq!(
            annotations.get("tenancy.dev/last-backup").map(String::as_str),
            Some("20260302T100000Z"),
            "another annotation was dropped"
        );
        let kept = slim.metadata.managed_fields.clone().expect("the spec manager's entry");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].manager.as_deref(), Some("kubectl-edit"));
        assert_eq!(kept[0].operation.as_deref(), Some("Update"));
        assert_eq!(kept[0].time, full.metadata.managed_fields.as_ref().unwrap()[2].time);
        assert_eq!(kept[0].fields_v1, None);
        assert_eq!(
            (&kept[0].api_version, &kept[0].fields_type, &kept[0].subresource),
            (&None, &None, &None)
        );

        // What reconciles read and the patches they write are guarded by.
        assert_eq!(slim.spec, full.spec);
        assert_eq!(slim.status, full.status);
        let (m, f) = (&slim.metadata, &full.metadata);
        assert_eq!(
            (
                &m.name,
                &m.uid,
                &m.resource_version,
                &m.generation,
                &m.finalizers,
                &m.labels,
                &m.creation_timestamp,
                &m.deletion_timestamp
            ),
            (
                &f.name,
                &f.uid,
                &f.resource_version,
                &f.generation,
                &f.finalizers,
                &f.labels,
                &f.creation_timestamp,
                &f.deletion_timestamp
            )
        );

        // The bulk is gone: the field sets and the annotation were four
        // fifths of the metadata (and spec and status are kept whole).
        let size = |m: &kube::core::ObjectMeta| serde_json::to_vec(m).unwrap().len();
        assert!(
            size(&slim.metadata) * 4 < size(&full.metadata),
            "metadata: slim {} bytes, full {}",
            size(&slim.metadata),
            size(&full.metadata)
        );
        // No annotation left: no empty map either.
        let mut only_applied = full.clone();
        only_applied
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove("tenancy.dev/last-backup");
        assert_eq!(slimmed(&only_applied).metadata.annotations, None);
    }

    #[tokio::test]
    async fn the_shared_store_holds_slim_tenants_and_every_reader_hears_of_each_event() {
        let (store, writer) = reflector::store::<Tenant>();
        let (tx, rx) = mpsc::unbounded();
        let listener: Listener = Box::new(move |ev: &watcher::Event<Tenant>| {
            let _ = tx.unbounded_send(match ev {
                watcher::Event::Init => "Init",
                watcher::Event::InitApply(_) => "InitApply",
                watcher::Event::InitDone => "InitDone",
                watcher::Event::Apply(_) => "Apply",
                watcher::Event::Delete(_) => "Delete",
            });
        });
        let full = tenant(applied());
        let mut other = applied();
        other["metadata"]["name"] = json!("globex");
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(full.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(tenant(other.clone()))),
            Ok(watcher::Event::Delete(tenant(other))),
        ]);
        let applied_objects: Vec<_> = reflect(writer, vec![listener], events).collect().await;
        // The watch ended: its listeners were dropped, and their channels end.
        let heard: Vec<&str> = rx.collect().await;
        assert_eq!(heard, ["Init", "InitApply", "InitDone", "Apply", "Delete"]);
        // The controller is given the applied Tenants, slim.
        assert_eq!(applied_objects.len(), 2);
        for t in applied_objects {
            let t = t.expect("no watch error");
            assert!(
                t.metadata.annotations.is_none(),
                "{}: the controller got the annotation",
                t.metadata.name.unwrap_or_default()
            );
        }
        let state = store.state();
        assert_eq!(state.len(), 1);
        assert_eq!(*state[0], slimmed(&full), "the store holds the full object");
        assert_eq!(last_spec_manager(&state[0]), last_spec_manager(&full));
    }
}
