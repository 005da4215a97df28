"""A graph's compute precision: fp32, or fp16 the way diffusers runs a pipeline in half precision.

fp16 is `module.half()` (what `pipe.to(torch.float16)` does), not an ONNX-level float16 converter:
the graph is traced from the half-precision torch module, so every place where diffusers or
transformers compute in float32 on purpose (timestep embeddings, `upcast_softmax`, ...) stays float32
in the graph too. The graph's float inputs are cast to fp16 inside the graph and its outputs back to
float32, so its IO stays float32 (int64 for token ids) and the runtime feeds an fp16 graph the same
tensors as an fp32 one.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .errors import ExportError

PRECISIONS = ("fp32", "fp16")


def check_precision(precision: str, what: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"{what} {precision!r}: expected one of {', '.join(PRECISIONS)}")


class HalfGraph(torch.nn.Module):
    """Runs `graph` (whose weights are fp16, see `half_weights`) on fp16 inputs, float32 outside.

    Floating inputs at the positions in `keep_float32` are passed on as they are: the wrapped module
    takes them in float32 in diffusers' fp16 pipelines too (the UNet's `timestep`).
    """

    def __init__(self, graph: torch.nn.Module, keep_float32: Sequence[int] = ()):
        super().__init__()
        self.graph = graph
        self.keep_float32 = frozenset(keep_float32)

    def forward(self, *args):
        args = tuple(a.half() if a.is_floating_point() and i not in self.keep_float32 else a for i, a in enumerate(args))
        out = self.graph(*args)
        if isinstance(out, (tuple, list)):
            return tuple(o.float() for o in out)
        return out.float()


@contextmanager
def half_weights(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` with fp16 floating parameters and buffers (as `module.half()`) inside the block.

    Afterwards the original float32 tensors are put back, not the fp16 ones upcast: `.half().float()`
    would round the weights, and the same components are exported again (other precision, fixtures).
    """
    # parameters() and buffers() list a tied tensor once; swapping `.data` keeps every reference valid.
    tensors = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()]
    originals = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.half()
        yield module
    finally:
        for t, data in zip(tensors, originals):
            t.data = data
