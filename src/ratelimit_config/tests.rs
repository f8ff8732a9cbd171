//! Renderer tests: golden files, order, the envoyproxy/ratelimit schema,
//! 10,000 tenants and byte-stable re-rendering.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::api::{RateLimitsSpec, TenantSpec};

fn tenant(name: &str, state: TenantState, limits: RateLimitsSpec) -> Tenant {
    // Every other field at its default, as a manifest that omits it gets.
    let mut spec: TenantSpec =
        serde_json::from_value(serde_json::json!({})).expect("an empty spec takes every default");
    spec.state = state;
    spec.rate_limits = limits;
    Tenant::new(name, spec)
}

fn limit(n: u32, unit: RateLimitUnit, shadow: bool) -> RateLimit {
    RateLimit {
        requests_per_unit: n,
        unit,
        shadow_mode: shadow,
    }
}

/// Active with defaults, suspended (its shadow mode is dropped: a suspended
/// tenant is refused, not just counted), shadow mode, a minute unit, a name
/// YAML would read as a number, and one being deleted; given out of order.
fn sample() -> Vec<Tenant> {
    let mut deleting = tenant("gone", TenantState::Active, RateLimitsSpec::default());
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    vec![
        tenant(
            "delta",
            TenantState::Active,
            RateLimitsSpec {
                api: limit(5000, RateLimitUnit::Minute, false),
                webhook: limit(10, RateLimitUnit::Hour, false),
            },
        ),
        tenant("acme", TenantState::Active, RateLimitsSpec::default()),
        deleting,
        tenant(
            "beta",
            TenantState::Suspended,
            RateLimitsSpec {
                api: limit(100, RateLimitUnit::Second, true),
                webhook: limit(7, RateLimitUnit::Day, false),
            },
        ),
        tenant(
            "gamma",
            TenantState::Active,
            RateLimitsSpec {
                api: limit(250, RateLimitUnit::Second, true),
                webhook: limit(20, RateLimitUnit::Second, false),
            },
        ),
        tenant("123", TenantState::Active, RateLimitsSpec::default()),
    ]
}

fn golden(file: &str, actual: &str) {
    let path = format!("{}/tests/golden/ratelimits/{file}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (UPDATE_GOLDEN=1 writes it)"));
    assert_eq!(
        actual, want,
        "{file} differs from the golden file (UPDATE_GOLDEN=1 rewrites it after review)"
    );
}

#[test]
fn golden_files_for_active_suspended_shadow_and_minute_tenants() {
    let cfg = RenderSettings::default();
    let shards = render(&cfg, &entries(&sample())).unwrap();
    assert_eq!(shards.len(), 1);
    assert_eq!(shards[0].name, "tenant-ratelimits");
    assert_eq!(shards[0].data.keys().collect::<Vec<_>>(), ["api.yaml", "webhook.yaml"]);
    golden("api.yaml", &shards[0].data["api.yaml"]);
    golden("webhook.yaml", &shards[0].data["webhook.yaml"]);
}

#[test]
fn order_is_by_tenant_name_whatever_the_input_order() {
    let cfg = RenderSettings::default();
    let mut ts = sample();
    let a = render(&cfg, &entries(&ts)).unwrap();
    ts.reverse();
    let b = render(&cfg, &entries(&ts)).unwrap();
    assert_eq!(a, b);
    let root = schema::parse(&a[0].data["api.yaml"]).unwrap();
    let values: Vec<_> = root.descriptors.iter().map(|d| d.value.clone().unwrap()).collect();
    assert_eq!(
        values,
        ["123", "acme", "beta", "delta", "gamma"],
        "sorted, and the tenant being deleted has no entry"
    );
}

#[test]
fn output_parses_as_envoy_ratelimit_config_and_says_what_the_specs_say() {
    let cfg = RenderSettings {
        api_domain: "edge".into(),
        webhook_domain: "hooks".into(),
        descriptor_key: "tenant".into(),
        ..Default::default()
    };
    let shards = render(&cfg, &entries(&sample())).unwrap();
    let units = BTreeSet::from(["second", "minute", "hour", "day"]);
    for (file, content) in &shards[0].data {
        let root = schema::parse(content)
            .unwrap_or_else(|e| panic!("{file} is not valid envoyproxy/ratelimit config: {e}\n{content}"));
        assert_eq!(root.domain, if file.starts_with("api") { "edge" } else { "hooks" });
        for d in &root.descriptors {
            assert_eq!(d.key, "tenant");
            assert!(d.descriptors.is_empty());
            let rl = d.rate_limit.as_ref().expect("every descriptor has a limit");
            assert!(units.contains(rl.unit.as_deref().unwrap()), "unit {:?}", rl.unit);
            assert!(!rl.unlimited);
        }
    }
    let api = schema::parse(&shards[0].data["api.yaml"]).unwrap();
    let find = |root: &schema::Root, t: &str| {
        root.descriptors
            .iter()
            .find(|d| d.value.as_deref() == Some(t))
            .cloned()
            .unwrap()
    };
    let beta = find(&api, "beta");
    assert_eq!(
        beta.rate_limit.unwrap().requests_per_unit,
        0,
        "a suspended tenant gets 0"
    );
    assert!(!beta.shadow_mode, "a suspended tenant's 0 is enforced, not shadowed");
    assert!(find(&api, "gamma").shadow_mode);
    assert_eq!(find(&api, "delta").rate_limit.unwrap().unit.as_deref(), Some("minute"));
    assert_eq!(find(&api, "acme").rate_limit.unwrap().requests_per_unit, 100);
    let hooks = schema::parse(&shards[0].data["webhook.yaml"]).unwrap();
    assert_eq!(find(&hooks, "acme").rate_limit.unwrap().requests_per_unit, 20);
    assert_eq!(
        find(&hooks, "123").value.as_deref(),
        Some("123"),
        "a numeric name stays a string"
    );
}

#[test]
fn a_stray_field_fails_the_schema_check() {
    let bad =
        "domain: x\ndescriptors:\n- {key: k, value: v, rate_limit: {unit: second, requests_per_unit: 1, burst: 2}}\n";
    assert!(
        schema::parse(bad).is_err(),
        "deny_unknown_fields must reject what envoyproxy/ratelimit rejects"
    );
}

#[test]
fn no_tenants_still_declares_both_domains() {
    let shards = render(&RenderSettings::default(), &[]).unwrap();
    assert_eq!(shards.len(), 1);
    for content in shards[0].data.values() {
        assert!(schema::parse(content).unwrap().descriptors.is_empty());
    }
}

#[test]
fn read_back_gives_what_was_rendered() {
    let cfg = RenderSettings::default();
    let es = entries(&sample());
    let shards = render(&cfg, &es).unwrap();
    let files: Vec<_> = shards.iter().map(|s| &s.data).collect();
    assert_eq!(read_back(&cfg, &files), by_domain(&cfg, &es));
}

#[test]
fn ten_thousand_tenants_split_into_configmaps_under_one_mib() {
    let cfg = RenderSettings::default();
    let ts: Vec<Tenant> = (0..10_000)
        .map(|i| {
            let state = if i % 10 == 0 {
                TenantState::Suspended
            } else {
                TenantState::Active
            };
            let mut limits = RateLimitsSpec::default();
            limits.api.requests_per_unit = (i % 1000) as u32;
            tenant(&format!("customer-{i:05}-eu-west"), state, limits)
        })
        .collect();
    let start = Instant::now();
    let es = entries(&ts);
    let shards = render(&cfg, &es).unwrap();
    let took = start.elapsed();
    let sizes: Vec<usize> = shards.iter().map(Shard::size).collect();
    println!(
        "10,000 tenants: {} ConfigMaps of {sizes:?} bytes, rendered in {took:?}",
        shards.len()
    );
    const MIB: usize = 1024 * 1024;
    assert!(shards.len() > 1, "1.9 MB of descriptors cannot fit one ConfigMap");
    for s in &shards {
        assert!(
            s.size() <= cfg.budget_bytes && s.size() < MIB,
            "{} holds {} bytes",
            s.name,
            s.size()
        );
        for (f, c) in &s.data {
            assert!(c.len() < MIB, "{f} is {} bytes", c.len());
        }
    }
    let names: Vec<_> = shards.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names[0], "tenant-ratelimits");
    assert_eq!(names[1], "tenant-ratelimits-1");
    // Every tenant exactly once per domain, and no file name repeats across
    // shards (they are projected into one directory).
    let files: BTreeSet<_> = shards.iter().flat_map(|s| s.data.keys().cloned()).collect();
    assert_eq!(files.len(), 2 * shards.len());
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in &shards {
        for content in s.data.values() {
            let root = schema::parse(content).unwrap();
            for d in root.descriptors {
                *seen.entry((root.domain.clone(), d.value.unwrap())).or_default() += 1;
            }
        }
    }
    assert_eq!(seen.len(), 20_000);
    assert!(seen.values().all(|&n| n == 1));
    let files: Vec<_> = shards.iter().map(|s| &s.data).collect();
    assert_eq!(read_back(&cfg, &files), by_domain(&cfg, &es));

    // Unchanged input, identical bytes; one tenant changed, one shard changed.
    assert_eq!(render(&cfg, &entries(&ts)).unwrap(), shards);
    let mut ts2 = ts.clone();
    ts2[4242].spec.rate_limits.webhook.requests_per_unit = 999;
    let again = render(&cfg, &entries(&ts2)).unwrap();
    assert_eq!(again.len(), shards.len());
    let changed: Vec<_> = again
        .iter()
        .zip(&shards)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.name.clone())
        .collect();
    assert_eq!(
        changed,
        [shard_name(
            &cfg.configmap,
            shard_of("customer-04242-eu-west", shards.len())
        )]
    );
}

#[test]
fn more_than_the_shard_limit_is_an_error_not_a_truncation() {
    let cfg = RenderSettings {
        budget_bytes: 2048,
        ..Default::default()
    };
    let ts: Vec<Tenant> = (0..2000)
        .map(|i| tenant(&format!("t{i}"), TenantState::Active, RateLimitsSpec::default()))
        .collect();
    assert!(matches!(render(&cfg, &entries(&ts)), Err(RenderError::TooLarge { .. })));
}

#[test]
fn summary_names_both_surfaces() {
    let es = entries(&sample());
    let beta = es.iter().find(|e| e.tenant == "beta").unwrap();
    assert_eq!(beta.summary(), "api 0/second, webhook 0/day");
    let gamma = es.iter().find(|e| e.tenant == "gamma").unwrap();
    assert_eq!(gamma.summary(), "api 250/second (shadow mode), webhook 20/second");
}

#[test]
fn the_digest_of_a_rendering_changes_with_any_byte_of_it() {
    let cfg = RenderSettings::default();
    let shards = render(&cfg, &entries(&sample())).expect("renders");
    let d = digest(&shards);
    assert_eq!(
        d,
        digest(&render(&cfg, &entries(&sample())).expect("renders")),
        "same input, same digest"
    );

    // One tenant's limit changed: one byte of one file.
    let mut tenants = sample();
    tenants[0].spec.rate_limits.api.requests_per_unit += 1;
    assert_ne!(d, digest(&render(&cfg, &entries(&tenants)).expect("renders")));

    // The same bytes split differently between a file's name and its
    // content, or between two shards, are a different rendering.
    let one = |name: &str, file: &str, content: &str| Shard {
        name: name.into(),
        data: [(file.to_string(), content.to_string())].into(),
    };
    assert_ne!(
        digest(&[one("cm", "a.yaml", "xy")]),
        digest(&[one("cm", "a.yamlx", "y")])
    );
    assert_ne!(digest(&[one("cm", "a", "b")]), digest(&[one("cma", "", "b")]));
    assert_ne!(
        digest(&[one("cm", "a", "b"), one("cm-1", "c", "d")]),
        digest(&[one("cm-1", "c", "d"), one("cm", "a", "b")]),
        "shard order counts"
    );
    assert_ne!(digest(&[]), digest(&[one("cm", "", "")]));
    let mut two = one("cm", "a", "b");
    two.data.insert("c".into(), "d".into());
    assert_ne!(digest(&[two]), digest(&[one("cm", "a", "b"), one("", "c", "d")]));
}

/// The rendering of 10,000 tenants over several ConfigMaps, byte for byte
/// (its digest): the shard count chosen from the lines' lengths and the
/// lines written into their files (stop 47) give what rendering every
/// candidate gave before.
#[test]
fn ten_thousand_tenants_render_as_before_byte_for_byte() {
    let cfg = RenderSettings::default();
    let ts: Vec<Tenant> = (0..10_000)
        .map(|i| {
            let state = if i % 7 == 0 {
                TenantState::Suspended
            } else {
                TenantState::Active
            };
            let mut limits = RateLimitsSpec::default();
            limits.api.requests_per_unit = (i % 1000) as u32;
            limits.webhook.shadow_mode = i % 3 == 0;
            tenant(&format!("customer-{i:05}-eu"), state, limits)
        })
        .collect();
    let shards = render(&cfg, &entries(&ts)).unwrap();
    assert_eq!(shards.len(), 3);
    assert_eq!(
        hex::encode(digest(&shards)),
        "54ef2f94fbc263419db10c5328b61a3c54c847aa34005f8950b4ce809a5ae1d9"
    );
    // And a budget that needs more shards than the total alone suggests.
    let tight = RenderSettings {
        budget_bytes: 300 * 1024,
        ..Default::default()
    };
    let more = render(&tight, &entries(&ts)).unwrap();
    assert!(more.iter().all(|s| s.size() <= tight.budget_bytes));
    assert_eq!(
        hex::encode(digest(&more)),
        "a9f49b0d3ff19fb5198c0915e71f8f0aa45bb9d0723044009918d90e9160fb9b"
    );
    assert!(render(&tight, &entries(&ts[..1])).unwrap().len() == 1);
}

/// The sizes the shard count is chosen by (computed from the lines'
/// lengths) are the sizes of the shards then rendered, for every count: an
/// underestimate would let a ConfigMap past its budget.
#[test]
fn the_sizes_a_shard_count_is_chosen_by_are_the_rendered_sizes() {
    let cfg = RenderSettings::default();
    let ts: Vec<Tenant> = (0..500)
        .map(|i| {
            let mut limits = RateLimitsSpec::default();
            limits.api.requests_per_unit = i * 37 % 100_000;
            limits.webhook.shadow_mode = i % 2 == 0;
            let name = if i % 5 == 0 {
                format!("tenant-with-a-longer-name-{i}")
            } else {
                format!("t{i}")
            };
            tenant(&name, TenantState::Active, limits)
        })
        .collect();
    let es = entries(&ts);
    let key_q = quote(&cfg.descriptor_key);
    let lens = line_lengths(&key_q, &es);
    for n in [1, 2, 3, 7, MAX_SHARDS] {
        let rendered: Vec<usize> = render_shards(&cfg, &es, &key_q, &lens, n)
            .iter()
            .map(Shard::size)
            .collect();
        assert_eq!(shard_sizes(&cfg, &es, &lens, n), rendered, "{n} shards");
    }
    // No tenant at all: both files still declare their domain.
    assert_eq!(
        shard_sizes(&cfg, &[], &[], 1),
        render_shards(&cfg, &[], &key_q, &[], 1)
            .iter()
            .map(Shard::size)
            .collect::<Vec<_>>()
    );
}
