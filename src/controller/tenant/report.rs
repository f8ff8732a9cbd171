//! Report: what a converge of one Tenant says, decided from what its steps
//! did.
//!
//! Takes an [`Outcome`]: the spec's state, what the steps did that Events
//! tell ([`Done`]: a restore recovered, the registry write's action, the
//! database and audit steps, the Secret write), the caps left unapplied,
//! read auditing, and the conditions of the sealed-secrets, migration,
//! CronJob and rate-limit steps. Gives a [`Report`]: the phase, the
//! conditions in their order, the status' schema version and the Events to
//! publish, in order. [`events`] gives the Events of a [`Done`] alone, for a
//! converge stopped half-way.
//!
//! Pure and synchronous: no side effects, no clock, no Kubernetes or
//! Postgres calls. The reconcile publishes the Events and writes the status.

use crate::api::{TenantPhase, TenantState};
use crate::controller::kit::conditions::Cond;
use crate::names::TenantName;
use crate::pg::audit::ReadAuditing;
use crate::pg::backup_sql::AsideState;

/// The names the messages show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub schema: String,
    pub owner_role: String,
    pub app_role: String,
    /// The connection Secret's name, in `namespace`.
    pub db_secret: String,
    /// The operator's namespace, where the Secret lives.
    pub namespace: String,
}

impl Names {
    pub fn of(name: &TenantName, namespace: &str) -> Self {
        Self {
            schema: name.schema(),
            owner_role: name.owner_role(),
            app_role: name.app_role(),
            db_secret: name.db_secret(),
            namespace: namespace.to_owned(),
        }
    }
}

/// The Secret step: whether it wrote, and whether a Secret existed before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretWrite {
    pub written: bool,
    pub existed: bool,
}

/// What the steps did that Events tell, filled in as they run (a converge
/// stopped half-way still publishes the Events of what it did).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub names: Names,
    /// What finishing an interrupted restore did; None when none was
    /// pending.
    pub restore_recovered: Option<AsideState>,
    /// The registry write's action (`Provisioned`, `Suspended`, `Resumed`,
    /// `Converged`); None when nothing was written.
    pub registry_action: Option<&'static str>,
    /// The labels of the database plan's actions.
    pub db_actions: Vec<&'static str>,
    /// The labels of the audit log's converging steps.
    pub audit_steps: Vec<&'static str>,
    /// Audit rows removed by retention (None: no prune was due).
    pub pruned: Option<u64>,
    /// None until the Secret step ran.
    pub secret: Option<SecretWrite>,
    /// `Placed` False (reason, message): the spec's shard is not where the
    /// tenant is, and why ([`super::moving`]).
    pub placed: Option<(&'static str, String)>,
}

/// Everything a converge that ran to the end observed and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub state: TenantState,
    pub done: Done,
    /// The caps the admin role may not set, in words.
    pub caps_not_applied: Option<String>,
    pub read_auditing: ReadAuditing,
    /// `RateLimitsApplied`, when rate limits are configured.
    pub rate_limits: Option<Cond>,
    /// `SecretsSealed`.
    pub sealed: Cond,
    /// The migration step: its condition and the schema version, or why it
    /// could not tell.
    pub migrations: Result<(Cond, i64), String>,
    /// `BackupScheduled`, when backups are configured.
    pub cronjob: Option<Cond>,
}

/// An Event to publish on the Tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

impl Event {
    fn normal(reason: &'static str, note: String) -> Self {
        Self {
            warning: false,
            reason,
            note,
        }
    }
}

/// What the reconcile writes and publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub phase: TenantPhase,
    pub conditions: Vec<Cond>,
    /// `status.schemaVersion`; None keeps the old one.
    pub schema_version: Option<i64>,
    pub events: Vec<Event>,
}

/// The report of a converge that ran to the end.
pub fn report(o: Outcome) -> Report {
    let n = &o.done.names;
    let (phase, reason, message) = match o.state {
        TenantState::Active => (
            TenantPhase::Active,
            "Provisioned",
            format!(
                "schema {} is ready; credentials in Secret {}/{}",
                n.schema, n.namespace, n.db_secret
            ),
        ),
        TenantState::Suspended => (
            TenantPhase::Suspended,
            "Suspended",
            "the tenant is suspended: its app role cannot log in".to_string(),
        ),
    };
    let mut conditions = vec![
        Cond::new("Ready", true, reason, message),
        Cond::new(
            "DatabaseReady",
            true,
            "Converged",
            "schema, roles, privileges and caps match the spec",
        ),
    ];
    conditions.extend(o.rate_limits);
    conditions.push(match o.caps_not_applied {
        Some(why) => Cond::new("CapsApplied", false, "TempFileLimitNeedsPrivilege", why),
        None => Cond::new(
            "CapsApplied",
            true,
            "Applied",
            "connection limit, timeouts, work_mem and temp_file_limit as the spec says",
        ),
    });
    conditions.push(Cond::new(
        "ReadAuditing",
        o.read_auditing == ReadAuditing::On,
        o.read_auditing.reason(),
        o.read_auditing.message(),
    ));
    conditions.push(o.sealed);
    let schema_version = match o.migrations {
        Ok((cond, version)) => {
            conditions.push(cond);
            Some(version)
        }
        Err(why) => {
            conditions.push(Cond::new(
                super::migrations::CONDITION,
                false,
                "MigrationStateUnknown",
                why,
            ));
            None
        }
    };
    conditions.extend(o.cronjob);
    if let Some((reason, message)) = &o.done.placed {
        conditions.push(Cond::new("Placed", false, reason, message.clone()));
    }
    Report {
        phase,
        conditions,
        schema_version,
        events: events(&o.done),
    }
}

/// The Events of what was done, in order: a restore recovered, audit drift
/// converged, audit rows pruned, then the registry write's action or else a
/// Secret written. Nothing done, nothing published.
pub fn events(done: &Done) -> Vec<Event> {
    let mut events = Vec::new();
    if let Some(state) = done.restore_recovered {
        events.push(Event {
            warning: true,
            reason: "RestoreRecovered",
            note: format!("an interrupted restore was finished: {state:?}"),
        });
    }
    if !done.audit_steps.is_empty() && done.registry_action != Some("Provisioned") {
        // Drift: a table made outside migrations, a trigger dropped or
        // disabled, an audit function edited.
        events.push(Event::normal(
            "AuditConverged",
            format!("audit log converged: {}", done.audit_steps.join(", ")),
        ));
    }
    if let Some(n) = done.pruned.filter(|n| *n > 0) {
        events.push(Event::normal(
            "AuditPruned",
            format!(
                "pruned {n} audit row(s) older than spec.audit.retentionDays; an ANCHOR row keeps the chain verifiable"
            ),
        ));
    }
    if let Some(secret) = done.secret {
        events.extend(write_event(done, secret));
    }
    events
}

/// The registry write's Event, or else the Secret's when it was written.
fn write_event(done: &Done, secret: SecretWrite) -> Option<Event> {
    let n = &done.names;
    if let Some(action) = done.registry_action {
        let note = match action {
            "Provisioned" => format!(
                "created schema {} with roles {} and {}",
                n.schema, n.owner_role, n.app_role
            ),
            "Suspended" => "app role can no longer log in; its sessions were terminated".to_string(),
            "Resumed" => "app role can log in again".to_string(),
            _ => format!("converged drift: {}", done.db_actions.join(", ")),
        };
        return Some(Event::normal(action, note));
    }
    match secret {
        SecretWrite {
            written: true,
            existed: true,
        } => Some(Event::normal(
            "SecretRestored",
            format!("Secret {} rewritten", n.db_secret),
        )),
        SecretWrite {
            written: true,
            existed: false,
        } => Some(Event::normal(
            "SecretCreated",
            format!("Secret {} written with new credentials", n.db_secret),
        )),
        SecretWrite { written: false, .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant `acme` that was already converged: nothing done, everything
    /// true.
    fn steady() -> Outcome {
        Outcome {
            state: TenantState::Active,
            done: Done {
                names: Names::of(&TenantName::parse("acme").unwrap(), "tenancy-system"),
                secret: Some(SecretWrite {
                    written: false,
                    existed: true,
                }),
                ..Done::default()
            },
            caps_not_applied: None,
            read_auditing: ReadAuditing::On,
            rate_limits: None,
            sealed: Cond::new("SecretsSealed", true, "NoSecrets", "spec.secrets is empty"),
            migrations: Ok((Cond::new("MigrationsApplied", true, "UpToDate", "at version 3"), 3)),
            cronjob: None,
        }
    }

    fn with_done(f: impl FnOnce(&mut Done)) -> Outcome {
        let mut o = steady();
        f(&mut o.done);
        o
    }

    fn cond<'a>(r: &'a Report, type_: &str) -> &'a Cond {
        r.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {:?}", r.conditions))
    }

    fn reasons_and_notes(events: &[Event]) -> Vec<(&'static str, &str)> {
        events.iter().map(|e| (e.reason, e.note.as_str())).collect()
    }

    #[test]
    fn an_active_tenant_is_ready_with_its_secret_named() {
        let r = report(steady());
        assert_eq!(r.phase, TenantPhase::Active);
        assert_eq!(
            cond(&r, "Ready"),
            &Cond::new(
                "Ready",
                true,
                "Provisioned",
                "schema tenant_acme is ready; credentials in Secret tenancy-system/tenant-acme-db"
            )
        );
        assert_eq!(
            cond(&r, "DatabaseReady"),
            &Cond::new(
                "DatabaseReady",
                true,
                "Converged",
                "schema, roles, privileges and caps match the spec"
            )
        );
        assert_eq!(r.schema_version, Some(3));
    }

    #[test]
    fn a_suspended_tenant_is_ready_and_says_it_is_suspended() {
        let r = report(Outcome {
            state: TenantState::Suspended,
            ..steady()
        });
        assert_eq!(r.phase, TenantPhase::Suspended);
        assert_eq!(
            cond(&r, "Ready"),
            &Cond::new(
                "Ready",
                true,
                "Suspended",
                "the tenant is suspended: its app role cannot log in"
            )
        );
    }

    #[test]
    fn a_steady_state_publishes_nothing() {
        assert_eq!(report(steady()).events, vec![]);
        assert_eq!(events(&Done::default()), vec![]);
    }

    #[test]
    fn each_registry_action_has_its_event_and_note() {
        let cases = [
            (
                "Provisioned",
                "created schema tenant_acme with roles tenant_acme_owner and tenant_acme_app",
            ),
            (
                "Suspended",
                "app role can no longer log in; its sessions were terminated",
            ),
            ("Resumed", "app role can log in again"),
            ("Converged", "converged drift: GrantConnect, SetConnectionLimit"),
        ];
        for (action, note) in cases {
            let r = report(with_done(|d| {
                d.registry_action = Some(action);
                d.db_actions = vec!["GrantConnect", "SetConnectionLimit"];
            }));
            assert_eq!(
                r.events,
                vec![Event {
                    warning: false,
                    reason: action,
                    note: note.to_string()
                }],
                "{action}"
            );
        }
    }

    #[test]
    fn the_registry_event_stands_for_a_secret_written_with_it() {
        let r = report(with_done(|d| {
            d.registry_action = Some("Provisioned");
            d.secret = Some(SecretWrite {
                written: true,
                existed: false,
            });
        }));
        assert_eq!(
            r.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            vec!["Provisioned"]
        );
    }

    #[test]
    fn a_secret_written_alone_is_restored_or_created() {
        let written = |existed| {
            report(with_done(|d| {
                d.secret = Some(SecretWrite { written: true, existed });
            }))
            .events
        };
        assert_eq!(
            reasons_and_notes(&written(true)),
            vec![("SecretRestored", "Secret tenant-acme-db rewritten")]
        );
        assert_eq!(
            reasons_and_notes(&written(false)),
            vec![("SecretCreated", "Secret tenant-acme-db written with new credentials")]
        );
        // Not written: nothing, whether it existed or not.
        for existed in [true, false] {
            let r = report(with_done(|d| {
                d.secret = Some(SecretWrite {
                    written: false,
                    existed,
                });
            }));
            assert_eq!(r.events, vec![]);
        }
    }

    #[test]
    fn a_stop_before_the_secret_step_keeps_the_registry_event_back() {
        // As before: the registry's Event went out only after the Secret
        // was written.
        let done = Done {
            registry_action: Some("Converged"),
            db_actions: vec!["GrantConnect"],
            audit_steps: vec!["AuditTable"],
            pruned: Some(2),
            secret: None,
            ..steady().done
        };
        assert_eq!(
            events(&done).iter().map(|e| e.reason).collect::<Vec<_>>(),
            vec!["AuditConverged", "AuditPruned"]
        );
    }

    #[test]
    fn audit_converged_is_published_for_drift_only() {
        let drift = report(with_done(|d| d.audit_steps = vec!["AuditTable", "GuardAuditTable"]));
        assert_eq!(
            reasons_and_notes(&drift.events),
            vec![("AuditConverged", "audit log converged: AuditTable, GuardAuditTable")]
        );
        // A new tenant's audit objects are part of its provisioning.
        let new = report(with_done(|d| {
            d.audit_steps = vec!["CreateAuditTables"];
            d.registry_action = Some("Provisioned");
        }));
        assert_eq!(
            new.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            vec!["Provisioned"]
        );
        // Drift beside another registry write is still reported.
        let resumed = report(with_done(|d| {
            d.audit_steps = vec!["AuditTable"];
            d.registry_action = Some("Resumed");
        }));
        assert_eq!(
            resumed.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            vec!["AuditConverged", "Resumed"]
        );
    }

    #[test]
    fn audit_pruned_is_published_only_when_rows_went() {
        for pruned in [None, Some(0)] {
            assert_eq!(report(with_done(|d| d.pruned = pruned)).events, vec![], "{pruned:?}");
        }
        assert_eq!(
            reasons_and_notes(&report(with_done(|d| d.pruned = Some(42))).events),
            vec![(
                "AuditPruned",
                "pruned 42 audit row(s) older than spec.audit.retentionDays; an ANCHOR row keeps the chain verifiable"
            )]
        );
    }

    #[test]
    fn events_come_out_in_their_order_the_recovered_restore_first() {
        let r = report(with_done(|d| {
            d.restore_recovered = Some(AsideState::PutBack);
            d.audit_steps = vec!["AuditTable"];
            d.pruned = Some(1);
            d.registry_action = Some("Converged");
            d.db_actions = vec!["GrantConnect"];
        }));
        assert_eq!(
            r.events.iter().map(|e| (e.warning, e.reason)).collect::<Vec<_>>(),
            vec![
                (true, "RestoreRecovered"),
                (false, "AuditConverged"),
                (false, "AuditPruned"),
                (false, "Converged")
            ]
        );
        assert_eq!(r.events[0].note, "an interrupted restore was finished: PutBack");
    }

    #[test]
    fn caps_the_admin_may_not_set_are_reported() {
        let applied = report(steady());
        assert_eq!(
            cond(&applied, "CapsApplied"),
            &Cond::new(
                "CapsApplied",
                true,
                "Applied",
                "connection limit, timeouts, work_mem and temp_file_limit as the spec says"
            )
        );
        let not = report(Outcome {
            caps_not_applied: Some("temp_file_limit needs superuser".into()),
            ..steady()
        });
        assert_eq!(
            cond(&not, "CapsApplied"),
            &Cond::new(
                "CapsApplied",
                false,
                "TempFileLimitNeedsPrivilege",
                "temp_file_limit needs superuser"
            )
        );
        // Not a failure of the tenant.
        assert!(cond(&not, "Ready").status);
    }

    #[test]
    fn read_auditing_is_true_only_when_on() {
        let on = report(steady());
        let c = cond(&on, "ReadAuditing");
        assert_eq!((c.status, c.reason), (true, "Applied"));
        assert_eq!(c.message, ReadAuditing::On.message());
        let off = report(Outcome {
            read_auditing: ReadAuditing::NotInstalled,
            ..steady()
        });
        let c = cond(&off, "ReadAuditing");
        assert_eq!((c.status, c.reason), (false, "PgauditNotInstalled"));
        assert!(c.message.starts_with("read auditing is off"), "{}", c.message);
    }

    #[test]
    fn a_migration_step_that_cannot_tell_is_unknown_and_keeps_the_version() {
        let r = report(Outcome {
            migrations: Err("reading MigrationSet base: forbidden".into()),
            ..steady()
        });
        assert_eq!(
            cond(&r, "MigrationsApplied"),
            &Cond::new(
                "MigrationsApplied",
                false,
                "MigrationStateUnknown",
                "reading MigrationSet base: forbidden"
            )
        );
        assert_eq!(r.schema_version, None);
        assert!(cond(&r, "Ready").status);
        assert_eq!(r.phase, TenantPhase::Active);
    }

    #[test]
    fn conditions_come_out_in_their_order() {
        let r = report(Outcome {
            rate_limits: Some(Cond::new("RateLimitsApplied", true, "Applied", "ok")),
            cronjob: Some(Cond::new("BackupScheduled", true, "Scheduled", "ok")),
            ..steady()
        });
        assert_eq!(
            r.conditions.iter().map(|c| c.type_).collect::<Vec<_>>(),
            vec![
                "Ready",
                "DatabaseReady",
                "RateLimitsApplied",
                "CapsApplied",
                "ReadAuditing",
                "SecretsSealed",
                "MigrationsApplied",
                "BackupScheduled"
            ]
        );
        // Without rate limits and backups, their conditions are left out.
        assert_eq!(
            report(steady()).conditions.iter().map(|c| c.type_).collect::<Vec<_>>(),
            vec![
                "Ready",
                "DatabaseReady",
                "CapsApplied",
                "ReadAuditing",
                "SecretsSealed",
                "MigrationsApplied"
            ]
        );
    }
}
