"""A simulated fleet of AI agents writing to a shop database, as Debezium would report their writes.

Used by the demo, the integration tests and the benchmarks. Events are payload-only JSON exactly as
Debezium's PostgreSQL connector emits them with ``value.converter.schemas.enable=false``; keys are the
row's primary key, as Debezium keys them.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import orjson

TOPIC_PREFIX = "shop"
REFUNDS = "public.refunds"
ORDERS = "public.orders"


def topic_of(table: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}.{table}"


def debezium_value(
    table: str,
    op: str,
    before: Mapping[str, object] | None,
    after: Mapping[str, object] | None,
    ts_us: int,
    *,
    prefix: str = TOPIC_PREFIX,
    tx_id: int = 1,
    lsn: int = 1,
) -> bytes:
    """A change event as Debezium 3.x's PostgreSQL connector writes it with payload-only JSON converters.

    ``ts_us`` is the commit time (``source.ts_*``); the envelope's own ``ts_*`` is when Debezium handled it.
    """
    schema, name = table.split(".")
    now_us = ts_us + 3_000
    return orjson.dumps(
        {
            "before": before,
            "after": after,
            "source": {
                "version": "3.6.1.Final",
                "connector": "postgresql",
                "name": prefix,
                "ts_ms": ts_us // 1000,
                "ts_us": ts_us,
                "ts_ns": ts_us * 1000,
                "snapshot": "false",
                "db": "shop",
                "sequence": f'[null,"{lsn}"]',
                "schema": schema,
                "table": name,
                "txId": tx_id,
                "lsn": lsn,
                "xmin": None,
            },
            "transaction": None,
            "op": op,
            "ts_ms": now_us // 1000,
            "ts_us": now_us,
            "ts_ns": now_us * 1000,
        }
    )


@dataclass
class Envelopes:
    """The change events of one database in commit order: each write its own transaction, the LSN moving on.

    >>> wal = Envelopes(random.Random(1), lsn=1_000, tx_id=7)
    >>> value = wal.value("public.refunds", "c", None, {"id": 1}, 1_700_000_000_000_000)
    >>> wal.tx_id, wal.lsn > 1_000, b'"txId":8' in value
    (8, True, True)
    """

    rng: random.Random  # the generator's own, so that its sequence of draws stays what it was
    lsn: int
    tx_id: int
    prefix: str = TOPIC_PREFIX

    def value(
        self,
        table: str,
        op: str,
        before: Mapping[str, object] | None,
        after: Mapping[str, object] | None,
        ts_us: int,
    ) -> bytes:
        """The next change event, committed at ``ts_us``, as :func:`debezium_value` writes it."""
        self.lsn += self.rng.randint(200, 900)
        self.tx_id += 1
        return debezium_value(table, op, before, after, ts_us, prefix=self.prefix, tx_id=self.tx_id, lsn=self.lsn)


@dataclass
class Agent:
    agent_id: str
    table: str
    mean_amount: float
    rate_per_s: float
    run_id: str
    version: str = "1.4.2"
    rogue: str | None = None  # None, "inflate" or "delete_burst"
    written: int = 0
    rogue_written: int = 0


@dataclass
class Record:
    topic: str
    key: bytes
    value: bytes
    agent_id: str
    commit_ts_us: int
    rogue: bool
    op: str


@dataclass
class Fleet:
    """``n_agents`` agents, alternating between the refunds and orders tables.

    >>> fleet = Fleet(n_agents=4, seed=1)
    >>> rec = fleet.write(fleet.agents[0], 1_700_000_000_000_000)
    >>> rec.topic, b'"op":"c"' in rec.value
    ('shop.public.refunds', True)
    """

    n_agents: int = 12
    seed: int = 7
    prefix: str = TOPIC_PREFIX
    agents: list[Agent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._ids = {REFUNDS: 100_000, ORDERS: 500_000}
        self._live_orders: list[tuple[int, float, int, Agent]] = []
        self._wal = Envelopes(self.rng, lsn=30_000_000, tx_id=700, prefix=self.prefix)
        if not self.agents:
            for i in range(self.n_agents):
                table = REFUNDS if i % 2 == 0 else ORDERS
                kind = "refund" if table == REFUNDS else "order"
                self.agents.append(
                    Agent(
                        agent_id=f"{kind}-agent-{i:02d}",
                        table=table,
                        mean_amount=round(self.rng.uniform(15, 120), 2),
                        rate_per_s=self.rng.uniform(2.0, 6.0),
                        run_id=f"run-{self.rng.getrandbits(32):08x}",
                    )
                )

    def agent(self, agent_id: str) -> Agent:
        return next(a for a in self.agents if a.agent_id == agent_id)

    def _amount(self, a: Agent) -> float:
        v = a.mean_amount * math.exp(self.rng.gauss(0.0, 0.35))
        if a.rogue == "inflate":
            v *= 20.0
        return round(v, 2)

    def write(self, a: Agent, ts_us: int) -> Record:
        """One write by agent ``a`` committed at ``ts_us``."""
        prov: dict[str, object] = {"agent_id": a.agent_id, "run_id": a.run_id, "agent_version": a.version}
        rogue = a.rogue is not None
        if a.table == REFUNDS:
            self._ids[REFUNDS] += 1
            rid = self._ids[REFUNDS]
            after = {
                "id": rid,
                "order_id": self.rng.randint(1, 400_000),
                "amount": self._amount(a),
                "currency": "EUR",
                "reason": self.rng.choice(["damaged", "late", "wrong_item", "other"]),
                **prov,
                "idempotency_key": f"{a.agent_id}-{rid}",
            }
            value, key, op = self._wal.value(REFUNDS, "c", None, after, ts_us), {"id": rid}, "c"
        else:
            value, key, op = self._order_write(a, prov, ts_us)
        a.written += 1
        a.rogue_written += rogue
        return Record(topic_of(a.table, self.prefix), orjson.dumps(key), value, a.agent_id, ts_us, rogue, op)

    def _order_write(self, a: Agent, prov: dict[str, object], ts_us: int) -> tuple[bytes, dict[str, int], str]:
        r = self.rng.random()
        mine = [o for o in self._live_orders[-200:] if o[3] is a]
        if a.rogue == "delete_burst" and mine:
            oid, total, items, _ = mine[-1]
            self._live_orders.remove(mine[-1])
            before = {"id": oid, "customer_id": 1, "total": total, "items": items, "status": "paid", **prov}
            return self._wal.value(ORDERS, "d", before, None, ts_us), {"id": oid}, "d"
        if r < 0.25 and mine:
            idx = self.rng.randrange(len(mine))
            oid, total, items, _ = mine[idx]
            new_total = round(total * math.exp(self.rng.gauss(0.0, 0.05)), 2)
            before = {"id": oid, "customer_id": 1, "total": total, "items": items, "status": "paid", **prov}
            after = {**before, "total": new_total, "status": "shipped"}
            return self._wal.value(ORDERS, "u", before, after, ts_us), {"id": oid}, "u"
        if r < 0.27 and mine:
            oid, total, items, _ = mine[0]
            self._live_orders.remove(mine[0])
            before = {"id": oid, "customer_id": 1, "total": total, "items": items, "status": "paid", **prov}
            return self._wal.value(ORDERS, "d", before, None, ts_us), {"id": oid}, "d"
        self._ids[ORDERS] += 1
        oid = self._ids[ORDERS]
        items = 1 + min(int(self.rng.expovariate(0.6)), 9)
        total = self._amount(a) * items
        self._live_orders.append((oid, total, items, a))
        if len(self._live_orders) > 5000:
            del self._live_orders[:1000]
        after = {
            "id": oid,
            "customer_id": self.rng.randint(1, 90_000),
            "total": round(total, 2),
            "items": items,
            "status": "paid",
            **prov,
        }
        return self._wal.value(ORDERS, "c", None, after, ts_us), {"id": oid}, "c"

    def stream(self, n: int, start_us: int, *, speedup: float = 1.0) -> Iterator[Record]:
        """``n`` writes in commit-time order, each agent a Poisson process at its own rate."""
        heap = [
            (start_us + int(self.rng.expovariate(a.rate_per_s) * 1e6 / speedup), i) for i, a in enumerate(self.agents)
        ]
        import heapq

        heapq.heapify(heap)
        for _ in range(n):
            ts, i = heapq.heappop(heap)
            a = self.agents[i]
            yield self.write(a, ts)
            heapq.heappush(heap, (ts + max(1, int(self.rng.expovariate(a.rate_per_s) * 1e6 / speedup)), i))


def without_agent(value: bytes) -> tuple[bytes, int]:
    """A change event with its agent and run columns emptied (the agent names itself in a logical decoding message
    instead), and its transaction id.

    >>> v, tx = without_agent(debezium_value("public.refunds", "c", None, {"id": 1, "agent_id": "a"}, 5, tx_id=9))
    >>> orjson.loads(v)["after"], tx
    ({'id': 1, 'agent_id': None, 'run_id': None}, 9)
    """
    ev = orjson.loads(value)
    for image in (ev["before"], ev["after"]):
        if image:
            image["agent_id"] = image["run_id"] = None
    return orjson.dumps(ev), ev["source"]["txId"]


def logical_message(
    tx_id: int, ts_us: int, content: bytes, *, prefix: str = TOPIC_PREFIX, message_prefix: str = "writeguard"
) -> tuple[bytes, bytes]:
    """Key and value of a transactional ``pg_logical_emit_message`` as Debezium writes it (op ``m``, keyed by its
    prefix, the content in base64).

    >>> key, value = logical_message(9, 5, b'{"agent_id": "a"}')
    >>> key, orjson.loads(value)["source"]["txId"], base64.b64decode(orjson.loads(value)["message"]["content"])
    (b'{"prefix":"writeguard"}', 9, b'{"agent_id": "a"}')
    """
    source = {"version": "3.6.1.Final", "connector": "postgresql", "name": prefix, "ts_ms": ts_us // 1000,
              "ts_us": ts_us, "snapshot": "false", "db": "shop", "schema": "", "table": "", "txId": tx_id}  # fmt: skip
    value = {
        "op": "m",
        "ts_ms": ts_us // 1000 + 3,
        "source": source,
        "message": {"prefix": message_prefix, "content": base64.b64encode(content).decode()},
    }
    return orjson.dumps({"prefix": message_prefix}), orjson.dumps(value)
