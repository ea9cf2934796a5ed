"""An authenticated control topic: forged records release nobody and grant nothing (real broker, worker, PostgreSQL).

- A real worker quarantines an agent; `released` records produced by another producer (unsigned, signed with
  another key, or a signed release of another quarantine replayed) are counted as rejected and change nothing:
  the quarantined gauge stays 1 and the agent's writes stay counted as quarantined. `writeguard release` does
  release it.
- `writeguard release` against a real PostgreSQL: a forged `quarantined` record that names a NOLOGIN group role
  with LOGIN, INSERT WITH GRANT OPTION and TRUNCATE grants nothing, whether it is unsigned, signed with another
  key, or signed but naming a role that is not the agent's. A record the worker would write is restored.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from psycopg import sql

from connectors.messages import CONTROL_SIGNATURE_HEADER, ControlRecord, EnforcementResult, sign_control, verify_control
from connectors.pg_enforce import Revocation
from detectors.spec import RateSpec
from stream.config import load_config
from stream.enforce import postgres_enforcer
from testbed.broker import LocalKafka
from testbed.fleet import Fleet
from testbed.postgres import LocalPostgres
from testbed.stack import SHOP_DDL, TEST_CONTROL_KEY, create_agents, shop_config
from tests.integration.conftest import Worker, read_topic, release, start_worker, until

pytestmark = pytest.mark.integration

KEY = TEST_CONTROL_KEY.encode()
OTHER_KEY = b"an-attackers-own-key-0123456789abcdef"
S = 1_000_000


def produce_control(bootstrap: str, topic: str, rec: ControlRecord, signature: bytes | None) -> None:
    """One control record as any producer could write it, on the partition writeguard's own records for it use."""
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all"})
    errors: list[str] = []
    headers: dict[str, str | bytes | None] | None = None
    if signature is not None:
        headers = {CONTROL_SIGNATURE_HEADER: signature}
    p.produce(
        topic,
        key=rec.agent_id.encode(),
        value=rec.to_bytes(),
        headers=headers,
        on_delivery=lambda err, msg: errors.append(str(err)) if err else None,
    )
    assert p.flush(30) == 0 and not errors, errors


def signed_by(secret: bytes, rec: ControlRecord) -> bytes:
    return sign_control(secret, rec.agent_id.encode(), rec.to_bytes())


def released(agent: str, alert_id: str | None, by: str = "attacker") -> ControlRecord:
    return ControlRecord(agent_id=agent, state="released", reason="forged", alert_id=alert_id, by=by)


# -- the worker ignores forged releases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(kafka, tmp_path_factory.mktemp("control-auth"))
    try:
        yield w
    finally:
        w.process.stop()


def test_forged_releases_do_not_release_a_quarantined_agent_and_writeguard_release_does(worker: Worker) -> None:
    w = worker
    fleet = Fleet(n_agents=2, seed=11, prefix=w.prefix)
    rogue = fleet.agents[0]
    # More writes than the rate ceiling: the rate guard needs no warm-up, so this quarantines the agent.
    table = rogue.table
    spec = next(t for t in w.config.tables if t.name == table)
    ceiling = next(d.max_events for d in spec.detectors if isinstance(d, RateSpec))
    t0 = time.time_ns() // 1000
    burst = [fleet.write(rogue, t0 + i * 1_000) for i in range(ceiling + 50)]
    assert all(r.topic == w.topic(table) for r in burst)
    _produce(w, burst)
    until("the quarantine", lambda: w.total("writeguard_quarantined_agents") == 1, w)
    control = until("the quarantined record", lambda: read_topic(w.bootstrap, w.config.topics.control), w)
    ((_, value, _, _),) = control
    quarantined = ControlRecord.model_validate_json(value or b"")
    assert quarantined.agent_id == rogue.agent_id and quarantined.state == "quarantined"
    assert quarantined.alert_id is not None

    # Three forgeries of a release, each after the quarantine on the same partition.
    topic = w.config.topics.control
    unsigned = released(rogue.agent_id, quarantined.alert_id)
    produce_control(w.bootstrap, topic, unsigned, None)
    wrong_key = released(rogue.agent_id, quarantined.alert_id)
    produce_control(w.bootstrap, topic, wrong_key, signed_by(OTHER_KEY, wrong_key))
    # A release signed with the real key, of an earlier quarantine (as one replayed from the topic's history).
    replayed = released(rogue.agent_id, "an-earlier-alert", by="ops@host")
    produce_control(w.bootstrap, topic, replayed, signed_by(KEY, replayed))

    def rejected() -> dict[str, float]:
        m = w.metrics()
        return {
            reason: m.get(f'writeguard_control_records_rejected_total{{reason="{reason}"}}', 0.0)
            for reason in ("unsigned", "bad_signature", "stale_release")
        }

    until(
        "the three forgeries rejected", lambda: rejected() == {"unsigned": 1, "bad_signature": 1, "stale_release": 1}, w
    )
    assert w.total("writeguard_quarantined_agents") == 1
    assert "ignoring control record at partition" in w.process.log_tail(20_000)
    # Its next writes are still a quarantined agent's (the blast radius counter).
    before = w.total("writeguard_quarantined_agent_events_total")
    more = [fleet.write(rogue, t0 + 100 * S + i * 1_000) for i in range(10)]
    _produce(w, more)
    until(
        "the later writes counted as quarantined",
        lambda: w.total("writeguard_quarantined_agent_events_total") >= before + len(more),
        w,
    )
    assert w.total("writeguard_quarantined_agent_events_total") == before + len(more)
    assert w.total("writeguard_quarantined_agents") == 1

    # The operator's release is signed and names the quarantine in force: it is applied.
    out = release(w.config_path, rogue.agent_id, "prompt fixed")
    assert out.returncode == 0, out.stderr
    until("the release applied", lambda: w.total("writeguard_quarantined_agents") == 0, w)
    records = read_topic(w.bootstrap, topic, expect=5)
    last_key, last_value, _, _ = max(records, key=lambda r: r[3])
    rec = verify_control([KEY], last_key, last_value, _headers_of(w.bootstrap, topic, last_key))
    assert (rec.state, rec.alert_id, rec.by != "attacker") == ("released", quarantined.alert_id, True)
    assert rejected() == {"unsigned": 1, "bad_signature": 1, "stale_release": 1}
    # Released: its writes no longer count as a quarantined agent's.
    counted = w.total("writeguard_quarantined_agent_events_total")
    events = w.total("writeguard_events_total")
    after = [fleet.write(rogue, t0 + 200 * S + i * 1_000) for i in range(5)]
    _produce(w, after)
    w.wait_for("writeguard_events_total", events + len(after))
    assert w.total("writeguard_quarantined_agent_events_total") == counted


def _produce(w: Worker, records: list[Any]) -> None:
    from tests.integration.conftest import produce

    produce(w.bootstrap, records)


def _headers_of(bootstrap: str, topic: str, key: bytes | None) -> list[tuple[str, bytes | None]] | None:
    """The headers of the last record of ``key`` (read_topic returns none)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"h-{uuid.uuid4()}", "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        seen = 0
        headers: Any = None
        deadline = time.monotonic() + 30
        while seen < sum(ends.values()) and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error():
                    continue
                seen += 1
                if m.key() == key:
                    headers = m.headers()
        return headers  # type: ignore[no-any-return]
    finally:
        c.close()


# -- `writeguard release` grants nothing from a forged quarantine ----------------------------------------------------

AGENTS = ("agent_unsigned_01", "agent_otherkey_01", "agent_wrongrole_01", "agent_genuine_01")
GROUP = "agent_group_01"  # a NOLOGIN group role whose name fits the role pattern


@dataclass
class Db:
    pg: LocalPostgres
    config_path: Path
    bootstrap: str
    topic: str

    def one(self, query: str, *args: Any) -> Any:
        with self.pg.connect(dbname="shop", autocommit=True) as c:
            row = c.execute(query, args).fetchone()
        assert row is not None
        return row[0]

    def can(self, role: str, privilege: str) -> bool:
        return bool(self.one("SELECT has_table_privilege(%s, 'public.refunds', %s)", role, privilege))

    def can_login(self, role: str) -> bool:
        return bool(self.one("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", role))


@pytest.fixture(scope="module")
def db(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    pg = LocalPostgres(progress=lambda m: print(m, file=sys.stderr)).start()
    try:
        pg.create_database("shop")
        with pg.connect(dbname="shop", autocommit=True) as c:
            c.execute(SHOP_DDL)
            c.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(GROUP)))
        create_agents(pg, AGENTS)
        prefix = f"ca{uuid.uuid4().hex[:8]}"
        data = shop_config(kafka.bootstrap_servers, pg, prefix, agents=AGENTS)
        path = tmp_path_factory.mktemp("control-auth-pg") / "writeguard.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = load_config(path)
        kafka.create_topics({cfg.topics.control: 3}, config={cfg.topics.control: {"cleanup.policy": "compact"}})
        d = Db(pg, path, kafka.bootstrap_servers, cfg.topics.control)
        assert not d.can_login(GROUP) and not d.can(GROUP, "INSERT") and not d.can(GROUP, "TRUNCATE")
        yield d
    finally:
        pg.stop()


def forged_quarantine(agent: str, role: str) -> ControlRecord:
    """What an attacker would post: the agent is 'quarantined', and its revocation names ``role``."""
    rev = Revocation(
        role=role,
        mode="revoke_writes",
        privileges=(("public", "refunds", "INSERT"), ("public", "refunds", "TRUNCATE")),
        had_login=True,
        terminated_sessions=0,
        grant_options=(("public", "refunds", "", "INSERT"),),
    )
    return ControlRecord(
        agent_id=agent,
        state="quarantined",
        reason="forged",
        alert_id=f"forged-{uuid.uuid4()}",
        by="writeguard-worker",
        enforcement=[EnforcementResult(action="postgres", ok=True, revocation=rev.to_dict())],
    )


def assert_group_got_nothing(d: Db) -> None:
    assert not d.can_login(GROUP)
    for privilege in ("INSERT", "TRUNCATE", "INSERT WITH GRANT OPTION", "TRUNCATE WITH GRANT OPTION"):
        assert not d.can(GROUP, privilege), privilege


@pytest.mark.parametrize(
    ("agent", "signer", "says"),
    [
        (AGENTS[0], None, "ignored the control record"),
        (AGENTS[1], OTHER_KEY, "ignored the control record"),
        (AGENTS[2], KEY, "restore refused"),
    ],
    ids=["unsigned", "another key", "signed, another role"],
)
def test_release_grants_nothing_from_a_forged_quarantine(db: Db, agent: str, signer: bytes | None, says: str) -> None:
    rec = forged_quarantine(agent, GROUP)
    produce_control(db.bootstrap, db.topic, rec, signed_by(signer, rec) if signer is not None else None)
    out = release(db.config_path, agent, "forged test")
    assert out.returncode == 0, out.stderr
    assert says in out.stderr + _released_detail(db, agent), (out.stdout, out.stderr)
    assert "restored" not in out.stdout, out.stdout
    assert_group_got_nothing(db)
    # The agent's own role is as it was: nothing taken, nothing added.
    assert db.can(agent, "INSERT") and not db.can(agent, "TRUNCATE") and db.can_login(agent)


def _released_detail(db: Db, agent: str) -> str:
    """The details of the `released` record release wrote for ``agent``, as text."""
    out = []
    for key, value, _, _ in read_topic(db.bootstrap, db.topic):
        if key == agent.encode() and value is not None:
            rec = json.loads(value)
            if rec["state"] == "released":
                out += [e["detail"] for e in rec["enforcement"]]
    return " ".join(out)


def test_release_restores_a_quarantine_the_worker_would_have_recorded(db: Db) -> None:
    """The control experiment: the same path grants back a signed revocation of the agent's own role."""
    agent = AGENTS[3]
    cfg = load_config(db.config_path)
    enforcer = postgres_enforcer(cfg)
    assert enforcer is not None
    try:
        rev = enforcer.quarantine(agent)
    finally:
        enforcer.close()
    assert rev.enforced and not db.can(agent, "INSERT")
    rec = ControlRecord(
        agent_id=agent,
        state="quarantined",
        reason="zscore",
        alert_id="alert-genuine",
        by="writeguard-worker",
        enforcement=[EnforcementResult(action="postgres", ok=True, revocation=rev.to_dict())],
    )
    produce_control(db.bootstrap, db.topic, rec, signed_by(KEY, rec))
    out = release(db.config_path, agent, "prompt fixed")
    assert out.returncode == 0, out.stderr
    assert f"restored role {agent}" in out.stdout, (out.stdout, out.stderr)
    assert db.can(agent, "INSERT") and db.can(agent, "DELETE")
    assert_group_got_nothing(db)
