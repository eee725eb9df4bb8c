"""pkgproxy's own certificate authority, for intercepting https:// sources it caches.

A client configured with an https:// repository and a proxy sends ``CONNECT host:443``;
a cache can only see (and so cache) what is inside if it ends that TLS itself. With
interception switched on, pkgproxy answers the tunnel with a certificate for exactly
the host asked for, signed by this CA, which the operator installs on the clients. It
does so only for hosts its routes name; any other host is refused before TLS.

The CA key never leaves the state directory (mode 0600). Leaf certificates are minted
on the fly, short-lived, and kept in memory per host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl

#: Leaf certificates are valid this long; clients see a fresh one after a restart.
LEAF_DAYS = 7
CA_YEARS = 10


class CAError(Exception):
    """The CA files cannot be read or written; the message says which and why."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pkgproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def generate_ca(cert_path: str, key_path: str) -> None:
    """Write a new CA certificate and key (the key readable by its owner only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(f"pkgproxy CA {os.uname().nodename}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    write_pem(key, cert, key_path, cert_path)


def write_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cert: x509.Certificate,
    key_path: str,
    cert_path: str,
) -> None:
    """Write a private key (a new file, readable by its owner only) and its certificate."""
    os.makedirs(os.path.dirname(os.path.abspath(key_path)), exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class CertificateAuthority:
    """Mints server certificates for intercepted hosts.

    :param cert_path: the CA certificate (PEM); with ``key_path``, created if both are
        missing.
    """

    def __init__(self, cert_path: str, key_path: str, cache_size: int = 256) -> None:
        if not os.path.exists(cert_path) and not os.path.exists(key_path):
            try:
                generate_ca(cert_path, key_path)
            except OSError as e:
                where = os.path.dirname(key_path)
                raise CAError(f"cannot create the CA in {where}: {e}") from None
        try:
            with open(cert_path, "rb") as f:
                self.cert_pem = f.read()
            with open(key_path, "rb") as f:
                key_pem = f.read()
            self._cert = x509.load_pem_x509_certificate(self.cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (OSError, ValueError, TypeError) as e:
            raise CAError(f"cannot load the CA from {cert_path} and {key_path}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | _rsa_key_type()):
            raise CAError(f"{key_path}: the CA key must be an EC or RSA key")
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaves: OrderedDict[str, ssl.CertificateOptions] = OrderedDict()
        self._cache_size = cache_size
        self.minted = 0

    def options_for(self, host: str) -> ssl.CertificateOptions:
        """TLS server options presenting a certificate for exactly ``host``."""
        options = self._leaves.get(host)
        if options is not None:
            self._leaves.move_to_end(host)
            return options
        options = self._mint(host)
        self._leaves[host] = options
        while len(self._leaves) > self._cache_size:
            self._leaves.popitem(last=False)
        return options

    def issue(self, names: Sequence[str]) -> tuple[bytes, bytes]:
        """A server certificate for ``names`` (host names or IP addresses), signed by this
        CA: ``(certificate PEM, key PEM)``."""
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
        )
        self.minted += 1
        key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def _mint(self, host: str) -> ssl.CertificateOptions:
        leaf_pem, key_pem = self.issue([host])
        leaf = ssl.PrivateCertificate.loadPEM(leaf_pem + key_pem)
        return ssl.CertificateOptions(
            privateKey=leaf.privateKey.original,
            certificate=leaf.original,
            extraCertChain=[ssl.Certificate.loadPEM(self.cert_pem).original],
            # Clients offer ALPN (curl: h2, http/1.1); the tunnel speaks HTTP/1.1. Without
            # a list here the handshake fails with an internal error.
            acceptableProtocols=[b"http/1.1"],
        )


def _rsa_key_type() -> type:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPrivateKey
