"""The integrations cost nothing where their libraries are not installed.

Each case runs in a fresh interpreter in which the libraries can be hidden (an import
hook refuses them, as if they were not installed), makes the observability test app,
and reports which integration modules were imported and which receivers are connected
to the request and task signals.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing as t

import pytest

from .worker_processes import ROOT, subprocess_env

PROBE = r"""
import json, sys, weakref

HIDDEN = set(sys.argv[1].split(",")) - {""}


class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, Uninstalled())

from celery.signals import before_task_publish, task_postrun, task_prerun
from flask import got_request_exception, request_finished

from flask_tenant_jobs import current_tenant
from tests import observability_app

app = observability_app.create_app(CELERY={"task_always_eager": True})
app.add_url_rule("/", "index", lambda: current_tenant() or "-")


def names(signal):
    found = []
    for _, receiver in signal.receivers:
        if isinstance(receiver, weakref.ReferenceType):
            receiver = receiver()
        found.append(getattr(receiver, "__name__", repr(receiver)))
    return found


with app.app_context(), observability_app.tenant_jobs.switch("acme"):
    ran_in = app.extensions["celery"].tasks["obs.report"].delay().get()
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.startswith("flask_tenant_jobs.integrations.")),
    "libraries": sorted(
        m for m in ("opentelemetry.trace", "sentry_sdk", "prometheus_client", "flask_caching")
        if m in sys.modules
    ),
    "request_finished": len(request_finished.receivers),
    "got_request_exception": len(got_request_exception.receivers),
    "task_prerun": names(task_prerun),
    "task_postrun": names(task_postrun),
    "before_task_publish": names(before_task_publish),
    "request": app.test_client().get("http://acme.example.test/").text,
    "task": ran_in,
}))
"""


def _probe(hidden: t.Sequence[str]) -> dict[str, t.Any]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(hidden)], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return t.cast(dict[str, t.Any], json.loads(done.stdout.splitlines()[-1]))


def test_without_the_libraries_nothing_is_imported_or_connected() -> None:
    found = _probe(["opentelemetry", "sentry_sdk", "prometheus_client", "flask_caching"])
    assert found["modules"] == [] and found["libraries"] == []
    assert (found["request_finished"], found["got_request_exception"]) == (0, 0)
    assert found["task_prerun"] == ["_restore_tenant"]
    assert found["task_postrun"] == ["_reset_tenant"]
    assert found["before_task_publish"] == []
    assert (found["request"], found["task"]) == ("acme", "acme")


@pytest.mark.parametrize(
    ("hidden", "modules"),
    [
        ([], ["caching", "otel", "prometheus", "sentry"]),
        (["opentelemetry"], ["caching", "prometheus", "sentry"]),
        (["sentry_sdk"], ["caching", "otel", "prometheus"]),
        (["prometheus_client"], ["caching", "otel", "sentry"]),
        (["flask_caching"], ["otel", "prometheus", "sentry"]),
    ],
)
def test_each_integration_comes_with_its_library(hidden: list[str], modules: list[str]) -> None:
    found = _probe(hidden)
    assert found["modules"] == [f"flask_tenant_jobs.integrations.{name}" for name in modules]
    assert (found["request"], found["task"]) == ("acme", "acme")
