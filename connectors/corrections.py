"""Correction records: what ``writeguard undo apply`` changed, for the systems that copied the agent's writes.

A billing sync or a search index that read the agent's rows from the CDC topics learns of the fix from the
corrections topic (default ``writeguard.corrections``): one :class:`Correction` per applied step, keyed by the
row's key (canonical JSON, :func:`undo.events.canonical_key`), so that a row's corrections keep their order.

Delivery is at least once. The apply publishes a batch's corrections after the batch committed and records each
confirmed delivery (partition, offset) in its ledger; a crash between the commit and that record leaves steps
applied but unconfirmed, and the next run of the plan publishes exactly those again. A consumer therefore sees a
step once, or in that case twice: ``(plan_id, step)`` identifies a correction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from detectors.strict import Strict
from undo.events import canonical_key
from undo.models import Action, Row

Op = Literal["c", "u", "d"]
_OPS: dict[str, Op] = {"insert": "c", "delete": "d", "update": "u", "soft_delete": "u", "undelete": "u"}


class Correction(Strict):
    """One compensating write of an undo, as it was committed (topic ``writeguard.corrections``)."""

    schema_version: Literal[1] = 1
    plan_id: str
    step: int = Field(description="The plan step; (plan_id, step) identifies a correction, also when redelivered.")
    table: str = Field(description="'<schema>.<table>'")
    key: Row = Field(description="The row's primary key, as in the change events.")
    action: Action
    op: Op = Field(description="The compensating write, as a change event's op: c re-insert, u update, d delete.")
    agent_wrote: Row | None = Field(
        description="What the agent's writes had left in the columns the undo changed; None: the agent deleted the row."
    )
    restored: Row | None = Field(
        description="The values written back (a re-insert: the whole row); None: the undo deleted the row."
    )
    now_columns: list[str] = Field(default_factory=list, description="Columns set to applied_at (a soft delete).")
    applied_at: datetime = Field(description="Start of the undo's transaction (PostgreSQL now()).")
    tx_id: int = Field(description="The undo transaction's id, as Debezium's source.txId of its change events.")

    def kafka_key(self) -> bytes:
        return canonical_key(self.key).encode()

    @classmethod
    def of(
        cls,
        plan_id: str,
        step: int,
        table: str,
        key: Row,
        action: Action,
        restored: Row | None,
        agent_values: Row,
        now_columns: Sequence[str],
        applied_at: datetime,
        tx_id: int,
    ) -> Correction:
        """From a ledger row: a re-insert has no agent value (the agent deleted the row), a delete no restored one.

        >>> from datetime import UTC
        >>> c = Correction.of("p", 1, "public.t", {"id": 1}, "delete", {}, {"amount": 5}, [],
        ...                   datetime(2026, 1, 1, tzinfo=UTC), 728)
        >>> c.op, c.restored, c.agent_wrote, c.kafka_key()
        ('d', None, {'amount': 5}, b'{"id":1}')
        """
        return cls(
            plan_id=plan_id,
            step=step,
            table=table,
            key=key,
            action=action,
            op=_OPS[action],
            agent_wrote=None if action == "insert" else agent_values,
            restored=None if action == "delete" else restored,
            now_columns=list(now_columns),
            applied_at=applied_at,
            tx_id=tx_id,
        )


class CorrectionsError(RuntimeError):
    """Kafka did not confirm every correction of a batch; the ledger keeps those steps unconfirmed."""


@dataclass(frozen=True, slots=True)
class Delivered:
    step: int
    topic: str
    partition: int
    offset: int


class CorrectionPublisher:
    """A confluent-kafka idempotent producer of :class:`Correction` records, flushed per call of :meth:`publish`."""

    def __init__(self, client: Mapping[str, Any], topic: str, *, partitions: int = 6, timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self._client = dict(client)
        self._partitions = partitions
        self._timeout_s = timeout_s
        self._topic_checked = False
        self._producer = Producer(
            {
                **self._client,
                "enable.idempotence": True,  # acks=all, no duplicates or reordering from the producer's own retries
                "acks": "all",
                "linger.ms": 5,
                # Java's and Faust's partitioner: a row's corrections land where a Java producer would put them.
                "partitioner": "murmur2_random",
            }
        )

    def ensure_topic(self) -> None:
        """Create the topic when it is missing (with ``partitions``), so no broker auto-creation is relied on."""
        if self._topic_checked:
            return
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

        admin = AdminClient(self._client)
        if self.topic not in admin.list_topics(timeout=self._timeout_s).topics:
            fut = admin.create_topics([NewTopic(self.topic, self._partitions)])[self.topic]
            try:
                fut.result(self._timeout_s)
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise CorrectionsError(f"cannot create {self.topic}: {e}") from None
        self._topic_checked = True

    def publish(self, corrections: Sequence[Correction]) -> list[Delivered]:
        """Produce and flush; every record confirmed, or :class:`CorrectionsError` with what Kafka said."""
        if not corrections:
            return []
        self.ensure_topic()
        delivered: list[Delivered] = []
        errors: list[str] = []

        def done(step: int) -> Any:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(f"step {step}: {err}")
                else:
                    delivered.append(Delivered(step, msg.topic(), msg.partition(), msg.offset()))

            return cb

        for c in corrections:
            while True:
                try:
                    self._producer.produce(
                        self.topic, key=c.kafka_key(), value=c.model_dump_json().encode(), on_delivery=done(c.step)
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    self._producer.poll(0.1)
        left = self._producer.flush(self._timeout_s)
        if left or errors:
            raise CorrectionsError(
                f"{self.topic}: {len(corrections) - len(delivered)} of {len(corrections)} corrections not confirmed"
                + (f": {'; '.join(errors[:3])}" if errors else f" in {self._timeout_s:.0f} s")
            )
        return sorted(delivered, key=lambda d: d.step)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


def committed_offsets(
    client: Mapping[str, Any], topic: str, groups: Sequence[str], partitions: Sequence[int], timeout_s: float = 30.0
) -> dict[str, dict[int, int]]:
    """Each group's committed offset (the next one it reads) per partition of ``topic``; -1 when it has none."""
    if not groups or not partitions:
        return {g: {} for g in groups}
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict(client))
    out: dict[str, dict[int, int]] = {}
    for group in groups:
        req = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])]
        res = admin.list_consumer_group_offsets(req, request_timeout=timeout_s)[group].result(timeout_s)
        out[group] = {tp.partition: tp.offset for tp in res.topic_partitions}
    return out
