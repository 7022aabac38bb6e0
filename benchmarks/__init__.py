"""rawdiff-bench: latency and throughput measurements (installed as rawdiff_bench)."""
