"""The heap settling of server/heap.py: what the loaded models hold is frozen out of full
collections, and a model unloaded later is freed all the same."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from pipeserve.server import heap

from tests.conftest import server_settings
from tests.generation_helpers import wait_until
from tests.model_folders import add_model
from tests.server_harness import ServerThread


def test_a_served_model_is_frozen_and_once_unloaded_it_is_freed(tmp_path: Path) -> None:
    add_model(tmp_path, "kept")
    add_model(tmp_path, "dropped")
    server = ServerThread(server_settings(tmp_path)).start()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # torch's, transformers' and the models' objects
        dropped = server.call(lambda: server.server.registry.get("dropped"))
        model = weakref.ref(dropped.pool.instances[0].backend_instance.model)
        del dropped
        server.run(server.server.registry.unload("dropped"))
        # The settle after the unload unfreezes, collects (the model's cycles) and freezes again.
        wait_until(lambda: model() is None, 10.0, "the unloaded model freed")
        assert gc.get_freeze_count() > 0
    finally:
        server.stop()
    assert gc.get_freeze_count() == 0  # a stopped server leaves the heap as it found it


def test_settle_collects_garbage_in_cycles_before_it_freezes() -> None:
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    garbage = weakref.ref(a)
    del a, b
    heap.settle()
    try:
        assert garbage() is None
    finally:
        gc.unfreeze()
