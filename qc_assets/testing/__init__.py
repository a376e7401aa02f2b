"""What the tests and the benchmarks share, and the pipeline never imports: stand-ins for what cannot run here (an
OpenAI-compatible teacher on 127.0.0.1), the real services the suite starts itself (PostgreSQL, an S3 server,
`qc ui`), and the end-to-end scenarios (kills in every stage, the UI session) that tests run once and benchmarks
run at length."""
