"""Benchmark suite: our per-user-channel propagation against python-socketio's AsyncRedisManager.

Run it with `python -m bench` (see bench/README.md).
"""
