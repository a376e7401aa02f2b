"""What every stage's definitions are built from: the settings, the corpus's shards and the deployment.

`qc_assets.definitions.build_definitions` sets it while Dagster autoloads `qc_assets/defs/`; each stage's
`definitions.py` reads it with `current_graph()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property

import dagster as dg

from qc_assets.defs.corpus.sources import Shard
from qc_assets.execution import Environment
from qc_assets.partitions import evaluation_partitions, shard_partitions
from qc_assets.settings import Settings


@dataclass(frozen=True)
class GraphSpec:
    settings: Settings
    shards: tuple[Shard, ...]
    environment: Environment = "local"

    @cached_property
    def by_shard(self) -> dg.StaticPartitionsDefinition:
        return shard_partitions([shard.key for shard in self.shards])

    @cached_property
    def by_checkpoint_and_shard(self) -> dg.MultiPartitionsDefinition:
        return evaluation_partitions(self.by_shard)


_CURRENT: ContextVar[GraphSpec] = ContextVar("qc_assets_graph_spec")


def current_graph() -> GraphSpec:
    try:
        return _CURRENT.get()
    except LookupError:
        raise RuntimeError(
            "qc_assets/defs/ is loaded through qc_assets.definitions.build_definitions, which sets the settings and "
            "shards the graph is built from"
        ) from None


@contextmanager
def building(spec: GraphSpec) -> Iterator[GraphSpec]:
    token = _CURRENT.set(spec)
    try:
        yield spec
    finally:
        _CURRENT.reset(token)
