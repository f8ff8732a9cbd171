//! Rate limits: from the set of Tenants to the envoyproxy/ratelimit
//! configuration files (one domain per surface), as ConfigMap data.
//!
//! Pure: takes the Tenants (or their [`Entry`]s) and the rendering settings,
//! gives the ConfigMaps' names and data. No I/O; the writer task in
//! `controller::ratelimits` decides what to write.
//!
//! Format (envoyproxy/ratelimit `src/config/config_impl.go`, `YamlRoot`): a
//! file per surface with `domain` and a list of `descriptors`, one per
//! tenant: `{key: <descriptor key>, value: <tenant name>, rate_limit: {unit,
//! requests_per_unit}, shadow_mode}`. Each descriptor is one flow-style line
//! so 10,000 tenants stay small and a diff shows one line per tenant.
//!
//! Size: a ConfigMap holds at most 1 MiB of data, and 10,000 tenants on two
//! surfaces take about 1.9 MB. When the rendering exceeds the budget, the
//! tenants are split into shards by a stable hash of their name: shard 0 is
//! the ConfigMap named in the settings, shard `i` is `<name>-<i>`, and shard
//! `i` holds `api-<i>.yaml` and `webhook-<i>.yaml` (the same domains, so
//! envoyproxy/ratelimit needs `MERGE_DOMAIN_CONFIG=true` then). A tenant's
//! shard changes only when the shard count does.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::api::{RateLimit, RateLimitUnit, Tenant, TenantState};

/// The most data one rendered ConfigMap may hold (Kubernetes refuses more
/// than 1 MiB; the rest is headroom for keys and metadata).
pub const DEFAULT_BUDGET_BYTES: usize = 900 * 1024;
/// The most ConfigMaps the tenants may be split into; the rate-limit
/// Deployment's projected volume lists this many (see docs/rate-limits.md).
pub const MAX_SHARDS: usize = 16;

/// How the configuration is named and keyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderSettings {
    /// Name of the (first) ConfigMap.
    pub configmap: String,
    /// Rate-limit domain of the API surface.
    pub api_domain: String,
    /// Rate-limit domain of the webhook surface.
    pub webhook_domain: String,
    /// Descriptor key whose value is the tenant name (what Envoy sends).
    pub descriptor_key: String,
    /// Most data bytes per ConfigMap.
    pub budget_bytes: usize,
}

impl Default for RenderSettings {
    fn default() -> Self {
        Self {
            configmap: "tenant-ratelimits".into(),
            api_domain: "tenant-api".into(),
            webhook_domain: "tenant-webhook".into(),
            descriptor_key: "tenant_id".into(),
            budget_bytes: DEFAULT_BUDGET_BYTES,
        }
    }
}

/// One tenant's limit on one surface, as rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: RateLimitUnit,
    pub shadow_mode: bool,
}

impl Limit {
    /// The effective limit: a suspended tenant gets 0, enforced (not shadow).
    pub fn effective(spec: &RateLimit, state: TenantState) -> Limit {
        let RateLimit {
            requests_per_unit,
            unit,
            shadow_mode,
        } = *spec;
        match state {
            TenantState::Active => Limit {
                requests_per_unit,
                unit,
                shadow_mode,
            },
            TenantState::Suspended => Limit {
                requests_per_unit: 0,
                unit,
                shadow_mode: false,
            },
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.requests_per_unit, self.unit.as_str())?;
        if self.shadow_mode {
            f.write_str(" (shadow mode)")?;
        }
        Ok(())
    }
}

/// One tenant's rendered limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tenant: String,
    pub api: Limit,
    pub webhook: Limit,
}

impl Entry {
    /// The entry of a Tenant, or None when it is being deleted (a deleted
    /// tenant has no entry, so its requests match no descriptor).
    pub fn of(t: &Tenant) -> Option<Entry> {
        if t.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let name = t.metadata.name.clone()?;
        let limits = &t.spec.rate_limits;
        Some(Entry {
            tenant: name,
            api: Limit::effective(&limits.api, t.spec.state),
            webhook: Limit::effective(&limits.webhook, t.spec.state),
        })
    }

    /// What the `RateLimitsApplied` condition says about this entry.
    pub fn summary(&self) -> String {
        format!("api {}, webhook {}", self.api, self.webhook)
    }
}

/// The entries of every Tenant that should have one, sorted by name.
pub fn entries<'a>(tenants: impl IntoIterator<Item = &'a Tenant>) -> Vec<Entry> {
    let mut v: Vec<Entry> = tenants.into_iter().filter_map(Entry::of).collect();
    v.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    v.dedup_by(|a, b| a.tenant == b.tenant);
    v
}

/// One ConfigMap's worth of rendered files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The ConfigMap's name.
    pub name: String,
    /// File name to content.
    pub data: BTreeMap<String, String>,
}

impl Shard {
    /// Bytes of data (keys and values), what the 1 MiB limit counts.
    pub fn size(&self) -> usize {
        self.data.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// A SHA-256 digest of a rendering (every shard's name, file names and
/// contents, each length-prefixed, in order): what the writer keeps of its
/// last rendering to tell whether a new one differs, instead of the
/// rendering itself (about 220 bytes per tenant). Pure.
pub fn digest(shards: &[Shard]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut put = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(&(shards.len() as u64).to_le_bytes());
    for s in shards {
        put(s.name.as_bytes());
        put(&(s.data.len() as u64).to_le_bytes());
        for (k, v) in &s.data {
            put(k.as_bytes());
            put(v.as_bytes());
        }
    }
    h.finalize().into()
}

/// Why the tenants cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the rate limits of {tenants} tenants do not fit in {max} ConfigMaps of {budget} bytes")]
    TooLarge { tenants: usize, max: usize, budget: usize },
}

/// The ConfigMap name of shard `i` of `n`.
pub fn shard_name(base: &str, i: usize) -> String {
    if i == 0 {
        base.to_string()
    } else {
        format!("{base}-{i}")
    }
}

/// Which shard a tenant lands in: FNV-1a of its name, stable across
/// processes, platforms and Rust versions (unlike `DefaultHasher`).
pub fn shard_of(tenant: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// A string as a YAML double-quoted scalar (JSON's escapes are YAML's), so
/// a value such as `123`, `yes` or `null` stays a string.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// One descriptor line, ending in a newline.
fn descriptor_line(key_q: &str, tenant: &str, l: &Limit) -> String {
    let shadow = if l.shadow_mode { ", shadow_mode: true" } else { "" };
    format!(
        "- {{key: {key_q}, value: {}, rate_limit: {{unit: {}, requests_per_unit: {}}}{shadow}}}\n",
        quote(tenant),
        l.unit.as_str(),
        l.requests_per_unit
    )
}

const HEADER: &str = "# Rendered by tenant-operator from the Tenant objects; edits are overwritten.\n";

/// One rendered file: the header, the domain, and the descriptor lines of
/// `entries` (each entry's `line`), `len` bytes long ([`file_len`]).
fn file<'a>(
    domain: &str,
    entries: impl Iterator<Item = &'a Entry>,
    line: impl Fn(&Entry) -> String,
    len: usize,
) -> String {
    let mut out = String::with_capacity(len);
    out.push_str(HEADER);
    out.push_str("domain: ");
    out.push_str(&quote(domain));
    out.push('\n');
    let mut any = false;
    for e in entries {
        if !any {
            out.push_str("descriptors:\n");
            any = true;
        }
        out.push_str(&line(e));
    }
    if !any {
        out.push_str("descriptors: []\n");
    }
    out
}

/// The length of [`file`]'s output for `count` lines of `lines` bytes in
/// all.
fn file_len(domain: &str, count: usize, lines: usize) -> usize {
    let descriptors = if count == 0 {
        "descriptors: []\n"
    } else {
        "descriptors:\n"
    };
    HEADER.len() + "domain: ".len() + quote(domain).len() + 1 + descriptors.len() + lines
}

/// The file names of shard `i` of `n`.
fn file_names(i: usize, n: usize) -> (String, String) {
    if n == 1 {
        ("api.yaml".to_string(), "webhook.yaml".to_string())
    } else {
        (format!("api-{i}.yaml"), format!("webhook-{i}.yaml"))
    }
}

/// Renders the entries (sorted by tenant, as [`entries`] gives them) into as
/// few ConfigMaps as the budget allows: one ConfigMap with `api.yaml` and
/// `webhook.yaml` when they fit, else the smallest shard count whose every
/// shard fits. The same input always gives the same bytes.
///
/// The shard count is chosen from the descriptor lines' lengths (each line
/// formatted once and only its length kept), and only the chosen one is
/// rendered, each line written into its file: at 10,000 tenants at most
/// 2.0 MiB in use while rendering, 1.8 of them the rendering, where every
/// line was kept as a string, the one-ConfigMap rendering made to learn its
/// size, and then the shards (6.6 MiB; `cargo bench --bench tenant_memory`).
pub fn render(cfg: &RenderSettings, entries: &[Entry]) -> Result<Vec<Shard>, RenderError> {
    let key_q = quote(&cfg.descriptor_key);
    let lens = line_lengths(&key_q, entries);
    let fits = |n: usize| {
        shard_sizes(cfg, entries, &lens, n)
            .iter()
            .all(|&s| s <= cfg.budget_bytes)
    };
    let total = shard_sizes(cfg, entries, &lens, 1)[0];
    let n = if total <= cfg.budget_bytes {
        Some(1)
    } else {
        (total.div_ceil(cfg.budget_bytes).max(2)..=MAX_SHARDS).find(|&n| fits(n))
    };
    match n {
        Some(n) => Ok(render_shards(cfg, entries, &key_q, &lens, n)),
        None => Err(RenderError::TooLarge {
            tenants: entries.len(),
            max: MAX_SHARDS,
            budget: cfg.budget_bytes,
        }),
    }
}

/// Each entry's api and webhook descriptor lines' lengths (each line
/// formatted and dropped).
fn line_lengths(key_q: &str, entries: &[Entry]) -> Vec<(usize, usize)> {
    entries
        .iter()
        .map(|e| {
            (
                descriptor_line(key_q, &e.tenant, &e.api).len(),
                descriptor_line(key_q, &e.tenant, &e.webhook).len(),
            )
        })
        .collect()
}

/// The shard each entry lands in when there are `n`.
fn shard_index(e: &Entry, n: usize) -> usize {
    if n == 1 {
        0
    } else {
        shard_of(&e.tenant, n)
    }
}

/// Per shard of `n`: how many entries it holds and its api and webhook
/// lines' bytes.
fn tally(entries: &[Entry], lens: &[(usize, usize)], n: usize) -> Vec<(usize, usize, usize)> {
    let mut acc = vec![(0usize, 0usize, 0usize); n];
    for (e, (api, webhook)) in entries.iter().zip(lens) {
        let a = &mut acc[shard_index(e, n)];
        a.0 += 1;
        a.1 += api;
        a.2 += webhook;
    }
    acc
}

/// The data bytes ([`Shard::size`]) of each of `n` shards, from the lines'
/// lengths, without rendering them.
fn shard_sizes(cfg: &RenderSettings, entries: &[Entry], lens: &[(usize, usize)], n: usize) -> Vec<usize> {
    tally(entries, lens, n)
        .into_iter()
        .enumerate()
        .map(|(i, (count, api, webhook))| {
            let (fa, fw) = file_names(i, n);
            fa.len() + file_len(&cfg.api_domain, count, api) + fw.len() + file_len(&cfg.webhook_domain, count, webhook)
        })
        .collect()
}

fn render_shards(
    cfg: &RenderSettings,
    entries: &[Entry],
    key_q: &str,
    lens: &[(usize, usize)],
    n: usize,
) -> Vec<Shard> {
    // Each entry's shard, found once (an index per entry, not a line),
    // with the lengths of its shard's two files.
    let mut members: Vec<Vec<&Entry>> = vec![Vec::new(); n];
    let mut lengths = vec![(0usize, 0usize); n];
    for (e, (api, webhook)) in entries.iter().zip(lens) {
        let i = shard_index(e, n);
        members[i].push(e);
        lengths[i].0 += api;
        lengths[i].1 += webhook;
    }
    members
        .into_iter()
        .zip(lengths)
        .enumerate()
        .map(|(i, (mine, (api_len, webhook_len)))| {
            let count = mine.len();
            let (fa, fw) = file_names(i, n);
            let api = file(
                &cfg.api_domain,
                mine.iter().copied(),
                |e| descriptor_line(key_q, &e.tenant, &e.api),
                file_len(&cfg.api_domain, count, api_len),
            );
            let webhook = file(
                &cfg.webhook_domain,
                mine.iter().copied(),
                |e| descriptor_line(key_q, &e.tenant, &e.webhook),
                file_len(&cfg.webhook_domain, count, webhook_len),
            );
            Shard {
                name: shard_name(&cfg.configmap, i),
                data: BTreeMap::from([(fa, api), (fw, webhook)]),
            }
        })
        .collect()
}

/// envoyproxy/ratelimit's YAML config schema (`YamlRoot` in
/// `src/config/config_impl.go`), strict: a field it does not know is an
/// error here too. Used to read back what was rendered.
pub mod schema {
    use super::*;

    #[derive(Deserialize, Debug, Clone, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Root {
        pub domain: String,
        #[serde(default)]
        pub descriptors: Vec<Descriptor>,
    }

    #[derive(Deserialize, Debug, Clone, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Descriptor {
        pub key: String,
        #[serde(default)]
        pub value: Option<String>,
        #[serde(default)]
        pub rate_limit: Option<YamlRateLimit>,
        #[serde(default)]
        pub shadow_mode: bool,
        #[serde(default)]
        pub quota_mode: bool,
        #[serde(default)]
        pub detailed_metric: bool,
        #[serde(default)]
        pub value_to_metric: bool,
        #[serde(default)]
        pub share_threshold: bool,
        #[serde(default)]
        pub metadata: Option<serde_yaml::Mapping>,
        #[serde(default)]
        pub descriptors: Vec<Descriptor>,
    }

    #[derive(Deserialize, Debug, Clone, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct YamlRateLimit {
        #[serde(default)]
        pub unit: Option<String>,
        #[serde(default)]
        pub requests_per_unit: u32,
        #[serde(default)]
        pub unlimited: bool,
        #[serde(default)]
        pub name: Option<String>,
        #[serde(default)]
        pub replaces: Vec<Replaces>,
    }

    #[derive(Deserialize, Debug, Clone, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct Replaces {
        pub name: String,
    }

    /// Parses one rendered file.
    pub fn parse(yaml: &str) -> Result<Root, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }
}

/// Reads rendered ConfigMap data back into per-tenant limits of each
/// domain: (domain, tenant) to limit. Files that do not parse, descriptors
/// of another key and units it does not know are skipped (the next render
/// overwrites them).
pub fn read_back(cfg: &RenderSettings, files: &[&BTreeMap<String, String>]) -> BTreeMap<(String, String), Limit> {
    let mut out = BTreeMap::new();
    for data in files {
        for content in data.values() {
            let Ok(root) = schema::parse(content) else { continue };
            for d in root.descriptors {
                let (Some(value), Some(rl)) = (d.value, d.rate_limit) else {
                    continue;
                };
                if d.key != cfg.descriptor_key {
                    continue;
                }
                let unit = match rl.unit.as_deref() {
                    Some("second") => RateLimitUnit::Second,
                    Some("minute") => RateLimitUnit::Minute,
                    Some("hour") => RateLimitUnit::Hour,
                    Some("day") => RateLimitUnit::Day,
                    _ => continue,
                };
                out.insert(
                    (root.domain.clone(), value),
                    Limit {
                        requests_per_unit: rl.requests_per_unit,
                        unit,
                        shadow_mode: d.shadow_mode,
                    },
                );
            }
        }
    }
    out
}

/// The same map from entries, to compare with [`read_back`].
pub fn by_domain(cfg: &RenderSettings, entries: &[Entry]) -> BTreeMap<(String, String), Limit> {
    let mut out = BTreeMap::new();
    for e in entries {
        out.insert((cfg.api_domain.clone(), e.tenant.clone()), e.api);
        out.insert((cfg.webhook_domain.clone(), e.tenant.clone()), e.webhook);
    }
    out
}

#[cfg(test)]
mod tests;
