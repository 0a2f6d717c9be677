"""tests/support/services.py: a missing outside program skips its tests, or fails them when
the run requires services (CI: KEYBROKER_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support.services import REQUIRE, find_binary, require_binary


def test_a_missing_binary_skips_with_a_plain_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="initdb not found: for the test"):
        require_binary("initdb", "for the test", [str(tmp_path / "nowhere" / "*")])


def test_a_missing_binary_fails_when_services_are_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match=f"initdb not found.*{REQUIRE} is set"):
        require_binary("initdb", "for the test")


def test_binaries_are_found_off_path_in_the_newest_matching_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for version in ("9.6", "15", "13"):
        binary = tmp_path / "lib" / version / "bin" / "initdb"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        os.chmod(binary, stat.S_IRWXU)
    pattern = str(tmp_path / "lib" / "*" / "bin")
    assert find_binary("initdb", [pattern]) == tmp_path / "lib" / "15" / "bin" / "initdb"
    assert require_binary("initdb", "why", [pattern]).parent.parent.name == "15"


def test_the_first_of_several_names_found_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "chromium-browser").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "chromium-browser", stat.S_IRWXU)
    assert require_binary(("chromium", "chromium-browser"), "why") == \
        tmp_path / "chromium-browser"
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromedriver or driver not found: why"):
        require_binary(("chromedriver", "driver"), "why")
