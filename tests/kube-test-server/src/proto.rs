//! A table-driven decoder for Kubernetes protobuf request bodies. client-go's typed clients
//! (`kubectl create <generator>`, helm's release storage, `--create-namespace`) send protobuf
//! for built-in kinds whatever the server prefers, so this decodes the messages those clients
//! write. Responses are always JSON, which every client accepts. Fields that this table does
//! not know make the request fail with 415 rather than silently lose data.

use serde_json::{json, Map, Value};

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, String> {
    let bad = || "malformed protobuf".to_string();
    let mut pos = 0;
    let mut out = vec![];
    while pos < buf.len() {
        let key = varint(buf, &mut pos).ok_or_else(bad)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(buf, &mut pos).ok_or_else(bad)?),
            1 => {
                pos += 8;
                Wire::Fixed
            }
            5 => {
                pos += 4;
                Wire::Fixed
            }
            2 => {
                let len = varint(buf, &mut pos).ok_or_else(bad)? as usize;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len()).ok_or_else(bad)?;
                let b = &buf[pos..end];
                pos = end;
                Wire::Bytes(b)
            }
            _ => return Err(bad()),
        };
        out.push((key >> 3, wire));
    }
    Ok(out)
}

/// How a field is encoded and shown in JSON.
#[derive(Clone, Copy)]
enum K {
    /// string (empty strings omitted)
    S,
    /// integer (zero omitted)
    I,
    /// integer kept even when zero (a pointer field in Go)
    Ip,
    /// bool (false omitted)
    B,
    /// bool kept even when false
    Bp,
    /// message
    M(&'static str),
    /// embedded message whose fields are inlined into the parent
    E(&'static str),
    /// repeated string
    Rs,
    /// repeated message
    Rm(&'static str),
    /// map<string,string>
    Mss,
    /// map<string,bytes> (base64 in JSON)
    Msb,
    /// map<string,Quantity>
    Msq,
    /// IntOrString
    Ios,
    /// skipped (status and other server-written parts)
    Skip,
}

use K::*;

fn table(msg: &str) -> Option<&'static [(u64, &'static str, K)]> {
    Some(match msg {
        "ObjectMeta" => &[
            (1, "name", S),
            (2, "generateName", S),
            (3, "namespace", S),
            (4, "selfLink", Skip),
            (5, "uid", S),
            (6, "resourceVersion", S),
            (7, "generation", I),
            (8, "creationTimestamp", Skip),
            (9, "deletionTimestamp", Skip),
            (10, "deletionGracePeriodSeconds", Skip),
            (11, "labels", Mss),
            (12, "annotations", Mss),
            (13, "ownerReferences", Rm("OwnerReference")),
            (14, "finalizers", Rs),
            (17, "managedFields", Skip),
        ],
        "OwnerReference" => &[
            (1, "kind", S),
            (3, "name", S),
            (4, "uid", S),
            (5, "apiVersion", S),
            (6, "controller", Bp),
            (7, "blockOwnerDeletion", Bp),
        ],
        "Secret" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "data", Msb),
            (3, "type", S),
            (4, "stringData", Mss),
            (5, "immutable", Bp),
        ],
        "ConfigMap" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "data", Mss),
            (3, "binaryData", Msb),
            (4, "immutable", Bp),
        ],
        "Namespace" => &[(1, "metadata", M("ObjectMeta")), (2, "spec", Skip), (3, "status", Skip)],
        "ServiceAccount" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "secrets", Rm("ObjectReference")),
            (3, "imagePullSecrets", Rm("LocalObjectReference")),
            (4, "automountServiceAccountToken", Bp),
        ],
        "ObjectReference" => &[
            (1, "kind", S),
            (2, "namespace", S),
            (3, "name", S),
            (4, "uid", S),
            (5, "apiVersion", S),
            (6, "resourceVersion", S),
            (7, "fieldPath", S),
        ],
        "LocalObjectReference" => &[(1, "name", S)],
        "LabelSelector" => &[
            (1, "matchLabels", Mss),
            (2, "matchExpressions", Rm("LabelSelectorRequirement")),
        ],
        "LabelSelectorRequirement" => &[(1, "key", S), (2, "operator", S), (3, "values", Rs)],
        "Deployment" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "spec", M("DeploymentSpec")),
            (3, "status", Skip),
        ],
        "DeploymentSpec" => &[
            (1, "replicas", Ip),
            (2, "selector", M("LabelSelector")),
            (3, "template", M("PodTemplateSpec")),
            (4, "strategy", M("DeploymentStrategy")),
            (5, "minReadySeconds", I),
            (6, "revisionHistoryLimit", Ip),
            (7, "paused", B),
            (9, "progressDeadlineSeconds", Ip),
        ],
        "DeploymentStrategy" => &[(1, "type", S), (2, "rollingUpdate", M("RollingUpdateDeployment"))],
        "RollingUpdateDeployment" => &[(1, "maxUnavailable", Ios), (2, "maxSurge", Ios)],
        "PodTemplateSpec" => &[(1, "metadata", M("ObjectMeta")), (2, "spec", M("PodSpec"))],
        "PodSpec" => &[
            (2, "containers", Rm("Container")),
            (3, "restartPolicy", S),
            (4, "terminationGracePeriodSeconds", Ip),
            (5, "activeDeadlineSeconds", Ip),
            (6, "dnsPolicy", S),
            (7, "nodeSelector", Mss),
            (8, "serviceAccountName", S),
            (9, "serviceAccount", S),
            (10, "nodeName", S),
            (11, "hostNetwork", B),
            (12, "hostPID", B),
            (13, "hostIPC", B),
            (14, "securityContext", M("Opaque")),
            (15, "imagePullSecrets", Rm("LocalObjectReference")),
            (16, "hostname", S),
            (17, "subdomain", S),
            (19, "schedulerName", S),
            (20, "initContainers", Rm("Container")),
            (21, "automountServiceAccountToken", Bp),
            (24, "priorityClassName", S),
            (25, "priority", Ip),
            (30, "enableServiceLinks", Bp),
            (35, "setHostnameAsFQDN", Bp),
        ],
        "Container" => &[
            (1, "name", S),
            (2, "image", S),
            (3, "command", Rs),
            (4, "args", Rs),
            (5, "workingDir", S),
            (6, "ports", Rm("ContainerPort")),
            (7, "env", Rm("EnvVar")),
            (8, "resources", M("ResourceRequirements")),
            (13, "terminationMessagePath", S),
            (14, "imagePullPolicy", S),
            (16, "stdin", B),
            (17, "stdinOnce", B),
            (18, "tty", B),
            (20, "terminationMessagePolicy", S),
        ],
        "ContainerPort" => &[
            (1, "name", S),
            (2, "hostPort", I),
            (3, "containerPort", I),
            (4, "protocol", S),
            (5, "hostIP", S),
        ],
        "EnvVar" => &[(1, "name", S), (2, "value", S), (3, "valueFrom", M("EnvVarSource"))],
        "EnvVarSource" => &[
            (1, "fieldRef", M("ObjectFieldSelector")),
            (3, "configMapKeyRef", M("KeySelector")),
            (4, "secretKeyRef", M("KeySelector")),
        ],
        "ObjectFieldSelector" => &[(1, "apiVersion", S), (2, "fieldPath", S)],
        "KeySelector" => &[(1, "", E("LocalObjectReference")), (2, "key", S), (3, "optional", Bp)],
        "ResourceRequirements" => &[(1, "limits", Msq), (2, "requests", Msq)],
        "Job" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "spec", M("JobSpec")),
            (3, "status", Skip),
        ],
        "JobSpec" => &[
            (1, "parallelism", Ip),
            (2, "completions", Ip),
            (3, "activeDeadlineSeconds", Ip),
            (4, "selector", M("LabelSelector")),
            (5, "manualSelector", Bp),
            (6, "template", M("PodTemplateSpec")),
            (7, "backoffLimit", Ip),
            (8, "ttlSecondsAfterFinished", Ip),
            (9, "completionMode", S),
            (10, "suspend", Bp),
            (14, "podReplacementPolicy", S),
            (15, "managedBy", S),
        ],
        "CronJob" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "spec", M("CronJobSpec")),
            (3, "status", Skip),
        ],
        "CronJobSpec" => &[
            (1, "schedule", S),
            (2, "startingDeadlineSeconds", Ip),
            (3, "concurrencyPolicy", S),
            (4, "suspend", Bp),
            (5, "jobTemplate", M("JobTemplateSpec")),
            (6, "successfulJobsHistoryLimit", Ip),
            (7, "failedJobsHistoryLimit", Ip),
            (8, "timeZone", S),
        ],
        "JobTemplateSpec" => &[(1, "metadata", M("ObjectMeta")), (2, "spec", M("JobSpec"))],
        "Service" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "spec", M("ServiceSpec")),
            (3, "status", Skip),
        ],
        "ServiceSpec" => &[
            (1, "ports", Rm("ServicePort")),
            (2, "selector", Mss),
            (3, "clusterIP", S),
            (4, "type", S),
            (5, "externalIPs", Rs),
            (7, "sessionAffinity", S),
            (8, "loadBalancerIP", S),
            (9, "loadBalancerSourceRanges", Rs),
            (10, "externalName", S),
            (11, "externalTrafficPolicy", S),
            (12, "healthCheckNodePort", I),
            (13, "publishNotReadyAddresses", B),
            (14, "sessionAffinityConfig", M("Opaque")),
            (17, "ipFamilyPolicy", S),
            (18, "clusterIPs", Rs),
            (19, "ipFamilies", Rs),
            (20, "allocateLoadBalancerNodePorts", Bp),
            (21, "loadBalancerClass", S),
            (22, "internalTrafficPolicy", S),
            (23, "trafficDistribution", S),
        ],
        "ServicePort" => &[
            (1, "name", S),
            (2, "protocol", S),
            (3, "port", I),
            (4, "targetPort", Ios),
            (5, "nodePort", I),
            (6, "appProtocol", S),
        ],
        "Role" | "ClusterRole" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "rules", Rm("PolicyRule")),
            (3, "aggregationRule", Skip),
        ],
        "PolicyRule" => &[
            (1, "verbs", Rs),
            (2, "apiGroups", Rs),
            (3, "resources", Rs),
            (4, "resourceNames", Rs),
            (5, "nonResourceURLs", Rs),
        ],
        "RoleBinding" | "ClusterRoleBinding" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "subjects", Rm("Subject")),
            (3, "roleRef", M("RoleRef")),
        ],
        "Subject" => &[(1, "kind", S), (2, "apiGroup", S), (3, "name", S), (4, "namespace", S)],
        "RoleRef" => &[(1, "apiGroup", S), (2, "kind", S), (3, "name", S)],
        "PodDisruptionBudget" => &[
            (1, "metadata", M("ObjectMeta")),
            (2, "spec", M("PodDisruptionBudgetSpec")),
            (3, "status", Skip),
        ],
        "PodDisruptionBudgetSpec" => &[
            (1, "minAvailable", Ios),
            (2, "selector", M("LabelSelector")),
            (3, "maxUnavailable", Ios),
            (4, "unhealthyPodEvictionPolicy", S),
        ],
        _ => return None,
    })
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn entry(b: &[u8]) -> Result<(String, &[u8]), String> {
    let mut k = String::new();
    let mut v: &[u8] = &[];
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => k = s(x),
            (2, Wire::Bytes(x)) => v = x,
            _ => {}
        }
    }
    Ok((k, v))
}

fn quantity(b: &[u8]) -> Result<Value, String> {
    for (n, w) in fields(b)? {
        if let (1, Wire::Bytes(x)) = (n, w) {
            return Ok(json!(s(x)));
        }
    }
    Ok(json!("0"))
}

fn int_or_string(b: &[u8]) -> Result<Value, String> {
    let (mut ty, mut i, mut st) = (0, 0i64, String::new());
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Varint(v)) => ty = v,
            (2, Wire::Varint(v)) => i = v as i32 as i64,
            (3, Wire::Bytes(x)) => st = s(x),
            _ => {}
        }
    }
    Ok(if ty == 1 { json!(st) } else { json!(i) })
}

fn message(name: &str, buf: &[u8]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    if name == "Opaque" {
        return Ok(out);
    }
    let t = table(name).ok_or_else(|| format!("protobuf message {name} is not supported; send JSON"))?;
    for (n, w) in fields(buf)? {
        let Some((_, key, kind)) = t.iter().find(|(num, _, _)| *num == n) else {
            return Err(format!(
                "protobuf field {n} of {name} is not supported by this test server; send JSON"
            ));
        };
        let key = key.to_string();
        match (*kind, w) {
            (Skip, _) => {}
            (S, Wire::Bytes(x)) => {
                if !x.is_empty() {
                    out.insert(key, json!(s(x)));
                }
            }
            (I, Wire::Varint(v)) => {
                if v != 0 {
                    out.insert(key, json!(v as i64));
                }
            }
            (Ip, Wire::Varint(v)) => {
                out.insert(key, json!(v as i64));
            }
            (B, Wire::Varint(v)) => {
                if v != 0 {
                    out.insert(key, json!(true));
                }
            }
            (Bp, Wire::Varint(v)) => {
                out.insert(key, json!(v != 0));
            }
            (M(m), Wire::Bytes(x)) => {
                let sub = message(m, x)?;
                if !sub.is_empty() || m == "Opaque" || m == "ResourceRequirements" {
                    out.insert(key, Value::Object(sub));
                }
            }
            (E(m), Wire::Bytes(x)) => {
                for (k, v) in message(m, x)? {
                    out.insert(k, v);
                }
            }
            (Rs, Wire::Bytes(x)) => {
                if let Value::Array(a) = out.entry(key).or_insert_with(|| json!([])) {
                    a.push(json!(s(x)));
                }
            }
            (Rm(m), Wire::Bytes(x)) => {
                let sub = Value::Object(message(m, x)?);
                if let Value::Array(a) = out.entry(key).or_insert_with(|| json!([])) {
                    a.push(sub);
                }
            }
            (Mss | Msb | Msq, Wire::Bytes(x)) => {
                let (k, v) = entry(x)?;
                let v = match kind {
                    Mss => json!(s(v)),
                    Msb => json!(b64(v)),
                    _ => quantity(v)?,
                };
                if let Value::Object(m) = out.entry(key).or_insert_with(|| json!({})) {
                    m.insert(k, v);
                }
            }
            (Ios, Wire::Bytes(x)) => {
                out.insert(key, int_or_string(x)?);
            }
            (_, Wire::Fixed) | (_, _) => return Err(format!("unexpected wire type for field {n} of {name}")),
        }
    }
    Ok(out)
}

/// Decodes a `k8s\0`-prefixed protobuf body (a `runtime.Unknown` envelope) into JSON.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body.strip_prefix(b"k8s\x00").ok_or("missing protobuf magic prefix")?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (n, w) in fields(rest)? {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (tn, tw) in fields(tm)? {
                    match (tn, tw) {
                        (1, Wire::Bytes(x)) => api_version = s(x),
                        (2, Wire::Bytes(x)) => kind = s(x),
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = message(&kind, raw)?;
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}
