"""The freshness decision as a table: every row is one situation and its action."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.cache.freshness import Action, check_due, decide

SERVE, STALE, ASK = Action.SERVE, Action.SERVE_STALE, Action.ASK
WINDOW = 5.0

# (why, immutable, expires, fetched, now, wants_check, stale_grace, action)
TABLE: list[tuple[str, bool, float | None, float, float, bool, float, Action]] = [
    ("immutable content is served", True, None, 0.0, 1e9, False, 0.0, SERVE),
    ("immutable even when the client wants a check", True, 10.0, 0.0, 1e9, True, 0.0, SERVE),
    ("no expiry known: ask", False, None, 0.0, 1.0, False, 60.0, ASK),
    ("fresh index is served", False, 100.0, 0.0, 50.0, False, 0.0, SERVE),
    ("expired index is asked", False, 100.0, 0.0, 100.0, False, 0.0, ASK),
    ("max-age=0 past the window is asked", False, 100.0, 0.0, 50.0, True, 0.0, ASK),
    ("max-age=0 within the window is served", False, 100.0, 48.0, 50.0, True, 0.0, SERVE),
    ("expired within the grace: stale", False, 100.0, 0.0, 120.0, False, 30.0, STALE),
    ("expired past the grace is asked", False, 100.0, 0.0, 130.0, False, 30.0, ASK),
    ("stale refused to a client demanding a check", False, 100.0, 0.0, 120.0, True, 30.0, ASK),
    ("stale allowed when the check was just made", False, 100.0, 118.0, 120.0, True, 30.0, STALE),
    ("no grace: never stale", False, 100.0, 0.0, 101.0, False, 0.0, ASK),
]


class DecideTests(SynchronousTestCase):
    def test_table(self) -> None:
        for why, immutable, expires, fetched, now, wants, grace, action in TABLE:
            got = decide(
                immutable=immutable,
                expires=expires,
                fetched=fetched,
                now=now,
                wants_check=wants,
                revalidate_window=WINDOW,
                stale_grace=grace,
            )
            self.assertIs(got, action, why)

    def test_check_due(self) -> None:
        self.assertFalse(check_due(0.0, 100.0, False, WINDOW))
        self.assertTrue(check_due(0.0, 100.0, True, WINDOW))
        self.assertFalse(check_due(96.0, 100.0, True, WINDOW))
        self.assertTrue(check_due(95.0, 100.0, True, WINDOW))
