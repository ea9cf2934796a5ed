"""Settings dicts that keep their secret values out of ``repr``, ``str``, logs and JSON dumps.

Single secrets in the config are pydantic ``SecretStr``. Some secrets sit in free-form dicts of properties
that are handed on as they are (``kafka.client`` to confluent-kafka and Faust, ``debezium.extra`` to Kafka
Connect, the webhook's extra ``headers``): wrapping their values would change what every caller reads, so
these stay plain ``dict[str, str]`` (the real values, for the clients) and only their display is masked,
by key name. Masking too much costs nothing but a less useful repr; masking too little leaks, so the
patterns are broad. Like :mod:`detectors.strict`, this lives in the lowest layer, shared by the connectors'
settings and the config.

>>> from pydantic import BaseModel
>>> class Kafka(BaseModel):
...     client: ClientProperties = ClientProperties()
>>> k = Kafka(client={"sasl.username": "wg", "sasl.password": "s3cret"})
>>> k
Kafka(client={'sasl.username': 'wg', 'sasl.password': '**********'})
>>> k.model_dump_json()
'{"client":{"sasl.username":"wg","sasl.password":"**********"}}'
>>> k.client["sasl.password"]  # the clients still get the value
's3cret'
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

MASK = "**********"  # what pydantic's SecretStr shows


class MaskedDict(dict[str, str]):
    """A ``dict[str, str]`` whose values under keys matching ``SECRET`` are masked in repr and in JSON dumps."""

    __slots__ = ()
    SECRET: ClassVar[re.Pattern[str]] = re.compile(r"password|secret", re.IGNORECASE)

    @classmethod
    def is_secret(cls, key: str) -> bool:
        return cls.SECRET.search(key) is not None

    def masked(self) -> dict[str, str]:
        """A plain copy with every secret value replaced by ``**********``."""
        return {k: MASK if self.is_secret(k) else v for k, v in self.items()}

    def __repr__(self) -> str:
        return repr(self.masked())

    __str__ = __repr__

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # Validated (and described in the JSON Schema) as a plain dict[str, str], then wrapped.
        return core_schema.no_info_after_validator_function(
            cls,
            handler.generate_schema(dict[str, str]),
            # JSON goes to files, logs and topics: masked. A Python dump (model_dump()) is for code that
            # hands the settings on, as the dict itself is, so it keeps the values.
            serialization=core_schema.plain_serializer_function_ser_schema(cls._serialize, when_used="json"),
        )

    @classmethod
    def _serialize(cls, value: dict[str, str]) -> dict[str, str]:
        return cls(value).masked()


class ClientProperties(MaskedDict):
    """Kafka client / Kafka Connect properties: ``sasl.password``, ``ssl.key.password``, ``ssl.key.pem``,
    ``sasl.oauthbearer.client.secret``, ``sasl.jaas.config``, ``sasl.oauthbearer.config``, ... are masked.

    >>> ClientProperties({"security.protocol": "SASL_SSL", "ssl.key.password": "k", "sasl.jaas.config": "j"})
    {'security.protocol': 'SASL_SSL', 'ssl.key.password': '**********', 'sasl.jaas.config': '**********'}
    """

    __slots__ = ()
    SECRET = re.compile(
        r"pass(word|phrase)?|secret|token|credential|jaas|oauthbearer\.config|private|key\.pem|^ssl_key$",
        re.IGNORECASE,
    )


class HttpHeaders(MaskedDict):
    """Extra HTTP headers: ``Authorization``, ``Cookie``, ``X-Api-Key``, anything naming a token or secret.

    >>> HttpHeaders({"Authorization": "Bearer t0ken", "X-Tenant": "shop"})
    {'Authorization': '**********', 'X-Tenant': 'shop'}
    """

    __slots__ = ()
    SECRET = re.compile(r"auth|cookie|token|secret|key|pass|signature|session|credential", re.IGNORECASE)
