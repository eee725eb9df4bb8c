"""Real-socket integration tests: pkgproxy, fake upstreams and clients in one reactor.

Every server binds 127.0.0.1 port 0; every socket, timer and thread a test opens is
closed by the test's cleanup. See :mod:`tests.integration.harness`.
"""
