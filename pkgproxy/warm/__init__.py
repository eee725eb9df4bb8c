"""``pkgproxy-warm``: fill a running pkgproxy ahead of need from the files users already have.

Lock files and package lists are read into *requests*: the pages and indexes a client would
read first, then the exact files they pin, each with the digest the lock file gives it. Every
request goes through the server's own routes by path, so the server's single flight, its
verification and its byte budget apply; this program stores nothing itself.

The parsers (:mod:`pkgproxy.warm.sources`) and the planner are pure; the network side is one
bounded pool of worker threads (:mod:`pkgproxy.warm.runner`), each with one kept-alive
connection to the server.
"""
