"""
Run history and jobs' results (SPEC.md §12), kept in SQLite: the database
and its queries as plain synchronous calls (``store``: ``HistoryStore``,
``HistoryError``, no Twisted), and the Twisted side that feeds
it from the reactor without blocking and answers its reads off the reactor's
thread (``writer``: ``HistoryWriter``).
"""
