"""Asserting a call's gRPC error: the status code and the field the message names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest


def expect_invalid_argument(call: Callable[[], Any], field: str) -> str:
    """`call()` fails with INVALID_ARGUMENT and a message that starts with `field` ("field: why")."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"{field}:"), info.value.details()
    return info.value.details()
