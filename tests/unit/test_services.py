"""CI must never pass by skipping: with KEYBROKER_REQUIRE_SERVICES=1 a missing service is a
failure, without it a plain skip naming what to install."""

from __future__ import annotations

import pytest

from tests.support.services import REQUIRE, require_binary


def test_a_missing_service_is_a_skip_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nothing-here"):
        require_binary(["no-such-binary-kb"], "nothing", "apt-get install nothing-here")


def test_a_missing_service_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="KEYBROKER_REQUIRE_SERVICES=1"):
        require_binary(["no-such-binary-kb"], "nothing", "apt-get install nothing-here")


def test_a_present_binary_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE, "1")
    assert require_binary(["no-such-binary-kb", "sh"], "a shell", "-").name == "sh"
