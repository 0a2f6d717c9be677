"""TLS mistakes stop the start before anything opens, with one line naming the file and the
problem (docs: README "Running the broker", TLS): a missing or unreadable file, a swapped
certfile and keyfile, a certificate where the key should be, a key of another
certificate, an encrypted key; on an MQTT listener and on the API alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from broker.core.settings import Listener, Settings
from broker.core.tls import check_tls_files
from keystore.errors import KeybrokerError
from tests.support.harness import RunningBroker, StartDaemon, broker_settings
from tests.support.tls import server_certificate


@dataclass(frozen=True)
class Pem:
    cert: str
    key: str
    other_key: str  # the key of another certificate
    encrypted_key: str  # the right key, encrypted with a passphrase


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Pem:
    folder = tmp_path_factory.mktemp("pem")
    _, cert, key = server_certificate(folder)
    other = folder / "other-key.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    loaded = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    encrypted = folder / "encrypted-key.pem"
    encrypted.write_bytes(loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    return Pem(cert, key, str(other), str(encrypted))


def with_tls_listener(tmp_path: Path, certfile: str, keyfile: str) -> Settings:
    settings = broker_settings(tmp_path)
    tls = Listener(name="tls", type="tcp", host="127.0.0.1", port=0, certfile=certfile,
                   keyfile=keyfile)
    return replace(settings, listeners=(*settings.listeners, tls))


def start_fails(settings: Settings) -> str:
    """The one-line error of a start that must fail; nothing was created or bound."""
    daemon = RunningBroker(settings)
    with pytest.raises(KeybrokerError) as failure:
        daemon.start()
    try:
        assert daemon.server.broker is None and daemon.server.keystore is None
        assert not settings.db_path.exists()  # stopped before the keystore was opened
    finally:
        daemon.stop()
    message = str(failure.value)
    assert "\n" not in message
    return message


def test_a_missing_certfile_is_named(tmp_path: Path, pem: Pem) -> None:
    missing = str(tmp_path / "nowhere" / "cert.pem")
    assert start_fails(with_tls_listener(tmp_path, missing, pem.key)) == (
        f"listener 'tls': certfile {missing}: not found")


def test_swapped_certfile_and_keyfile_are_named(tmp_path: Path, pem: Pem) -> None:
    assert start_fails(with_tls_listener(tmp_path, pem.key, pem.cert)) == (
        f"listener 'tls': certfile {pem.key} holds no certificate but a private key "
        "(certfile and keyfile swapped?)")


def test_a_certificate_given_as_keyfile_is_named(tmp_path: Path, pem: Pem) -> None:
    assert start_fails(with_tls_listener(tmp_path, pem.cert, pem.cert)) == (
        f"listener 'tls': keyfile {pem.cert} holds a certificate, not a private key")


def test_a_key_of_another_certificate_is_named(tmp_path: Path, pem: Pem) -> None:
    assert start_fails(with_tls_listener(tmp_path, pem.cert, pem.other_key)) == (
        f"listener 'tls': keyfile {pem.other_key} does not match certfile {pem.cert}")


def test_an_encrypted_key_is_named_not_prompted_for(tmp_path: Path, pem: Pem) -> None:
    assert start_fails(with_tls_listener(tmp_path, pem.cert, pem.encrypted_key)) == (
        f"listener 'tls': keyfile {pem.encrypted_key} is encrypted: keybroker needs an "
        "unencrypted key, readable only by the daemon")


def test_a_file_with_no_pem_in_it_is_named(tmp_path: Path, pem: Pem) -> None:
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x0a" + bytes(200))  # binary, as a DER file is
    assert start_fails(with_tls_listener(tmp_path, str(der), pem.key)) == (
        f"listener 'tls': certfile {der} holds no certificate (a PEM certificate chain)")
    assert start_fails(with_tls_listener(tmp_path, pem.cert, str(tmp_path))) == (
        f"listener 'tls': keyfile {tmp_path}: cannot be read: Is a directory")


def test_an_unreadable_keyfile_is_named(tmp_path: Path, pem: Pem) -> None:
    # In a folder anyone may enter (pytest's own are private to their user), a readable
    # certificate beside a key nobody but root may read.
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o755)
    cert, locked = shared / "cert.pem", shared / "locked-key.pem"
    cert.write_bytes(Path(pem.cert).read_bytes())
    cert.chmod(0o644)
    locked.write_bytes(Path(pem.key).read_bytes())
    locked.chmod(0)
    settings = with_tls_listener(tmp_path, str(cert), str(locked))
    expected = f"listener 'tls': keyfile {locked}: not readable (permission denied)"
    if os.geteuid() != 0:
        assert start_fails(settings) == expected
        shutil.rmtree(shared)
        return
    # Root reads any file: the check runs in a child that has become nobody.
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(reader)
        try:
            os.setgid(65534)
            os.setuid(65534)
            check_tls_files(settings)
            message = "no error"
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            message = str(exc)
        os.write(writer, message.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    shutil.rmtree(shared)
    assert message == expected


def test_the_apis_files_are_checked_too(tmp_path: Path, pem: Pem) -> None:
    settings = replace(broker_settings(tmp_path), api_certfile=Path(pem.key),
                       api_keyfile=Path(pem.cert))
    assert start_fails(settings).startswith(
        f"API listener: certfile {pem.key} holds no certificate but a private key")


def test_serve_says_it_in_one_line(tmp_path: Path, pem: Pem) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--db", str(tmp_path / "k.db"), "serve",
         "--host", "127.0.0.1", "--port", "0", "--ws-port", "0", "--api-port", "0",
         "--tls-port", "0", "--certfile", pem.key, "--keyfile", pem.cert],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"Error: listener 'tls': certfile {pem.key} holds no certificate but a private key "
        "(certfile and keyfile swapped?)"]
    assert not (tmp_path / "k.db").exists()


def test_good_files_still_serve_tls(tmp_path: Path, pem: Pem, daemon_with: StartDaemon) -> None:
    daemon = daemon_with(with_tls_listener(tmp_path, pem.cert, pem.key))
    assert daemon.port("tls") > 0
