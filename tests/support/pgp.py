"""OpenPGP signature packets made by hand, for tests that compare signatures by their
creation time (nothing here can be verified: the key material is filler)."""

from __future__ import annotations

import base64


def sig_v4(made: int, old_format: bool = False) -> bytes:
    """An OpenPGP version 4 signature packet whose only hashed subpacket is its
    creation time (the rest is filler: nothing here checks signatures)."""
    hashed = bytes([5, 2]) + made.to_bytes(4, "big")
    body = bytes([4, 0, 22, 8]) + len(hashed).to_bytes(2, "big") + hashed + b"\x00\x00"
    body += b"\x12\x34" + b"\x00\x01\x01"
    return bytes([0x88 if old_format else 0xC2, len(body)]) + body


def sig_v3(made: int) -> bytes:
    body = bytes([3, 5, 0]) + made.to_bytes(4, "big") + b"\x00" * 8 + bytes([1, 8]) + b"\x12\x34"
    return bytes([0xC2, len(body)]) + body


def armour(packets: bytes) -> bytes:
    return (
        b"-----BEGIN PGP SIGNATURE-----\nComment: test\n\n"
        + base64.encodebytes(packets)
        + b"=abcd\n-----END PGP SIGNATURE-----\n"
    )
