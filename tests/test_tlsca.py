"""pkgproxy's CA: created once with a private key file, leaf certificates per host."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.tlsca import CAError, CertificateAuthority


class CATests(SynchronousTestCase):
    def test_created_on_first_use_with_private_key_mode(self) -> None:
        """The CA is made when missing; its key file is readable by its owner only."""
        d = self.mktemp()
        ca = CertificateAuthority(os.path.join(d, "ca.crt"), os.path.join(d, "ca.key"))
        mode = stat.S_IMODE(os.stat(os.path.join(d, "ca.key")).st_mode)
        self.assertEqual(mode, 0o600)
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
        self.assertTrue(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        again = CertificateAuthority(os.path.join(d, "ca.crt"), os.path.join(d, "ca.key"))
        self.assertEqual(again.cert_pem, ca.cert_pem)

    def test_leaf_for_exactly_the_host_and_reused(self) -> None:
        """A leaf names only the host asked for, and is minted once per host."""
        d = self.mktemp()
        ca = CertificateAuthority(os.path.join(d, "ca.crt"), os.path.join(d, "ca.key"))
        first = ca.options_for("deb.debian.org")
        self.assertIs(ca.options_for("deb.debian.org"), first)
        ca.options_for("pypi.org")
        self.assertEqual(ca.minted, 2)
        pem = first.certificate.to_cryptography()
        names = pem.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["deb.debian.org"])

    def test_half_given_or_broken_ca(self) -> None:
        """A CA whose files cannot be read is a clear error, not a new CA."""
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "ca.crt"), "w") as f:
            f.write("not a certificate")
        self.assertRaises(
            CAError, CertificateAuthority, os.path.join(d, "ca.crt"), os.path.join(d, "ca.key")
        )
