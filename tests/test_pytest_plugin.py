"""The pytest plugin, met the way users meet it: a project's own tests run by pytester."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).parent / "plugin_project"


def _user_project(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((PROJECT / "conftest.py").read_text())
    pytester.makepyfile(test_user=(PROJECT / "test_user.py").read_text())


def test_plugin_fixtures_markers_and_reset(pytester: pytest.Pytester) -> None:
    _user_project(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=8)


def test_unknown_tenant_marker_fails_clearly(pytester: pytest.Pytester) -> None:
    _user_project(pytester)
    pytester.makepyfile(
        test_user="""
import pytest

@pytest.mark.tenant("nope")
def test_in_unknown_tenant():
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*TenantNotFoundError*Unknown tenant 'nope'*"])
