"""The body checks (pkgproxy/fetch/verify.py), as tables: given what was received and
what the decision expects, ok, a transfer failure or a verify failure."""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from pkgproxy.fetch import verify
from pkgproxy.fetch.verify import Problem

A = "a" * 64
B = "b" * 64


class CheckTests(SynchronousTestCase):
    #: (name, error, written, announced, size, expected, got, result)
    TABLE: tuple[
        tuple[
            str, str | None, int, int | None, int | None, dict[str, str], dict[str, str], object
        ],
        ...,
    ] = (
        ("nothing expected", None, 10, None, None, {}, {}, None),
        ("announced and got", None, 10, 10, None, {}, {}, None),
        ("size and digest match", None, 10, 10, 10, {"sha256": A}, {"sha256": A}, None),
        ("two digests match", None, 3, None, None, {"sha1": "c", "sha256": A},
         {"sha1": "c", "sha256": A}, None),
        ("broken transfer", "connection lost", 4, 10, None, {}, {},
         Problem("transfer", "transfer failed after 4 bytes: connection lost")),
        ("broken wins over a bad digest", "reset", 4, None, None, {"sha256": A},
         {"sha256": B}, Problem("transfer", "transfer failed after 4 bytes: reset")),
        ("short of the announced length", None, 4, 10, 10, {}, {},
         Problem("transfer", "got 4 bytes, upstream announced 10")),
        ("longer than announced", None, 11, 10, None, {}, {},
         Problem("transfer", "got 11 bytes, upstream announced 10")),
        ("not the index's size", None, 9, 9, 10, {}, {},
         Problem("verify", "got 9 bytes, the index says 10")),
        ("index size, nothing announced", None, 9, None, 10, {}, {},
         Problem("verify", "got 9 bytes, the index says 10")),
        ("digest mismatch", None, 10, 10, 10, {"sha256": A}, {"sha256": B},
         Problem("verify", f"sha256 mismatch: got {B}, expected {A}")),
        ("second digest mismatch", None, 1, None, None, {"sha1": "c", "sha512": "d"},
         {"sha1": "c", "sha512": "e"}, Problem("verify", "sha512 mismatch: got e, expected d")),
        ("digest not asked is not checked", None, 1, None, None, {}, {"sha256": B}, None),
    )  # fmt: skip

    def test_table(self) -> None:
        for name, error, written, announced, size, expected, got, want in self.TABLE:
            result = verify.check(
                error=error,
                written=written,
                announced=announced,
                size=size,
                expected=expected,
                got=got,
            )
            self.assertEqual(result, want, name)


class TransferTests(SynchronousTestCase):
    def test_transfer_error(self) -> None:
        """A body ends well when complete or delimited by the connection's end."""
        table = (
            (Failure(ResponseDone()), None),
            (Failure(PotentialDataLoss()), None),
            (Failure(ConnectionLost("gone")), "Connection to the other side was lost"),
        )
        for reason, want in table:
            got = verify.transfer_error(reason)
            if want is None:
                self.assertIsNone(got, reason)
            else:
                assert got is not None
                self.assertIn(want, got)
        self.assertIsNotNone(verify.transfer_error(Failure(ResponseFailed([]))))

    def test_open_ended(self) -> None:
        self.assertTrue(verify.open_ended(Failure(PotentialDataLoss())))
        self.assertFalse(verify.open_ended(Failure(ResponseDone())))

    def test_announced_mismatch(self) -> None:
        table = (
            (None, None, None),
            (10, None, None),
            (None, 10, None),
            (10, 10, None),
            (10, 11, "upstream length 10 differs from the expected 11"),
        )
        for announced, size, want in table:
            self.assertEqual(verify.announced_mismatch(announced, size), want)

    def test_named_digest(self) -> None:
        table = (
            ("sha256:ABCDEF", ("sha256", "abcdef")),
            ("sha512:00", ("sha512", "00")),
            ("sha256:", None),
            ("md5:00", None),
            ("", None),
            ("abcdef", None),
        )
        for value, want in table:
            self.assertEqual(verify.named_digest(value), want, value)
