"""Linear layers on the CPU, routed to whichever BLAS multiplies their shapes faster on this machine.

PyTorch's CPU wheels multiply matrices with MKL; numpy's wheels carry OpenBLAS. Which is faster
depends on the CPU and on the number of rows. A decode step multiplies every weight matrix by one
row per running sequence, a shape where the two differ most: on the AMD EPYC (AVX2) development
VM, 16 rows through GPT-2-small's 48 weight matrices took ~70 ms in MKL and ~55 ms in OpenBLAS
(one thread each), while at one row they were even and at hundreds of rows MKL caught up.

So nothing is assumed: `measure` times both libraries on the model's own weights, for row counts
1 to 256, when the instance warms up (in its worker thread), and `RoutedLinear` then sends each
product to the faster one by its row count; beyond 256 rows, where MKL's large-matrix kernels are
at home, products stay with torch. Results differ from torch's only by floating-point rounding (the same float32
products summed in another order). Only float32 CPU models are routed; others keep torch's path.
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("pipeserve.backends.cpu_matmul")

# Row counts timed: a product goes the way of the smallest bucket that holds its rows; one with more
# rows than the last bucket stays with torch.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Weights the tuning pass multiplies per row count: more than a server CPU's last-level cache, so
# that weights come from memory as they do in a real forward.
TUNING_BYTES = 96 << 20
# numpy must be this much faster to be chosen: a near tie (noise on a shared machine) stays with torch.
MARGIN = 0.90
MODES = ("auto", "torch", "numpy")


@dataclass(frozen=True)
class MatmulRoute:
    """For products of up to `ROW_BUCKETS[i]` rows, `use_numpy[i]` says which library runs them."""

    use_numpy: tuple[bool, ...]

    @classmethod
    def always(cls, use_numpy: bool) -> MatmulRoute:
        return cls((use_numpy,) * len(ROW_BUCKETS))

    def numpy_for(self, rows: int) -> bool:
        bucket = bisect.bisect_left(ROW_BUCKETS, rows)
        return bucket < len(ROW_BUCKETS) and self.use_numpy[bucket]

    def describe(self) -> str:
        return ", ".join(f"{rows}:{'numpy' if n else 'torch'}" for rows, n in zip(ROW_BUCKETS, self.use_numpy))


class RoutedLinear(torch.nn.Module):
    """y = x W^T + b for an `nn.Linear` or transformers' `Conv1D`, through torch or numpy's BLAS.

    Keeps the layer's parameters (shared, never copied); numpy multiplies a view of the same memory.
    """

    def __init__(self, layer: torch.nn.Module, route: MatmulRoute):
        super().__init__()
        weight = layer.weight
        if type(layer).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is [in, out]
            self._weight_in_out = weight.detach()
        else:  # nn.Linear: weight is [out, in]; its transpose is an [in, out] view
            self._weight_in_out = weight.detach().t()
        self.weight = weight
        self.bias = layer.bias
        self.in_features, self.out_features = self._weight_in_out.shape
        # numpy's view of the weight: no copy; numpy hands BLAS the transpose flag when needed.
        self._weight_np = self._weight_in_out.numpy()
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.dtype != torch.float32 or x.device.type != "cpu" or not self.route.numpy_for(rows):
            return self._torch(x)
        flat = x.reshape(rows, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty((rows, self.out_features), dtype=torch.float32)
        # numpy releases the GIL inside BLAS, as torch does.
        np.matmul(flat.numpy(), self._weight_np, out=out.numpy())
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.bias is None:
            out = flat @ self._weight_in_out
        else:
            out = torch.addmm(self.bias, flat, self._weight_in_out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, route=[{self.route.describe()}]"


def _routable(module: torch.nn.Module) -> bool:
    if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.float32 \
        and weight.device.type == "cpu"


def linear_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, layer) for every float32 CPU linear layer, in the model's order."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if _routable(child):
                found.append((parent, name, child))
    return found


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.inference_mode()
def measure(layers: Sequence[torch.nn.Module], rounds: int = 3) -> MatmulRoute:
    """Times torch against numpy on `layers` for each of ROW_BUCKETS (in this thread, with its torch
    and BLAS thread counts): `rounds` runs of each, interleaved, compared by their medians, so that
    a moment of noise on a shared machine does not decide."""
    sample: list[torch.nn.Module] = []
    total = 0
    for layer in layers:  # enough weight bytes to stream from memory, not from cache
        sample.append(layer)
        total += layer.weight.numel() * 4
        if total >= TUNING_BYTES:
            break
    numpy_layers = [RoutedLinear(layer, MatmulRoute.always(True)) for layer in sample]
    verdicts = []
    for rows in ROW_BUCKETS:
        inputs = [torch.randn(rows, layer.in_features) for layer in numpy_layers]

        def run(layers: Sequence[torch.nn.Module]) -> None:
            for layer, x in zip(layers, inputs):
                layer(x)

        # torch: the layers as they are, so that numpy must win by more than its wrapper costs.
        run(sample), run(numpy_layers)  # warm both (allocations, BLAS thread pools)
        times: dict[str, list[float]] = {"torch": [], "numpy": []}
        for _ in range(rounds):
            times["torch"].append(_time(lambda: run(sample)))
            times["numpy"].append(_time(lambda: run(numpy_layers)))
        with_torch, with_numpy = statistics.median(times["torch"]), statistics.median(times["numpy"])
        verdicts.append(with_numpy < MARGIN * with_torch)
        log.debug("%d rows: torch %.1f ms, numpy %.1f ms", rows, with_torch * 1e3, with_numpy * 1e3)
    return MatmulRoute(tuple(verdicts))


def set_numpy_blas_threads(threads: int) -> None:
    """numpy's BLAS keeps one thread count for the whole process, and not every OpenBLAS takes a
    new count safely while another thread is inside a product: so it changes only when it must
    (models that ask for different counts share the last one set). MKL is left alone: where numpy
    uses it, torch does too, and sets its own count."""
    from threadpoolctl import ThreadpoolController

    libraries = [lib for lib in ThreadpoolController().select(user_api="blas").lib_controllers
                 if lib.internal_api != "mkl" and lib.num_threads != threads]
    for library in libraries:
        library.set_num_threads(threads)


def route_linear_layers(model: torch.nn.Module, mode: str, numpy_threads: int | None = None) -> MatmulRoute | None:
    """Replaces the model's float32 CPU linear layers by RoutedLinear layers; returns the route, or
    None where there is nothing to route (mode "torch", no such layers). Call it in the thread that
    will run the model: "auto" times torch with that thread's intra-op threads against numpy's BLAS
    with `numpy_threads` (default: the same count)."""
    if mode not in MODES:
        raise ValueError(f"backend_parameters.cpu_matmul must be one of {', '.join(MODES)}, got {mode!r}")
    layers = linear_layers(model)
    if mode == "torch" or not layers:
        return None
    set_numpy_blas_threads(numpy_threads or torch.get_num_threads())
    route = MatmulRoute.always(True) if mode == "numpy" else measure([layer for _, _, layer in layers])
    if not any(route.use_numpy):
        log.info("cpu_matmul: torch's BLAS is as fast here at every row count; layers left as they are")
        return route
    for parent, name, layer in layers:
        setattr(parent, name, RoutedLinear(layer, route))
    log.info("cpu_matmul: %d linear layers routed by rows [%s]", len(layers), route.describe())
    return route
