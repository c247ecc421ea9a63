"""Benchmarks (`make bench`): each module with a `main()` measures one capability against its baseline."""
