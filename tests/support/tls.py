"""A throwaway certificate authority and a server certificate for 127.0.0.1 (trustme)."""

from __future__ import annotations

from pathlib import Path

import trustme


def server_certificate(folder: Path) -> tuple[str, str, str]:
    """(CA file, certificate file, key file), PEM, written into ``folder``."""
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1")
    ca, cert, key = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    authority.cert_pem.write_to_path(str(ca))
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    return str(ca), str(cert), str(key)
