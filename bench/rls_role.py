"""A PostgreSQL role that row-level security applies to, for the RLS benchmark, tests and stress.

Superusers and ``BYPASSRLS`` roles skip every policy, and the tests' own role
(``postgres``) is a superuser, so the RLS tests connect as a role made here:
``LOGIN``, neither ``SUPERUSER`` nor ``BYPASSRLS``, named uniquely (roles are
cluster-wide), and dropped afterwards with everything it owns and was granted.
"""

from __future__ import annotations

import typing as t
import uuid
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import make_url


@contextmanager
def app_role(admin_url: str, *, owner: bool = False) -> t.Iterator[str]:
    """Create the role and yield the URL that connects as it (same server and database).

    The role may read and write every table and sequence of schema ``public``, those
    there now and those ``admin_url``'s role creates later. With ``owner``, it may also
    create tables there, which it then owns (so only ``FORCE ROW LEVEL SECURITY``
    subjects it to their policies).
    """
    name = f"ftj_rls_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    statements = [
        f"CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS",
        f"GRANT USAGE ON SCHEMA public TO {name}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {name}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {name}",
    ]
    if owner:
        statements.append(f"GRANT CREATE ON SCHEMA public TO {name}")
    with admin.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    try:
        yield make_url(admin_url).set(username=name, password=None).render_as_string(False)
    finally:
        with admin.begin() as connection:
            connection.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE usename = :name"),
                {"name": name},
            )
            connection.exec_driver_sql(f"DROP OWNED BY {name} CASCADE")
            connection.exec_driver_sql(f"DROP ROLE {name}")
        admin.dispose()
