"""One request per tenant through the gateway login, in Python with psycopg 3.

The same single message as the Rust library (docs/data-path.md): the
tenant's app role, BEGIN, then search_path, the tenant's caps and the audit
actor and request id, all transaction-local, in one round trip.

    python tenant_request.py POSTGRES_URL TENANT [TENANT ...]

Prints one line per tenant: "<tenant> ok <rows>" with the rows of its
table `items`, "<tenant> unknown" or "<tenant> not-active".
"""

import re
import sys

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


def begin_sql(tenant: str, actor: str, request_id: str) -> str:
    if not TENANT.match(tenant):
        raise ValueError(f"not a tenant name: {tenant!r}")
    ident = "tenant_" + tenant.replace("-", "_")
    copied = ", ".join(f"'{s}'" for s in COPIED)
    return (
        f'SET LOCAL ROLE "{ident}_app"; BEGIN; SELECT '
        f"pg_catalog.set_config('search_path', {literal(chr(34) + ident + chr(34))}, true), "
        f"pg_catalog.set_config('tenancy.actor', {literal(actor)}, true), "
        f"pg_catalog.set_config('tenancy.request_id', {literal(request_id)}, true), "
        "(SELECT pg_catalog.count(pg_catalog.set_config(pg_catalog.split_part(kv, '=', 1), "
        "pg_catalog.substr(kv, pg_catalog.strpos(kv, '=') + 1), true)) "
        "FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) AS kv "
        "WHERE s.setdatabase = 0 AND s.setrole = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER) "
        f"AND pg_catalog.split_part(kv, '=', 1) IN ({copied}))"
    )


def begin(conn: psycopg.Connection, tenant: str, actor: str, request_id: str) -> None:
    """Opens the tenant transaction on `conn` (autocommit mode, so psycopg
    sends no BEGIN of its own); end it with COMMIT or ROLLBACK."""
    try:
        # No parameters: psycopg sends it with the simple query protocol,
        # which allows the several statements.
        conn.execute(begin_sql(tenant, actor, request_id).encode())
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
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
            print(f"{tenant} ok {','.join(rows)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
