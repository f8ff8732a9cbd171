//! The in-memory object store: one global resourceVersion counter, objects keyed by
//! (group, plural) then (namespace, name), and a bounded event history feeding watchers.

use crate::resources::{builtins, ResourceType};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

pub type TypeKey = (String, String);
pub type ObjKey = (String, String);

#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub etype: &'static str,
    pub object: Value,
    pub prev: Option<Value>,
}

pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<TypeKey, BTreeMap<ObjKey, Value>>,
    pub types: BTreeMap<TypeKey, ResourceType>,
    pub history: VecDeque<Arc<WatchEvent>>,
    pub history_limit: usize,
    /// A watch may start from any resourceVersion >= this; older ones get 410 Expired.
    pub min_watch_rv: u64,
    pub tx: broadcast::Sender<Arc<WatchEvent>>,
    /// Bumped to make every open watch end (test hook).
    pub close_tx: tokio::sync::watch::Sender<u64>,
}

pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        let (tx, _) = broadcast::channel(8192);
        let (close_tx, _) = tokio::sync::watch::channel(0);
        let mut st = Store {
            rv: 1,
            objects: BTreeMap::new(),
            types: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            min_watch_rv: 0,
            tx,
            close_tx,
        };
        for t in builtins() {
            st.types.insert((t.group.clone(), t.plural.clone()), t);
        }
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            st.rv += 1;
            let obj = json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "uid": new_uid(),
                    "resourceVersion": st.rv.to_string(),
                    "creationTimestamp": now(),
                    "labels": {"kubernetes.io/metadata.name": ns},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            st.objects
                .entry(("".into(), "namespaces".into()))
                .or_default()
                .insert(("".into(), ns.into()), obj);
        }
        st
    }

    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn emit(
        &mut self,
        group: &str,
        plural: &str,
        namespace: &str,
        etype: &'static str,
        object: Value,
        prev: Option<Value>,
    ) {
        let rv = self.rv;
        let ev = Arc::new(WatchEvent {
            rv,
            group: group.to_string(),
            plural: plural.to_string(),
            namespace: namespace.to_string(),
            etype,
            object,
            prev,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.min_watch_rv = old.rv;
            }
        }
        let _ = self.tx.send(ev);
    }

    /// Drops the whole event history and ends all open watches, so a client resuming from any
    /// earlier resourceVersion gets 410 Expired (as after an etcd compaction).
    pub fn expire_history(&mut self) {
        self.rv += 1;
        self.min_watch_rv = self.rv;
        self.history.clear();
        self.close_tx.send_modify(|e| *e += 1);
    }

    pub fn get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(group.to_string(), plural.to_string()))?
            .get(&(ns.to_string(), name.to_string()))
    }

    pub fn put(&mut self, group: &str, plural: &str, ns: &str, name: &str, obj: Value) {
        self.objects
            .entry((group.to_string(), plural.to_string()))
            .or_default()
            .insert((ns.to_string(), name.to_string()), obj);
    }

    pub fn take(&mut self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get_mut(&(group.to_string(), plural.to_string()))?
            .remove(&(ns.to_string(), name.to_string()))
    }

    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .get(&(group.to_string(), plural.to_string()))
            .filter(|t| t.version(version).is_some())
    }

    pub fn namespace_phase(&self, ns: &str) -> Option<String> {
        self.get("", "namespaces", "", ns).map(|n| {
            n.pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("Active")
                .to_string()
        })
    }
}
