"""What writeguard writes about an undo: the :class:`Scope` of a selection and the compensation :class:`Plan`.

Both are files people read and review (``writeguard scope --json``, ``writeguard undo plan -o plan.json``), with a
JSON Schema each in ``schemas/``. Row values are JSON as Debezium's ``JsonConverter`` wrote them, kept verbatim:
what the undo writes back is exactly what the change event said.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, JsonValue

from detectors.strict import Strict

Row = dict[str, JsonValue]
ConflictReason = Literal["later_write", "before_incomplete", "key_reused"]
Action = Literal["delete", "update", "insert", "soft_delete", "undelete"]
Decision = Literal["apply", "conflict", "force", "skip"]


class Selection(Strict):
    """Which writes: by any of the agents or runs named (none named: every writer), within the time range.

    >>> s = Selection(agents=("a1",), since=datetime(2026, 1, 1, tzinfo=UTC))
    >>> s.matches("a1", None, 1_767_225_600_000_000), s.matches("a2", None, 1_767_225_600_000_000)
    (True, False)
    >>> s.matches("a1", None, 1_767_225_599_999_999)  # before `since`
    False
    """

    agents: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    since: datetime | None = Field(None, description="Commit time from (inclusive).")
    until: datetime | None = Field(None, description="Commit time to (exclusive).")
    alert_id: str | None = Field(None, description="The alert the selection was derived from, if any.")

    def matches(self, agent_id: str | None, run_id: str | None, commit_ts_us: int) -> bool:
        if self.agents and agent_id not in self.agents:
            return False
        if self.runs and run_id not in self.runs:
            return False
        if self.since is not None and commit_ts_us < _us(self.since):
            return False
        return self.until is None or commit_ts_us < _us(self.until)


def _us(t: datetime) -> int:
    t = t if t.tzinfo is not None else t.replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


class Write(Strict):
    """One change event of a row, as scope and plan cite it."""

    op: Literal["c", "u", "d"]
    agent_id: str | None = Field(description="None: the writer named no agent (a human, a job).")
    run_id: str | None
    tx_id: str | None
    commit_ts: datetime
    position: str = Field(description="Where it was read: 'file:line' or 'topic/partition/offset'.")


class RowScope(Strict):
    """Every selected write of one row, and what others wrote to it after the selection's first write."""

    table: str
    key: Row
    writes: list[Write] = Field(description="The selected writes, in commit order.")
    first_before: Row | None = Field(description="Before image of the first selected write (None for an insert).")
    last_after: Row | None = Field(description="After image of the last selected write (None for a delete).")
    existed_before: bool = Field(description="The row existed before the selection (its first write is no insert).")
    exists_after: bool = Field(description="The row existed after the selection (its last write is no delete).")
    later: list[Write] = Field(description="Writes by anyone outside the selection after its first write: conflicts.")
    incomplete_before: list[str] = Field(
        default_factory=list,
        description="Why the first before image cannot be trusted (REPLICA IDENTITY not FULL, TOAST placeholders).",
    )
    last_event: int = Field(description="Ordinal in the scan of the selection's last write to the row: plan order.")


class OpCounts(Strict):
    c: int = 0
    u: int = 0
    d: int = 0


class TableScope(Strict):
    """Per table: events by op, rows by net effect, and the net change of each numeric feature."""

    table: str
    events: OpCounts
    rows_created: int = Field(description="Rows that did not exist before the selection and exist after it.")
    rows_updated: int
    rows_deleted: int
    rows_transient: int = Field(description="Rows the selection created and deleted again: nothing left to undo.")
    net: dict[str, float] = Field(
        description="Feature name -> after minus before summed over the rows, in the column's own units."
    )


class RunScope(Strict):
    run_id: str | None
    agent_id: str | None
    events: int
    first_commit: datetime
    last_commit: datetime
    metadata: dict[str, str] = Field(
        default_factory=dict, description="What the run's logical decoding message said besides agent and run."
    )


class Scope(Strict):
    """The blast radius of a selection of writes (``writeguard scope --json``)."""

    schema_version: Literal[1] = 1
    selection: Selection
    events_read: int
    events_selected: int
    first_commit: datetime | None
    last_commit: datetime | None
    tables: list[TableScope]
    runs: list[RunScope]
    rows: list[RowScope]

    @property
    def conflicts(self) -> int:
        """Rows an undo must not touch unreviewed; a row the selection created and deleted again needs no undo."""
        return sum(1 for r in self.rows if (r.existed_before or r.exists_after) and (r.later or r.incomplete_before))


class Conflict(Strict):
    """Why a step must not run unreviewed."""

    reason: ConflictReason
    detail: str
    writer: str | None = Field(None, description="The later writer's agent id, '<unattributed>' for one without.")
    at: datetime | None = Field(None, description="Commit time of the later write.")
    position: str | None = None


class Precondition(Strict):
    """What must hold when the step runs, or it is not applied.

    ``row_matches``: the columns listed still hold the values the selection left. ``key_free``: no row has the key.
    """

    kind: Literal["row_matches", "key_free"]
    columns: Row = Field(default_factory=dict)


class Step(Strict):
    """One compensating statement."""

    n: int = Field(description="Position in the plan, from 1: reverse commit order of the rows' last writes.")
    table: str
    key: Row
    action: Action
    values: Row | None = Field(
        description="update/undelete: the columns and the values they get back; insert: the whole before image; "
        "soft_delete: a boolean soft-delete column and true; delete: {}. None when unknown (before image incomplete)."
    )
    now_columns: list[str] = Field(
        default_factory=list, description="Columns set to the time of the apply: a timestamp soft-delete column."
    )
    precondition: Precondition
    agent_values: Row = Field(default_factory=dict, description="What the selection left in the columns touched.")
    last_commit: datetime = Field(description="Commit time of the selection's last write to the row.")
    conflict: Conflict | None = None
    decision: Decision = Field(
        "apply", description="'apply' or 'conflict' as planned; a reviewer may set 'skip', or 'force' on a conflict."
    )


class TablePlan(Strict):
    table: str
    steps: dict[str, int] = Field(description="Action -> number of steps.")
    conflicts: int
    undo_net: dict[str, float] = Field(
        description="Feature -> the change the plan makes when every step is applied, in the column's own units."
    )


class Plan(Strict):
    """The compensation of a scope (``writeguard undo plan -o plan.json``).

    ``plan_id`` is the sha256 of the plan's content without ``plan_id``, ``created_at`` and the steps' ``decision``
    (see :func:`undo.plan.plan_id_of`).
    """

    schema_version: Literal[1] = 1
    plan_id: str
    created_at: datetime
    selection: Selection
    all_or_nothing: bool
    tables: list[TablePlan]
    unchanged_rows: int = Field(
        description="Rows the selection created and deleted again, or updated back to what they held: no step."
    )
    steps: list[Step]


ApplyOutcome = Literal["applied", "already_applied", "precondition_failed", "key_taken", "skipped", "conflict"]
"""What applying a step did: ``already_applied`` means an earlier run did it (the ledger says so)."""


class StepOutcome(Strict):
    """One step of one ``writeguard undo apply`` run."""

    n: int
    table: str
    key: Row
    action: Action
    outcome: ApplyOutcome
    detail: str | None = Field(None, description="Why a step was not applied, for people.")
    batch: int = Field(description="The run's batch (one transaction) that took the step; 0 when it ran none.")


class ApplyReport(Strict):
    """What one ``writeguard undo apply`` run did (``--dry-run``: would do) to each step of a plan."""

    schema_version: Literal[1] = 1
    plan_id: str
    dry_run: bool = Field(description="Every batch ran and was rolled back: nothing changed, the ledger neither.")
    ledger: str
    applied_by: str
    started_at: datetime
    finished_at: datetime
    batches: int = Field(description="Transactions that ran (committed, or rolled back in a dry run).")
    outcomes: dict[str, int] = Field(description="Outcome -> steps, over the whole plan.")
    tables: dict[str, dict[str, int]] = Field(description="Table -> outcome -> steps.")
    rolled_back: bool = Field(
        False, description="An all-or-nothing plan had a step that could not be applied: nothing was committed."
    )
    corrections_published: int = Field(0, description="Correction records confirmed by Kafka in this run.")
    steps: list[StepOutcome]

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()
