"""Credentials for trying Flower's deployment engine on one machine: `fedcollm certs DIR`.

- `ca.crt`: a test root CA; SuperNodes and the `flwr` CLI trust the SuperLink through it.
- `server.pem`, `server.key`: the SuperLink's TLS certificate for 127.0.0.1, ::1, localhost.
- `supernode-<k>`, `supernode-<k>.pub`: each SuperNode's authentication key pair, EC P-384
  (Flower requires a NIST curve) in OpenSSH format: the private key for
  `flower-supernode --auth-supernode-private-key`, the public line for
  `flwr supernode register`.
- `other-ca.crt`: an unrelated CA, to show that a node trusting the wrong CA is refused.

For testing only: real deployments take their certificates from their own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PRIVATE = serialization.NoEncryption()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcollm test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(subject: str, key, issuer: x509.Name, signer, days: int, ca: bool):
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
    )
    if not ca:
        hosts = [x509.DNSName("localhost")] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(hosts), False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(signer, hashes.SHA384())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def write_test_credentials(out: Path, supernodes: int, days: int = 30) -> list[Path]:
    """Write the files listed in the module docstring; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("fedcollm test CA", ca_key, _name("fedcollm test CA"), ca_key, days, True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate("127.0.0.1", server_key, ca.subject, ca_key, days, False)
    other_key = ec.generate_private_key(ec.SECP384R1())
    other = _certificate("unrelated CA", other_key, _name("unrelated CA"), other_key, days, True)
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "server.pem", server.public_bytes(pem))
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(out / "server.key", server_key.private_bytes(pem, pkcs8, PRIVATE), private=True)
    _write(out / "other-ca.crt", other.public_bytes(pem))
    for k in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        ssh = serialization.PrivateFormat.OpenSSH
        _write(out / f"supernode-{k}", key.private_bytes(pem, ssh, PRIVATE), private=True)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(out / f"supernode-{k}.pub", public + f" supernode-{k}\n".encode())
    return sorted(out.iterdir())
