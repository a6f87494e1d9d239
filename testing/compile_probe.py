"""A torch.compile backend that records what it compiled and every time compiled code runs (tests only).

ComfyUI's TorchCompileModel node hands its backend name to `torch.compile`, which looks the name up in
torch._dynamo's backend registry. `probe()` registers `BACKEND` there once, so the node's own `execute` (the
same `set_torch_compile_wrapper` that the "inductor" choice goes through) compiles with it:

- for every graph Dynamo captures, the probe keeps the names of the operations in it and returns a runner that
  executes the captured FX graph eagerly (no kernel rewriting), so the output is exactly the uncompiled one;
- every run of a captured graph is logged, and `count_unet_calls` attributes those runs to the UNet calls that
  made them (a model_function_wrapper, which sits outside the compiled region).

What that proves: a UNet call that ran one or more captured graphs went through Dynamo's compiled code. With
`fullgraph` off, Dynamo runs what it cannot capture eagerly; a call whose whole UNet is captured runs exactly
one graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

BACKEND = "ip2p_compile_probe"


@dataclass
class CapturedGraph:
    """One graph Dynamo handed to the backend: the operations it holds and how often it ran."""

    index: int
    operations: frozenset[str]
    runs: int = 0


def operation_names(gm: torch.fx.GraphModule) -> frozenset[str]:
    """Names of the functions, methods and modules a captured graph calls (e.g. scaled_dot_product_attention)."""
    names = set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            target = node.target
            names.add(target if isinstance(target, str) else getattr(target, "__name__", str(target)))
    return frozenset(names)


@dataclass
class CompileProbe:
    graphs: list[CapturedGraph] = field(default_factory=list)
    run_log: list[int] = field(default_factory=list)  # graph index of every run, in order

    def compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:  # Dynamo backend signature
        graph = CapturedGraph(len(self.graphs), operation_names(gm))
        self.graphs.append(graph)

        def run(*args: Any) -> Any:
            graph.runs += 1
            self.run_log.append(graph.index)
            return gm.forward(*args)

        return run

    def count_unet_calls(self, model) -> tuple[Any, list[list[int]]]:
        """A clone of `model` logging, for each UNet call, the indices of the captured graphs that ran in it."""
        calls: list[list[int]] = []

        # A closure, not a bound method: ModelPatcher.clone() deep-copies model_options, and a deep copy of a
        # bound method would copy this probe with it, so the node's own clones would log elsewhere.
        def wrapper(apply_model: Callable, params: dict) -> torch.Tensor:
            start = len(self.run_log)
            out = apply_model(params["input"], params["timestep"], **params["c"])
            calls.append(self.run_log[start:])
            return out

        counted = model.clone()
        counted.set_model_unet_function_wrapper(wrapper)
        return counted, calls

    def operations_run(self, calls: list[list[int]]) -> set[str]:
        """Every operation name in the graphs that ran during `calls`."""
        return {name for call in calls for index in call for name in self.graphs[index].operations}


_PROBE: list[CompileProbe] = []


def probe() -> CompileProbe:
    """The process's probe, registered with torch._dynamo under BACKEND on first use (names cannot be
    registered twice)."""
    if not _PROBE:
        instance = CompileProbe()
        torch._dynamo.register_backend(instance.compile, name=BACKEND)
        _PROBE.append(instance)
    return _PROBE[0]
