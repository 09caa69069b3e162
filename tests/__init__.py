"""fila's test suite: a package, so tests and benchmarks import the shared builders as ``tests.helpers``."""
