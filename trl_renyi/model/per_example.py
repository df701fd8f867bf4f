r"""Per-example gradients of one LoRA adapter, from one forward and one backward of a whole batch, and their sketch.

For a LoRA layer :math:`y = W x + s\,B A x` (:math:`A \in \mathbb{R}^{r\times d_{in}}`, :math:`B \in
\mathbb{R}^{d_{out}\times r}`) and a loss :math:`\sum_i \ell_i` whose terms depend on row i of the batch only, the
gradient of :math:`\ell_i` is a sum over the row's positions t of outer products of the layer's output gradient
:math:`\gamma_{it} = \partial \ell_i / \partial y_{it}` with its input:

.. math::

    \nabla_B \ell_i = s \sum_t \gamma_{it}\, (A x_{it})^\top, \qquad
    \nabla_A \ell_i = s \sum_t (B^\top \gamma_{it})\, x_{it}^\top .

:class:`LoraGradientCapture` records every adapted layer's input :math:`x` and output :math:`y` during the forward
(module hooks on the LoRA layers, so the same code serves PEFT's own forward and the member-batched one with one
member routed) and :meth:`~LoraGradientCapture.per_example` asks autograd for :math:`\gamma` only, so no parameter's
``.grad`` is touched and a training run in progress is not disturbed. The model must be in evaluation mode (LoRA
dropout off) and rows must not interact (padded rows, no packing).

The per-example gradient has P entries (every A and B of the adapter). :class:`GradientSketch` maps it to
:math:`D \ll P` entries with a count sketch (each parameter is hashed to one of D buckets with a random sign), which
preserves inner products in expectation, :math:`\mathbb{E}\,\langle Sg, Sh\rangle = \langle g, h\rangle`, with an
error of order :math:`\lVert g\rVert \lVert h\rVert / \sqrt{D}`; with ``dim=None`` (or ``dim >= P``) the gradients are
kept exactly, in the order of :meth:`GradientSketch.parameter_names`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import LoraLayer


@dataclass
class _LayerRecord:
    name: str
    module: LoraLayer
    inputs: list
    outputs: list


def lora_layers(model, adapter: str) -> list[tuple[str, LoraLayer]]:
    """The LoRA layers of ``model`` that hold ``adapter``, in module order."""
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {})
    ]
    if not layers:
        raise ValueError(f"The model has no LoRA layer holding adapter {adapter!r}.")
    for name, module in layers:
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"Adapter {adapter!r} is a LoRA variant (DoRA) at {name}; per-example gradients serve plain LoRA.")
        if getattr(module, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"Adapter {adapter!r} has a LoRA bias at {name}; per-example gradients serve plain LoRA.")
        if not isinstance(module.lora_A[adapter], torch.nn.Linear):
            raise ValueError(f"Adapter {adapter!r} at {name} is not a linear LoRA layer ({type(module.lora_A[adapter]).__name__}).")
    return layers


def adapter_parameters(model, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the adapter's A and B factors, layer by layer (A before B): the order of the exact
    per-example gradient vector."""
    params = []
    for name, module in lora_layers(model, adapter):
        params.append((f"{name}.lora_A.{adapter}.weight", module.lora_A[adapter].weight))
        params.append((f"{name}.lora_B.{adapter}.weight", module.lora_B[adapter].weight))
    return params


class GradientSketch:
    """A count sketch of the adapter's gradient (``dim`` buckets), or the identity when ``dim`` is ``None`` or at least
    the number of parameters P (exact gradients)."""

    def __init__(self, shapes: Sequence[torch.Size], dim: int | None, seed: int = 0):
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.num_parameters = sum(self.sizes)
        self.exact = dim is None or dim >= self.num_parameters
        self.dim = self.num_parameters if self.exact else int(dim)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._buckets, self._signs = [], []
        if not self.exact:
            generator = torch.Generator().manual_seed(seed)
            for size in self.sizes:
                self._buckets.append(torch.randint(0, self.dim, (size,), generator=generator))
                self._signs.append(torch.randint(0, 2, (size,), generator=generator).float().mul_(2).sub_(1))

    def add(self, out: torch.Tensor, block: int, gradients: torch.Tensor) -> None:
        """Add the per-example gradients ``(N, size)`` of parameter ``block`` into ``out`` ``(N, dim)``."""
        flat = gradients.reshape(gradients.shape[0], -1).to(out.dtype)
        if self.exact:
            start = self.offsets[block]
            out[:, start : start + flat.shape[1]] += flat
            return
        buckets = self._buckets[block].to(out.device)
        signs = self._signs[block].to(device=out.device, dtype=out.dtype)
        out.index_add_(1, buckets, flat * signs)


class LoraGradientCapture:
    """Per-example gradients of ``adapter`` (see the module docstring): use as a context manager around the forward,
    then call :meth:`per_example` once per scalar whose per-example gradients are wanted.

    During the forward every adapted layer's input is kept (autograd keeps it anyway) and a hook is put on its output;
    during :meth:`per_example`'s backward each hook turns the output gradient into that layer's per-example gradients
    at once and adds their sketch to the result, so no more than one layer's output gradient is held at a time."""

    def __init__(self, model, adapter: str, sketch_dim: int | None = None, seed: int = 0):
        self.adapter = adapter
        self.layers = [_LayerRecord(name, module, [], []) for name, module in lora_layers(model, adapter)]
        shapes = []
        for record in self.layers:
            shapes += [record.module.lora_A[adapter].weight.shape, record.module.lora_B[adapter].weight.shape]
        self.sketch = GradientSketch(shapes, sketch_dim, seed)
        self._handles = []
        self._out: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.sketch.dim

    @property
    def num_parameters(self) -> int:
        return self.sketch.num_parameters

    def _forward_hook(self, index: int):
        record = self.layers[index]

        def hook(module, args, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                x = args[0].detach()
                record.inputs.append(x)
                record.outputs.append(output)
                output.register_hook(lambda gamma: self._consume(index, x, gamma))

        return hook

    def _consume(self, index: int, x: torch.Tensor, gamma: torch.Tensor) -> None:
        out = self._out
        if out is None:  # a backward that is not ours (nothing to record)
            return
        record, adapter = self.layers[index], self.adapter
        module = record.module
        weight_a, weight_b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
        scaling = float(module.scaling[adapter])
        rows = out.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1]).to(out.dtype)
        g3 = gamma.reshape(rows, -1, gamma.shape[-1]).to(out.dtype)
        low_rank = x3 @ weight_a.to(out.dtype).T  # (N, T, r)
        grad_b = torch.einsum("nto,ntr->nor", g3, low_rank).mul_(scaling)
        back = g3 @ weight_b.to(out.dtype)  # (N, T, r)
        grad_a = torch.einsum("ntr,nti->nri", back, x3).mul_(scaling)
        self.sketch.add(out, 2 * index, grad_a)
        self.sketch.add(out, 2 * index + 1, grad_b)

    def __enter__(self):
        self.clear()
        for index, record in enumerate(self.layers):
            self._handles.append(record.module.register_forward_hook(self._forward_hook(index)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        for record in self.layers:
            record.inputs.clear()
            record.outputs.clear()

    def per_example(self, objective: torch.Tensor, num_rows: int, retain_graph: bool = True) -> torch.Tensor:
        r"""``(num_rows, dim)``: the sketched gradient of each row's share of the scalar ``objective``
        (:math:`\sum_i \ell_i`, row i of the batch contributing :math:`\ell_i`) with respect to the adapter."""
        outputs = [y for record in self.layers for y in record.outputs]
        if not outputs:
            raise RuntimeError(
                "No LoRA layer output was recorded: run the forward inside the capture, with gradients enabled and the "
                "adapter's weights requiring gradients."
            )
        first = self.layers[0].inputs[0] if self.layers[0].inputs else outputs[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self._out = torch.zeros(num_rows, self.dim, device=first.device, dtype=dtype)
        parameters = [
            weight
            for record in self.layers
            for weight in (record.module.lora_A[self.adapter].weight, record.module.lora_B[self.adapter].weight)
        ]
        try:
            # the hooks on the layers' outputs fill self._out as the backward passes them; asking for the (summed)
            # gradients of the adapter's own weights makes the backward reach every adapted layer, holds only P numbers
            # at the end and writes no parameter's .grad
            torch.autograd.grad(objective, parameters, retain_graph=retain_graph, allow_unused=True)
            return self._out
        finally:
            self._out = None


@contextmanager
def adapter_requires_grad(model, adapter: str):
    """The adapter's A and B require gradients inside the block (so its layers' outputs are in the graph); every flag
    is restored on exit."""
    params = [p for _, p in adapter_parameters(model, adapter)]
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)
