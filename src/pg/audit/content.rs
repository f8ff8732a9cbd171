//! The canonical content of an audit row, the bytes its hash covers: as
//! SQL ([`content_sql`], and the pieces the write function computes once
//! per statement) and in Rust ([`Content`], what the walk renders from the
//! columns; the same bytes, checked against the server by
//! `verify_builds_the_content_the_server_builds` in tests/pg_audit.rs).
//!
//! Takes column expressions or values, gives SQL text or bytes; a leaf.
//! Pure.

/// The canonical content of an audit row that its hash covers, as UTF-8:
/// three lines, `header \n row_pk \n changed_columns`, where the header is
/// the JSON array text of (epoch seconds with microseconds, actor,
/// actor_given, request_id, operation, table_name) and the others are jsonb
/// texts (`null` when NULL). jsonb's text form is deterministic and never
/// holds a raw newline; the epoch does not depend on the session's TimeZone.
/// Verification uses this over the columns; the write function computes
/// [`header_sql`] and [`tail_sql`] once per statement and only the key per
/// row (the same bytes).
pub fn content_sql(
    time: &str,
    actor: &str,
    given: &str,
    request: &str,
    op: &str,
    table: &str,
    pk: &str,
    changed: &str,
) -> String {
    format!(
        "pg_catalog.convert_to({} || E'\\n' || {} || E'\\n' || {}, 'UTF8')",
        header_sql(time, actor, given, request, op, table),
        pk_sql(pk),
        tail_sql(changed)
    )
}

/// The first line of the content (text).
pub fn header_sql(time: &str, actor: &str, given: &str, request: &str, op: &str, table: &str) -> String {
    format!(
        "pg_catalog.jsonb_build_array(EXTRACT(EPOCH FROM {time}), {actor}, {given}, {request}, {op}, {table})::text"
    )
}

/// The second line (text).
pub(super) fn pk_sql(pk: &str) -> String {
    format!("coalesce({pk}::text, 'null')")
}

/// The third line (text).
pub fn tail_sql(changed: &str) -> String {
    format!("coalesce(pg_catalog.to_jsonb({changed})::text, 'null')")
}

/// One entry's fields as the walk reads them, rendered into the bytes
/// [`content_sql`] gives on the server: jsonb's text form (`[a, b]`,
/// strings escaped as PostgreSQL's `escape_json` does), the epoch as
/// numeric text (`EXTRACT(EPOCH FROM time)::text`) and the key as its
/// jsonb text. Checked against the SQL by `verify_builds_the_content_the_server_builds`
/// (tests/pg_audit.rs).
#[derive(Clone, Copy, Debug)]
pub struct Content<'a> {
    pub epoch: &'a str,
    pub actor: &'a str,
    pub actor_given: bool,
    pub request_id: Option<&'a str>,
    pub operation: &'a str,
    pub table: Option<&'a str>,
    pub row_pk: Option<&'a str>,
    pub changed: Option<&'a [String]>,
}

impl Content<'_> {
    /// Appends the content to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        out.extend_from_slice(self.epoch.as_bytes());
        out.extend_from_slice(b", ");
        json_string(out, self.actor);
        out.extend_from_slice(if self.actor_given { b", true, " } else { b", false, " });
        json_opt(out, self.request_id);
        out.extend_from_slice(b", ");
        json_string(out, self.operation);
        out.extend_from_slice(b", ");
        json_opt(out, self.table);
        out.extend_from_slice(b"]\n");
        out.extend_from_slice(self.row_pk.unwrap_or("null").as_bytes());
        out.push(b'\n');
        match self.changed {
            None => out.extend_from_slice(b"null"),
            Some(cols) => {
                out.push(b'[');
                for (i, c) in cols.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    json_string(out, c);
                }
                out.push(b']');
            }
        }
    }
}

/// Microseconds between 1970-01-01 and 2000-01-01 UTC, Postgres' own
/// epoch for `timestamptz`.
const UNIX_TO_PG_EPOCH_MICROS: i128 = 946_684_800_000_000;

/// `EXTRACT(EPOCH FROM t)::text` (PostgreSQL 14 and later: a numeric of
/// scale 6) of a `timestamptz` as the server stores and sends it in
/// binary: microseconds since 2000-01-01 UTC, `i64::MAX` and `i64::MIN`
/// for `infinity` and `-infinity`. Appends it to `out`. Exact below the
/// last 30 years of the server's range (there the server's own epoch
/// takes a rounding path; the walk asks for its text instead:
/// `verify::time_columns_sql`). The walk formats the epoch itself so that
/// the server sends the column as it is; checked against the server by
/// `the_epoch_verify_writes_is_the_servers` (tests/pg_audit.rs: negative,
/// fractional, extreme and infinite times).
pub fn epoch_text(pg_micros: i64, out: &mut String) {
    use std::fmt::Write;
    match pg_micros {
        i64::MAX => out.push_str("Infinity"),
        i64::MIN => out.push_str("-Infinity"),
        v => {
            let unix = i128::from(v) + UNIX_TO_PG_EPOCH_MICROS;
            let sign = if unix < 0 { "-" } else { "" };
            let abs = unix.unsigned_abs();
            // Writing into a String cannot fail.
            let _ = write!(out, "{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000);
        }
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string as jsonb's text output writes it: `"`, `\\`, `\\b`,
/// `\\f`, `\\n`, `\\r`, `\\t` escaped, other bytes below 0x20 as
/// `\\u00xx`, everything else (UTF-8 included) as it is. Runs of plain
/// bytes are copied at once (verify renders every entry's strings).
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            c if c < 0x20 => {
                out.extend_from_slice(&bytes[plain..i]);
                out.extend_from_slice(format!("\\u{c:04x}").as_bytes());
                plain = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(escaped);
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}
