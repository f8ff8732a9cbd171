//! The PL/pgSQL of the audit log: the sources of the audit functions in
//! each tenant schema (write, trigger, guard, tail), of the tenant's
//! anchor function, and of the once-per-database anchoring set-up.
//!
//! Takes a validated [`TenantName`] (and the tenant's uid for its anchor
//! function); gives the function bodies as text, byte for byte what is
//! installed: the operator compares `sha256(name:source)` of the installed
//! functions with these, so a changed byte makes every tenant's functions
//! stale (pinned by the `sql_fingerprint` test). No side effects.
//!
//! The text lives in `sql/*.sql`, loaded with `include_str!` and filled by
//! plain substitution of `{{name}}` placeholders ([`fill`]); identifiers
//! and literals are quoted before they are filled in. A function body is a
//! newline followed by its file; a fragment (`append`, `append_vars`) or a
//! statement is its file without the final newline.

use std::collections::BTreeMap;

use super::consts::{
    AuditFns, ANCHOR_ROLE_PREFIX, ANCHOR_SCHEMA, AUDIT_TABLE, CHUNK_ROWS, HEAD_TABLE, PENDING_TABLE,
    SEAL_DELAY_SETTING, SEAL_SETTING, SMALL_STATEMENT,
};
use super::content::content_sql;
use crate::names::TenantName;
use crate::pg::{quote_ident, quote_literal, PgError};

/// `text` with each `{{name}}` replaced by its value in `vars`, in one pass
/// (a value is never scanned for placeholders). Panics on a placeholder
/// without a value: the templates are constants, and every one is rendered
/// by the unit tests.
fn fill(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len() + 256);
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let end = rest[start..]
            .find("}}")
            .map(|e| start + e)
            .unwrap_or_else(|| panic!("an unclosed placeholder in an audit SQL template"));
        let key = &rest[start + 2..end];
        let value = vars
            .iter()
            .find_map(|(k, v)| (*k == key).then_some(*v))
            .unwrap_or_else(|| panic!("no value for {{{{{key}}}}} in an audit SQL template"));
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A fragment or statement: its file without the final newline.
fn text(file: &'static str) -> &'static str {
    file.strip_suffix('\n').unwrap_or(file)
}

/// A function body: a newline, then its file filled in.
fn body(file: &'static str, vars: &[(&str, &str)]) -> String {
    format!("\n{}", fill(file, vars))
}

/// The expected source of each of the tenant's audit functions, by its
/// name ([`AuditFns`]).
pub(super) fn function_bodies(name: &TenantName) -> Result<BTreeMap<String, String>, PgError> {
    let schema = quote_ident(&name.schema())?;
    let owner = quote_literal(&name.owner_role())?;
    let schema_lit = quote_literal(&name.schema())?;
    let fns = AuditFns::of(name);
    let queued = quote_literal(&fns.queued)?;
    let seal_setting = quote_literal(SEAL_SETTING)?;
    let delay_setting = quote_literal(SEAL_DELAY_SETTING)?;
    // The append, shared by the write function (prune's PRUNE entry) and the
    // trigger function, which runs it inline (a nested SECURITY DEFINER call
    // per statement costs a GUC save/restore and a function call): what
    // every entry carries (`prepare`), the INSERT of entries from `pks`
    // (jsonb[]; `op`, `table` and `changed` (text[]) are expressions of the
    // enclosing function), and the transaction's mark once an entry is in
    // (`mark`; the trigger's statement of a few rows inserts its own entry).
    let prepare = fill(
        text(include_str!("sql/append_prepare.sql")),
        &[
            ("schema", &schema),
            ("head_table", HEAD_TABLE),
            ("queued", &queued),
            ("delay_setting", &delay_setting),
        ],
    );
    let mark = |indent: &str| {
        fill(
            text(include_str!("sql/append_mark.sql")),
            &[("indent", indent), ("queued", &queued)],
        )
    };
    let append = |op: &str, table: &str, pks: &str, changed: &str, ret: &str| {
        fill(
            text(include_str!("sql/append.sql")),
            &[
                ("schema", &schema),
                ("pending_table", PENDING_TABLE),
                ("pks", pks),
                ("op", op),
                ("table", table),
                ("changed", changed),
                ("ret", ret),
                ("mark", &mark("  ")),
            ],
        )
    };
    let append_vars = text(include_str!("sql/append_vars.sql"));
    // The trigger's entry for a statement of a few rows, inserted from the
    // keys it read (`... FROM s`).
    let small_insert = fill(
        text(include_str!("sql/small_insert.sql")),
        &[("schema", &schema), ("pending_table", PENDING_TABLE)],
    );
    let write = body(
        include_str!("sql/write.sql"),
        &[
            ("append_vars", append_vars),
            ("prepare", &prepare),
            ("append", &append("p_op", "p_table", "p_pks", "p_changed", "")),
        ],
    );
    let trigger = body(
        include_str!("sql/trigger.sql"),
        &[
            ("append_vars", append_vars),
            ("prepare", &prepare),
            (
                "append",
                &append("TG_OP", "TG_TABLE_NAME::text", "v_pks", "v_changed", " NULL"),
            ),
            ("mark", &mark("      ")),
            ("small_insert", &small_insert),
            ("small_statement", &SMALL_STATEMENT.to_string()),
            ("chunk_rows", &CHUNK_ROWS.to_string()),
        ],
    );
    let guard = body(
        include_str!("sql/guard.sql"),
        &[
            ("owner", &owner),
            ("audit_table", &quote_literal(AUDIT_TABLE)?),
            ("pending_table", &quote_literal(PENDING_TABLE)?),
            ("seal_setting", &seal_setting),
        ],
    );
    // The seal: under the head's row lock, the pending entries in order,
    // each hashed onto the chain (its content built by the query, the same
    // bytes `content_sql` gives the walk), moved into the audit table; then
    // the head and the tenant's head in tenancy.audit_heads through its
    // anchor function (which refuses to move it back). The update touches
    // the head only when it moves.
    let anchor = anchor_fn(name)?;
    let content = content_sql(
        "p.\"time\"",
        "p.actor",
        "p.actor_given",
        "p.request_id",
        "p.operation",
        "p.table_name",
        "p.row_pk",
        "p.changed_columns",
    );
    let seal = body(
        include_str!("sql/seal.sql"),
        &[
            ("schema", &schema),
            ("schema_lit", &schema_lit),
            ("audit_table", AUDIT_TABLE),
            ("head_table", HEAD_TABLE),
            ("pending_table", PENDING_TABLE),
            ("content", &content),
            ("seal_setting", &seal_setting),
            ("anchor", &anchor),
        ],
    );
    // At commit (deferred, once per transaction: queued by its first
    // entry): the seal, without waiting.
    let seal_fn = quote_ident(&fns.seal)?;
    let tail = body(include_str!("sql/tail.sql"), &[("schema", &schema), ("seal", &seal_fn)]);
    Ok(BTreeMap::from([
        (fns.write, write),
        (fns.trigger, trigger),
        (fns.guard, guard),
        (fns.tail, tail),
        (fns.seal, seal),
    ]))
}

/// The tenant's anchor function, qualified and quoted.
pub(super) fn anchor_fn(name: &TenantName) -> Result<String, PgError> {
    Ok(format!(
        "{}.{}",
        quote_ident(ANCHOR_SCHEMA)?,
        quote_ident(&name.schema())?
    ))
}

/// The source of the tenant's anchor function: moves the tenant's head in
/// `tenancy.audit_heads` forward (a later row, or the same row with the same
/// hash), refuses anything else. The uid is a literal, so the function can
/// only ever write its own tenant's row.
pub fn anchor_function_body(name: &TenantName, uid: &str) -> Result<String, PgError> {
    let uid = quote_literal(uid)?;
    let tenant = quote_literal(name.as_str())?;
    Ok(body(
        include_str!("sql/anchor.sql"),
        &[("uid", &uid), ("tenant", &tenant)],
    ))
}

/// The anchoring set-up ([`super::anchor::prepare_anchoring`]): one `DO`
/// block that creates the anchor role and [`ANCHOR_SCHEMA`] when missing
/// and grants what anchoring needs; idempotent.
pub(super) fn prepare_anchoring_sql() -> Result<String, PgError> {
    Ok(fill(
        text(include_str!("sql/prepare_anchoring.sql")),
        &[
            ("prefix", &quote_literal(ANCHOR_ROLE_PREFIX)?),
            ("schema", &quote_literal(ANCHOR_SCHEMA)?),
        ],
    ))
}
