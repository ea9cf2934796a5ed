"""Blast radius and undo: which rows a selection of writes touched, and the plan that compensates them.

Pure, like :mod:`detectors`: change events in (:class:`undo.events.RowEvent`), a :class:`undo.models.Scope` and a
:class:`undo.models.Plan` out; no Kafka, no database, no files. Reading the CDC history (connectors/undo_source.py)
and rendering or applying SQL (connectors/undo_sql.py) are edges above it.
"""
