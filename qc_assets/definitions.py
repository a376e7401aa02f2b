"""The qc_assets code location: the whole asset graph, built from the QC_* settings."""

from __future__ import annotations

import dagster as dg

from qc_assets.defs.corpus.assets import CorpusResource, build_corpus_asset
from qc_assets.lake.resource import LakeResource
from qc_assets.settings import Settings, load_settings


def build_definitions(settings: Settings) -> dg.Definitions:
    corpus_source = CorpusResource.from_settings(settings)
    shards = corpus_source.open().shards()
    return dg.Definitions(
        assets=[build_corpus_asset(shards)],
        resources={
            "lake": LakeResource(catalog=settings.catalog, data_path=settings.data_path),
            "corpus_source": corpus_source,
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_settings())

