"""Enforcement of a quarantine beyond the control topic: revoke the agent's database role, call its pause webhook.

Both run off the event loop's critical path: PostgreSQL statements in one worker thread (in order), webhook
deliveries in the sender's own task, so a slow database or endpoint never stalls the stream. Each outcome
is recorded on the control topic, in a ``quarantined`` record that lists every action taken so far: the
topic is compacted, so the latest record must carry everything a release needs to undo.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from connectors.messages import Alert, ControlRecord, ControlRejected, EnforcementResult, verify_control
from connectors.pg_enforce import EnforcementError, PostgresEnforcer, Revocation
from connectors.webhook import Delivery, WebhookSender, idempotency_key
from stream.config import Config
from stream.metrics import Metrics

log = logging.getLogger("writeguard.enforce")
Publish = Callable[[ControlRecord], Awaitable[None]]
Current = Callable[[str, str], bool]  # (agent id, alert id) -> is that alert's quarantine still in force?


def postgres_enforcer(cfg: Config) -> PostgresEnforcer | None:
    pg = cfg.enforcement.postgres
    if pg is None:
        return None
    return PostgresEnforcer(
        pg.dsn.get_secret_value(),
        pg.roles,
        [t.name for t in cfg.tables],
        pg.mode,
        terminate_sessions=pg.terminate_sessions,
    )


@dataclass
class _Open:
    alert: Alert
    results: list[EnforcementResult] = field(default_factory=list)


class Enforcer:
    """Takes a quarantining alert, runs its enforcement actions, publishes what each did."""

    def __init__(self, cfg: Config, publish: Publish, metrics: Metrics, current: Current | None = None) -> None:
        self._publish = publish
        # Whether an alert's quarantine is still the agent's: a human may release it while an action is under way.
        self._current = current or (lambda agent_id, alert_id: True)
        self._metrics = metrics
        self._pg = postgres_enforcer(cfg)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeguard-pg")
        wh = cfg.enforcement.webhook
        self._webhook = WebhookSender(wh, on_result=self._on_delivery) if wh is not None else None
        self._open: dict[str, _Open] = {}  # alert id -> the quarantine it enforces
        self._done: set[str] = set()  # alert ids already enforced: one alert is enforced once
        self._deliveries: dict[str, str] = {}  # webhook idempotency key -> alert id, until its outcome
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._webhook is not None:
            await self._webhook.start()

    async def stop(self) -> None:
        if self._webhook is not None:
            await self._webhook.stop()
        for t in list(self._tasks):
            t.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._pg is not None:
            self._pg.close()

    def enforce(self, alert: Alert) -> None:
        """Start the alert's enforcement actions; returns at once."""
        if alert.alert_id in self._done:
            return
        self._done.add(alert.alert_id)
        self._open[alert.alert_id] = _Open(alert)
        if "postgres" in alert.actions and self._pg is not None:
            task = asyncio.ensure_future(self._revoke(alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if "webhook" in alert.actions and self._webhook is not None:
            payload = {
                "event": "writeguard.quarantine",
                "agent_id": alert.agent_id,
                "run_id": alert.run_id,
                "alert_id": alert.alert_id,
                "table": alert.table,
                "severity": alert.severity,
                "summary": alert.summary,
                "commit_ts": alert.commit_ts.isoformat(),
            }
            # A delivery that is not queued (queue full, sender stopped, payload not JSON) is reported by the
            # sender through _on_delivery, within submit(): recording it here too would count it twice.
            key = idempotency_key(alert.alert_id, "webhook")
            self._deliveries[key] = alert.alert_id
            self._webhook.submit(key, payload)

    # A postgres enforcement that failed (database unreachable, kept waiting past the enforcer's bound) is tried
    # again after each of these pauses, in seconds, before it is recorded as failed for a human. A refusal
    # (superuser, owner, unknown role) is recorded at once: trying again would not change it.
    retry_delays: tuple[float, ...] = (5.0, 15.0, 40.0)

    async def _revoke(self, alert: Alert) -> None:
        assert self._pg is not None and self._loop is not None
        pg = self._pg
        attempts = len(self.retry_delays) + 1
        for attempt in range(1, attempts + 1):
            try:
                rev: Revocation = await self._loop.run_in_executor(self._pool, pg.quarantine, alert.agent_id)
            except Exception as e:  # a database error of any kind must be reported, not crash the worker
                known = isinstance(e, EnforcementError | OSError | RuntimeError)
                if not known:
                    log.exception("postgres enforcement failed for %s", alert.agent_id)
                detail = str(e) if known else repr(e)
                final = isinstance(e, EnforcementError) and not e.retryable
                if attempt < attempts and not final:
                    if not self._current(alert.agent_id, alert.alert_id):
                        log.info("agent %s released: its failed postgres enforcement is not retried", alert.agent_id)
                        return
                    delay = self.retry_delays[attempt - 1]
                    log.warning(
                        "postgres enforcement for agent %s: attempt %d of %d failed, trying again in %g s: %s",
                        alert.agent_id,
                        attempt,
                        attempts,
                        delay,
                        detail[:2000],
                    )
                    await asyncio.sleep(delay)
                    continue
                if attempt > 1:
                    detail = f"failed {attempt} attempts; the last: {detail}"
                result = EnforcementResult(action="postgres", ok=False, detail=detail[:2000])
                break
            # Not enforced (still writable, or not verified) is reported as failed, never as done.
            result = EnforcementResult(
                action="postgres", ok=rev.enforced, detail=rev.describe()[:2000], revocation=rev.to_dict()
            )
            if not self._current(alert.agent_id, alert.alert_id):
                # Released while the REVOKE waited: the release found nothing to grant back, so do it now.
                try:
                    await self._loop.run_in_executor(self._pool, pg.release, rev)
                    log.warning("role %s: released while its quarantine was enforced; granted back", rev.role)
                except Exception:
                    log.exception("role %s: released while enforced, and granting back failed", rev.role)
            break
        self._record(alert.alert_id, result)

    def _on_delivery(self, d: Delivery) -> None:
        alert_id = self._deliveries.pop(d.key, None)
        if alert_id is None:
            return  # not a delivery this enforcer submitted
        if d.error == "queue_full":
            detail = "not queued: delivery queue full"
        elif d.status:
            detail = f"HTTP {d.status} after {d.attempts} attempt(s)"
        else:
            detail = f"{d.error} ({d.attempts} attempts)"
        self._record(alert_id, EnforcementResult(action="webhook", ok=d.delivered, detail=detail))

    def _record(self, alert_id: str, result: EnforcementResult) -> None:
        self._metrics.enforcement.labels(result.action, "ok" if result.ok else "failed").inc()
        if not result.ok:
            log.warning("enforcement %s failed for alert %s: %s", result.action, alert_id, result.detail)
        entry = self._open.get(alert_id)
        if entry is None:
            return
        if not self._current(entry.alert.agent_id, alert_id):
            # A late outcome must not publish a `quarantined` record over the human's `released` one.
            del self._open[alert_id]
            return
        entry.results.append(result)
        task = asyncio.ensure_future(self._publish(ControlRecord.quarantine(entry.alert, entry.results)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def revocation_from(record: ControlRecord | None) -> Revocation | None:
    """The postgres revocation recorded in a control record, if any."""
    if record is None:
        return None
    for r in record.enforcement:
        if r.action == "postgres" and r.revocation:
            return Revocation.from_dict(r.revocation)
    return None


class NotRestorable(ValueError):
    """A release must not grant back what the agent's latest control record names; the message says why."""


def revocation_to_restore(cfg: Config, agent_id: str, last: ControlRecord | None) -> Revocation | None:
    """What ``writeguard release agent_id`` may grant back: None when there is nothing, NotRestorable when refused.

    ``last`` is the agent's latest verified control record. Only a ``quarantined`` record of that agent is
    restored from, and only for the role the config's mapping gives that agent: a record that names any other
    role (a NOLOGIN group role, say) would otherwise hand that role whatever the record lists.
    """
    if last is None or last.state != "quarantined":
        return None
    try:
        rev = revocation_from(last)
    except (ValueError, EnforcementError) as e:  # from_dict is strict: a malformed revocation grants nothing
        raise NotRestorable(f"the recorded revocation is malformed: {e}") from None
    if rev is None:
        return None
    if last.agent_id != agent_id:
        raise NotRestorable(f"the latest control record is agent {last.agent_id[:200]!r}'s, not {agent_id[:200]!r}'s")
    pg = cfg.enforcement.postgres
    if pg is None:
        return None
    try:
        role = pg.roles.role_for(agent_id)
    except EnforcementError as e:
        raise NotRestorable(str(e)) from None
    if rev.role != role:
        raise NotRestorable(
            f"the quarantine record names role {rev.role[:200]!r}, but agent {agent_id[:200]!r} maps to role {role!r}"
        )
    return rev


def undo_enforcement(cfg: Config, rev: Revocation) -> EnforcementResult | None:
    """Grant back what a quarantine's revocation took away in the database; None without postgres enforcement.

    A refusal is returned as a result with ``ok=False``, not raised: the release is published either way, and
    its control record says what could not be restored.
    """
    pg = postgres_enforcer(cfg)
    if pg is None:
        return None
    try:
        pg.release(rev)
    except (EnforcementError, OSError, RuntimeError) as e:
        return EnforcementResult(action="postgres", ok=False, detail=f"restore failed: {e}"[:2000])
    finally:
        pg.close()
    detail = f"role {rev.role}: {len(rev.privileges)} privileges granted back" + (
        ", LOGIN restored" if rev.had_login else ""
    )
    return EnforcementResult(action="postgres", ok=True, detail=detail, revocation=rev.to_dict())


def read_control_state(
    cfg: Config, timeout: float = 30.0, on_reject: Callable[[int, int, ControlRejected], None] | None = None
) -> dict[str, ControlRecord]:
    """The latest verified control record of every agent: the compacted control topic read from start to end.

    With ``control.signing_key`` set, a record that is unsigned, badly signed, malformed, under another agent's
    key, or a release of another quarantine than the agent's latest is skipped (``on_reject(partition, offset,
    error)``), as the worker's follower skips it: the agent's state is the last record that passes.
    """
    import time
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    from stream.config import client_settings

    keys = cfg.control.keys() if cfg.control is not None else None
    c = Consumer(
        {
            **client_settings(cfg),
            "group.id": f"writeguard-release-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        topic = cfg.topics.control
        parts = c.list_topics(topic, timeout=timeout).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        state: dict[str, ControlRecord] = {}
        pending = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in c.consume(500, timeout=0.5):
                if msg.error():
                    continue
                part, off = msg.partition(), msg.offset()
                if part is not None and off is not None and off >= ends[part] - 1:
                    pending.discard(part)
                value = msg.value()
                if value is None:
                    continue
                try:
                    if keys is None:
                        try:
                            rec = ControlRecord.model_validate_json(value)
                        except ValueError as e:
                            raise ControlRejected("invalid_record", str(e).splitlines()[0]) from None
                    else:
                        rec = verify_control(keys, msg.key(), value, msg.headers())
                    prev = state.get(rec.agent_id)
                    if rec.stale_for(prev.alert_id if prev is not None and prev.state == "quarantined" else None):
                        raise ControlRejected("stale_release", f"releases alert {rec.alert_id}, not the latest")
                except ControlRejected as e:
                    if on_reject is not None:
                        on_reject(part if part is not None else -1, off if off is not None else -1, e)
                    continue
                state[rec.agent_id] = rec
        return state
    finally:
        c.close()
