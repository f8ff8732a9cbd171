//! HTTP routing and the REST verbs.

use crate::discovery;
use crate::patch;
use crate::resources::{self, ResourceType};
use crate::schema;
use crate::selectors::{extra_field_labels, FieldSelector, LabelSelector};
use crate::status::{success_status, ApiError, ApiResult, Cause};
use crate::store::{new_uid, now, Store, WatchEvent};
use crate::table;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub struct App {
    pub store: Mutex<Store>,
    pub addr: String,
    pub bookmark_interval: Duration,
    pub log_requests: bool,
    /// (bearer token, user) pairs authorized through RBAC (see `rbac`).
    pub rbac_tokens: Vec<(String, String)>,
}

impl App {
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        match self.store.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

pub struct Req {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true") | Some("1"))
    }
    fn header(&self, k: &str) -> &str {
        self.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

pub fn parse_query(q: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .to_string()
        };
        m.insert(dec(k), dec(v));
    }
    m
}

/// A JSON response with the headers the real API server sends on one.
fn json_body(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    r
}

pub fn json_resp(code: u16, v: &Value, warnings: &[String]) -> Response<Body> {
    let mut r = json_body(Body::from(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for w in warnings {
        let text = format!("299 - {w:?}");
        if let Ok(hv) = HeaderValue::from_str(&text) {
            r.headers_mut().append("Warning", hv);
        }
    }
    r
}

pub fn err_resp(e: &ApiError) -> Response<Body> {
    json_resp(e.code, &e.to_status(), &[])
}

fn text_resp(code: u16, s: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(s.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn not_found_path() -> ApiError {
    ApiError {
        code: 404,
        reason: "NotFound",
        message: "the server could not find the requested resource".into(),
        details: Some(json!({})),
    }
}

pub async fn handle(app: Arc<App>, req: Req) -> Response<Body> {
    let segs: Vec<String> = req
        .path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    if let Some(denied) = authorize(&app, &req, &s) {
        return err_resp(&denied);
    }
    let get = req.method == Method::GET;
    match s.as_slice() {
        ["version"] if get => json_resp(200, &discovery::version(), &[]),
        ["healthz" | "readyz" | "livez", ..] => text_resp(200, "ok"),
        ["api"] if get => json_resp(200, &discovery::api_versions(&app.addr), &[]),
        ["apis"] if get => json_resp(200, &discovery::group_list(&app.lock()), &[]),
        ["apis", g] if get => match discovery::group(&app.lock(), g) {
            Some(v) => json_resp(200, &v, &[]),
            None => err_resp(&not_found_path()),
        },
        ["api", "v1"] if get => match discovery::resource_list(&app.lock(), "", "v1") {
            Some(v) => json_resp(200, &v, &[]),
            None => err_resp(&not_found_path()),
        },
        ["apis", g, v] if get => match discovery::resource_list(&app.lock(), g, v) {
            Some(v) => json_resp(200, &v, &[]),
            None => err_resp(&not_found_path()),
        },
        ["openapi", "v3"] if get => json_resp(200, &discovery::openapi_root(&app.lock()), &[]),
        ["openapi", "v3", "api", "v1"] if get => match discovery::openapi_gv(&app.lock(), "", "v1") {
            Some(v) => json_resp(200, &v, &[]),
            None => err_resp(&not_found_path()),
        },
        ["openapi", "v3", "apis", g, v] if get => match discovery::openapi_gv(&app.lock(), g, v) {
            Some(v) => json_resp(200, &v, &[]),
            None => err_resp(&not_found_path()),
        },
        ["kube-test-server", "expire-watch-history"] if req.method == Method::POST => {
            app.lock().expire_history();
            json_resp(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                &[],
            )
        }
        ["api", "v1", rest @ ..] if !rest.is_empty() => resource(app, "", "v1", rest, &req).await,
        ["apis", g, v, rest @ ..] if !rest.is_empty() => resource(app, g, v, rest, &req).await,
        _ => err_resp(&not_found_path()),
    }
}

/// A 403 when the request's bearer token is one of the RBAC-checked ones
/// and the stored RBAC objects do not allow the request.
fn authorize(app: &App, req: &Req, segs: &[&str]) -> Option<ApiError> {
    let user = rbac_user(app, req)?;
    let attrs = crate::rbac::attributes(req.method.as_str(), segs, req.flag("watch"))?;
    if crate::rbac::allowed(&app.lock(), user, &attrs) {
        return None;
    }
    Some(forbidden(user, &attrs))
}

/// The RBAC-checked user the request comes from, if any.
fn rbac_user<'a>(app: &'a App, req: &Req) -> Option<&'a str> {
    if app.rbac_tokens.is_empty() {
        return None;
    }
    // kube-rs sends its bearer token over plain HTTP; kubectl does not, so
    // `kubectl --as USER` (the Impersonate-User header) names a configured
    // user too.
    let token = req.header("authorization").strip_prefix("Bearer ").map(str::trim);
    let impersonated = req.header("impersonate-user");
    app.rbac_tokens
        .iter()
        .find(|(t, u)| Some(t.as_str()) == token || (!impersonated.is_empty() && u == impersonated))
        .map(|(_, u)| u.as_str())
}

fn forbidden(user: &str, attrs: &crate::rbac::Attributes) -> ApiError {
    let mut e = ApiError::new(403, "Forbidden", crate::rbac::denied_message(user, attrs));
    e.details =
        Some(json!({"name": attrs.name.clone().unwrap_or_default(), "group": attrs.group, "kind": attrs.resource}));
    e
}

/// A server-side apply that creates the object is authorized as `create`
/// too, as the real API server does (a `patch` grant alone does not create).
fn authorize_apply_create(app: &App, st: &Store, t: &Target, req: &Req) -> Result<(), ApiError> {
    let Some(user) = rbac_user(app, req) else {
        return Ok(());
    };
    let attrs = crate::rbac::Attributes {
        verb: "create".into(),
        group: t.g().to_string(),
        resource: t.p().to_string(),
        subresource: None,
        namespace: t.ns.clone(),
        name: t.name.clone(),
    };
    if crate::rbac::allowed(st, user, &attrs) {
        Ok(())
    } else {
        Err(forbidden(user, &attrs))
    }
}

/// What a resource request addresses.
#[derive(Clone)]
pub struct Target {
    pub rt: ResourceType,
    pub version: String,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

impl Target {
    fn api_version(&self) -> String {
        self.rt.api_version(&self.version)
    }
    fn g(&self) -> &str {
        &self.rt.group
    }
    /// The group objects are stored under: events.k8s.io Events share core Events' storage.
    fn sg(&self) -> &str {
        if self.rt.group == "events.k8s.io" {
            ""
        } else {
            &self.rt.group
        }
    }
    fn storage_av(&self) -> String {
        if self.rt.group == "events.k8s.io" {
            "v1".into()
        } else {
            self.api_version()
        }
    }
    fn p(&self) -> &str {
        &self.rt.plural
    }
    fn nsk(&self) -> String {
        self.ns.clone().unwrap_or_default()
    }
}

async fn resource(app: Arc<App>, g: &str, v: &str, rest: &[&str], req: &Req) -> Response<Body> {
    let target = {
        let st = app.lock();
        let namespaced_path =
            rest.len() >= 3 && rest[0] == "namespaces" && st.find_type(g, v, rest[2]).is_some_and(|t| t.namespaced);
        let (ns, rest) = if namespaced_path {
            (Some(rest[1].to_string()), &rest[2..])
        } else {
            (None, rest)
        };
        let Some(rt) = st.find_type(g, v, rest[0]).cloned() else {
            return err_resp(&not_found_path());
        };
        if rest.len() > 3 || (rt.namespaced && ns.is_none() && rest.len() > 1) {
            return err_resp(&not_found_path());
        }
        let sub = rest.get(2).map(|s| s.to_string());
        if let Some(s) = &sub {
            if !(s == "status" && rt.has_status(v)) {
                return err_resp(&not_found_path());
            }
        }
        Target {
            rt,
            version: v.to_string(),
            ns,
            name: rest.get(1).map(|s| s.to_string()),
            sub,
        }
    };
    let result = match (&req.method, &target.name) {
        (&Method::GET, None) if req.flag("watch") => return watch(app, target, req).await,
        (&Method::GET, None) => list(&app, &target, req),
        (&Method::GET, Some(_)) => get(&app, &target, req),
        (&Method::POST, None) => create(&app, &target, req),
        (&Method::PUT, Some(_)) => update(&app, &target, req),
        (&Method::PATCH, Some(_)) => patch_handler(&app, &target, req),
        (&Method::DELETE, Some(_)) => delete(&app, &target, req),
        (&Method::DELETE, None) => delete_collection(&app, &target, req),
        (m, _) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({m})"
        ))),
    };
    match result {
        Ok((code, v, warnings)) => json_resp(code, &v, &warnings),
        Err(e) => err_resp(&e),
    }
}

type Out = ApiResult<(u16, Value, Vec<String>)>;

fn wants_partial(req: &Req) -> bool {
    req.header("accept")
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
}

fn wants_table(req: &Req) -> bool {
    req.header("accept")
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

const EVENT_FIELDS: [(&str, &str); 11] = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingInstance", "reportingInstance"),
    ("eventTime", "eventTime"),
    ("series", "series"),
    ("related", "related"),
];

/// Renames fields between core/v1 and events.k8s.io/v1 Events (they share storage).
fn convert_event(obj: &mut Value, to_events_api: bool) {
    if let Some(o) = obj.as_object_mut() {
        for (core, ev) in EVENT_FIELDS {
            let (from, to) = if to_events_api { (core, ev) } else { (ev, core) };
            if from != to {
                if let Some(v) = o.remove(from) {
                    o.insert(to.to_string(), v);
                }
            }
        }
        if to_events_api {
            if let Some(series) = o.get_mut("series").and_then(Value::as_object_mut) {
                series.remove("state");
            }
        }
    }
}

/// An incoming object in the API's shape, converted to the stored shape.
fn to_storage(t: &Target, mut obj: Value) -> Value {
    if t.rt.group == "events.k8s.io" {
        convert_event(&mut obj, false);
        if let Some(o) = obj.as_object_mut() {
            o.insert("apiVersion".into(), json!("v1"));
        }
    }
    obj
}

/// The object as served at the requested version.
fn present(t: &Target, mut obj: Value) -> Value {
    if t.rt.group == "events.k8s.io" {
        convert_event(&mut obj, true);
    }
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), json!(t.api_version()));
        o.insert("kind".into(), json!(t.rt.kind));
    }
    obj
}

fn selectors(t: &Target, req: &Req) -> ApiResult<(LabelSelector, FieldSelector)> {
    let ls = LabelSelector::parse(req.q("labelSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
    let fs = FieldSelector::parse(req.q("fieldSelector").unwrap_or(""), extra_field_labels(t.g(), t.p()))
        .map_err(ApiError::bad_request)?;
    Ok((ls, fs))
}

fn list(app: &App, t: &Target, req: &Req) -> Out {
    let (ls, fs) = selectors(t, req)?;
    let st = app.lock();
    let limit = req.q("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let start: Option<Continue> = match req.q("continue").filter(|c| !c.is_empty()) {
        Some(c) => Some(
            decode_continue(c)
                .ok_or_else(|| ApiError::bad_request("continue key is not valid: malformed continue token"))?,
        ),
        None => None,
    };
    // Every page of a paginated list shows the collection as it was when the
    // first page was served, and carries that page's resourceVersion (as
    // the API server does, reading the rest from the same etcd revision): a
    // client that starts its watch there then misses nothing changed
    // between two pages. The snapshot is the current state with the changes
    // made since undone from the event history; a snapshot older than the
    // history is 410 Expired, as after etcd's compaction.
    let snapshot = start.as_ref().and_then(|c| c.rv).unwrap_or(st.rv);
    let since = snapshot_changes(&st, t, snapshot)?;
    let mut items = vec![];
    let mut next = None;
    let empty = BTreeMap::new();
    let objs = st
        .objects
        .get(&(t.sg().to_string(), t.p().to_string()))
        .unwrap_or(&empty);
    // The collection at `snapshot`: the current objects, those changed since
    // as they were then (absent when created since).
    let mut at_snapshot: BTreeMap<&(String, String), &Value> =
        objs.iter().filter(|(k, _)| !since.contains_key(*k)).collect();
    at_snapshot.extend(since.iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    for ((ns, name), obj) in at_snapshot {
        if let Some(want) = &t.ns {
            if ns != want {
                continue;
            }
        }
        if let Some(c) = &start {
            if (ns, name) <= (&c.ns, &c.name) {
                continue;
            }
        }
        if !(ls.matches(obj) && fs.matches(obj)) {
            continue;
        }
        if let Some(l) = limit {
            if items.len() == l {
                next = items.last().map(|o: &Value| {
                    encode_continue(
                        o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(""),
                        o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or(""),
                        snapshot,
                    )
                });
                break;
            }
        }
        items.push(present(t, obj.clone()));
    }
    let mut meta = json!({"resourceVersion": snapshot.to_string()});
    if let Some(n) = next {
        meta["continue"] = json!(n);
    }
    drop(st);
    if wants_table(req) {
        return Ok((
            200,
            table::table(
                &t.rt,
                &t.version,
                &items,
                meta,
                req.q("includeObject").unwrap_or("Metadata"),
            ),
            vec![],
        ));
    }
    if wants_partial(req) {
        let items: Vec<Value> = items.iter().map(partial).collect();
        return Ok((
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": meta, "items": items}),
            vec![],
        ));
    }
    Ok((
        200,
        json!({"apiVersion": t.api_version(), "kind": t.rt.list_kind, "metadata": meta, "items": items}),
        vec![],
    ))
}

/// Where a paginated list goes on: after this key, as of this resourceVersion.
struct Continue {
    ns: String,
    name: String,
    /// None in a token from before snapshots: the current state.
    rv: Option<u64>,
}

fn encode_continue(ns: &str, name: &str, rv: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({"ns": ns, "name": name, "rv": rv}).to_string())
}

fn decode_continue(c: &str) -> Option<Continue> {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?;
    let v: Value = serde_json::from_slice(&b).ok()?;
    Some(Continue {
        ns: v.get("ns")?.as_str()?.to_string(),
        name: v.get("name")?.as_str()?.to_string(),
        rv: v.get("rv").and_then(Value::as_u64),
    })
}

/// The objects of `t`'s collection changed after `snapshot`, each as it was
/// then (None: it did not exist). 410 Expired when the history no longer
/// reaches back to `snapshot`.
fn snapshot_changes<'a>(
    st: &'a Store,
    t: &Target,
    snapshot: u64,
) -> ApiResult<BTreeMap<(String, String), Option<&'a Value>>> {
    let mut before = BTreeMap::new();
    if snapshot >= st.rv {
        return Ok(before);
    }
    if snapshot < st.min_watch_rv {
        return Err(ApiError::expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        ));
    }
    // Newest first: the oldest change after the snapshot is undone last.
    for ev in st.history.iter().rev().take_while(|e| e.rv > snapshot) {
        if ev.group != t.sg() || ev.plural != t.p() {
            continue;
        }
        let name = ev
            .object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let was = match ev.etype {
            "ADDED" => None,
            _ => ev.prev.as_ref(),
        };
        before.insert((ev.namespace.clone(), name), was);
    }
    Ok(before)
}

fn get(app: &App, t: &Target, req: &Req) -> Out {
    let name = t.name.clone().unwrap_or_default();
    let st = app.lock();
    let obj = st
        .get(t.sg(), t.p(), &t.nsk(), &name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(t.g(), t.p(), &name))?;
    let obj = present(t, obj);
    if wants_table(req) {
        let meta = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
        return Ok((
            200,
            table::table(
                &t.rt,
                &t.version,
                &[obj],
                meta,
                req.q("includeObject").unwrap_or("Metadata"),
            ),
            vec![],
        ));
    }
    if wants_partial(req) {
        return Ok((200, partial(&obj), vec![]));
    }
    Ok((200, obj, vec![]))
}

fn parse_body(req: &Req) -> ApiResult<Value> {
    let ct = req.header("content-type");
    if ct.contains("protobuf") {
        return crate::proto::decode(&req.body).map_err(|e| ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml ({e})")));
    }
    if let Ok(v) = serde_json::from_slice::<Value>(&req.body) {
        return Ok(v);
    }
    let y: serde_yaml::Value = serde_yaml::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))?;
    serde_json::to_value(y).map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))
}

fn field_manager(req: &Req, default_from_ua: bool) -> String {
    if let Some(m) = req.q("fieldManager").filter(|m| !m.is_empty()) {
        return m.to_string();
    }
    if default_from_ua {
        let ua = req.header("user-agent");
        let first = ua.split('/').next().unwrap_or("").trim();
        if !first.is_empty() {
            return first.to_string();
        }
    }
    "unknown".to_string()
}

const META_KEYS: [&str; 15] = [
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Drops empty collections from metadata (Go's omitempty) and unknown metadata fields.
fn normalize_meta(obj: &mut Value, unknown: &mut Vec<String>) {
    if let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        let keys: Vec<String> = md.keys().cloned().collect();
        for k in keys {
            if !META_KEYS.contains(&k.as_str()) {
                md.remove(&k);
                unknown.push(format!("metadata.{k}"));
                continue;
            }
            let empty = match md.get(&k) {
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(Value::Null) => true,
                Some(Value::String(s)) => s.is_empty() && k != "name",
                _ => false,
            };
            if empty {
                md.remove(&k);
            }
        }
    }
}

/// Validates and normalises an object about to be written (schema, defaults, pruning, name).
fn admit(t: &Target, obj: &mut Value, old: Option<&Value>, req: &Req) -> ApiResult<Vec<String>> {
    let mut unknown = vec![];
    if !obj.get("metadata").is_some_and(Value::is_object) {
        if let Some(o) = obj.as_object_mut() {
            o.insert("metadata".into(), json!({}));
        }
    }
    normalize_meta(obj, &mut unknown);
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut causes: Vec<Cause> = schema::name_causes(t.rt.name_rule, &name);
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        let re = regex::Regex::new(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").ok();
        for (k, v) in labels {
            let ok = v
                .as_str()
                .is_some_and(|s| s.len() <= 63 && re.as_ref().is_none_or(|r| r.is_match(s)));
            if !ok {
                causes.push(Cause::invalid("metadata.labels", v, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"));
            }
            let _ = k;
        }
    }
    if t.rt.builtin {
        crate::defaults::apply(t.g(), t.p(), obj);
    }
    if let Some(s) = t.rt.version(&t.version).and_then(|v| v.schema.clone()) {
        schema::prune_and_default(&s, obj, "", true, &mut unknown);
        schema::validate(&s, obj, old, "", true, &mut causes);
    }
    if t.rt.builtin && t.rt.plural == "customresourcedefinitions" {
        causes.extend(validate_crd(obj));
    }
    if !unknown.is_empty() {
        match req.q("fieldValidation").unwrap_or("Warn") {
            "Strict" => {
                let list: Vec<String> = unknown.iter().map(|u| format!("unknown field {u:?}")).collect();
                return Err(ApiError::bad_request(format!(
                    "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
                    t.rt.kind,
                    t.version,
                    t.rt.kind,
                    list.join(", ")
                )));
            }
            "Ignore" => unknown.clear(),
            _ => {}
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(t.g(), &t.rt.kind, &name, causes));
    }
    Ok(unknown.iter().map(|u| format!("unknown field {u:?}")).collect())
}

fn validate_crd(obj: &Value) -> Vec<Cause> {
    let mut c = vec![];
    let group = obj.pointer("/spec/group").and_then(Value::as_str).unwrap_or("");
    let plural = obj.pointer("/spec/names/plural").and_then(Value::as_str).unwrap_or("");
    if group.is_empty() {
        c.push(Cause::required("spec.group", ""));
    }
    if plural.is_empty() {
        c.push(Cause::required("spec.names.plural", ""));
    }
    if obj
        .pointer("/spec/names/kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        c.push(Cause::required("spec.names.kind", ""));
    }
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        c.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let versions = obj
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions
        .iter()
        .filter(|v| v.get("storage") == Some(&json!(true)))
        .count()
        != 1
    {
        c.push(Cause::invalid(
            "spec.versions",
            &json!(versions),
            "must have exactly one version marked as storage version",
        ));
    }
    if obj
        .pointer("/spec/scope")
        .and_then(Value::as_str)
        .is_none_or(|s| s != "Cluster" && s != "Namespaced")
    {
        c.push(Cause::not_supported(
            "spec.scope",
            obj.pointer("/spec/scope").unwrap_or(&Value::Null),
            &[json!("Cluster"), json!("Namespaced")],
        ));
    }
    c
}

fn check_kind(t: &Target, obj: &Value) -> ApiResult<()> {
    if let Some(k) = obj.get("kind").and_then(Value::as_str) {
        if k != t.rt.kind {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({}) does not match the expected API version ({})",
                obj.get("apiVersion").and_then(Value::as_str).unwrap_or(""),
                t.api_version()
            )));
        }
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
        if av != t.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                t.api_version()
            )));
        }
    }
    Ok(())
}

const NAME_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn create(app: &App, t: &Target, req: &Req) -> Out {
    let body = parse_body(req)?;
    if !body.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    check_kind(t, &body)?;
    let body = to_storage(t, body);
    let manager = field_manager(req, true);
    let dry = req.q("dryRun").is_some_and(|d| !d.is_empty());
    let mut st = app.lock();
    create_locked(&mut st, t, body, req, &manager, None, dry)
}

/// Creates an object. `applied_by` marks a server-side apply create (its field set is recorded).
fn create_locked(
    st: &mut Store,
    t: &Target,
    mut obj: Value,
    req: &Req,
    manager: &str,
    applied_by: Option<bool>,
    dry: bool,
) -> Out {
    let ns = t.nsk();
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), json!(t.storage_av()));
        o.insert("kind".into(), json!(t.rt.kind));
        let md = o.entry("metadata").or_insert_with(|| json!({}));
        if !md.is_object() {
            *md = json!({});
        }
        if t.rt.namespaced {
            if let Some(bns) = md.get("namespace").and_then(Value::as_str) {
                if !bns.is_empty() && bns != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
            md["namespace"] = json!(ns);
        } else if let Some(m) = md.as_object_mut() {
            m.remove("namespace");
        }
    }
    let mut name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        let gen = obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if gen.is_empty() {
            return Err(ApiError::invalid(
                t.g(),
                &t.rt.kind,
                "",
                vec![Cause::required("metadata.name", "name or generateName is required")],
            ));
        }
        loop {
            let suffix: String = (0..5)
                .map(|_| NAME_CHARS[rand::random_range(0..NAME_CHARS.len())] as char)
                .collect();
            name = format!("{gen}{suffix}");
            if st.get(t.sg(), t.p(), &ns, &name).is_none() {
                break;
            }
        }
        obj["metadata"]["name"] = json!(name);
    }
    if t.rt.namespaced {
        match st.namespace_phase(&ns) {
            None => return Err(ApiError::not_found("", "namespaces", &ns)),
            Some(p) if p == "Terminating" => {
                return Err(ApiError::forbidden(
                    t.g(),
                    t.p(),
                    &name,
                    &format!("unable to create new content in namespace {ns} because it is being terminated"),
                ))
            }
            _ => {}
        }
    }
    if t.rt.has_status(&t.version) && t.rt.plural != "customresourcedefinitions" {
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
    }
    let raw = obj.clone();
    let mut warnings = admit(t, &mut obj, None, req)?;
    if st.get(t.sg(), t.p(), &ns, &name).is_some() {
        return Err(ApiError::already_exists(t.g(), t.p(), &name));
    }
    let ts = now();
    if let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "generation",
        ] {
            md.remove(k);
        }
        md.insert("uid".into(), json!(new_uid()));
        md.insert("creationTimestamp".into(), json!(ts));
        if t.rt.tracks_generation {
            md.insert("generation".into(), json!(1));
        }
        md.remove("managedFields");
    }
    match (t.g(), t.p()) {
        ("", "namespaces") => {
            obj["status"] = json!({"phase": "Active"});
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        ("", "secrets") => {
            if obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
                obj["type"] = json!("Opaque");
            }
            encode_string_data(&mut obj);
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            obj["status"] = resources::crd_status(&obj, &ts);
        }
        _ => {}
    }
    match applied_by {
        Some(force) => {
            let applied = raw;
            let scope = scope_fn(t);
            let av = t.api_version();
            let w = patch::Writer {
                manager,
                api_version: &av,
                subresource: "",
                time: &ts,
            };
            obj = patch::server_side_apply(&obj, &applied, &w, force, &scope, &list_resolver(t)).unwrap_or(obj);
        }
        None => {
            let av = t.api_version();
            let w = patch::Writer {
                manager,
                api_version: &av,
                subresource: "",
                time: &ts,
            };
            patch::track_update(None, &mut obj, &w, &list_resolver(t))
        }
    }
    if dry {
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        return Ok((201, present(t, obj), warnings));
    }
    let rv = st.next_rv();
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.put(t.sg(), t.p(), &ns, &name, obj.clone());
    st.emit(t.sg(), t.p(), &ns, "ADDED", obj.clone(), None);
    if t.rt.plural == "customresourcedefinitions" {
        register_crd(st, &obj, &mut warnings);
    }
    Ok((201, present(t, obj), warnings))
}

fn encode_string_data(obj: &mut Value) {
    use base64::Engine as _;
    if let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData")) {
        if let Some(m) = sd.as_object() {
            let data = obj
                .as_object_mut()
                .map(|o| o.entry("data").or_insert_with(|| json!({})));
            if let Some(Value::Object(d)) = data {
                for (k, v) in m {
                    let s = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                    d.insert(k.clone(), json!(base64::engine::general_purpose::STANDARD.encode(s)));
                }
            }
        }
    }
}

fn register_crd(st: &mut Store, crd: &Value, warnings: &mut Vec<String>) {
    if let Some(rt) = resources::from_crd(crd) {
        let key = (rt.group.clone(), rt.plural.clone());
        if st.types.get(&key).is_some_and(|t| t.builtin) {
            warnings.push(format!(
                "{} conflicts with a built-in resource; not served",
                crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
            ));
            return;
        }
        st.types.insert(key, rt);
    }
}

/// How lists of this kind merge under server-side apply: from the CRD schema, or the
/// built-in merge keys.
fn list_resolver(t: &Target) -> impl Fn(&[String], &[Value]) -> patch::ListKind {
    let schema = t.rt.version(&t.version).and_then(|v| v.schema.clone());
    move |path: &[String], items: &[Value]| match &schema {
        Some(s) => schema::list_kind(s, path, items),
        None => patch::builtin_lists(path, items),
    }
}

fn scope_fn(t: &Target) -> impl Fn(&patch::FieldPath) -> bool + '_ {
    let status = t.rt.has_status(&t.version);
    let is_status = t.sub.as_deref() == Some("status");
    move |p: &patch::FieldPath| {
        let s = p.first().map(String::as_str) == Some("status");
        if is_status {
            s
        } else {
            !(status && s)
        }
    }
}

fn update(app: &App, t: &Target, req: &Req) -> Out {
    let body = parse_body(req)?;
    if !body.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    check_kind(t, &body)?;
    let body = to_storage(t, body);
    let name = t.name.clone().unwrap_or_default();
    if let Some(bn) = body.pointer("/metadata/name").and_then(Value::as_str) {
        if bn != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({bn}) does not match the name on the URL ({name})"
            )));
        }
    }
    let manager = field_manager(req, true);
    let mut st = app.lock();
    let old = st
        .get(t.sg(), t.p(), &t.nsk(), &name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(t.g(), t.p(), &name))?;
    write_update(&mut st, t, old, body, req, &manager, None)
}

/// The common tail of PUT and PATCH: subresource rules, preconditions, validation,
/// generation, finalizers, and the write itself. `ssa` holds an already-merged object.
fn write_update(
    st: &mut Store,
    t: &Target,
    old: Value,
    incoming: Value,
    req: &Req,
    manager: &str,
    ssa: Option<()>,
) -> Out {
    let name = t.name.clone().unwrap_or_default();
    let ns = t.nsk();
    if let Some(rv) = incoming.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
        if !rv.is_empty() && Some(rv) != old.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
            return Err(ApiError::stale(t.g(), t.p(), &name));
        }
    }
    let is_status = t.sub.as_deref() == Some("status");
    let mut new = if is_status {
        let mut n = old.clone();
        match incoming.get("status") {
            Some(s) => n["status"] = s.clone(),
            None => {
                if let Some(o) = n.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        if let Some(mf) = incoming.pointer("/metadata/managedFields") {
            n["metadata"]["managedFields"] = mf.clone();
        }
        n
    } else {
        let mut n = incoming.clone();
        if t.rt.has_status(&t.version) {
            if let Some(o) = n.as_object_mut() {
                match old.get("status") {
                    Some(s) => o.insert("status".into(), s.clone()),
                    None => o.remove("status"),
                };
            }
        }
        n
    };
    // Server-owned metadata comes from the stored object.
    if let Some(o) = new.as_object_mut() {
        o.insert("apiVersion".into(), json!(t.storage_av()));
        o.insert("kind".into(), json!(t.rt.kind));
        if !o.get("metadata").is_some_and(Value::is_object) {
            o.insert("metadata".into(), json!({}));
        }
    }
    for k in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "resourceVersion",
    ] {
        match old.pointer(&format!("/metadata/{k}")) {
            Some(v) => new["metadata"][k] = v.clone(),
            None => {
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove(k);
                }
            }
        }
    }
    if t.g().is_empty() && t.p() == "secrets" {
        encode_string_data(&mut new);
    }
    if t.g().is_empty() && t.p() == "namespaces" && !is_status {
        new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
        new["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
    }
    let warnings = admit(t, &mut new, Some(&old), req)?;
    // No new finalizers on an object being deleted.
    if old.pointer("/metadata/deletionTimestamp").is_some() {
        let old_f = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let added: Vec<String> = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|f| !old_f.contains(f))
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if !added.is_empty() {
            let quoted: Vec<String> = added.iter().map(|a| format!("{a:?}")).collect();
            return Err(ApiError::invalid(
                t.g(),
                &t.rt.kind,
                &name,
                vec![Cause::forbidden("metadata.finalizers", &format!("no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}", quoted.join(", ")))],
            ));
        }
    }
    let ts = now();
    if ssa.is_none() {
        let client_set_managed = new.pointer("/metadata/managedFields") != old.pointer("/metadata/managedFields")
            && new.pointer("/metadata/managedFields").is_some();
        if !client_set_managed {
            new["metadata"]["managedFields"] = old.pointer("/metadata/managedFields").cloned().unwrap_or(json!([]));
            let sub = if is_status { "status" } else { "" };
            let av = t.api_version();
            let w = patch::Writer {
                manager,
                api_version: &av,
                subresource: sub,
                time: &ts,
            };
            patch::track_update(Some(&old), &mut new, &w, &list_resolver(t));
        }
    }
    normalize_meta(&mut new, &mut vec![]);
    // Generation moves on changes outside metadata and status.
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("status");
        }
        v
    };
    if t.rt.tracks_generation && strip(&old) != strip(&new) {
        let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
        new["metadata"]["generation"] = json!(g + 1);
    }
    let without_mf = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        v
    };
    if without_mf(&old) == without_mf(&new) {
        // A no-op write changes nothing, not even the resourceVersion.
        return Ok((200, present(t, old), warnings));
    }
    if req.q("dryRun").is_some_and(|d| !d.is_empty()) {
        return Ok((200, present(t, new), warnings));
    }
    let rv = st.next_rv();
    new["metadata"]["resourceVersion"] = json!(rv.to_string());
    let finalizers_empty = new
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(|a| a.is_empty());
    if new.pointer("/metadata/deletionTimestamp").is_some()
        && finalizers_empty
        && !(t.g().is_empty() && t.p() == "namespaces")
    {
        st.take(t.sg(), t.p(), &ns, &name);
        st.emit(t.sg(), t.p(), &ns, "DELETED", new.clone(), Some(old));
        after_removal(st, t.sg(), t.p(), &ns, &new, "Background");
        return Ok((200, present(t, new), warnings));
    }
    st.put(t.sg(), t.p(), &ns, &name, new.clone());
    st.emit(t.sg(), t.p(), &ns, "MODIFIED", new.clone(), Some(old));
    if t.rt.plural == "customresourcedefinitions" && !is_status {
        let mut w = vec![];
        register_crd(st, &new, &mut w);
    }
    Ok((200, present(t, new), warnings))
}

fn patch_handler(app: &App, t: &Target, req: &Req) -> Out {
    let ct = req
        .header("content-type")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let name = t.name.clone().unwrap_or_default();
    let is_apply = ct == "application/apply-patch+yaml";
    let manager = field_manager(req, !is_apply);
    if is_apply && req.q("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "PATCH, application/apply-patch+yaml requires fieldManager parameter",
        ));
    }
    let body = if is_apply
        || ct == "application/merge-patch+json"
        || ct == "application/strategic-merge-patch+json"
        || ct == "application/json-patch+json"
    {
        parse_body(req)?
    } else {
        return Err(ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct})")));
    };
    let mut st = app.lock();
    let old = st.get(t.sg(), t.p(), &t.nsk(), &name).cloned();
    if is_apply {
        check_kind(t, &body)?;
        if body.get("apiVersion").is_none() || body.get("kind").is_none() {
            return Err(ApiError::bad_request(
                "apiVersion and kind must be set in an apply configuration",
            ));
        }
        if let Some(bn) = body.pointer("/metadata/name").and_then(Value::as_str) {
            if bn != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({bn}) does not match the name on the URL ({name})"
                )));
            }
        }
        let force = req.flag("force");
        let Some(old) = old else {
            if t.sub.is_some() {
                return Err(ApiError::not_found(t.g(), t.p(), &name));
            }
            authorize_apply_create(app, &st, t, req)?;
            let mut body = to_storage(t, body);
            body["metadata"]["name"] = json!(name);
            let dry = req.q("dryRun").is_some_and(|d| !d.is_empty());
            return create_locked(&mut st, t, body, req, &manager, Some(force), dry);
        };
        let mut applied = to_storage(t, body.clone());
        applied["metadata"]["name"] = json!(name);
        if let Some(m) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
            for k in [
                "managedFields",
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
            ] {
                m.remove(k);
            }
        }
        if t.g().is_empty() && t.p() == "secrets" {
            encode_string_data(&mut applied);
        }
        let scope = scope_fn(t);
        if let Some(o) = applied.as_object_mut() {
            if t.rt.has_status(&t.version) {
                if t.sub.is_some() {
                    let s = o.remove("status");
                    o.retain(|k, _| k == "apiVersion" || k == "kind" || k == "metadata");
                    if let Some(s) = s {
                        o.insert("status".into(), s);
                    }
                    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.retain(|k, _| k == "name" || k == "namespace");
                    }
                } else {
                    o.remove("status");
                }
            }
        }
        let sub = t.sub.clone().unwrap_or_default();
        let ts = now();
        let av = t.api_version();
        let w = patch::Writer {
            manager: &manager,
            api_version: &av,
            subresource: &sub,
            time: &ts,
        };
        let lists = list_resolver(t);
        let mut result = patch::server_side_apply(&old, &applied, &w, force, &scope, &lists);
        if let Err(cs) = &result {
            // As the real server does for `kubectl apply --server-side` after client-side
            // apply: conflicts on fields of the last-applied-configuration are forced.
            if manager == "kubectl" && last_applied_covers(&old, cs, &lists) {
                result = patch::server_side_apply(&old, &applied, &w, true, &scope, &lists);
            }
        }
        let merged = result.map_err(|cs| {
            let n = cs.len();
            let msg = if n == 1 {
                format!("Apply failed with 1 conflict: conflict with {:?} using {}: {}", cs[0].manager, cs[0].api_version, cs[0].path)
            } else {
                let lines: Vec<String> = cs.iter().map(|c| format!("conflict with {:?} using {}: {}", c.manager, c.api_version, c.path)).collect();
                format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
            };
            let causes: Vec<Value> = cs.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {:?} using {}", c.manager, c.api_version), "field": c.path})).collect();
            ApiError { code: 409, reason: "Conflict", message: msg, details: Some(json!({"causes": causes})) }
        })?;
        return write_update(&mut st, t, old, merged, req, &manager, Some(()));
    }
    let Some(old) = old else {
        return Err(ApiError::not_found(t.g(), t.p(), &name));
    };
    let mut doc = present(t, old.clone());
    match ct.as_str() {
        "application/merge-patch+json" => patch::merge_patch(&mut doc, &body),
        "application/strategic-merge-patch+json" => {
            if !t.rt.builtin {
                return Err(ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct})")));
            }
            patch::strategic_merge(&mut doc, &body)
        }
        _ => patch::json_patch(&mut doc, &body).map_err(|e| {
            ApiError::new(
                422,
                "Invalid",
                format!("the server rejected our request due to an error in our request: {e}"),
            )
        })?,
    }
    if !doc.is_object() {
        return Err(ApiError::bad_request("patch produced a non-object"));
    }
    let doc = to_storage(t, doc);
    write_update(&mut st, t, old, doc, req, &manager, None)
}

/// Whether every conflict is on a field listed in the object's
/// `kubectl.kubernetes.io/last-applied-configuration` annotation.
fn last_applied_covers(obj: &Value, conflicts: &[patch::Conflict], lists: patch::Lists) -> bool {
    let Some(text) = obj
        .pointer("/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration")
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Ok(last) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let allowed: Vec<String> = patch::leaves(&last, lists).iter().map(patch::dotted).collect();
    conflicts.iter().all(|c| allowed.contains(&c.path))
}

fn delete_options(req: &Req) -> Value {
    if req.body.is_empty() {
        return json!({});
    }
    serde_json::from_slice(&req.body).unwrap_or(json!({}))
}

fn delete(app: &App, t: &Target, req: &Req) -> Out {
    let opts = delete_options(req);
    let name = t.name.clone().unwrap_or_default();
    let ns = t.nsk();
    let policy = req
        .q("propagationPolicy")
        .map(str::to_string)
        .or_else(|| {
            opts.get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            if opts.get("orphanDependents") == Some(&json!(true)) || req.flag("orphanDependents") {
                "Orphan".into()
            } else {
                "Background".into()
            }
        });
    let mut st = app.lock();
    let old = st
        .get(t.sg(), t.p(), &ns, &name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(t.g(), t.p(), &name))?;
    if let Some(pre) = opts.get("preconditions") {
        if let Some(uid) = pre.get("uid").and_then(Value::as_str) {
            let have = old.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
            if uid != have {
                return Err(ApiError::conflict(
                    t.g(),
                    t.p(),
                    &name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                ));
            }
        }
        if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str) {
            let have = old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            if rv != have {
                return Err(ApiError::conflict(t.g(), t.p(), &name, &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}")));
            }
        }
    }
    if req.q("dryRun").is_some_and(|d| !d.is_empty())
        || opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    {
        return Ok((200, present(t, old), vec![]));
    }
    let result = delete_locked(&mut st, t.sg(), t.p(), &ns, &name, &policy);
    match result {
        Some(still) => Ok((200, present(t, still), vec![])),
        None => {
            if t.rt.builtin {
                let uid = old.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
                Ok((200, success_status(t.g(), t.p(), &name, uid), vec![]))
            } else {
                Ok((200, present(t, old), vec![]))
            }
        }
    }
}

fn delete_collection(app: &App, t: &Target, req: &Req) -> Out {
    let (ls, fs) = selectors(t, req)?;
    let mut st = app.lock();
    let keys: Vec<(String, String)> = st
        .objects
        .get(&(t.sg().to_string(), t.p().to_string()))
        .map(|m| {
            m.iter()
                .filter(|((ns, _), o)| t.ns.as_ref().is_none_or(|w| w == ns) && ls.matches(o) && fs.matches(o))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut items = vec![];
    for (ns, name) in keys {
        if let Some(o) = st.get(t.sg(), t.p(), &ns, &name).cloned() {
            items.push(present(t, o));
        }
        delete_locked(&mut st, t.sg(), t.p(), &ns, &name, "Background");
    }
    Ok((
        200,
        json!({"apiVersion": t.api_version(), "kind": t.rt.list_kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        vec![],
    ))
}

/// Deletes one object: with finalizers it is marked (deletionTimestamp) and kept; otherwise it
/// is removed, then dependents are garbage-collected. Returns the object if it remains.
pub fn delete_locked(st: &mut Store, g: &str, p: &str, ns: &str, name: &str, policy: &str) -> Option<Value> {
    let old = st.get(g, p, ns, name)?.clone();
    let is_ns = g.is_empty() && p == "namespaces";
    let is_crd = g == "apiextensions.k8s.io" && p == "customresourcedefinitions";
    let has_finalizers = old
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if is_ns || is_crd || has_finalizers {
        let mut new = old.clone();
        let fresh = old.pointer("/metadata/deletionTimestamp").is_none();
        if fresh {
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            if let Some(gen) = old.pointer("/metadata/generation").and_then(Value::as_i64) {
                new["metadata"]["generation"] = json!(gen + 1);
            }
            if is_ns {
                new["status"] = json!({"phase": "Terminating"});
            }
            if is_crd {
                new["status"]["conditions"] = json!([{"type": "Terminating", "status": "True", "lastTransitionTime": now(), "reason": "InstanceDeletionInProgress", "message": "CustomResource deletion is in progress"}]);
            }
            let rv = st.next_rv();
            new["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.put(g, p, ns, name, new.clone());
            st.emit(g, p, ns, "MODIFIED", new.clone(), Some(old.clone()));
        }
        if is_ns && fresh {
            let keys: Vec<(String, String, String)> = st
                .objects
                .iter()
                .flat_map(|((tg, tp), m)| {
                    m.keys()
                        .filter(|(ons, _)| ons == name)
                        .map(move |(_, n)| (tg.clone(), tp.clone(), n.clone()))
                })
                .collect();
            for (tg, tp, n) in keys {
                delete_locked(st, &tg, &tp, name, &n, "Background");
            }
            return finish_container(st, g, p, name);
        }
        if is_crd && fresh {
            if let Some((cg, cp)) = crd_type_key(&old) {
                let keys: Vec<(String, String)> = st
                    .objects
                    .get(&(cg.clone(), cp.clone()))
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for (ons, n) in keys {
                    delete_locked(st, &cg, &cp, &ons, &n, "Background");
                }
            }
            return finish_container(st, g, p, name);
        }
        return st.get(g, p, ns, name).cloned();
    }
    let mut gone = old.clone();
    st.take(g, p, ns, name);
    let rv = st.next_rv();
    gone["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.emit(g, p, ns, "DELETED", gone.clone(), Some(old));
    after_removal(st, g, p, ns, &gone, policy);
    None
}

fn crd_type_key(crd: &Value) -> Option<(String, String)> {
    Some((
        crd.pointer("/spec/group")?.as_str()?.to_string(),
        crd.pointer("/spec/names/plural")?.as_str()?.to_string(),
    ))
}

/// Removes a terminating namespace or CRD once nothing is left inside it.
fn finish_container(st: &mut Store, g: &str, p: &str, name: &str) -> Option<Value> {
    let obj = st.get(g, p, "", name)?.clone();
    obj.pointer("/metadata/deletionTimestamp")?;
    let empty = if p == "namespaces" {
        !st.objects.values().any(|m| m.keys().any(|(ns, _)| ns == name))
    } else {
        crd_type_key(&obj).is_none_or(|k| st.objects.get(&k).is_none_or(|m| m.is_empty()))
    };
    if !empty {
        return Some(obj);
    }
    st.take(g, p, "", name);
    let rv = st.next_rv();
    let mut gone = obj.clone();
    gone["metadata"]["resourceVersion"] = json!(rv.to_string());
    if p == "customresourcedefinitions" {
        if let Some(k) = crd_type_key(&obj) {
            if st.types.get(&k).is_some_and(|t| !t.builtin) {
                st.types.remove(&k);
            }
            st.objects.remove(&k);
        }
    }
    st.emit(g, p, "", "DELETED", gone, Some(obj));
    None
}

/// Garbage collection and container bookkeeping after an object is gone.
fn after_removal(st: &mut Store, g: &str, p: &str, ns: &str, gone: &Value, policy: &str) {
    let uid = gone
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !uid.is_empty() {
        let mut deps = vec![];
        for ((tg, tp), m) in st.objects.iter() {
            for ((ons, n), o) in m.iter() {
                let owners = o.pointer("/metadata/ownerReferences").and_then(Value::as_array);
                if owners.is_some_and(|a| {
                    a.iter()
                        .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid.as_str()))
                }) {
                    deps.push((tg.clone(), tp.clone(), ons.clone(), n.clone()));
                }
            }
        }
        for (tg, tp, ons, n) in deps {
            let Some(o) = st.get(&tg, &tp, &ons, &n).cloned() else {
                continue;
            };
            if policy == "Orphan" {
                let mut new = o.clone();
                if let Some(a) = new
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    a.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                }
                normalize_meta(&mut new, &mut vec![]);
                let rv = st.next_rv();
                new["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.put(&tg, &tp, &ons, &n, new.clone());
                st.emit(&tg, &tp, &ons, "MODIFIED", new, Some(o));
                continue;
            }
            let other_owner_alive = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.get("uid").and_then(Value::as_str))
                        .filter(|u| *u != uid)
                        .any(|u| uid_exists(st, u))
                })
                .unwrap_or(false);
            if !other_owner_alive {
                delete_locked(st, &tg, &tp, &ons, &n, "Background");
            }
        }
    }
    if !ns.is_empty() {
        finish_container(st, "", "namespaces", ns);
    }
    let _ = (g, p);
    // A CR gone: its CRD may be waiting for it.
    let crds: Vec<String> = st
        .objects
        .get(&(
            "apiextensions.k8s.io".to_string(),
            "customresourcedefinitions".to_string(),
        ))
        .map(|m| {
            m.values()
                .filter(|c| {
                    c.pointer("/metadata/deletionTimestamp").is_some()
                        && crd_type_key(c).is_some_and(|(cg, cp)| cg == g && cp == p)
                })
                .filter_map(|c| c.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for c in crds {
        finish_container(st, "apiextensions.k8s.io", "customresourcedefinitions", &c);
    }
}

fn uid_exists(st: &Store, uid: &str) -> bool {
    st.objects.values().any(|m| {
        m.values()
            .any(|o| o.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid))
    })
}

// ---------------------------------------------------------------------------------------------
// watch

fn watch_line(etype: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": etype, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(t: &Target, rv: u64, initial_end: bool) -> Value {
    let mut md = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": t.rt.kind, "apiVersion": t.api_version(), "metadata": md})
}

struct WatchFilter {
    t: Target,
    ls: LabelSelector,
    fs: FieldSelector,
    /// `Some(includeObject)` when the client asked for Table events (`kubectl get -w`).
    table: Option<String>,
    /// PartialObjectMetadata events (kube-rs `metadata_watcher`).
    partial: bool,
}

impl WatchFilter {
    /// The object sent for an ADDED/MODIFIED/DELETED event.
    fn render(&self, obj: Value) -> Value {
        match &self.table {
            Some(include) => {
                let meta =
                    json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
                table::table(&self.t.rt, &self.t.version, &[obj], meta, include)
            }
            None if self.partial => partial(&obj),
            None => obj,
        }
    }
    fn matches(&self, o: &Value) -> bool {
        self.ls.matches(o) && self.fs.matches(o)
    }
    /// The event this watcher sees for a store event, if any (selector transitions become ADDED/DELETED).
    fn convert(&self, ev: &WatchEvent) -> Option<(&'static str, Value)> {
        if ev.group != self.t.sg() || ev.plural != self.t.rt.plural {
            return None;
        }
        if let Some(ns) = &self.t.ns {
            if *ns != ev.namespace {
                return None;
            }
        }
        let cur = self.matches(&ev.object);
        let prev = ev.prev.as_ref().map(|p| self.matches(p)).unwrap_or(false);
        let et = match ev.etype {
            "MODIFIED" => match (prev, cur) {
                (true, true) => "MODIFIED",
                (false, true) => "ADDED",
                (true, false) => "DELETED",
                _ => return None,
            },
            "DELETED" => {
                if !(cur || prev) {
                    return None;
                }
                "DELETED"
            }
            other => {
                if !cur {
                    return None;
                }
                other
            }
        };
        Some((et, self.render(present(&self.t, ev.object.clone()))))
    }
}

async fn watch(app: Arc<App>, mut t: Target, req: &Req) -> Response<Body> {
    let (ls, fs) = match selectors(&t, req) {
        Ok(x) => x,
        Err(e) => return err_resp(&e),
    };
    let fs = match &t.name {
        Some(n) => match FieldSelector::parse(&format!("metadata.name={n}"), &[]) {
            Ok(f) => f,
            Err(_) => fs,
        },
        None => fs,
    };
    t.name = None;
    let send_initial = req.flag("sendInitialEvents");
    if send_initial && req.q("resourceVersionMatch") != Some("NotOlderThan") {
        return err_resp(&ApiError::invalid(
            t.g(),
            "ListOptions",
            "",
            vec![Cause::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )],
        ));
    }
    let bookmarks = req.flag("allowWatchBookmarks");
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(1800);
    let rv_param = req.q("resourceVersion").unwrap_or("").to_string();
    let table = if wants_table(req) {
        Some(req.q("includeObject").unwrap_or("Metadata").to_string())
    } else {
        None
    };
    let filter = WatchFilter {
        t: t.clone(),
        ls,
        fs,
        table,
        partial: wants_partial(req),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let (mut sub, backlog, start_rv, mut close_rx, expired) = {
        let st = app.lock();
        let sub = st.tx.subscribe();
        let close_rx = st.close_tx.subscribe();
        let mut backlog: Vec<Bytes> = vec![];
        let mut expired = None;
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            if let Some(m) = st.objects.get(&(t.sg().to_string(), t.p().to_string())) {
                for ((ns, _), o) in m.iter() {
                    if t.ns.as_ref().is_some_and(|w| w != ns) || !filter.matches(o) {
                        continue;
                    }
                    backlog.push(watch_line("ADDED", &filter.render(present(&t, o.clone()))));
                }
            }
            if send_initial {
                backlog.push(watch_line("BOOKMARK", &bookmark(&t, st.rv, true)));
            }
        } else {
            match rv_param.parse::<u64>() {
                Ok(r) if r >= st.min_watch_rv => {
                    for ev in st.history.iter().filter(|e| e.rv > r) {
                        if let Some((et, o)) = filter.convert(ev) {
                            backlog.push(watch_line(et, &o));
                        }
                    }
                }
                Ok(r) => {
                    expired = Some(ApiError::expired(format!(
                        "too old resource version: {r} ({})",
                        st.min_watch_rv
                    )));
                }
                Err(_) => {
                    drop(st);
                    return err_resp(&ApiError::bad_request(format!("invalid resource version: {rv_param}")));
                }
            }
        }
        (sub, backlog, st.rv, close_rx, expired)
    };
    let bookmark_every = app.bookmark_interval;
    tokio::spawn(async move {
        if let Some(e) = expired {
            let _ = tx.send(watch_line("ERROR", &e.to_status())).await;
            return;
        }
        for b in backlog {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        let mut seen = start_rv;
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = close_rx.changed() => break,
                _ = tx.closed() => break,
                _ = tick.tick(), if bookmarks => {
                    if tx.send(watch_line("BOOKMARK", &bookmark(&filter.t, seen, false))).await.is_err() { break; }
                }
                ev = sub.recv() => {
                    match ev {
                        Ok(ev) => {
                            if ev.rv <= seen { continue; }
                            seen = ev.rv;
                            if let Some((et, o)) = filter.convert(&ev) {
                                if tx.send(watch_line(et, &o)).await.is_err() { break; }
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = Body::from_stream(futures::StreamExt::map(stream, Ok::<Bytes, std::convert::Infallible>));
    json_body(body)
}
