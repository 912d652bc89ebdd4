"""Signed tenant headers: only an app holding the key chooses the tenant a job runs in.

With ``TENANT_JOBS_SIGNING_KEY`` set, every tenant task message carries, next to
the tenant header, the header ``<tenant header>_signature``: an HMAC-SHA256, under
the first key, of the task's name, its id and its tenant. The worker refuses a
tenant task whose tenant is unsigned, signed under none of the keys, or signed for
another task name or id (:class:`~flask_tenant_jobs.errors.TenantSignatureError`).
The message body (the arguments) is not covered: see docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac

from .errors import TenantSignatureError

#: Marks the signature format, so that a later one can be told apart.
VERSION = "v1"
#: How every signature starts.
PREFIX = VERSION + ":"
#: Longest signature header read; anything longer is refused unread.
MAX_SIGNATURE_LENGTH = 128
#: Longest task id or task name signed or checked.
MAX_FIELD_LENGTH = 255


def signature_header(header: str) -> str:
    """The message header carrying the signature of the tenant in ``header``."""
    return f"{header}_signature"


class Signer:
    """Signs tenant headers with the first key; checks them against every key."""

    def __init__(self, keys: tuple[bytes, ...], accept_unsigned: bool = False) -> None:
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)
        self.accept_unsigned = accept_unsigned

    def sign(self, task_name: str, task_id: str, tenant: str) -> str:
        """The signature of ``tenant`` for the task ``task_name`` with id ``task_id``."""
        return _signature(self._macs[0], _signed_text(task_name, task_id, tenant))

    def verify(
        self, task_name: object, task_id: object, tenant: object, signature: object
    ) -> None:
        """Return when ``signature`` signs ``tenant`` for this task under one of the keys;
        else raise ``TenantSignatureError`` saying what was wrong with it."""
        if signature is None:
            if self.accept_unsigned:
                return
            raise TenantSignatureError(task_name, task_id, tenant, "unsigned")
        if (
            not isinstance(signature, str)
            or len(signature) > MAX_SIGNATURE_LENGTH
            or not signature.isascii()  # compare_digest takes ASCII strings only
            or not signature.startswith(PREFIX)
        ):
            raise TenantSignatureError(task_name, task_id, tenant, "malformed")
        text = _checked_text(task_name, task_id, tenant)
        if text is not None:
            for mac in self._macs:
                if hmac.compare_digest(_signature(mac, text), signature):
                    return
        raise TenantSignatureError(task_name, task_id, tenant, "mismatch")


def _signed_text(task_name: str, task_id: str, tenant: str) -> bytes:
    """The signed bytes: each field prefixed by its length, so that no two sets of
    fields give the same bytes, whatever the fields hold."""
    text = f"{VERSION}|{len(task_name)}:{task_name}|{len(task_id)}:{task_id}|{len(tenant)}:{tenant}"
    return text.encode("utf-8", "surrogatepass")


def _checked_text(task_name: object, task_id: object, tenant: object) -> bytes | None:
    """The signed bytes of a received message, ``None`` when a field cannot have been
    signed (not a string, or too long)."""
    if (
        isinstance(task_name, str) and isinstance(task_id, str) and isinstance(tenant, str)
        and max(len(task_name), len(task_id), len(tenant)) <= MAX_FIELD_LENGTH
    ):
        return _signed_text(task_name, task_id, tenant)
    return None


def _signature(mac: hmac.HMAC, text: bytes) -> str:
    """HMAC-SHA256 of ``text`` (from a copy of the keyed ``mac``), in the header's format."""
    copy = mac.copy()
    copy.update(text)
    return PREFIX + copy.hexdigest()
