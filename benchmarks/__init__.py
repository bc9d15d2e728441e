"""Latency benchmarks per route and per stage; results are data (JSON), tables render them."""
