//! What the operator's Tenant cache costs per tenant, before and after
//! slimming (issue 16: RSS <= 64 MiB at 10,000 tenants).
//!
//! `cargo bench --bench tenant_memory` (no Postgres, no API server;
//! BENCH_TENANTS, default 10000; the counts do not depend on the profile,
//! so `--profile dev` gives the same figures sooner). Builds BENCH_TENANTS Tenants as the API
//! server returns them after `kubectl apply` (client side: the
//! last-applied-configuration annotation, managedFields of kubectl, the
//! operator's finalizer and status writes and a `kubectl edit`;
//! `tests/golden/tenant-kubectl-apply.json`, renamed per tenant), feeds
//! them to reflector stores as a watch's initial list would, and counts the
//! heap bytes the stores hold with a counting global allocator (`cap`):
//! - a store of full Tenants (what `Controller::new` kept),
//! - a store with managedFields cleared (what the MigrationSet controller's
//!   and the rate-limit writer's own watches kept),
//! - a store of `tenant_watch::slim` Tenants (the one store now).
//!
//! Prints bytes per tenant for each, the operator's total before (one full
//! store plus two cleared ones) and after (one slim store), and the ratio.
//! Not counted: allocator overhead and fragmentation, and the second copy a
//! reflector builds during a relist (until `InitDone` swaps it in).
//!
//! Also what a rollout pass holds in ops logins (`pg::confined::OpsLogin`,
//! keyed by tenant): for every planned follower, as a pass held them until
//! stop 47, against one chunk of `controller::migration_set::apply::LOGIN_CHUNK`
//! tenants, as it reads them now.
//!
//! And what kube-runtime's scheduler holds per tenant waiting in it: for
//! the resync (a requeue per tenant until stop 51; now the operator's own
//! `Resyncs`, measured too), and for a follower its MigrationSet brought back (as
//! `Controller::watches` queued it until stop 51, and by name now).
//! And what a tenant waiting for a reconcile holds in the operator's front
//! queue (`controller::tenant::gate::Gate`, stop 52), against the
//! scheduler's entry it replaces.
//!
//! And the rate-limit writer's rendering of every tenant
//! (`ratelimit_config::render`): the most heap it held at once while
//! rendering, beyond its input, and what the rendering itself holds.

use std::alloc::System;

use cap::Cap;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use tenant_operator::api::Tenant;
use tenant_operator::controller::tenant_watch::slim;

/// The system allocator, counting the bytes in use (no limit).
#[global_allocator]
static GLOBAL: Cap<System> = Cap::new(System, usize::MAX);

fn in_use() -> isize {
    GLOBAL.allocated() as isize
}

const FIXTURE: &str = include_str!("../tests/golden/tenant-kubectl-apply.json");

/// The status the operator writes for a tenant at scale, as the scale
/// benchmark read it back (seven conditions, the usage, the shard): about
/// 2.1 KB of JSON, where the golden object's own is 1.8 KB.
const STATUS: &str = include_str!("../tests/golden/tenant-status-at-scale.json");

/// The golden object with the status at scale.
fn fixture() -> String {
    let mut v: serde_json::Value = serde_json::from_str(FIXTURE).expect("the golden Tenant");
    v["status"] = serde_json::from_str(STATUS).expect("the status at scale");
    v.to_string()
}

/// Tenant number `i`, as the API server sends it in a watch event.
fn tenant_json(fixture: &str, i: usize) -> String {
    fixture
        .replace("acme", &format!("tenant-{i:05}"))
        .replace("0c1d2e3f4a5b", &format!("{i:012x}"))
        .replace("1048213", &format!("{}", 1_048_213 + i))
}

/// Heap bytes a store holds once the initial list of `n` Tenants, each
/// passed through `shrink`, was applied to it (as a reflector does).
fn store_bytes(n: usize, shrink: impl Fn(&mut Tenant)) -> (isize, usize) {
    let fixture = fixture();
    let before = in_use();
    let (store, mut writer) = reflector::store::<Tenant>();
    writer.apply_watcher_event(&Event::Init);
    let mut serialized = 0;
    for i in 0..n {
        let mut t: Tenant = serde_json::from_str(&tenant_json(&fixture, i)).expect("a Tenant");
        shrink(&mut t);
        serialized += serde_json::to_vec(&t).expect("serializes").len();
        writer.apply_watcher_event(&Event::InitApply(t));
    }
    writer.apply_watcher_event(&Event::InitDone);
    assert_eq!(store.len(), n);
    let held = in_use() - before;
    drop((store, writer));
    (held, serialized)
}

/// Heap bytes of `n` ops logins keyed by tenant, as a rollout pass holds
/// them (the password a fixed 43-character string, as the derived ones are).
fn logins_bytes(n: usize) -> isize {
    use tenant_operator::names::TenantName;
    use tenant_operator::pg::{confined::OpsLogin, Target};
    let opts: sqlx::postgres::PgConnectOptions = "postgres://tenancy_admin@db.example.internal:5432/app"
        .parse()
        .expect("options");
    let target = Target::from_options(opts);
    let before = in_use();
    let logins: std::collections::BTreeMap<TenantName, OpsLogin> = (0..n)
        .map(|i| {
            let name = TenantName::parse(&format!("tenant-{i:05}")).expect("a name");
            let uid = format!("{i:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
            let password = zeroize::Zeroizing::new("p".repeat(43));
            let login = OpsLogin::new(&target, &name, &uid, password);
            (name, login)
        })
        .collect();
    let held = in_use() - before;
    drop(logins);
    held
}

/// Heap bytes kube-runtime's scheduler holds for `n` Tenants waiting in
/// it, each with the request `request` makes of the Tenant as the watch
/// gave it, due later (a reconcile's requeue, or a follower waiting for its
/// turn at the start of a rollout).
fn scheduler_bytes(
    n: usize,
    request: impl Fn(&Tenant) -> kube::runtime::controller::ReconcileRequest<Tenant>,
) -> isize {
    use futures::StreamExt;
    use kube::runtime::scheduler::{scheduler, ScheduleRequest};
    let fixture = fixture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut queued = Box::pin(scheduler(rx));
        let before = in_use();
        let run_at = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
        for i in 0..n {
            let t: Tenant = serde_json::from_str(&tenant_json(&fixture, i)).expect("a Tenant");
            tx.unbounded_send(ScheduleRequest {
                message: request(&t),
                run_at,
            })
            .expect("the scheduler listens");
        }
        // One poll takes every request in; none is due.
        assert!(futures::poll!(queued.next()).is_pending());
        in_use() - before
    })
}

/// Heap bytes the resyncs of `n` tenants hold as the operator keeps them
/// now (`controller::tenant::resync::Resyncs`: each name once, and when it
/// is due).
fn resyncs_bytes(n: usize) -> isize {
    use tenant_operator::controller::tenant::resync::Resyncs;
    let before = in_use();
    let resyncs = Resyncs::default();
    for i in 0..n {
        resyncs.after(&format!("tenant-{i:05}"), std::time::Duration::from_secs(300));
    }
    assert_eq!(resyncs.len(), n);
    let held = in_use() - before;
    drop(resyncs);
    held
}

/// Heap bytes `n` tenants waiting in the Tenant controller's front queue
/// hold (`controller::tenant::gate::Gate`: each name once, in its lane),
/// none of them handed over yet.
fn gate_bytes(n: usize) -> isize {
    use tenant_operator::controller::tenant::gate::{Gate, Lane};
    let before = in_use();
    let gate = Gate::default();
    for i in 0..n {
        gate.push(&format!("tenant-{i:05}"), Lane::Change);
    }
    assert_eq!(gate.counts(), (n, 0));
    let held = in_use() - before;
    drop(gate);
    held
}

/// What the scheduler held per tenant: for its resync, as a requeue per
/// tenant (`Action::requeue`, until stop 51) left it (the `ObjectRef` the
/// controller built from the Tenant, with its name, resourceVersion and
/// uid); and for a follower its
/// MigrationSet brought back, as `Controller::watches` queued it (that
/// `ObjectRef`, and the set's own as the reason: its kind, group, version
/// and plural as strings) against `reconcile_on` with the name only (now).
fn scheduled_per_tenant(n: usize) -> (isize, isize, isize) {
    use kube::runtime::controller::{ReconcileReason, ReconcileRequest};
    use kube::runtime::reflector::ObjectRef;
    use tenant_operator::api::MigrationSet;
    let set: MigrationSet = serde_json::from_value(serde_json::json!({
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "MigrationSet",
        "metadata": {"name": "app", "resourceVersion": "2048311", "uid": "6c1d2e3f-1c2d-4e5f-8a9b-0c1d2e3f4a5b"},
        "spec": {"migrations": []}
    }))
    .expect("a MigrationSet");
    let set_ref = ObjectRef::from_obj(&set).erase();
    let resync = scheduler_bytes(n, |t| ReconcileRequest {
        obj_ref: ObjectRef::from_obj(t),
        reason: ReconcileReason::ReconcilerRequestedRetry,
    });
    let watched = scheduler_bytes(n, |t| ReconcileRequest {
        obj_ref: ObjectRef::from_obj(t),
        reason: ReconcileReason::RelatedObjectUpdated {
            obj_ref: Box::new(set_ref.clone()),
        },
    });
    let by_name = scheduler_bytes(n, |t| ReconcileRequest {
        obj_ref: ObjectRef::new(t.metadata.name.as_deref().unwrap_or_default()),
        reason: ReconcileReason::Unknown,
    });
    (resync, watched, by_name)
}

/// The rate-limit rendering of `n` tenants: the most heap in use at once
/// while `render` ran, beyond what was in use before, and the bytes the
/// result holds. Run before anything larger (the peak counter only rises).
fn render_bytes(n: usize) -> (isize, isize, usize) {
    use tenant_operator::ratelimit_config::{render, Entry, RenderSettings};
    let fixture = fixture();
    // One Tenant at a time, so no larger peak comes first; the names are
    // in order already.
    let es: Vec<Entry> = (0..n)
        .filter_map(|i| Entry::of(&serde_json::from_str::<Tenant>(&tenant_json(&fixture, i)).expect("a Tenant")))
        .collect();
    let before = in_use();
    assert!(
        GLOBAL.max_allocated() as isize <= before + (1 << 20),
        "a larger peak came first"
    );
    let shards = render(&RenderSettings::default(), &es).expect("renders");
    let (peak, held) = (GLOBAL.max_allocated() as isize - before, in_use() - before);
    (peak, held, shards.len())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let n: usize = std::env::var("BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let per = |b: isize| b as f64 / n as f64;
    let kib = |b: isize| b as f64 / 1024.0 / 1024.0;

    // First, while the peak counter has seen nothing larger.
    let (render_peak, render_held, render_shards) = render_bytes(n);
    // Warm up (lazy statics, the allocator's first arenas), then measure.
    let _ = store_bytes(10, |_| {});
    let (full, full_json) = store_bytes(n, |_| {});
    let (cleared, cleared_json) = store_bytes(n, |t| t.metadata.managed_fields = None);
    let (slimmed, slim_json) = store_bytes(n, slim);
    let (resync_queued, set_queued, name_queued) = scheduled_per_tenant(n);
    let resyncs_held = resyncs_bytes(n);
    let gate_held = gate_bytes(n);

    println!("{n} Tenants as `kubectl apply` leaves them (tests/golden/tenant-kubectl-apply.json) with the status the operator writes at scale (tests/golden/tenant-status-at-scale.json)");
    println!(
        "{:<44} {:>12} {:>12} {:>10}",
        "store", "heap B/tenant", "JSON B/tenant", "MiB"
    );
    for (what, bytes, json) in [
        ("full (Controller::new, before)", full, full_json),
        ("managedFields cleared (2 stores, before)", cleared, cleared_json),
        ("slim (the one store, after)", slimmed, slim_json),
    ] {
        println!(
            "{what:<44} {:>12.0} {:>12.0} {:>10.1}",
            per(bytes),
            json as f64 / n as f64,
            kib(bytes)
        );
    }
    use std::mem::size_of;
    println!(
        "inline sizes (bytes): Tenant {}, metadata {}, spec {}, status {}, one condition {}",
        size_of::<Tenant>(),
        size_of::<kube::api::ObjectMeta>(),
        size_of::<tenant_operator::api::TenantSpec>(),
        size_of::<tenant_operator::api::TenantStatus>(),
        size_of::<tenant_operator::api::Condition>()
    );
    let chunk = tenant_operator::controller::migration_set::apply::LOGIN_CHUNK;
    let (every, one_chunk) = (logins_bytes(n), logins_bytes(chunk.min(n)));
    println!(
        "a rollout pass's ops logins: every one of {n} followers {:.0} B/tenant, {:.1} MiB (until stop 47); one chunk of {} {:.2} MiB (now)",
        per(every),
        kib(every),
        chunk.min(n),
        kib(one_chunk)
    );
    println!(
        "the rate-limit rendering of {n} tenants ({render_shards} ConfigMaps): {:.1} MiB at most in use while rendering, {:.1} MiB the rendering",
        kib(render_peak),
        kib(render_held)
    );
    println!(
        "the resyncs: an entry per tenant in the controller's scheduler (until stop 51) {:.0} B/tenant, {:.1} MiB; `tenant::resync::Resyncs` (now) {:.0} B/tenant, {:.1} MiB",
        per(resync_queued),
        kib(resync_queued),
        per(resyncs_held),
        kib(resyncs_held)
    );
    println!(
        "the controller's scheduler, every follower its MigrationSet brought back: as `watches` queued them (until stop 51) {:.0} B/tenant, {:.1} MiB; by name through `reconcile_on` (now) {:.0} B/tenant, {:.1} MiB",
        per(set_queued),
        kib(set_queued),
        per(name_queued),
        kib(name_queued)
    );
    println!(
        "every Tenant waiting for a reconcile (the Tenants applied faster than they are provisioned; the followers at a rollout's start): in the controller's scheduler, queued from their watch events (until stop 52) {:.0} B/tenant, {:.1} MiB, or by name {:.0} B/tenant; in `tenant::gate::Gate` (now; the scheduler holds at most {} of them) {:.0} B/tenant, {:.1} MiB",
        per(resync_queued),
        kib(resync_queued),
        per(name_queued),
        tenant_operator::controller::tenant::gate::RELEASED,
        per(gate_held),
        kib(gate_held)
    );
    let before = full + 2 * cleared;
    println!(
        "operator before: 3 stores, {:.0} B/tenant, {:.1} MiB",
        per(before),
        kib(before)
    );
    println!(
        "operator after:  1 store,  {:.0} B/tenant, {:.1} MiB",
        per(slimmed),
        kib(slimmed)
    );
    println!(
        "ratio after/before: {:.3} (one store: slim/full {:.3})",
        slimmed as f64 / before as f64,
        slimmed as f64 / full as f64
    );
}
