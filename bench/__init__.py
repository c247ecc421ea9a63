"""Benchmarks (`make bench`): each module with a `main()` measures one capability against its baseline.

OpenMP workers that spin while they wait turn every preemption into a stall when their cores are
shared (with the server's event loop, with the benchmark's clients, with other processes); the
server therefore waits passively (see server/cli.py), and so do the in-process baselines here,
so that both sides run under the same policy. Set OMP_WAIT_POLICY yourself to compare.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
