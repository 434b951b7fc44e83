"""TLS certificates and node keys for a Flower deployment: a local CA, the SuperLink's certificate,
and one OpenSSH key pair per SuperNode (`scripts/make_certs.py`, `fedpeft.deploy.LocalDeployment`).

The certificates are valid from 5 minutes before they are made for 365 days: a machine whose clock
is further behind refuses them, and they are renewed by making them again (README, "Run on real
machines").
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certificates", "make_certs"]


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA certificate SuperNodes and the flwr CLI trust (--root-certificates)
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys (OpenSSH, ECDSA P-384); public halves beside them (.pub)


def make_certs(
    directory: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), nodes: int = 0
) -> Certificates:
    """A local CA, a SuperLink certificate for `hosts` signed by it, and `nodes` SuperNode key pairs.

    Keys are written with mode 600. For production, use certificates from your own CA; the layout
    (ca.crt, server.pem, server.key) is what `flower-superlink --ssl-*` and `--root-certificates` take.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_key(out / "ca.key", ca_key, serialization.PrivateFormat.TraditionalOpenSSL)
    (out / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(out / "server.key", server_key, serialization.PrivateFormat.TraditionalOpenSSL)
    node_keys = []
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = out / f"node-{k}"
        write_key(path, key, serialization.PrivateFormat.OpenSSH)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.with_suffix(".pub").write_bytes(public + f" fedpeft-node-{k}\n".encode())
        node_keys.append(path)
    return Certificates(out / "ca.crt", out / "server.pem", out / "server.key", tuple(node_keys))
