"""The site's small PKI: a CA, the broker's server certificate, client
certificates and Ed25519 signing keys, with the `cryptography` package.

EC P-256 for TLS because every client on the path speaks it (OpenSSL in
Mosquitto, Python's ssl in paho, Home Assistant); Ed25519 for message signing
because its keys and signatures are small and have no parameters to get wrong.
All private keys are unencrypted PKCS#8 PEM files readable by their owner only:
they are unlocked by systemd's LoadCredential=, not by a passphrase.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.files import write_private, write_public

CA_DAYS = 20 * 365
LEAF_DAYS = 5 * 365
# Clocks on a Pi without an RTC battery can lag at boot until NTP catches up:
# back-date certificates a little so a fresh one is valid straight away.
BACKDATE = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as objects."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbell"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """The KeyUsage extension that allows `allowed` and nothing else."""
    assert set(allowed) <= set(_KEY_USAGES), allowed
    return x509.KeyUsage(**{usage: usage in allowed for usage in _KEY_USAGES})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(site: str) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"fedbell {site} CA", "ca")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage("key_cert_sign", "crl_sign"),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    unit: str,
    *,
    server_names: tuple[str, ...] = (),
    client_too: bool = False,
) -> Issued:
    """A leaf certificate signed by `ca`.

    With `server_names` it is a server certificate for those DNS names or IP
    addresses (and with `client_too` also a client one: a cluster node dials
    its peers with it); otherwise a client certificate for `common_name`.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []
    if client_too or not server_names:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, unit))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage("digital_signature", "key_agreement"),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
            critical=False,
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def save(issued: Issued, cert_path: Path, key_path: Path, key_group: str | None = None) -> None:
    write_public(cert_path, issued.certificate.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, _private_pem(issued.key), group=key_group)


def load(cert_path: Path, key_path: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{key_path} is not an EC private key")
    return Issued(cert, key)


def create_crl(ca: Issued, revoked: dict[int, dt.datetime]) -> bytes:
    """The CA's certificate revocation list (PEM) for these serial numbers.

    Mosquitto's `crlfile` makes OpenSSL check it at every handshake, and it
    rejects every client once a CRL's next update has passed: this one stays
    current for as long as the CA itself.
    """
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - BACKDATE)
        .next_update(ca.certificate.not_valid_after_utc)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def serial_of(cert_path: Path) -> int:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number


def create_signing_key(private_path: Path, public_path: Path) -> None:
    """An Ed25519 key pair for signing fedbell messages (fedbell/wire/signing.py).

    The private key is PKCS#8 PEM, the public key SubjectPublicKeyInfo PEM:
    `serialization.load_pem_private_key` / `load_pem_public_key` read them.
    """
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(private_path, _private_pem(key))
    write_public(
        public_path,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def _private_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
