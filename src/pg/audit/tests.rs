//! Unit tests of the pure parts: the observation's judge, the plan and its SQL,
//! prune timing, the chain walk and the anchors.

use std::collections::BTreeMap;

use chrono::Utc;
use sha2::{Digest, Sha256};

use super::consts::*;
use super::functions::function_bodies;
use super::observe::FACTS_SQL;
use super::*;
use crate::crypto::{Keyring, TenantSalt};
use crate::names::TenantName;

fn n(s: &str) -> TenantName {
    TenantName::parse(s).unwrap()
}

fn full() -> AuditState {
    AuditState::objects_present(vec![])
}

/// What the observation reads of a converged schema with the tables
/// `docs` (partitioned, no key, audited) and `items` (key `id`, index 30,
/// audited), `_tenancy_migrations`, a sequence and a partition of `docs`.
fn converged_facts(name: &TenantName) -> Vec<CatalogFact> {
    let rel = |oid: u32, name: &str, kind: char, partition: bool| CatalogFact::Relation {
        oid,
        name: name.into(),
        kind,
        partition,
    };
    let tg = |relation: u32, name: &str, function: u32, deferred: bool| CatalogFact::Trigger {
        relation,
        name: name.into(),
        function,
        enabled: 'O',
        deferred,
        args: if relation == 15 { b"30\0id\0".to_vec() } else { vec![] },
    };
    let column = |relation: u32, name: &str| CatalogFact::Column {
        relation,
        name: name.into(),
        type_oid: 5069,
    };
    let mut facts = vec![
        CatalogFact::Schema,
        rel(10, AUDIT_TABLE, 'r', false),
        rel(11, HEAD_TABLE, 'r', false),
        rel(12, "_tenancy_migrations", 'r', false),
        rel(13, "docs", 'p', false),
        rel(14, "docs_2026", 'r', true),
        rel(15, "items", 'r', false),
        rel(16, "items_id_seq", 'S', false),
        rel(17, PENDING_TABLE, 'r', false),
        rel(18, PENDING_XID_INDEX, 'i', false),
        column(17, "xid"),
        column(11, "seal_floor"),
        CatalogFact::KeyColumn {
            relation: 15,
            index: 30,
            position: 1,
            name: "id".into(),
            encoded: b"id".to_vec(),
        },
        tg(10, GUARD_TRIGGER, 103, false),
        tg(17, GUARD_TRIGGER, 103, false),
        tg(17, TAIL_TRIGGER, 104, true),
    ];
    for t in [13, 15] {
        facts.extend(TABLE_TRIGGERS.iter().map(|n| tg(t, n, 102, false)));
    }
    let fns = AuditFns::of(name);
    for (oid, (f, body)) in (101..).zip(function_bodies(name).unwrap()) {
        facts.push(CatalogFact::Function {
            oid,
            definer: f != fns.guard,
            argtypes: if f == fns.seal {
                "16".into()
            } else if f == fns.write {
                "25 25 3807 1009".into()
            } else {
                String::new()
            },
            name: f,
            owned: true,
            config: Some(vec![FN_SEARCH_PATH.into()]),
            source: body,
        });
    }
    // Ids of the functions by name (BTreeMap order): guard 101, seal 102, tail 103, trigger 104, write 105.
    let ids: BTreeMap<String, u32> = facts
        .iter()
        .filter_map(|f| match f {
            CatalogFact::Function { oid, name, .. } => Some((name.clone(), *oid)),
            _ => None,
        })
        .collect();
    for f in facts.iter_mut() {
        if let CatalogFact::Trigger { name, function, .. } = f {
            *function = ids[match name.as_str() {
                GUARD_TRIGGER => &fns.guard,
                TAIL_TRIGGER => &fns.tail,
                _ => &fns.trigger,
            }];
        }
    }
    facts
}

fn state_of(name: &TenantName, facts: &[CatalogFact], exclude: &[String]) -> AuditState {
    audit_state(facts, &AuditFns::of(name), &function_bodies(name).unwrap(), exclude)
}

/// The tables to trigger and those of them stale, when the audit log's own
/// objects are all as they should be; None otherwise.
fn judge(name: &TenantName, facts: &[CatalogFact]) -> Option<(Vec<String>, Vec<String>)> {
    let s = state_of(name, facts, &[]);
    assert!(s.excluded_triggered.is_empty());
    let intact = s.schema_exists
        && s.table
        && s.head
        && s.pending
        && s.guard
        && s.functions_current
        && !s.legacy_functions
        && s.misshapen.is_empty();
    intact.then_some((s.untriggered, s.stale))
}

fn edit(facts: &mut [CatalogFact], pick: impl Fn(&CatalogFact) -> bool, change: impl Fn(&mut CatalogFact)) {
    let f = facts.iter_mut().find(|f| pick(f)).expect("the fact to edit");
    change(f);
}

fn is_fn(f: &CatalogFact, wanted: &str) -> bool {
    matches!(f, CatalogFact::Function { name, .. } if name == wanted)
}

fn is_trigger(f: &CatalogFact, rel: u32, wanted: &str) -> bool {
    matches!(f, CatalogFact::Trigger { relation, name, .. } if *relation == rel && name == wanted)
}

#[test]
fn the_light_check_passes_a_converged_schema_and_lists_new_tables_sorted() {
    let t = n("acme");
    let mut facts = converged_facts(&t);
    assert_eq!(judge(&t, &facts), Some((vec![], vec![])));
    // A migration's new tables (a plain and a partitioned one); its
    // partitions, sequences and `_tenancy_*` tables are never audited.
    facts.push(CatalogFact::Relation {
        oid: 20,
        name: "orders".into(),
        kind: 'r',
        partition: false,
    });
    facts.push(CatalogFact::Relation {
        oid: 21,
        name: "b_events".into(),
        kind: 'p',
        partition: false,
    });
    facts.push(CatalogFact::Relation {
        oid: 22,
        name: "b_events_1".into(),
        kind: 'r',
        partition: true,
    });
    facts.push(CatalogFact::Relation {
        oid: 23,
        name: "_tenancy_scratch".into(),
        kind: 'r',
        partition: false,
    });
    facts.push(CatalogFact::Relation {
        oid: 24,
        name: "v".into(),
        kind: 'v',
        partition: false,
    });
    assert_eq!(
        judge(&t, &facts),
        Some((vec!["b_events".into(), "orders".into()], vec![]))
    );
}

#[test]
fn an_excluded_table_is_never_untriggered_and_its_triggers_are_listed_for_dropping() {
    let t = n("acme");
    let mut facts = converged_facts(&t);
    let items = vec!["items".to_string()];
    let u = state_of(&t, &facts, &items);
    assert_eq!(u.excluded_triggered, ["items"]);
    assert!(u.untriggered.is_empty() && u.stale.is_empty());
    assert_eq!(
        u,
        AuditState {
            excluded_triggered: items.clone(),
            ..full()
        }
    );
    let actions = plan(&u, None);
    assert_eq!(actions, [AuditAction::UntriggerTable { table: "items".into() }]);
    let sql = render(&actions[0], &t).unwrap();
    assert_eq!(sql.len(), TABLE_TRIGGERS.len() + LEGACY_TABLE_TRIGGERS.len());
    assert!(sql.iter().all(|s| s.starts_with("DROP TRIGGER IF EXISTS")), "{sql:?}");
    // Once dropped (only the legacy per-row trigger left counts too).
    facts.retain(|f| !matches!(f, CatalogFact::Trigger { relation: 15, .. }));
    assert_eq!(state_of(&t, &facts, &items), full());
    facts.push(CatalogFact::Trigger {
        relation: 15,
        name: LEGACY_TABLE_TRIGGERS[0].into(),
        function: 1,
        enabled: 'O',
        deferred: false,
        args: vec![],
    });
    assert_eq!(state_of(&t, &facts, &items).excluded_triggered, ["items"]);
    // Not excluded any more: the table needs its triggers, replacing the
    // legacy one, with its key as their arguments.
    let u = state_of(&t, &facts, &[]);
    assert_eq!((u.untriggered, u.stale), (items.clone(), items));
    assert_eq!(
        u.keys,
        BTreeMap::from([("items".to_string(), vec!["30".to_string(), "id".to_string()])])
    );
}

#[test]
fn a_table_trigger_dropped_disabled_or_replaced_makes_the_table_stale() {
    let t = n("acme");
    let mut facts = converged_facts(&t);
    edit(
        &mut facts,
        |f| is_trigger(f, 15, "_tenancy_audit_update"),
        |f| {
            if let CatalogFact::Trigger { enabled, .. } = f {
                *enabled = 'D';
            }
        },
    );
    assert_eq!(judge(&t, &facts), Some((vec!["items".into()], vec!["items".into()])));
    let mut facts = converged_facts(&t);
    facts.retain(|f| !is_trigger(f, 13, "_tenancy_audit_del"));
    edit(
        &mut facts,
        |f| is_trigger(f, 15, "_tenancy_audit_ins"),
        |f| {
            if let CatalogFact::Trigger { function, .. } = f {
                *function = 9999; // CREATE OR REPLACE TRIGGER ... EXECUTE FUNCTION something_else()
            }
        },
    );
    assert_eq!(
        judge(&t, &facts),
        Some((vec!["docs".into(), "items".into()], vec!["docs".into(), "items".into()]))
    );
    // Another function of the schema named like ours does not count
    // (only the trigger function's oid does).
    let mut facts = converged_facts(&t);
    edit(
        &mut facts,
        |f| is_trigger(f, 15, "_tenancy_audit_ins"),
        |f| {
            if let CatalogFact::Trigger { function, .. } = f {
                *function = 101; // the guard function
            }
        },
    );
    assert_eq!(judge(&t, &facts), Some((vec!["items".into()], vec!["items".into()])));
}

#[test]
fn any_change_to_the_audit_logs_own_objects_is_judged_not_intact() {
    let t = n("acme");
    type Tamper = Box<dyn Fn(&mut Vec<CatalogFact>)>;
    let fns = AuditFns::of(&t);
    let set_fn = |wanted: &String, change: fn(&mut CatalogFact)| -> Tamper {
        let wanted = wanted.clone();
        Box::new(move |facts: &mut Vec<CatalogFact>| edit(facts, |f| is_fn(f, &wanted), change))
    };
    let set_trigger = |wanted: &'static str, change: fn(&mut CatalogFact)| -> Tamper {
        Box::new(move |facts: &mut Vec<CatalogFact>| {
            edit(
                facts,
                |f| is_trigger(f, 10, wanted) || is_trigger(f, 11, wanted) || is_trigger(f, 17, wanted),
                change,
            )
        })
    };
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "audit table dropped",
            Box::new(|f: &mut Vec<CatalogFact>| {
                f.retain(|x| !matches!(x, CatalogFact::Relation { name, .. } if name == AUDIT_TABLE))
            }),
        ),
        (
            "head table dropped",
            Box::new(|f: &mut Vec<CatalogFact>| {
                f.retain(|x| !matches!(x, CatalogFact::Relation { name, .. } if name == HEAD_TABLE))
            }),
        ),
        (
            "head replaced by a view",
            Box::new(|f: &mut Vec<CatalogFact>| {
                edit(
                    f,
                    |x| matches!(x, CatalogFact::Relation { name, .. } if name == HEAD_TABLE),
                    |x| {
                        if let CatalogFact::Relation { kind, .. } = x {
                            *kind = 'v';
                        }
                    },
                )
            }),
        ),
        (
            "audit table partitioned",
            Box::new(|f: &mut Vec<CatalogFact>| {
                edit(
                    f,
                    |x| matches!(x, CatalogFact::Relation { name, .. } if name == AUDIT_TABLE),
                    |x| {
                        if let CatalogFact::Relation { kind, .. } = x {
                            *kind = 'p';
                        }
                    },
                )
            }),
        ),
        (
            "trigger function's source replaced",
            set_fn(&fns.trigger, |x| {
                if let CatalogFact::Function { source, .. } = x {
                    source.push_str("-- evil")
                }
            }),
        ),
        (
            "write function made SECURITY INVOKER",
            set_fn(&fns.write, |x| {
                if let CatalogFact::Function { definer, .. } = x {
                    *definer = false
                }
            }),
        ),
        (
            "guard function made SECURITY DEFINER",
            set_fn(&fns.guard, |x| {
                if let CatalogFact::Function { definer, .. } = x {
                    *definer = true
                }
            }),
        ),
        (
            "tail function given to another owner",
            set_fn(&fns.tail, |x| {
                if let CatalogFact::Function { owned, .. } = x {
                    *owned = false
                }
            }),
        ),
        (
            "search_path reset",
            set_fn(&fns.write, |x| {
                if let CatalogFact::Function { config, .. } = x {
                    *config = None
                }
            }),
        ),
        (
            "search_path changed",
            set_fn(&fns.trigger, |x| {
                if let CatalogFact::Function { config, .. } = x {
                    *config = Some(vec!["search_path=public".into()])
                }
            }),
        ),
        (
            "a setting added",
            set_fn(&fns.trigger, |x| {
                if let CatalogFact::Function { config, .. } = x {
                    config.as_mut().unwrap().push("work_mem=1MB".into())
                }
            }),
        ),
        ("write function dropped", {
            let write = fns.write.clone();
            Box::new(move |f: &mut Vec<CatalogFact>| f.retain(|x| !is_fn(x, &write)))
        }),
        (
            "guard trigger disabled",
            set_trigger(GUARD_TRIGGER, |x| {
                if let CatalogFact::Trigger { enabled, .. } = x {
                    *enabled = 'D'
                }
            }),
        ),
        (
            "guard trigger enabled only for replicas",
            set_trigger(GUARD_TRIGGER, |x| {
                if let CatalogFact::Trigger { enabled, .. } = x {
                    *enabled = 'R'
                }
            }),
        ),
        (
            "tail trigger disabled",
            set_trigger(TAIL_TRIGGER, |x| {
                if let CatalogFact::Trigger { enabled, .. } = x {
                    *enabled = 'D'
                }
            }),
        ),
        (
            "tail trigger not deferred",
            set_trigger(TAIL_TRIGGER, |x| {
                if let CatalogFact::Trigger { deferred, .. } = x {
                    *deferred = false
                }
            }),
        ),
        (
            "tail trigger calling another function",
            set_trigger(TAIL_TRIGGER, |x| {
                if let CatalogFact::Trigger { function, .. } = x {
                    *function = 9999
                }
            }),
        ),
        (
            "guard trigger renamed",
            set_trigger(GUARD_TRIGGER, |x| {
                if let CatalogFact::Trigger { name, .. } = x {
                    *name = "renamed".into()
                }
            }),
        ),
        (
            "tail trigger dropped",
            Box::new(|f: &mut Vec<CatalogFact>| f.retain(|x| !is_trigger(x, 17, TAIL_TRIGGER))),
        ),
        (
            "guard trigger dropped from the pending table",
            Box::new(|f: &mut Vec<CatalogFact>| f.retain(|x| !is_trigger(x, 17, GUARD_TRIGGER))),
        ),
        (
            "pending table dropped",
            Box::new(|f: &mut Vec<CatalogFact>| {
                f.retain(|x| !matches!(x, CatalogFact::Relation { name, .. } if name == PENDING_TABLE))
            }),
        ),
        (
            "tail trigger on the head (once per transaction, holding the head's lock, as until 2026-12-03)",
            Box::new(|f: &mut Vec<CatalogFact>| {
                for x in f.iter_mut() {
                    if let CatalogFact::Trigger { relation, name, .. } = x {
                        if name == TAIL_TRIGGER {
                            *relation = 11
                        }
                    }
                }
            }),
        ),
        (
            "a second tail trigger, on the head",
            Box::new(|f: &mut Vec<CatalogFact>| {
                let tail = f.iter().find(|x| is_trigger(x, 17, TAIL_TRIGGER)).cloned().unwrap();
                if let CatalogFact::Trigger { function, deferred, .. } = tail {
                    f.push(CatalogFact::Trigger {
                        relation: 11,
                        name: TAIL_TRIGGER.into(),
                        function,
                        enabled: 'O',
                        deferred,
                        args: vec![],
                    });
                }
            }),
        ),
        (
            "tail trigger on the audit table (per entry, as before 2026-12)",
            Box::new(|f: &mut Vec<CatalogFact>| {
                for x in f.iter_mut() {
                    if let CatalogFact::Trigger { relation, name, .. } = x {
                        if name == TAIL_TRIGGER {
                            *relation = 10
                        }
                    }
                }
            }),
        ),
        (
            "guard function renamed",
            set_fn(&fns.guard, |x| {
                if let CatalogFact::Function { name, .. } = x {
                    *name = "_tenancy_audit_guard2".into()
                }
            }),
        ),
        ("no schema (no rows)", Box::new(|f: &mut Vec<CatalogFact>| f.clear())),
    ];
    for (what, tamper) in cases {
        let mut facts = converged_facts(&t);
        tamper(&mut facts);
        assert_eq!(judge(&t, &facts), None, "{what}: judged intact");
    }
}

#[test]
fn each_tenant_has_functions_of_its_own_names_and_the_shared_ones_are_dropped() {
    // No two tenants' audit functions share a name (Postgres resolves a
    // function named in DDL through a list of every function of that name
    // in the database), and the longest name fits an identifier.
    let a = AuditFns::of(&n("ab-c"));
    let b = AuditFns::of(&n("a-bc"));
    let long = AuditFns::of(&n(&"z".repeat(crate::api::tenant::NAME_MAX_LEN)));
    let all = |f: &AuditFns| {
        [
            f.write.clone(),
            f.trigger.clone(),
            f.guard.clone(),
            f.tail.clone(),
            f.seal.clone(),
        ]
    };
    let mut names: Vec<String> = [&a, &b, &long].into_iter().flat_map(all).collect();
    assert!(
        names.iter().all(|f| f.len() <= 63 && f.starts_with("_tenancy_audit_")),
        "{names:?}"
    );
    assert!(all(&a).iter().all(|f| !LEGACY_FUNCTIONS.contains(&f.as_str())));
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 15);
    assert_eq!(a.trigger, "_tenancy_audit_trigger_ab_c");
    // The bodies are keyed by those names; the triggers call them.
    let t = n("acme");
    let fns = AuditFns::of(&t);
    assert_eq!(
        function_bodies(&t).unwrap().into_keys().collect::<Vec<_>>(),
        [
            fns.guard.clone(),
            fns.seal.clone(),
            fns.tail.clone(),
            fns.trigger.clone(),
            fns.write.clone()
        ]
    );
    let sql = render(
        &AuditAction::TriggerTable {
            table: "items".into(),
            replace: false,
            args: vec![],
        },
        &t,
    )
    .unwrap();
    assert_eq!(sql.len(), 4, "{sql:?}");
    assert!(
        sql.iter()
            .all(|s| s.ends_with(&format!("EXECUTE FUNCTION \"tenant_acme\".\"{}\"()", fns.trigger))),
        "{sql:?}"
    );
    let sql = render(&AuditAction::GuardTable, &t).unwrap().join(";");
    assert!(
        sql.contains(&format!("\"tenant_acme\".\"{}\"()", fns.guard))
            && sql.contains(&format!("\"tenant_acme\".\"{}\"()", fns.tail))
    );
    // An earlier version's shared functions left in the schema: the
    // observation reports them, and the plan drops them last (after the
    // triggers were moved to the tenant's own).
    let mut facts = converged_facts(&t);
    assert!(judge(&t, &facts).is_some());
    facts.push(CatalogFact::Function {
        oid: 300,
        name: TRIGGER_FN.into(),
        definer: true,
        owned: true,
        config: Some(vec![FN_SEARCH_PATH.into()]),
        source: "old".into(),
        argtypes: String::new(),
    });
    assert_eq!(judge(&t, &facts), None);
    assert!(state_of(&t, &facts, &[]).legacy_functions);
    let upgraded = AuditState {
        functions_current: false,
        guard: false,
        untriggered: vec!["items".into()],
        stale: vec!["items".into()],
        legacy_functions: true,
        ..full()
    };
    let actions = plan(&upgraded, None);
    assert_eq!(actions.first(), Some(&AuditAction::ReplaceFunctions));
    assert_eq!(actions.last(), Some(&AuditAction::DropLegacyFunctions));
    assert_eq!(
        render(&AuditAction::DropLegacyFunctions, &t).unwrap(),
        [
            "DROP FUNCTION IF EXISTS \"tenant_acme\"._tenancy_audit_write(text, text, jsonb[], text[])",
            "DROP FUNCTION IF EXISTS \"tenant_acme\"._tenancy_audit_trigger()",
            "DROP FUNCTION IF EXISTS \"tenant_acme\"._tenancy_audit_guard()",
            "DROP FUNCTION IF EXISTS \"tenant_acme\"._tenancy_audit_tail()",
        ]
    );
}

#[test]
fn functions_are_counted_as_observe_counts_them() {
    let t = n("acme");
    // An overload of one of ours with another source does not count.
    let mut facts = converged_facts(&t);
    facts.push(CatalogFact::Function {
        oid: 200,
        name: AuditFns::of(&t).trigger,
        definer: true,
        owned: true,
        config: None,
        source: "other".into(),
        argtypes: "23".into(),
    });
    assert!(judge(&t, &facts).is_some());
    // One that matches too makes five: observe says not current.
    let mut facts = converged_facts(&t);
    let mut copy = facts
        .iter()
        .find(|f| is_fn(f, &AuditFns::of(&t).write))
        .unwrap()
        .clone();
    if let CatalogFact::Function { oid, .. } = &mut copy {
        *oid = 201;
    }
    facts.push(copy);
    assert_eq!(judge(&t, &facts), None);
    // Sources are another tenant's (its schema in every body).
    let facts = converged_facts(&n("other"));
    assert_eq!(judge(&t, &facts), None);
}

#[test]
fn the_observation_reads_catalogs_only_by_index_and_qualified() {
    // Constant text (one prepared statement per session), no view, every
    // relation and type qualified, each catalog read by an indexed column:
    // pg_class by oid or by (name, namespace), never by namespace alone.
    for catalog in [
        "pg_namespace",
        "pg_depend",
        "pg_class",
        "pg_trigger",
        "pg_proc",
        "pg_attribute",
        "pg_index",
    ] {
        assert!(FACTS_SQL.contains(&format!("FROM pg_catalog.{catalog} ")), "{catalog}");
    }
    assert!(!FACTS_SQL.contains("pg_roles") && !FACTS_SQL.contains("pg_tables"));
    assert!(
        !FACTS_SQL.contains("::regclass") && !FACTS_SQL.contains("::text") && !FACTS_SQL.contains("::oid"),
        "unqualified types"
    );
    for indexed in [
        "d.refclassid = '2615' AND d.refobjid =",
        "n.oid = pg_catalog.to_regnamespace($1)",
        "c.oid = ANY",
        "c.relname = ANY ($5) AND c.relnamespace =",
        "t.tgrelid = ANY",
        "p.oid = ANY",
        "a.attrelid = ANY",
        "a.attrelid = i.indrelid AND a.attnum = k.attnum",
        "i.indrelid = ANY",
    ] {
        assert!(FACTS_SQL.contains(indexed), "{indexed}");
    }
    assert_eq!(FACTS_SQL.matches("relnamespace").count(), 2);
    assert_eq!(FACTS_SQL.matches(" JOIN ").count(), 2, "the key's columns only");
}

/// A table's triggers carry its primary key (its index's oid, then its
/// columns in the key's order, as `tgargs` holds them): a key changed,
/// reordered, renamed or dropped makes the table stale, with the key it
/// has now.
#[test]
fn triggers_whose_arguments_are_not_the_tables_key_are_stale() {
    let t = n("acme");
    let key = |facts: &mut Vec<CatalogFact>, index: u32, columns: &[&str]| {
        facts.retain(|f| !matches!(f, CatalogFact::KeyColumn { relation: 15, .. }));
        for (i, c) in columns.iter().enumerate() {
            facts.push(CatalogFact::KeyColumn {
                relation: 15,
                index,
                position: i as i64 + 1,
                name: c.to_string(),
                encoded: c.as_bytes().to_vec(),
            });
        }
    };
    let stale = |keys: &[&str]| {
        let mut s = full();
        s.untriggered = vec!["items".into()];
        s.stale = vec!["items".into()];
        s.keys
            .insert("items".into(), keys.iter().map(|k| k.to_string()).collect());
        s
    };
    let mut facts = converged_facts(&t);
    assert_eq!(state_of(&t, &facts, &[]), full());
    // Facts come in any order: the key's columns by position.
    key(&mut facts, 30, &["id"]);
    facts.rotate_left(3);
    assert_eq!(state_of(&t, &facts, &[]), full());
    key(&mut facts, 31, &["id"]);
    assert_eq!(state_of(&t, &facts, &[]), stale(&["31", "id"]), "a new key index");
    key(&mut facts, 30, &["id", "region"]);
    assert_eq!(
        state_of(&t, &facts, &[]),
        stale(&["30", "id", "region"]),
        "a column more"
    );
    let mut swapped = converged_facts(&t);
    key(&mut swapped, 30, &["region", "id"]);
    swapped.retain(|f| !matches!(f, CatalogFact::KeyColumn { position: 1, .. }));
    swapped.push(CatalogFact::KeyColumn {
        relation: 15,
        index: 30,
        position: 1,
        name: "region".into(),
        encoded: b"region".to_vec(),
    });
    assert_eq!(state_of(&t, &swapped, &[]), stale(&["30", "region", "id"]));
    key(&mut facts, 30, &["item_id"]);
    assert_eq!(state_of(&t, &facts, &[]), stale(&["30", "item_id"]), "renamed");
    key(&mut facts, 30, &[]);
    assert_eq!(state_of(&t, &facts, &[]), stale(&[]), "no key");
    // Compared as bytes in the database's encoding, not as text.
    let mut latin = converged_facts(&t);
    key(&mut latin, 30, &["id"]);
    if let Some(CatalogFact::KeyColumn { encoded, .. }) =
        latin.iter_mut().find(|f| matches!(f, CatalogFact::KeyColumn { .. }))
    {
        *encoded = b"i\xe9".to_vec();
    }
    assert_eq!(state_of(&t, &latin, &[]), stale(&["30", "id"]));
}

/// What the pending table needs, besides being a table: its transaction
/// ids (`xid8`), their index, and the head's seal floor; and what is
/// misshapen.
#[test]
fn the_pending_table_needs_its_transaction_ids_their_index_and_the_heads_floor() {
    let t = n("acme");
    let not_pending = |f: fn(&mut Vec<CatalogFact>)| {
        let mut facts = converged_facts(&t);
        f(&mut facts);
        state_of(&t, &facts, &[])
    };
    let pending_only = AuditState {
        pending: false,
        ..full()
    };
    assert_eq!(
        not_pending(|f| f.retain(|x| !matches!(x, CatalogFact::Column { name, .. } if name == "xid"))),
        pending_only
    );
    assert_eq!(
        not_pending(|f| f.retain(|x| !matches!(x, CatalogFact::Column { name, .. } if name == "seal_floor"))),
        pending_only
    );
    assert_eq!(
        not_pending(|f| f.retain(|x| !matches!(x, CatalogFact::Relation { name, .. } if name == PENDING_XID_INDEX))),
        pending_only
    );
    assert_eq!(
        not_pending(|f| {
            for x in f.iter_mut() {
                if let CatalogFact::Column { name, type_oid, .. } = x {
                    if name == "xid" {
                        *type_oid = 20; // bigint
                    }
                }
            }
        }),
        pending_only
    );
    assert_eq!(
        not_pending(|f| {
            for x in f.iter_mut() {
                if let CatalogFact::Relation { name, kind, .. } = x {
                    if name == PENDING_XID_INDEX {
                        *kind = 'r';
                    }
                }
            }
        }),
        pending_only
    );
    // The columns must be on those relations: a tenant table's `xid` is not the pending table's.
    assert_eq!(
        not_pending(|f| {
            for x in f.iter_mut() {
                if let CatalogFact::Column { name, relation, .. } = x {
                    if name == "xid" {
                        *relation = 15;
                    }
                }
            }
        }),
        pending_only
    );
    let misshapen = not_pending(|f| {
        for x in f.iter_mut() {
            if let CatalogFact::Relation { name, kind, .. } = x {
                if name == PENDING_TABLE || name == AUDIT_TABLE {
                    *kind = 'v';
                }
            }
        }
    });
    assert_eq!(misshapen.misshapen, [AUDIT_TABLE, PENDING_TABLE]);
    assert!(!misshapen.table && !misshapen.pending);
    assert_eq!(
        not_pending(|f| f.retain(|x| !matches!(x, CatalogFact::Schema))),
        AuditState::default()
    );
}

/// An earlier version's functions (named alike in every schema) count only
/// with the signature their drop names.
#[test]
fn an_earlier_versions_function_counts_with_the_signature_its_drop_names() {
    let t = n("acme");
    let legacy = |name: &str, argtypes: &str| {
        let mut facts = converged_facts(&t);
        facts.push(CatalogFact::Function {
            oid: 300,
            name: name.into(),
            definer: true,
            owned: true,
            config: None,
            source: String::new(),
            argtypes: argtypes.into(),
        });
        state_of(&t, &facts, &[]).legacy_functions
    };
    assert!(legacy(LEGACY_FUNCTIONS[0], "25 25 3807 1009"));
    assert!(!legacy(LEGACY_FUNCTIONS[0], ""));
    for f in &LEGACY_FUNCTIONS[1..] {
        assert!(legacy(f, ""), "{f}");
        assert!(!legacy(f, "23"), "{f}");
    }
    assert!(!legacy("_tenancy_audit_other", ""));
}

#[test]
fn a_converged_schema_plans_nothing() {
    assert!(plan(&full(), None).is_empty());
    let p = PgauditState {
        loaded: true,
        can_set: false,
        app_setting: None,
        ..Default::default()
    };
    assert!(
        plan(&full(), Some(&p)).is_empty(),
        "nothing to do when pgaudit.log cannot be set"
    );
    let p = PgauditState {
        loaded: true,
        can_set: true,
        app_setting: Some("READ, write, ddl".into()),
        ..Default::default()
    };
    assert!(plan(&full(), Some(&p)).is_empty());
    assert!(
        plan(&AuditState::default(), None).is_empty(),
        "no schema, nothing to do"
    );
}

#[test]
fn a_new_schema_gets_tables_functions_guard_and_triggers() {
    let s = AuditState {
        schema_exists: true,
        untriggered: vec!["docs".into()],
        ..Default::default()
    };
    let p = PgauditState {
        loaded: true,
        can_set: true,
        app_setting: None,
        ..Default::default()
    };
    let labels: Vec<_> = plan(&s, Some(&p)).iter().map(AuditAction::label).collect();
    assert_eq!(
        labels,
        [
            "CreateAuditTables",
            "ReplaceAuditFunctions",
            "GuardAuditTable",
            "AuditTable",
            "SetPgauditLog"
        ]
    );
}

#[test]
fn read_auditing_degrades_with_a_reason() {
    let off = PgauditState::default();
    assert_eq!(read_auditing(&off, "a", "adm").reason(), "PgauditNotInstalled");
    let su = PgauditState {
        loaded: true,
        can_set: false,
        app_setting: None,
        ..Default::default()
    };
    let r = read_auditing(&su, "tenant_x_app", "adm");
    assert_eq!(r.reason(), "PgauditNeedsSuperuser");
    assert!(
        r.message().contains("ALTER ROLE tenant_x_app SET pgaudit.log"),
        "{}",
        r.message()
    );
    let granted = PgauditState {
        loaded: true,
        can_set: false,
        app_setting: Some("all".into()),
        ..Default::default()
    };
    assert_eq!(read_auditing(&granted, "a", "adm"), ReadAuditing::On);
}

#[test]
fn table_names_are_quoted_in_triggers() {
    let sql = render(
        &AuditAction::TriggerTable {
            table: "we\"ird; DROP".into(),
            replace: true,
            args: vec![],
        },
        &n("acme"),
    )
    .unwrap();
    assert!(
        sql.iter().all(|s| s.contains("\"tenant_acme\".\"we\"\"ird; DROP\"")),
        "{sql:?}"
    );
    // 4 drops, the legacy per-row UPDATE trigger's drop, 4 creates.
    assert_eq!(sql.len(), 9);
}

#[test]
fn only_tables_with_stale_triggers_get_drops() {
    let s = AuditState {
        untriggered: vec!["new".into(), "tampered".into()],
        stale: vec!["tampered".into()],
        ..full()
    };
    let actions = plan(&s, None);
    assert_eq!(
        actions,
        [
            AuditAction::TriggerTable {
                table: "new".into(),
                replace: false,
                args: vec![]
            },
            AuditAction::TriggerTable {
                table: "tampered".into(),
                replace: true,
                args: vec![]
            }
        ]
    );
    let new = render(&actions[0], &n("acme")).unwrap();
    assert_eq!(new.len(), 4);
    assert!(new.iter().all(|s| s.starts_with("CREATE TRIGGER")), "{new:?}");
    let tampered = render(&actions[1], &n("acme")).unwrap();
    assert_eq!(
        tampered
            .iter()
            .filter(|s| s.starts_with("DROP TRIGGER IF EXISTS"))
            .count(),
        5,
        "{tampered:?}"
    );
}

#[test]
fn prune_runs_at_most_daily() {
    let now = Utc::now();
    assert_eq!(prune_due(None, None, now), None);
    assert_eq!(prune_due(Some(30), None, now), Some(now - chrono::Duration::days(30)));
    assert_eq!(prune_due(Some(30), Some(now - chrono::Duration::hours(3)), now), None);
    assert!(prune_due(Some(30), Some(now - chrono::Duration::hours(25)), now).is_some());
}

fn chain(n: usize) -> Vec<ChainRow> {
    let mut prev = GENESIS.to_vec();
    (1..=n as i64)
        .map(|id| {
            let content = format!("row {id}").into_bytes();
            let hash = Sha256::new()
                .chain_update(&prev)
                .chain_update(&content)
                .finalize()
                .to_vec();
            let r = ChainRow {
                id,
                operation: "INSERT".into(),
                prev_hash: prev.clone(),
                hash: hash.clone(),
                content,
                row_pk: None,
            };
            prev = hash;
            r
        })
        .collect()
}

fn walk(rows: &[ChainRow], head: Option<(i64, Vec<u8>)>) -> VerifyReport {
    let mut w = Walker::new(head);
    rows.iter().for_each(|r| w.push(r));
    w.finish()
}

#[test]
fn the_walk_finds_edits_removals_and_a_cut_tail() {
    let rows = chain(5);
    // The head is the last entry.
    let head = Some((5, rows[4].hash.clone()));
    assert_eq!(walk(&rows, head.clone()).first_break, None);
    // Rows beyond the head: appended without it moving, or it was set back.
    let b = walk(&rows, Some((3, rows[2].hash.clone()))).first_break.unwrap();
    assert_eq!(b.id, 4);
    assert!(b.what.contains("after the chain head"), "{}", b.what);
    let mut edited = rows.clone();
    edited[2].content = b"row 3 edited".to_vec();
    assert_eq!(walk(&edited, head.clone()).first_break.unwrap().id, 3);
    let mut removed = rows.clone();
    removed.remove(1);
    let b = walk(&removed, head.clone()).first_break.unwrap();
    assert_eq!(b.id, 3);
    assert!(b.what.contains("deleted"), "{}", b.what);
    let b = walk(&rows[..2], head).first_break.unwrap();
    assert!(b.what.contains("rows at the end"), "{}", b.what);
    assert_eq!(walk(&[], Some((0, GENESIS.to_vec()))).first_break, None);
}

fn ring(active: u32) -> Keyring {
    let keys = (1..=active).map(|v| (format!("v{v}"), vec![v as u8 * 7; 32])).collect();
    Keyring::new(keys, &format!("v{active}")).unwrap()
}

#[test]
fn the_anchor_encoding_is_unambiguous_and_covers_every_field() {
    let base = anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32]));
    assert!(base.starts_with(ANCHOR_DOMAIN));
    let variants = [
        anchor_message("uid-2", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
        anchor_message("uid-1", 4, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
        anchor_message("uid-1", 3, 43, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
        anchor_message("uid-1", 3, 42, &[8; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
        anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_001, 1, Some(&[9; 32])),
        anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 2, Some(&[9; 32])),
        anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, None),
        anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[])),
    ];
    for v in &variants {
        assert_ne!(v, &base);
    }
    // Length prefixes: moving a byte from the uid into the hash changes the encoding.
    assert_ne!(
        anchor_message("ab", 1, 1, b"c", 0, 1, None),
        anchor_message("a", 1, 1, b"bc", 0, 1, None)
    );
    // The layout, field by field.
    let m = anchor_message("u", 1, 2, &[0xaa], 3, 4, None);
    let mut expected = ANCHOR_DOMAIN.to_vec();
    expected.extend([0, 0, 0, 1, b'u']);
    expected.extend(1i64.to_be_bytes());
    expected.extend(2i64.to_be_bytes());
    expected.extend([0, 0, 0, 1, 0xaa]);
    expected.extend(3i64.to_be_bytes());
    expected.extend(4u32.to_be_bytes());
    expected.push(0);
    assert_eq!(m, expected);
}

fn anchors(ring: &Keyring, salt: &TenantSalt, points: &[(i64, &[u8])]) -> Vec<AnchorRow> {
    let mut out: Vec<AnchorRow> = Vec::new();
    for (id, hash) in points {
        let prev = out.last().map(|a| (a.seq, a.mac.clone()));
        out.push(
            make_anchor(
                ring,
                salt,
                "uid-1",
                prev.as_ref().map(|p| (p.0, p.1.as_slice())),
                *id,
                hash,
                Utc::now(),
            )
            .unwrap(),
        );
    }
    out
}

#[test]
fn anchors_verify_under_their_key_only_and_in_order() {
    let (r, salt) = (ring(1), TenantSalt::generate());
    let rows = chain(5);
    let a = anchors(&r, &salt, &[(2, &rows[1].hash), (5, &rows[4].hash)]);
    let (points, unknown, bad) = check_anchors(&r, &salt, "uid-1", &a);
    assert_eq!((points.len(), unknown, bad), (2, 0, None));
    // Another tenant's key (salt or uid), an edited field, a forged MAC.
    assert!(check_anchors(&r, &TenantSalt::generate(), "uid-1", &a).2.is_some());
    assert!(check_anchors(&r, &salt, "uid-2", &a).2.is_some());
    let mut edited = a.clone();
    edited[0].last_id = 3;
    assert!(check_anchors(&r, &salt, "uid-1", &edited)
        .2
        .unwrap()
        .what
        .contains("does not verify"));
    // A removed anchor breaks the link of the next.
    let three = anchors(&r, &salt, &[(1, &rows[0].hash), (2, &rows[1].hash), (3, &rows[2].hash)]);
    let gap = [three[0].clone(), three[2].clone()];
    assert!(check_anchors(&r, &salt, "uid-1", &gap)
        .2
        .unwrap()
        .what
        .contains("does not follow"));
    // An anchor under a root key that was retired is skipped, not failed;
    // after a rotation the next anchors are under the new key.
    let rotated = ring(2);
    let mut mixed = a.clone();
    let prev = (mixed[1].seq, mixed[1].mac.clone());
    mixed.push(
        make_anchor(
            &rotated,
            &salt,
            "uid-1",
            Some((prev.0, &prev.1)),
            5,
            &rows[4].hash,
            Utc::now(),
        )
        .unwrap(),
    );
    assert_eq!(mixed[2].key_version, 2);
    let (points, unknown, bad) = check_anchors(&ring(1), &salt, "uid-1", &mixed);
    assert_eq!((points.len(), unknown, bad), (2, 1, None));
    assert_eq!(check_anchors(&rotated, &salt, "uid-1", &mixed).0.len(), 3);
}

fn point(id: i64, hash: &[u8], anchor: bool) -> Checkpoint {
    Checkpoint {
        id,
        hash: hash.to_vec(),
        what: format!("point {id}"),
        is_anchor: anchor,
    }
}

fn walk_anchored(rows: &[ChainRow], anchored: Anchored) -> VerifyReport {
    let head = rows
        .last()
        .map(|r| (r.id, r.hash.clone()))
        .or(Some((0, GENESIS.to_vec())));
    let mut w = Walker::with_anchors(head, anchored);
    rows.iter().for_each(|r| w.push(r));
    w.finish()
}

#[test]
fn the_walk_checks_every_checkpoint_the_operator_recorded() {
    let rows = chain(6);
    let points = vec![
        point(6, &rows[5].hash, false),
        point(3, &rows[2].hash, true),
        point(0, &GENESIS, true),
    ];
    let ok = walk_anchored(
        &rows,
        Anchored {
            checkpoints: points.clone(),
            ..Default::default()
        },
    );
    assert_eq!(ok.first_break, None);
    assert_eq!(ok.anchors_checked, 2);
    // A consistent rewrite: every hash recomputed after an edit of row 2.
    let mut rewritten = rows.clone();
    rewritten[1].content = b"row 2 edited".to_vec();
    let mut prev = rewritten[0].hash.clone();
    for r in rewritten.iter_mut().skip(1) {
        r.prev_hash = prev.clone();
        r.hash = Sha256::new()
            .chain_update(&prev)
            .chain_update(&r.content)
            .finalize()
            .to_vec();
        prev = r.hash.clone();
    }
    assert_eq!(
        walk(&rewritten, Some((6, prev.clone()))).first_break,
        None,
        "without anchors the rewrite passes"
    );
    let b = walk_anchored(
        &rewritten,
        Anchored {
            checkpoints: points.clone(),
            ..Default::default()
        },
    )
    .first_break
    .unwrap();
    assert_eq!(b.id, 3);
    assert!(b.what.contains("point 3"), "{}", b.what);
    // The tail cut and the in-schema head set back to match.
    let b = walk_anchored(
        &rows[..4],
        Anchored {
            checkpoints: points.clone(),
            ..Default::default()
        },
    )
    .first_break
    .unwrap();
    assert_eq!(b.id, 6);
    assert!(b.what.contains("rows at the end"), "{}", b.what);
    // A missing row in the middle, at a checkpoint.
    let holed: Vec<ChainRow> = rows.iter().filter(|r| r.id != 3).cloned().collect();
    assert!(walk_anchored(
        &holed,
        Anchored {
            checkpoints: points.clone(),
            ..Default::default()
        }
    )
    .first_break
    .is_some());
    // Rows beyond the anchored head read after the snapshot.
    let b = walk_anchored(
        &rows,
        Anchored {
            checkpoints: vec![point(4, &rows[3].hash, false)],
            head_after: Some(4),
            ..Default::default()
        },
    )
    .first_break
    .unwrap();
    assert_eq!(b.id, 5);
    assert!(b.what.contains("anchored head"), "{}", b.what);
    // The empty chain.
    assert_eq!(
        walk_anchored(
            &[],
            Anchored {
                checkpoints: vec![point(0, &GENESIS, false)],
                ..Default::default()
            }
        )
        .first_break,
        None
    );
    assert!(walk_anchored(
        &[],
        Anchored {
            checkpoints: vec![point(0, &[1; 32], false)],
            ..Default::default()
        }
    )
    .first_break
    .is_some());
}

/// A chain pruned at row `cut`: an ANCHOR row there, the rows after it,
/// a PRUNE row confirming it.
fn pruned(rows: &[ChainRow], cut: usize) -> Vec<ChainRow> {
    let c = &rows[cut - 1];
    let mut out = vec![ChainRow {
        id: c.id,
        operation: "ANCHOR".into(),
        prev_hash: c.hash.clone(),
        hash: c.hash.clone(),
        content: vec![],
        row_pk: None,
    }];
    out.extend(rows[cut..].iter().cloned());
    let prev = out.last().map(|r| r.hash.clone()).unwrap();
    let content = b"prune".to_vec();
    let hash = Sha256::new()
        .chain_update(&prev)
        .chain_update(&content)
        .finalize()
        .to_vec();
    let id = out.last().map(|r| r.id + 1).unwrap();
    let pk = serde_json::json!({"through_id": c.id, "cut_hash": hex::encode(&c.hash)});
    out.push(ChainRow {
        id,
        operation: "PRUNE".into(),
        prev_hash: prev,
        hash,
        content,
        row_pk: Some(pk),
    });
    out
}

#[test]
fn an_anchor_row_must_be_at_or_before_the_recorded_cut() {
    let rows = chain(6);
    let chain3 = pruned(&rows, 3);
    let cut = |id: i64| Some((id, rows[id as usize - 1].hash.clone()));
    let before = vec![point(2, &rows[1].hash, true), point(5, &rows[4].hash, true)];
    let ok = walk_anchored(
        &chain3,
        Anchored {
            checkpoints: before.clone(),
            cut: cut(3),
            ..Default::default()
        },
    );
    assert_eq!(ok.first_break, None);
    assert_eq!(
        (ok.anchors_checked, ok.anchors_skipped),
        (1, 1),
        "the anchor before the cut cannot be checked"
    );
    // No cut recorded: the owner pruned by itself.
    let b = walk_anchored(
        &chain3,
        Anchored {
            checkpoints: before.clone(),
            ..Default::default()
        },
    )
    .first_break
    .unwrap();
    assert!(b.what.contains("no retention cut"), "{}", b.what);
    // A cut further than the operator's.
    let b = walk_anchored(
        &chain3,
        Anchored {
            checkpoints: before.clone(),
            cut: cut(2),
            ..Default::default()
        },
    )
    .first_break
    .unwrap();
    assert!(b.what.contains("after the operator's last retention cut"), "{}", b.what);
    // The operator recorded a later cut but crashed before deleting: the
    // older ANCHOR row is fine, the recorded cut's row must be passed.
    let mut points = before.clone();
    points.push(point(4, &rows[3].hash, false));
    assert_eq!(
        walk_anchored(
            &chain3,
            Anchored {
                checkpoints: points,
                cut: cut(4),
                ..Default::default()
            }
        )
        .first_break,
        None
    );
}

#[test]
fn the_triggers_arguments_are_the_observed_key_quoted_as_literals() {
    let s = AuditState {
        untriggered: vec!["orders".into(), "nokey".into()],
        keys: [(
            "orders".to_string(),
            vec!["16384".to_string(), "it's \"x\" \\".to_string()],
        )]
        .into(),
        ..full()
    };
    let actions = plan(&s, None);
    assert_eq!(
        actions,
        [
            AuditAction::TriggerTable {
                table: "orders".into(),
                replace: false,
                args: vec!["16384".into(), "it's \"x\" \\".into()]
            },
            AuditAction::TriggerTable {
                table: "nokey".into(),
                replace: false,
                args: vec![]
            }
        ]
    );
    let fns = AuditFns::of(&n("acme"));
    let sql = render(&actions[0], &n("acme")).unwrap();
    assert_eq!(sql.len(), 4);
    assert!(
        sql.iter().all(|s| s.ends_with(&format!(
            "EXECUTE FUNCTION \"tenant_acme\".\"{}\"('16384', 'it''s \"x\" \\')",
            fns.trigger
        ))),
        "{sql:?}"
    );
    let sql = render(&actions[1], &n("acme")).unwrap();
    assert!(sql.iter().all(|s| s.ends_with("()")), "{sql:?}");
}

/// The epoch the walk renders from a stored time is the server's
/// `EXTRACT(EPOCH FROM t)::text` (the values PostgreSQL 15 gave for these
/// times; the pg test `the_epoch_verify_writes_is_the_servers` compares
/// with a live server).
#[test]
fn the_epoch_of_a_stored_time_is_the_servers_text() {
    // Microseconds since 2000-01-01 UTC, as the server stores a time.
    let pg = |unix_micros: i128| i64::try_from(unix_micros - 946_684_800_000_000).unwrap();
    let cases: [(i64, &str); 10] = [
        (pg(1_796_464_800_000_000), "1796464800.000000"),
        (pg(500_000), "0.500000"),
        (pg(0), "0.000000"),
        (pg(-500_000), "-0.500000"),
        (pg(-1_000_000), "-1.000000"),
        (pg(-315_619_199_999_999), "-315619199.999999"),
        (pg(-210_866_803_200_000_000), "-210866803200.000000"),
        (0, "946684800.000000"),
        (i64::MAX, "Infinity"),
        (i64::MIN, "-Infinity"),
    ];
    for (micros, want) in cases {
        let mut out = String::from("left over");
        out.clear();
        epoch_text(micros, &mut out);
        assert_eq!(out, want, "{micros}");
    }
    // Appends.
    let mut out = String::from("[");
    epoch_text(pg(1), &mut out);
    assert_eq!(out, "[0.000001");
}
