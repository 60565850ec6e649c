"""
Run history and jobs' results (SPEC.md §12): one storage interface
(``base``: ``Store``, ``HistoryError``, ``HistoryUnavailable``) kept by two
databases, plain synchronous calls with no Twisted: SQLite, embedded, the
default (``store``: ``HistoryStore``), and PostgreSQL, shared by the servers
of a cluster (``postgres``: ``PostgresStore``); and the Twisted side that
feeds either from the reactor without blocking, holds records through an
outage of the database, and answers its reads off the reactor's thread
(``writer``: ``HistoryWriter``).
"""
