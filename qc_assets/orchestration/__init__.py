"""How the graph is launched: the persistent instance, the Dagster processes `qc run` and `qc ui` start, and the
backfill `qc run` asks them for."""
