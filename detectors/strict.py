"""The base of every model read from the YAML config: unknown keys refused, values frozen.

It lives in the lowest layer, so that the detector specs (:mod:`detectors.spec`), the config's edge sections
(:mod:`connectors.debezium_connector`) and the config itself (:mod:`stream.config`) share one definition.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config model: a typo in a YAML key is refused, not silently ignored; fields may be given by alias or name.

    >>> from pydantic import Field, ValidationError
    >>> class Kafka(Strict):
    ...     group_id: str = Field("writeguard", alias="group.id")
    >>> Kafka.model_validate({"group.id": "wg"}).group_id, Kafka(group_id="wg").group_id
    ('wg', 'wg')
    >>> try:
    ...     Kafka.model_validate({"groupid": "wg"})
    ... except ValidationError as e:
    ...     print(e.errors()[0]["type"])
    extra_forbidden
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
