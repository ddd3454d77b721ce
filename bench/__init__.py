"""distrib's benchmarks, run as modules from the repository root: `python -m bench.mfu`,
`python -m bench.throughput`, `python -m bench.loader`, `python -m bench.memory`,
`python -m bench.checkpoint` (bench/README.md)."""
