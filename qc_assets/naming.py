"""Names made safe for file names and partition keys: the one slug function.

Every slug keeps only `A-Z a-z 0-9 . _ -` (safe in a path component on every filesystem, in a Dagster partition key
and in a shell word); what differs between callers is policy, and the policy is part of identifiers already stored
(shard keys in lake rows and Dagster partitions, checkpoint directories and ids, journal directories), so each caller
pins its own arguments and must keep them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
READABLE_WITH_DIGEST = 60  # readable characters kept before a digest suffix


def slug(
    name: str,
    *,
    fill: str = "_",
    trim: str = "._",
    separator: str | None = None,
    fallback: str = "x",
    digest: Literal["always", "if_changed", "never"] = "always",
) -> str:
    """`name` as a file and partition-safe string.

    separator  replaces each `/` first (`Qwen/Qwen3` -> `Qwen--Qwen3`); None treats `/` as any other unsafe character
    fill       replaces each run of unsafe characters; then `trim` characters are stripped from both ends
    digest     appends `-<8 hex of sha256(name)>` so distinct names stay distinct: "always" (names never shown),
               "if_changed" (only when the slug differs from `name` after `separator`), or "never" (readable keys whose
               collisions the caller reports); with a digest the readable part is cut to 60 characters
    fallback   stands in for an empty readable part
    """
    mapped = name.replace("/", separator) if separator is not None else name
    readable = _UNSAFE.sub(fill, mapped).strip(trim)
    if digest == "never" or (digest == "if_changed" and readable and readable == mapped):
        return readable or fallback
    return f"{readable[:READABLE_WITH_DIGEST] or fallback}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
