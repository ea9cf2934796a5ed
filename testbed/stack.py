"""The whole real path on one machine: PostgreSQL -> Debezium on Kafka Connect -> Kafka -> a writeguard worker.

The end-to-end tests, ``python -m testbed demo --postgres`` and the latency benchmark all bring it up the same way:
a ``shop`` database whose agents log in as their own roles, the example config pointed at it, the Debezium
connector that ``writeguard connector-config`` renders, and quarantine enforced with REVOKE.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stream.config import EXAMPLE_CONFIG, Config, load_config
from testbed.broker import LocalKafka
from testbed.connect import LocalConnect
from testbed.postgres import LocalPostgres
from testbed.process import Progress, WorkerProcess, spawn_worker

SHOP_DDL = """
CREATE TABLE public.refunds (id bigserial PRIMARY KEY, order_id bigint, amount double precision NOT NULL,
                             agent_id text, run_id text);
CREATE TABLE public.orders (id bigserial PRIMARY KEY, total double precision NOT NULL, items int NOT NULL,
                            status text NOT NULL DEFAULT 'paid', agent_id text, run_id text);
-- Deletes and updates must carry the whole old row (agent id, old total) in Debezium's `before`.
ALTER TABLE public.refunds REPLICA IDENTITY FULL;
ALTER TABLE public.orders REPLICA IDENTITY FULL;
"""
ROLE_PATTERN = "^agent_[a-z]+_[0-9]{2}$"
# The control topic's HMAC key of every test stack. A literal is fine here: it guards only throwaway local topics.
TEST_CONTROL_KEY = "testbed-control-key-not-a-secret-0123456789"


def example_config(kafka: str, prefix: str) -> dict[str, Any]:
    """The example config with its consumer group, its own topics and the CDC topics all under ``prefix``,
    so that several runs (test modules, benchmark phases) share one broker without seeing each other."""
    data: dict[str, Any] = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    data["kafka"]["bootstrap.servers"] = kafka
    data["kafka"]["group.id"] = f"wg-{prefix}"
    data["topics"] = {
        "alerts": f"{prefix}.alerts",
        "control": f"{prefix}.control",
        "dead_letter": f"{prefix}.dlq",
        "changes": f"{prefix}.changes",
        "partitions": 3,
    }
    # Every test stack signs its control records, as a deployment with enforcement must.
    data["control"] = {"signing_key": TEST_CONTROL_KEY}
    for t in data["tables"]:
        t["topic"] = f"{prefix}.{t['name']}"
        # A test stack's fleet writes for seconds, and its rogue must be stopped: no learning period (a
        # deployment's is a day, see the example config), unless a test asks for one.
        t["learning"] = {"writes": 0, "seconds": 0}
        # A test stack runs a handful of agents for seconds: its population model judges from its 30th write,
        # where a deployment's waits for 20 agents and 200 writes (ZScoreSpec.population_agents/_writes).
        for d in t["detectors"]:
            if d.get("kind") == "zscore":
                d.setdefault("population_agents", 1)
                d.setdefault("population_writes", 30)
    return data


def shop_config(
    kafka: str,
    pg: LocalPostgres,
    prefix: str,
    actions: Sequence[str] = ("alert", "quarantine", "postgres"),
    agents: Sequence[str] = (),
) -> dict[str, Any]:
    """The example config, pointed at ``pg`` through Debezium, with writeguard's topics unique to ``prefix``.

    The shop's agents are named by their role names, so the role mapping is an explicit map: a template needs a
    fixed prefix in front of the agent id (a bare ``{agent_id}`` would let a row name any role).
    """
    data = example_config(kafka, prefix)
    data["debezium"] = {
        "name": f"{prefix}-connector",
        "topic.prefix": prefix,
        "database": {"hostname": pg.host, "port": pg.port, "user": "postgres", "password": "", "dbname": "shop"},
        "slot.name": f"slot_{prefix}",
        "publication.name": f"pub_{prefix}",
    }
    data["enforcement"] = {
        "postgres": {"dsn": pg.dsn(dbname="shop"), "roles": {"map": {a: a for a in agents}, "pattern": ROLE_PATTERN}}
    }
    # Agents may also name themselves with pg_logical_emit_message(true, 'writeguard', '{"agent_id": ...}').
    data["worker"]["agent_messages"] = {"topic": f"{prefix}.message", "prefix": "writeguard"}
    for t in data["tables"]:
        t["actions"] = {"info": ["alert"], "warning": ["alert"], "critical": list(actions)}
    return data


@dataclass
class Stack:
    pg: LocalPostgres
    kafka: LocalKafka
    connect: LocalConnect
    worker: WorkerProcess
    config: Config
    config_path: Path
    owns_kafka: bool
    _stopped: bool = field(default=False, repr=False)

    def agent(self, role: str) -> Any:
        """A connection as the agent's own role, autocommit: every statement is its own transaction."""
        import psycopg

        return psycopg.connect(self.pg.dsn(user=role, dbname="shop"), autocommit=True)

    def wait_events(self, at_least: float, timeout: float = 90.0) -> float:
        """Wait until the worker has scored ``at_least`` events."""
        deadline = time.monotonic() + timeout
        while (got := self.worker.total("writeguard_events_total")) < at_least:
            if self.worker.proc.poll() is not None:
                raise RuntimeError(f"worker died:\n{self.worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker scored {got} events, not {at_least}:\n{self.worker.log_tail()}")
            time.sleep(0.1)
        return got

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.worker.stop()
        self.connect.stop()
        self.pg.stop()
        if self.owns_kafka:
            self.kafka.stop()


def create_agents(pg: LocalPostgres, roles: Sequence[str]) -> None:
    from psycopg import sql

    with pg.connect(dbname="shop", autocommit=True) as c:
        for role in roles:
            ident = sql.Identifier(role)
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
            c.execute(
                sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.refunds, public.orders TO {}").format(ident)
            )
            c.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))


def start_stack(
    workdir: Path,
    agents: Sequence[str],
    *,
    kafka: LocalKafka | None = None,
    prefix: str | None = None,
    progress: Progress | None = None,
    edit_config: Callable[[dict[str, Any]], None] | None = None,
    loglevel: str = "info",
    extra_ddl: str | None = None,
) -> Stack:
    """Bring everything up in order (Kafka unless given, PostgreSQL, Connect + Debezium, the worker).

    ``extra_ddl`` runs in the shop database once its tables and the agents' roles exist, before Debezium starts: a
    test's own tables (and their grants); ``edit_config`` then adds them to ``tables`` for Debezium and the worker.
    """
    say = progress or (lambda m: None)
    prefix = prefix or f"wg{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True, exist_ok=True)
    owns_kafka = kafka is None
    started: list[Any] = []
    try:
        if kafka is None:
            say("starting a local Apache Kafka broker (KRaft, jars from Maven Central) ...")
            kafka = LocalKafka(workdir / "kafka", progress=say).start()
            started.append(kafka)
        say("starting PostgreSQL (wal_level=logical) ...")
        # Its own temporary folder: the postgres OS user must reach it, which a private workdir may not allow.
        pg = LocalPostgres(progress=say).start()
        started.append(pg)
        pg.create_database("shop")
        with pg.connect(dbname="shop", autocommit=True) as c:
            c.execute(SHOP_DDL)
        create_agents(pg, agents)
        if extra_ddl is not None:
            with pg.connect(dbname="shop", autocommit=True) as c:
                c.execute(extra_ddl)
        data = shop_config(kafka.bootstrap_servers, pg, prefix, agents=agents)
        if edit_config is not None:
            edit_config(data)
        config_path = workdir / "writeguard.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = load_config(config_path)
        kafka.create_topics({**{t.topic: 3 for t in cfg.tables}, f"{prefix}.message": 1})
        say("starting Kafka Connect with the Debezium PostgreSQL connector ...")
        connect = LocalConnect(kafka.bootstrap_servers, workdir / "connect", progress=say).start()
        started.append(connect)
        body = cfg.connector_config()
        connect.put_connector(body["name"], body["config"])
        say(f"Debezium connector {body['name']} running: {prefix}.public.refunds, {prefix}.public.orders")
        worker = spawn_worker(config_path, workdir, loglevel=loglevel)
        say(f"worker running (pid {worker.proc.pid}); metrics at http://127.0.0.1:{worker.metrics_port}/metrics")
        return Stack(pg, kafka, connect, worker, cfg, config_path, owns_kafka)
    except BaseException:
        for part in reversed(started):
            if part is kafka and not owns_kafka:
                continue
            with contextlib.suppress(Exception):
                part.stop()
        raise
