//! Defaulting for the built-in kinds an operator typically writes, following the real
//! `SetDefaults_*` functions for the fields that show up in practice, so that "desired vs
//! observed" comparisons meet the same server-filled fields as on a real cluster.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};

fn set(obj: &mut Value, key: &str, v: Value) {
    if let Some(o) = obj.as_object_mut() {
        if o.get(key).is_none_or(Value::is_null) {
            o.insert(key.to_string(), v);
        }
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn container(c: &mut Value) {
    set(c, "terminationMessagePath", json!("/dev/termination-log"));
    set(c, "terminationMessagePolicy", json!("File"));
    let policy = image_pull_policy(c.get("image").and_then(Value::as_str).unwrap_or(""));
    set(c, "imagePullPolicy", json!(policy));
    set(c, "resources", json!({}));
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set(p, "protocol", json!("TCP"));
        }
    }
}

fn pod_spec(spec: &mut Value, restart: &str) {
    set(spec, "restartPolicy", json!(restart));
    set(spec, "terminationGracePeriodSeconds", json!(30));
    set(spec, "dnsPolicy", json!("ClusterFirst"));
    set(spec, "securityContext", json!({}));
    set(spec, "schedulerName", json!("default-scheduler"));
    for key in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(key).and_then(Value::as_array_mut) {
            for c in cs {
                container(c);
            }
        }
    }
    if let Some(vols) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols {
            for src in ["secret", "configMap"] {
                if let Some(s) = v.get_mut(src) {
                    set(s, "defaultMode", json!(420));
                }
            }
        }
    }
}

fn template(t: Option<&mut Value>, restart: &str) {
    if let Some(t) = t {
        if let Some(spec) = t.get_mut("spec") {
            pod_spec(spec, restart);
        }
    }
}

static NEXT_IP: AtomicU32 = AtomicU32::new(1);

/// Applies built-in defaults in place (no-op for kinds without any here).
pub fn apply(group: &str, plural: &str, obj: &mut Value) {
    match (group, plural) {
        ("apps", "deployments") => {
            let Some(spec) = obj.get_mut("spec") else {
                return;
            };
            set(spec, "replicas", json!(1));
            set(
                spec,
                "strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
            );
            set(spec, "revisionHistoryLimit", json!(10));
            set(spec, "progressDeadlineSeconds", json!(600));
            template(spec.get_mut("template"), "Always");
        }
        ("batch", "jobs") => {
            let Some(spec) = obj.get_mut("spec") else {
                return;
            };
            set(spec, "parallelism", json!(1));
            set(spec, "completions", json!(1));
            set(spec, "backoffLimit", json!(6));
            set(spec, "completionMode", json!("NonIndexed"));
            set(spec, "suspend", json!(false));
            set(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
            template(spec.get_mut("template"), "Always");
        }
        ("batch", "cronjobs") => {
            let Some(spec) = obj.get_mut("spec") else {
                return;
            };
            set(spec, "concurrencyPolicy", json!("Allow"));
            set(spec, "suspend", json!(false));
            set(spec, "successfulJobsHistoryLimit", json!(3));
            set(spec, "failedJobsHistoryLimit", json!(1));
            if let Some(jt) = spec.get_mut("jobTemplate").and_then(|j| j.get_mut("spec")) {
                template(jt.get_mut("template"), "Always");
            }
        }
        ("", "services") => {
            let Some(spec) = obj.get_mut("spec") else {
                return;
            };
            set(spec, "type", json!("ClusterIP"));
            set(spec, "sessionAffinity", json!("None"));
            let external_name = spec.get("type").and_then(Value::as_str) == Some("ExternalName");
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    set(p, "protocol", json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        set(p, "targetPort", port);
                    }
                }
            }
            if !external_name {
                if spec
                    .get("clusterIP")
                    .is_none_or(|c| c.as_str().is_none_or(str::is_empty))
                {
                    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
                    spec["clusterIP"] = json!(format!("10.96.{}.{}", (n / 250) % 256, n % 250 + 1));
                }
                let ip = spec["clusterIP"].clone();
                set(spec, "clusterIPs", json!([ip]));
                set(spec, "ipFamilies", json!(["IPv4"]));
                set(spec, "ipFamilyPolicy", json!("SingleStack"));
                set(spec, "internalTrafficPolicy", json!("Cluster"));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cronjob_defaults() {
        let mut o = json!({"spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "b", "image": "busybox"}]}}}}}});
        apply("batch", "cronjobs", &mut o);
        assert_eq!(o["spec"]["suspend"], json!(false));
        let c = &o["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], json!("Always"));
        assert_eq!(
            o["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"],
            json!("Never")
        );
        assert_eq!(
            o["spec"]["jobTemplate"]["spec"]["template"]["spec"]["dnsPolicy"],
            json!("ClusterFirst")
        );
    }
}
