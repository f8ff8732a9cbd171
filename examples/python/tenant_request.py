"""One request per tenant through the gateway login, in Python with psycopg 3.

The same single message as the Rust library (docs/data-path.md): the
tenant's app role, BEGIN, then search_path, application_name
'tenant:<name>' (so the operator's caps watchdog sees whose transaction
this is), the tenant's caps and the audit actor and request id, all SET
LOCAL, in one round trip. The caps of every
tenant are read with one query and kept for CAPS_TTL seconds.

    python tenant_request.py POSTGRES_URL TENANT [TENANT ...]

Prints one line per tenant: "<tenant> ok <rows>" with the rows of its
table `items`, "<tenant> unknown" or "<tenant> not-active".
"""

import re
import sys
import time

import psycopg
from psycopg import errors

COPIED = ("statement_timeout", "idle_in_transaction_session_timeout", "work_mem")
TENANT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class UnknownTenant(Exception):
    pass


class TenantNotActive(Exception):
    pass


def literal(value: str) -> str:
    """An E'' literal: reads the same whatever standard_conforming_strings is."""
    if "\0" in value or len(value.encode()) > 200:
        raise ValueError("value too long or contains NUL")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


CAPS_TTL = 10.0
CAPS_SQL = (
    "SELECT r.rolname::text, pg_catalog.split_part(kv, '=', 1), "
    "pg_catalog.substr(kv, pg_catalog.strpos(kv, '=') + 1) "
    "FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_roles r ON r.oid = s.setrole "
    "CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS kv "
    "WHERE s.setdatabase = 0 AND r.rolname LIKE 'tenant\\_%\\_app' "
    "AND pg_catalog.split_part(kv, '=', 1) IN (" + ", ".join(f"'{s}'" for s in COPIED) + ")"
)
_caps: dict[str, list[tuple[str, str]]] = {}
_caps_read = 0.0


def caps(conn: psycopg.Connection, app_role: str) -> list[tuple[str, str]]:
    """The app role's caps, from every tenant's read at most every CAPS_TTL s."""
    global _caps, _caps_read
    age = time.monotonic() - _caps_read
    if age >= CAPS_TTL or (app_role not in _caps and age >= 1.0):
        fresh: dict[str, list[tuple[str, str]]] = {}
        for role, name, value in conn.execute(CAPS_SQL).fetchall():
            fresh.setdefault(role, []).append((name, value))
        _caps, _caps_read = fresh, time.monotonic()
    return _caps.get(app_role, [])


def begin_sql(tenant: str, actor: str, request_id: str, tenant_caps: list[tuple[str, str]]) -> str:
    if not TENANT.match(tenant):
        raise ValueError(f"not a tenant name: {tenant!r}")
    ident = "tenant_" + tenant.replace("-", "_")
    sql = (
        f'SET LOCAL ROLE "{ident}_app"; BEGIN; SET LOCAL search_path = "{ident}"; '
        f"SET LOCAL application_name = 'tenant:{tenant}'; "
        f"SET LOCAL tenancy.actor = {literal(actor)}; SET LOCAL tenancy.request_id = {literal(request_id)};"
    )
    for name, value in tenant_caps:
        if name in COPIED:
            sql += f" SET LOCAL {name} = {literal(value)};"
    return sql


def begin(conn: psycopg.Connection, tenant: str, actor: str, request_id: str) -> None:
    """Opens the tenant transaction on `conn` (autocommit mode, so psycopg
    sends no BEGIN of its own); end it with COMMIT or ROLLBACK."""
    try:
        # No parameters: psycopg sends it with the simple query protocol,
        # which allows the several statements.
        if not TENANT.match(tenant):
            raise ValueError(f"not a tenant name: {tenant!r}")
        app_role = "tenant_" + tenant.replace("-", "_") + "_app"
        conn.execute(begin_sql(tenant, actor, request_id, caps(conn, app_role)).encode())
    except errors.InvalidParameterValue as e:  # 22023: no such role
        raise UnknownTenant(tenant) from e
    except errors.InsufficientPrivilege as e:  # 42501: not a member: not Active
        raise TenantNotActive(tenant) from e


def main(url: str, tenants: list[str]) -> None:
    # autocommit: transactions are ours; prepare_threshold=None: no named
    # prepared statements (they do not follow a transaction through PgBouncer).
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        for i, tenant in enumerate(tenants):
            try:
                begin(conn, tenant, "python-example", f"py-{i}")
            except UnknownTenant:
                print(f"{tenant} unknown", flush=True)
                continue
            except TenantNotActive:
                print(f"{tenant} not-active", flush=True)
                continue
            try:
                rows = [r[0] for r in conn.execute("SELECT v FROM items ORDER BY id").fetchall()]
                (name,) = conn.execute("SELECT current_setting('application_name')").fetchone()
                assert name == f"tenant:{tenant}", name
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
            print(f"{tenant} ok {','.join(rows)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
