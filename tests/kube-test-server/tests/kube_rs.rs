//! Conformance through kube-rs 5 (the client the operator uses).
mod common;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::Client;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

async fn server() -> (kube_test_server::ServerHandle, Client) {
    let h = kube_test_server::start_on("127.0.0.1:0", kube_test_server::Config::default())
        .await
        .unwrap();
    let kc = Kubeconfig::from_yaml(&h.kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(cfg).unwrap();
    (h, client)
}

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "t"}}, "data": {"k": v}})).unwrap()
}

async fn tenants(client: &Client) -> Api<DynamicObject> {
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&std::fs::read_to_string(common::fixture("tenant-crd.yaml")).unwrap()).unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("tenancy.dev", "v1alpha1", "Tenant"), "tenants");
    Api::all_with(client.clone(), &ar)
}

fn tenant(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"displayName": name}
    }))
    .unwrap()
}

#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}
impl std::error::Error for Never {}

#[tokio::test]
async fn watcher_relists_after_410_expired() {
    let (h, client) = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let mut stream = watcher(api.clone(), watcher::Config::default().labels("app=t")).boxed();
    let mut inits = 0;
    let mut seen_b = false;
    let mut saw_410 = false;
    let run = async {
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Err(watcher::Error::WatchError(s)) if s.code == 410 && s.reason == "Expired" => {
                    saw_410 = true;
                    continue;
                }
                Err(e) => panic!("watcher error {e:?}"),
                Ok(ev) => ev,
            };
            match ev {
                watcher::Event::Init => inits += 1,
                watcher::Event::InitDone if inits == 1 => {
                    // force the next watch to start from a compacted resourceVersion
                    h.expire_watch_history();
                    api.create(&PostParams::default(), &cm("b", "2")).await.unwrap();
                }
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) if o.metadata.name.as_deref() == Some("b") => {
                    seen_b = true
                }
                watcher::Event::InitDone if inits >= 2 && seen_b => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("watcher did not relist");
    assert!(saw_410, "the resumed watch did not report 410 Expired");
    assert!(inits >= 2, "expected a relist after 410, saw {inits} init(s)");
    h.shutdown().await;
}

#[tokio::test]
async fn watcher_with_streaming_lists() {
    let (h, client) = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let mut stream = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let run = async {
        let mut initial = vec![];
        while let Some(ev) = stream.try_next().await.unwrap() {
            match ev {
                watcher::Event::InitApply(o) => initial.push(o.metadata.name.unwrap()),
                watcher::Event::InitDone => {
                    assert_eq!(initial, vec!["a".to_string()]);
                    api.create(&PostParams::default(), &cm("c", "3")).await.unwrap();
                }
                watcher::Event::Apply(o) if o.metadata.name.as_deref() == Some("c") => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("streaming list watch failed");
    h.shutdown().await;
}

#[tokio::test]
async fn finalizer_helper_adds_and_removes_its_finalizer() {
    let (h, client) = server().await;
    let api = tenants(&client).await;
    api.create(&PostParams::default(), &tenant("acme")).await.unwrap();
    let name = "tenancy.dev/cleanup";
    let reconcile = |obj: Arc<DynamicObject>| {
        let api = api.clone();
        async move {
            finalizer(&api, name, obj, |ev| async move {
                match ev {
                    FinalizerEvent::Apply(_) | FinalizerEvent::Cleanup(_) => Ok::<_, Never>(Action::await_change()),
                }
            })
            .await
            .unwrap()
        }
    };
    reconcile(Arc::new(api.get("acme").await.unwrap())).await;
    let obj = api.get("acme").await.unwrap();
    assert_eq!(obj.metadata.finalizers.as_deref(), Some(&[name.to_string()][..]));
    // the Apply branch now runs without patching
    reconcile(Arc::new(obj.clone())).await;
    let del = api.delete("acme", &DeleteParams::default()).await.unwrap();
    assert!(del.is_left(), "an object with a finalizer stays after delete");
    let obj = api.get("acme").await.unwrap();
    assert!(obj.metadata.deletion_timestamp.is_some());
    reconcile(Arc::new(obj)).await;
    let err = api.get("acme").await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 404);
            assert_eq!(s.message, "tenants.tenancy.dev \"acme\" not found");
        }
        other => panic!("unexpected {other:?}"),
    }
    h.shutdown().await;
}

#[tokio::test]
async fn stale_replace_is_a_conflict() {
    let (h, client) = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let created = api.create(&PostParams::default(), &cm("x", "1")).await.unwrap();
    let mut first = created.clone();
    first.data = Some([("k".to_string(), "2".to_string())].into());
    let replaced = api.replace("x", &PostParams::default(), &first).await.unwrap();
    assert_ne!(replaced.metadata.resource_version, created.metadata.resource_version);
    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    match api.replace("x", &PostParams::default(), &stale).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
            assert!(s.message.contains("the object has been modified"), "{}", s.message);
        }
        other => panic!("unexpected {other:?}"),
    }
    // replace without a resourceVersion is unconditional
    let mut unconditional = stale;
    unconditional.metadata.resource_version = None;
    api.replace("x", &PostParams::default(), &unconditional).await.unwrap();
    // creating it again: AlreadyExists
    match api.create(&PostParams::default(), &cm("x", "1")).await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("unexpected {other:?}"),
    }
    h.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_with_patch_apply() {
    let (h, client) = server().await;
    let api = tenants(&client).await;
    let pp = PatchParams::apply("tenant-operator");
    let applied = api.patch("acme", &pp, &Patch::Apply(tenant("acme"))).await.unwrap();
    assert_eq!(
        applied.data["spec"]["database"]["connectionLimit"],
        json!(20),
        "defaults applied"
    );
    assert_eq!(applied.metadata.generation, Some(1));
    // status through the status subresource with apply
    let status = json!({"apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant", "status": {"phase": "Active", "observedGeneration": 1}});
    let s = api.patch_status("acme", &pp, &Patch::Apply(status)).await.unwrap();
    assert_eq!(s.data["status"]["phase"], json!("Active"));
    assert_eq!(s.metadata.generation, Some(1));
    // another manager with a different value conflicts; force takes over
    let mut other = tenant("acme");
    other.data["spec"]["displayName"] = json!("Other");
    let err = api
        .patch(
            "acme",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(other.clone()),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!(s.code, 409, "{}", s.message),
        other => panic!("unexpected {other:?}"),
    }
    let forced = api
        .patch(
            "acme",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(other),
        )
        .await
        .unwrap();
    assert_eq!(forced.data["spec"]["displayName"], json!("Other"));
    assert_eq!(forced.metadata.generation, Some(2));
    // merge patch of the status, and a no-op apply writes nothing
    let rv = forced.metadata.resource_version.clone();
    let mut again = tenant("acme");
    again.data["spec"]["displayName"] = json!("Other");
    let same = api
        .patch(
            "acme",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(again),
        )
        .await
        .unwrap();
    assert_eq!(same.metadata.resource_version, rv);
    h.shutdown().await;
}

/// The pages of one list show the collection as of its first page and all
/// carry that page's resourceVersion; a watch from it delivers what changed
/// between the pages (a client that started watching from the newer version
/// of a later page would never see a change to an item of an earlier one).
#[tokio::test]
async fn list_pages_are_one_snapshot_and_a_watch_from_it_misses_nothing() {
    let (h, client) = server().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "snap"}})).unwrap(),
    )
    .await
    .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "snap");
    for i in 0..6 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i}"), "v1"))
            .await
            .unwrap();
    }
    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    let token = first.metadata.continue_.clone().unwrap();
    // Between the pages: an item of the first page and one of the second
    // changed, one of the second deleted, a new one created.
    let data = |v: &str| Patch::Merge(json!({"data": {"k": v}}));
    api.patch("cm-1", &PatchParams::default(), &data("v2")).await.unwrap();
    api.patch("cm-5", &PatchParams::default(), &data("v2")).await.unwrap();
    api.delete("cm-4", &DeleteParams::default()).await.unwrap();
    api.create(&PostParams::default(), &cm("cm-6", "v1")).await.unwrap();
    let second = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.metadata.resource_version.as_deref(), Some(rv.as_str()));
    let shown: Vec<(String, String)> = second
        .items
        .iter()
        .map(|c| (c.metadata.name.clone().unwrap(), c.data.as_ref().unwrap()["k"].clone()))
        .collect();
    let want: Vec<(String, String)> = [("cm-3", "v1"), ("cm-4", "v1"), ("cm-5", "v1")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(shown, want, "the second page as of the first");
    assert!(
        second.metadata.continue_.as_deref().unwrap_or("").is_empty(),
        "cm-6 came later"
    );
    // A watch from the list's version gets the four changes.
    let mut events = vec![];
    let mut stream = api
        .watch(&kube::api::WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    while events.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await {
            Ok(Ok(Some(kube::api::WatchEvent::Added(c)))) => events.push(format!("ADDED {}", c.metadata.name.unwrap())),
            Ok(Ok(Some(kube::api::WatchEvent::Modified(c)))) => {
                events.push(format!("MODIFIED {}", c.metadata.name.unwrap()))
            }
            Ok(Ok(Some(kube::api::WatchEvent::Deleted(c)))) => {
                events.push(format!("DELETED {}", c.metadata.name.unwrap()))
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("watch ended early: {other:?}, after {events:?}"),
        }
    }
    assert_eq!(events, ["MODIFIED cm-1", "MODIFIED cm-5", "DELETED cm-4", "ADDED cm-6"]);
    // Once the history no longer reaches back to the first page, the rest
    // of that list is 410 Expired, as after etcd's compaction.
    h.expire_watch_history();
    match api.list(&ListParams::default().limit(3).continue_token(&token)).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    // A new list starts afresh.
    assert_eq!(api.list(&ListParams::default()).await.unwrap().items.len(), 6);
    h.shutdown().await;
}

#[tokio::test]
async fn list_paginates_with_limit_and_continue() {
    let (h, client) = server().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "pages"}})).unwrap(),
    )
    .await
    .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "pages");
    for i in 0..7 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i}"), "v"))
            .await
            .unwrap();
    }
    let mut names = vec![];
    let mut lp = ListParams::default().limit(3);
    let mut pages = 0;
    loop {
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, (0..7).map(|i| format!("cm-{i}")).collect::<Vec<_>>());
    // label and field selectors
    let one = api
        .list(&ListParams::default().fields("metadata.name=cm-3"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    let none = api.list(&ListParams::default().labels("app!=t")).await.unwrap();
    assert!(none.items.is_empty());
    // across namespaces
    let all: Api<ConfigMap> = Api::all(client.clone());
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 7);
    h.shutdown().await;
}

#[tokio::test]
async fn invalid_custom_resource_is_a_422_with_causes() {
    let (h, client) = server().await;
    let api = tenants(&client).await;
    let mut t = tenant("acme");
    t.data["spec"]["database"] = json!({"connectionLimit": 5000});
    match api.create(&PostParams::default(), &t).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert_eq!(s.reason, "Invalid");
            assert_eq!(
                s.message,
                "Tenant.tenancy.dev \"acme\" is invalid: spec.database.connectionLimit: Invalid value: 5000: spec.database.connectionLimit in body should be less than or equal to 1000"
            );
            let details = s.details.unwrap();
            assert_eq!(details.causes[0].field, "spec.database.connectionLimit");
            assert_eq!(details.causes[0].reason, "FieldValueInvalid");
        }
        other => panic!("unexpected {other:?}"),
    }
    h.shutdown().await;
}

#[tokio::test]
async fn events_recorder_events_show_as_core_events() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    use kube::Resource;
    let (h, client) = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let c = api.create(&PostParams::default(), &cm("evt", "1")).await.unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tenant-operator".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Provisioned".into(),
        note: Some("schema created".into()),
        action: "Provision".into(),
        secondary: None,
    };
    recorder.publish(&ev, &c.object_ref(&())).await.unwrap();
    recorder.publish(&ev, &c.object_ref(&())).await.unwrap();
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let list = core.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.items.len(),
        1,
        "the second publish updates the series of the first"
    );
    let e = &list.items[0];
    assert_eq!(e.message.as_deref(), Some("schema created"));
    assert_eq!(e.reason.as_deref(), Some("Provisioned"));
    assert_eq!(e.involved_object.name.as_deref(), Some("evt"));
    assert_eq!(e.reporting_component.as_deref(), Some("tenant-operator"));
    h.shutdown().await;
}

#[tokio::test]
async fn metadata_watcher_and_status_subresource() {
    use kube::core::PartialObjectMeta;
    use kube::runtime::WatchStreamExt;
    let (h, client) = server().await;
    let api = tenants(&client).await;
    api.create(&PostParams::default(), &tenant("acme")).await.unwrap();
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("tenancy.dev", "v1alpha1", "Tenant"), "tenants");
    let meta_api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client.clone(), &ar);
    let mut stream = watcher(meta_api, watcher::Config::default()).applied_objects().boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("acme"));
    // status writes through the subresource do not touch spec or generation
    let patched = api
        .patch_status(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Provisioning"}, "spec": {"displayName": "nope"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], json!("Provisioning"));
    assert_eq!(patched.data["spec"]["displayName"], json!("acme"));
    assert_eq!(patched.metadata.generation, Some(1));
    let next = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.metadata.resource_version, patched.metadata.resource_version);
    h.shutdown().await;
}
