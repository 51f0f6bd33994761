"""``RouteRule``: one traffic-splitting rule of an appkey, as the registry stores it.

The rule is data the registry reads, checks and writes (``.../route/{id}`` JSON);
how a router applies it to callers and nodes is ``cluster.routing``'s job.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Tuple

from octo_core.registry import schema


@dataclasses.dataclass(frozen=True)
class RouteRule:
    """One traffic-splitting rule (the registry's ``.../route/{id}`` JSON).

    Callers match by IP pattern (``*`` wildcards) or appkey; the rule's
    providers match ``ip:port`` patterns. ``limit``: only those providers;
    otherwise the others stay, down-weighted. ``exclusive``: those providers
    serve the matching callers only.
    """
    id: str
    providers: Tuple[str, ...]
    consumer_ips: Tuple[str, ...] = ()
    consumer_appkeys: Tuple[str, ...] = ()
    priority: int = 0
    enabled: bool = True
    limit: bool = False
    exclusive: bool = False
    name: str = ""

    @classmethod
    def from_dict(cls, data: Mapping) -> "RouteRule":
        """A rule from its registry JSON; ``ValueError`` when a value has the wrong type
        (a string where a list belongs would match single characters, ``"false"``
        would enable the rule): the registry then skips the rule as malformed."""
        data = schema.require_object(data, "route rule")
        if "id" not in data:
            raise ValueError("route rule JSON lacks id")
        rule_id = data["id"]
        if not isinstance(rule_id, str):   # a numeric id is kept, as its text
            rule_id = str(schema.require_int("id", rule_id))

        def strings(key: str) -> Tuple[str, ...]:
            return schema.require_str_list(key, data.get(key, ()))

        def flag(key: str, default: bool) -> bool:
            return schema.require_bool(key, data.get(key, default))

        return cls(id=rule_id, name=schema.require_str("name", data.get("name", "")),
                   providers=strings("providers"), consumer_ips=strings("consumer_ips"),
                   consumer_appkeys=strings("consumer_appkeys"),
                   priority=schema.require_int("priority", data.get("priority", 0)),
                   enabled=flag("enabled", True), limit=flag("limit", False),
                   exclusive=flag("exclusive", False))

    def to_json(self) -> str:
        """The rule as registry JSON (what ``from_dict`` reads back)."""
        return json.dumps(dataclasses.asdict(self))
