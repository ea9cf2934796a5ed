"""The worker's local cache of (table, agent) model sets: evicted from memory, or preloaded from checkpoints.

The durable copy is the compacted models topic (:mod:`stream.checkpoints`): a worker fills this cache from the
topic's partitions it is assigned, and drops the entries of partitions it loses (``Engine.forget``), so the file
holds the model sets of the worker's own partitions only, never an ever-growing history.

``dbm.open`` picks whichever dbm module the interpreter was built with (``dbm.gnu``, ``dbm.ndbm`` or
``dbm.dumb``), and they differ in what they offer: ``dbm.ndbm`` on Debian's own Python has no ``pop``, which
broke the worker on its first event. SQLite is in every CPython build that users run (Debian's python3, the
official images, pyenv builds), so the store behaves the same everywhere.

>>> import tempfile, os
>>> with tempfile.TemporaryDirectory() as d:
...     store = ModelStore(os.path.join(d, "agent-models.sqlite"))
...     store["public.refunds\\x1fa1"] = b"state"
...     got = store.get("public.refunds\\x1fa1"), len(store)
...     del store["public.refunds\\x1fa1"]
...     store.close()
>>> got
(b'state', 1)
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, MutableMapping


class ModelStore(MutableMapping[str, bytes]):
    """A ``str -> bytes`` mapping in one SQLite file, emptied when it is opened.

    It is a cache, not durable state: a new worker starts with an empty store, as ``dbm.open(path, "n")`` did,
    and fills it from the models topic for the partitions it is assigned. Durability is not asked of it, so
    commits are not synced.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{os.fspath(path)}{suffix}")
            except FileNotFoundError:
                pass
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        # A rowid table: model sets are kilobytes, and WITHOUT ROWID stores rows that large poorly (3x slower).
        self._db.execute("CREATE TABLE models (key TEXT PRIMARY KEY, state BLOB NOT NULL)")

    def __getitem__(self, key: str) -> bytes:
        row = self._db.execute("SELECT state FROM models WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return bytes(row[0])

    def __setitem__(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO models (key, state) VALUES (?, ?)", (key, value))

    def __delitem__(self, key: str) -> None:
        if self._db.execute("DELETE FROM models WHERE key = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Insert or replace many entries in one transaction (a restore writes tens of thousands at once)."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT OR REPLACE INTO models (key, state) VALUES (?, ?)", items)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __iter__(self) -> Iterator[str]:
        return iter([k for (k,) in self._db.execute("SELECT key FROM models")])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM models").fetchone()[0])

    def close(self) -> None:
        self._db.close()
