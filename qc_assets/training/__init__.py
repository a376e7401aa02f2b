"""The student training program. It runs in its own process (under Dagster Pipes, on this machine or in a GPU pod),
so it lives outside `qc_assets/defs/`, which Dagster imports whole when it loads the code location."""
