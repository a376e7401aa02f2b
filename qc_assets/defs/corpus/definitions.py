import dagster as dg

from qc_assets.defs.corpus.assets import CorpusResource, build_corpus_asset
from qc_assets.graph import current_graph


@dg.definitions
def corpus() -> dg.Definitions:
    graph = current_graph()
    return dg.Definitions(
        assets=[build_corpus_asset(list(graph.shards), graph.by_shard)],
        resources={"corpus_source": CorpusResource.from_settings(graph.settings)},
    )
