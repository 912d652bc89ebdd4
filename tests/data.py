"""What the suites share: the services' URLs, malformed tenant names, hostile input (as
hypothesis strategies) and the shared table of tenant names a test app reads.

Importable by the test apps' worker subprocesses too: nothing here needs pytest.
"""

from __future__ import annotations

import os
import typing as t

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from hypothesis import strategies as st
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs.registry import TENANT_NAME

# -- the services (``.ci/run`` and the engineers' environments set these) --------------------

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

# -- tenant names that must be refused everywhere ----------------------------------------------

MALFORMED_NAMES: list[object] = [
    "Acme",
    "ACME",
    "ac me",
    " acme",
    "acme;",
    "acme'; drop table orders; --",
    "'acme'",
    '"acme"',
    "../acme",
    "acme/..",
    "",
    "-acme",
    "acme-",
    "ac_me",
    "ac.me",
    "bücher",
    "a" * 64,
    "a" * 200,
    42,
]


# -- the shared table of tenant names ----------------------------------------------------------


def tenant_table(db: SQLAlchemy, tablename: str) -> type[t.Any]:
    """The shared (not tenant-scoped) table of tenant names of the app of ``db``: what a
    callable ``TENANT_JOBS_TENANTS`` reads. One per test app."""

    class TenantName(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = tablename
        __tenant_shared__ = True
        name: Mapped[str] = mapped_column(sa.String(63), primary_key=True)
    return TenantName


# -- hostile input -----------------------------------------------------------------------------


def wsgi(text: str) -> str:
    """``text`` as a WSGI server hands it over: UTF-8 bytes decoded as latin-1."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


SQL_FRAGMENTS = [
    "acme'; DROP TABLE ftj_hostile_note; --",
    'acme"; DROP SCHEMA public CASCADE; --',
    "' OR '1'='1",
    "acme' OR tenant_id <> 'acme",
    "acme/**/",
    "acme;",
    "$$acme$$",
    "acme\\",
    "acme%",
    "acme_",
    "public",
    "pg_catalog",
    "information_schema",
    "ftjhostile_acme",
    "acme, public",
    '"acme"',
    "acme\x00",
    "acme\t",
    "acme\r\nX-Injected: 1",
    "ACME",
    "Acme",
    " acme",
    "acme ",
    "acme.",
    "xn--acme",
    "a" * 10_000,
    "",
]

ODD_HOSTS = [
    "example.test", "www.example.test", "EXAMPLE.TEST", "acme.example.test.evil.test",
    "acme.example.testx", "[::1]", "[::1]:80", "acme.globex.example.test",
    "acme..example.test", "acme.example.test:99999999999999999999", "xn--acme.example.test",
]  # fmt: skip

#: The tenants the hostile-input suites know.
KNOWN = st.sampled_from(["acme", "globex", "initech"])
#: Arbitrary bytes, as a WSGI server hands them over.
RAW = st.binary(max_size=100).map(lambda raw: raw.decode("latin-1"))
#: A tenant-ish label: known (in any case), valid but unknown, SQL, unicode, raw bytes.
LABELS = st.one_of(
    KNOWN,
    KNOWN.map(str.upper),
    st.from_regex(TENANT_NAME, fullmatch=True),
    st.sampled_from(SQL_FRAGMENTS),
    st.text(max_size=70).map(wsgi),
    st.binary(max_size=70).map(lambda raw: raw.decode("latin-1")),
)
HOSTS = st.one_of(
    st.tuples(LABELS, st.sampled_from(["", ":80", ":8080", ".", ":", ":x", ".:443"])).map(
        lambda parts: f"{parts[0]}.example.test{parts[1]}"
    ),
    LABELS,
    RAW,
    st.sampled_from(ODD_HOSTS),
)
PATHS = st.one_of(
    KNOWN.map(lambda label: f"/{label}/write"),
    LABELS.map(lambda label: f"/{label}/write"),
    st.tuples(KNOWN, st.sampled_from(["//write", "/write/", "/../write", "/./write", "/wr"])).map(
        "/".join
    ),
    st.text(max_size=60).map(lambda text: "/" + wsgi(text)),
    st.binary(max_size=60).map(lambda raw: "/" + raw.decode("latin-1")),
)
