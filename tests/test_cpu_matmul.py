"""CPU linear layers routed to numpy's BLAS (backends/cpu_matmul.py): the same products, shared
weights, the route a config asks for, and a clear error for a bad one."""

from __future__ import annotations

import pytest
import torch
from pipeserve.backends.cpu_matmul import (
    ROW_BUCKETS,
    MatmulRoute,
    RoutedLinear,
    linear_layers,
    measure,
    route_linear_layers,
    set_numpy_blas_threads,
)
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

NUMPY = MatmulRoute.always(True)


def _layers() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # transformers' GPT-2 layer: weight [in, out]
    torch.nn.init.normal_(conv.weight, std=0.1)
    torch.nn.init.normal_(conv.bias, std=0.1)
    return [torch.nn.Linear(32, 48), torch.nn.Linear(32, 48, bias=False), conv]


@pytest.mark.parametrize("shape", [(1, 32), (3, 32), (16, 32), (300, 32), (2, 5, 32)])
def test_a_routed_layer_computes_what_the_layer_computes(shape):
    x = torch.randn(shape)
    for layer in _layers():
        with torch.inference_mode():
            want = layer(x)
            got = RoutedLinear(layer, NUMPY)(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_routed_layer_shares_the_weights_instead_of_copying_them():
    linear = torch.nn.Linear(32, 48)
    routed = RoutedLinear(linear, NUMPY)
    assert routed.weight is linear.weight
    with torch.no_grad():
        linear.weight.mul_(2)  # numpy multiplies a view of the same memory
    x = torch.randn(4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(routed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_products_go_by_rows_to_the_smallest_bucket_that_holds_them_and_beyond_the_last_to_torch():
    only_16 = MatmulRoute(tuple(rows == 16 for rows in ROW_BUCKETS))
    assert [only_16.numpy_for(rows) for rows in (1, 8, 9, 16, 17)] == [False, False, True, True, False]
    assert NUMPY.numpy_for(ROW_BUCKETS[-1]) and not NUMPY.numpy_for(ROW_BUCKETS[-1] + 1)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def test_routing_a_model_replaces_its_linear_layers_and_keeps_its_outputs():
    model = _tiny_gpt2()
    ids = torch.randint(0, 97, (3, 11))
    with torch.inference_mode():
        want = model(ids).logits
    count = len(linear_layers(model))
    assert count == 2 * 4 + 1  # per block: attention in/out, MLP in/out; and the LM head
    route = route_linear_layers(model, "numpy", numpy_threads=1)
    assert route == NUMPY
    assert sum(isinstance(m, RoutedLinear) for m in model.modules()) == count
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_torch_leaves_the_model_as_it_is_and_a_bad_mode_says_what_is_allowed():
    model = _tiny_gpt2()
    assert route_linear_layers(model, "torch") is None
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())
    with pytest.raises(ValueError, match="cpu_matmul must be one of auto, torch, numpy"):
        route_linear_layers(model, "mkl")


def test_measuring_gives_a_verdict_for_every_row_bucket():
    route = measure([layer for _, _, layer in linear_layers(_tiny_gpt2())], rounds=1)
    assert len(route.use_numpy) == len(ROW_BUCKETS)
    assert all(isinstance(v, bool) for v in route.use_numpy)


def test_numpys_blas_takes_the_thread_count_asked_for():
    from threadpoolctl import ThreadpoolController

    def counts() -> set[int]:
        return {lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers
                if lib.internal_api != "mkl"}

    before = counts()
    assert before, "numpy's BLAS is not loaded"
    try:
        for threads in (1, 2, 1):
            set_numpy_blas_threads(threads)
            assert counts() == {threads}
    finally:
        set_numpy_blas_threads(max(before))
