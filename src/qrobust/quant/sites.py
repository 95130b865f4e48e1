"""Where a model's activations are: every activation call on the data path, found by tracing with torch.fx.

``quantize`` swaps activation *modules* for ``QuantAct``; a model of one's own may instead call
``F.relu``/``torch.relu``/``x.relu()`` in ``forward`` or call one ``nn.ReLU`` module at two places. Tracing
``forward`` with torch.fx finds every call: :func:`separate_sites` gives each functional call and each
further use of a shared module an activation module of its own (named ``<owner>.<kind>_fn<k>`` and
``<module>_use<k>``, where ``<owner>`` is the module whose ``forward`` made the call) and gives the model a
``forward`` generated from the rewritten graph, bound to the instance (the model keeps its class; a model
without such calls keeps its own ``forward``). Then every site is one module and ``quantize`` treats all
alike. The rewritten ``forward`` is the root's: a submodule called on its own still runs its class's
``forward``, where a functional call stays float.

What cannot be quantized stays float and is reported (:func:`float_ops`): activations without a quantized
replacement (sigmoid, tanh, ELU, …), subclasses of the supported modules, and — when ``forward`` does not
trace (data-dependent control flow) or traces differently in train and eval mode — every functional or
second use, which then cannot be seen. Modules of torch.nn, qrobust's quantized layers and modules marked
``qrobust_fx_leaf = True`` (``Normalize``) are not traced into; a model whose own childless modules block
the trace is traced again with those as leaves.

>>> import torch.nn as nn, torch.nn.functional as F
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc, self.act = nn.Linear(2, 2), nn.ReLU()
...     def forward(self, x):
...         return F.relu(self.act(self.act(self.fc(x))))
>>> net = Net()
>>> [s.name for s in separate_sites(net)]
['act', 'act_use2', 'relu_fn1']
>>> type(net).__name__, type(net.relu_fn1).__name__
('Net', 'ReLU')
"""

from __future__ import annotations

import copy
import operator
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qrobust.errors import ConfigError
from qrobust.quant.layers import AddOperand, QuantAct, QuantConv2d, QuantLinear
from qrobust.quant.quantizers import Quantizer

__all__ = ["ACT_MODULES", "Site", "float_ops", "separate_sites", "trace"]

#: Activation module types ``quantize`` replaces (exact types), with their QuantAct kind.
ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardswish: "hardswish",
    AddOperand: "identity",
}
_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.gelu: "gelu",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.hardswish: "hardswish",
}
_METHODS = {"relu": "relu", "relu_": "relu"}
# activations without a quantized replacement: reported as float
_FLOAT_MODULES = (
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.PReLU,
    nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.RReLU, nn.GLU, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)  # fmt: skip
_FLOAT_FUNCTIONS = {
    torch.sigmoid, torch.sigmoid_, F.sigmoid, torch.tanh, torch.tanh_, F.tanh, F.elu, F.selu, F.celu, F.mish,
    F.softplus, F.hardtanh, F.hardsigmoid, F.prelu, F.logsigmoid, F.softsign, F.glu, F.rrelu, F.hardshrink,
    F.softshrink, F.threshold, F.tanhshrink,
}  # fmt: skip
_FLOAT_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
_OWN_LEAVES = (QuantConv2d, QuantLinear, QuantAct, Quantizer)
_ADDS = {operator.add, operator.iadd, torch.add}
# ops that keep their input's values (so its integer grid): an operand reached through them from an
# activation site is already quantized
_GRID_MODULES = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)
_GRID_FUNCTIONS = {operator.getitem, F.pad, torch.flatten, F.max_pool2d}
_GRID_METHODS = {"flatten", "contiguous"}


@dataclass
class Site:
    """One activation site: the module name it has (or got), its kind and how ``forward`` reaches it."""

    name: str
    kind: str
    how: str  # "module", "second use of <module>", "F.relu in <owner>.forward"


class _Tracer(fx.Tracer):
    def __init__(self, *, childless_leaves: bool = False) -> None:
        super().__init__()
        self.childless_leaves = childless_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _OWN_LEAVES) or getattr(m, "qrobust_fx_leaf", False):
            return True
        if self.childless_leaves and not any(True for _ in m.children()):
            return True
        return super().is_leaf_module(m, qualname)


def _set_modes(model: nn.Module, modes: list[bool]) -> None:
    for m, mode in zip(model.modules(), modes):
        m.training = mode


def trace(model: nn.Module) -> tuple[fx.Graph | None, str]:
    """``(graph, "")`` of ``model.forward``, or ``(None, why)`` when it does not trace reliably.

    The graph is traced in train and in eval mode; a ``forward`` whose graph differs between them (a branch
    on ``self.training``) is not rewritten, since a traced graph would freeze one branch.
    """
    saved = [m.training for m in model.modules()]
    first_error = ""
    cls = type(model)
    own = model.__dict__.get("forward")
    if isinstance(own, types.MethodType):  # a forward separate_sites bound: torch.fx traces the class's
        model.__class__ = type(cls.__name__, (cls,), {"forward": own.__func__})
    try:
        for childless in (False, True):
            try:
                graphs = []
                for mode in (True, False):
                    model.train(mode)
                    graphs.append(_Tracer(childless_leaves=childless).trace(model))
            except Exception as e:  # noqa: BLE001 - any trace failure means "not traceable", said to the user
                first_error = first_error or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
                return None, "forward traces differently in train and eval mode (it branches on self.training)"
            graph = graphs[0] if saved[0] else graphs[1]
            return graph, ""
        return None, f"torch.fx cannot trace forward ({first_error})"
    finally:
        model.__class__ = cls
        _set_modes(model, saved)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _free_name(parent: nn.Module, base: str, start: int = 1) -> str:
    k = start
    while hasattr(parent, f"{base}{k}"):
        k += 1
    return f"{base}{k}"


def _constant_args(node: fx.Node) -> bool:
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return bool(node.args) and isinstance(node.args[0], fx.Node) and not any(isinstance(a, fx.Node) for a in rest)


def _module_for(kind: str, node: fx.Node) -> nn.Module:
    """The activation module equivalent to the functional call ``node``."""
    kwargs = dict(node.kwargs)
    if kind == "gelu":
        approximate = node.args[1] if len(node.args) > 1 else kwargs.get("approximate", "none")
        return nn.GELU(approximate=approximate)
    names = {"leaky_relu": ("negative_slope", "inplace")}.get(kind, ("inplace",))
    for name, value in zip(names, node.args[1:]):
        kwargs[name] = value
    inplace = bool(kwargs.get("inplace", False)) or (node.op == "call_method" and str(node.target).endswith("_"))
    inplace = inplace or getattr(node.target, "__name__", "").endswith("_")
    if kind == "leaky_relu":
        return nn.LeakyReLU(float(kwargs.get("negative_slope", 0.01)), inplace=inplace)
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}[kind](inplace=inplace)


def _describe_call(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"x.{node.target}()"
    fn = node.target
    module = getattr(fn, "__module__", None) or ""
    prefix = "F." if "functional" in module or module == "torch._C._nn" else "torch."
    return f"{prefix}{getattr(fn, '__name__', str(fn))}"


def _bind_forward(model: nn.Module, graph: fx.Graph) -> None:
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<qrobust: traced forward of {type(model).__name__}>", "exec"), namespace)  # noqa: S102
    model.forward = types.MethodType(namespace["forward"], model)


def separate_sites(model: nn.Module, *, additions: bool = False) -> list[Site]:
    """Give every activation call on ``model``'s data path a module of its own, in place; the sites in order.

    Functional calls and further uses of a shared module get new activation modules and ``model`` gets the
    rewritten ``forward`` (see the module docstring). When ``forward`` does not trace, the sites are the
    activation modules and nothing is rewritten (:func:`float_ops` then says what may have been missed).
    ``additions=True`` (a spec's ``add_bits``) also gives each operand of a tensor addition that does not come
    from an activation site (through max-pooling, slicing, zero padding, flatten) an :class:`AddOperand` of
    its own, ``<owner>.add_in<k>``, which ``quantize`` makes a symmetric quantizer; an untraceable ``forward``
    is then an error, since its additions cannot be found.
    """
    graph, why = trace(model)
    if graph is None:
        if additions:
            raise ConfigError(f"add_bits needs the model's additions, found by tracing forward with torch.fx, "
                              f"which failed: {why}; quantize without add_bits")
        return [Site(n, ACT_MODULES[type(m)], "module") for n, m in model.named_modules() if type(m) in ACT_MODULES]
    sites: list[Site] = []
    uses: dict[str, int] = {}
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            kind = ACT_MODULES.get(type(m))
            if kind is None:
                continue
            uses[node.target] = uses.get(node.target, 0) + 1
            if uses[node.target] == 1:
                sites.append(Site(node.target, kind, "module"))
                continue
            parent_name, _, attr = node.target.rpartition(".")
            parent = model.get_submodule(parent_name)
            new = _free_name(parent, f"{attr}_use", uses[node.target])
            parent.add_module(new, copy.deepcopy(m))
            name = f"{parent_name}.{new}" if parent_name else new
            sites.append(Site(name, kind, f"use {uses[node.target]} of {node.target}"))
            node.target = name
            changed = True
        elif node.op in ("call_function", "call_method"):
            kind = (_FUNCTIONS.get(node.target) if node.op == "call_function" else _METHODS.get(node.target))
            if kind is None or not _constant_args(node):
                continue
            owner = _owner(node)
            parent = model.get_submodule(owner)
            new = _free_name(parent, f"{kind}_fn")
            parent.add_module(new, _module_for(kind, node))
            name = f"{owner}.{new}" if owner else new
            where = f"{owner}.forward" if owner else "forward"
            sites.append(Site(name, kind, f"{_describe_call(node)} in {where}"))
            with graph.inserting_before(node):
                call = graph.call_module(name, (node.args[0],))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            changed = True
    if additions and _separate_additions(model, graph, sites):
        changed = True
    if changed:
        graph.lint()
        _bind_forward(model, graph)
    return sites


def _is_addition(node: fx.Node) -> bool:
    """A tensor + tensor addition (not a constant, not shape arithmetic)."""
    tensor_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not tensor_add or len(node.args) != 2 or node.kwargs:
        return False
    return all(isinstance(a, fx.Node) and not _is_shape(a) for a in node.args)


def _is_shape(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return True
    if node.op == "call_function" and node.target in (operator.getitem, operator.add, operator.mul,
                                                      operator.sub, operator.floordiv):
        return any(isinstance(a, fx.Node) and _is_shape(a) for a in node.args)
    return False


def _on_grid(model: nn.Module, node: Any) -> bool:
    """Whether ``node``'s value comes from an activation site through value-keeping ops only."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            m = model.get_submodule(str(node.target))
            if type(m) in ACT_MODULES or isinstance(m, QuantAct):
                return True
            if type(m) not in _GRID_MODULES:
                return False
        elif not ((node.op == "call_function" and node.target in _GRID_FUNCTIONS)
                  or (node.op == "call_method" and node.target in _GRID_METHODS)):
            return False
        node = node.args[0] if node.args else None
    return False


def _separate_additions(model: nn.Module, graph: fx.Graph, sites: list[Site]) -> bool:
    """An :class:`AddOperand` module on each operand of each addition that is not already on an activation's
    grid (``<owner>.add_in<k>``); True when the graph changed."""
    changed = False
    for node in list(graph.nodes):
        if not _is_addition(node):
            continue
        owner = _owner(node)
        parent = model.get_submodule(owner)
        for i, operand in enumerate(node.args):
            if _on_grid(model, operand):
                continue
            new = _free_name(parent, "add_in")
            parent.add_module(new, AddOperand())
            name = f"{owner}.{new}" if owner else new
            where = f"{owner}.forward" if owner else "forward"
            sites.append(Site(name, "identity", f"operand {i + 1} of {node.name} in {where}"))
            with graph.inserting_before(node):
                call = graph.call_module(name, (operand,))
            call.meta = dict(node.meta)
            node.update_arg(i, call)
            changed = True
    return changed


def float_ops(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, what)`` of every activation on ``model``'s data path that computes in float.

    On a float model that includes the activations ``quantize`` would replace; on a quantized one only what
    it could not (sigmoid, tanh, subclasses …). An untraceable ``forward`` adds one entry that says so.
    Modules are named by their module name, calls by their torch.fx node name.
    """
    return [(name, what) for name, what, _ in _float_ops(model)]


def _float_ops(model: nn.Module) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    graph, why = trace(model)
    if graph is None:
        for name, m in model.named_modules():
            if type(m) in ACT_MODULES or (isinstance(m, _FLOAT_MODULES) and type(m) is not nn.ReLU6):
                out.append((name, f"{type(m).__name__} module", True))
            elif isinstance(m, tuple(ACT_MODULES)):
                out.append((name, f"{type(m).__name__} (a subclass of a supported activation)", True))
        out.append(
            ("(forward)", f"not traced — {why}: functional activations and shared modules cannot be seen", False)
        )
        return out
    for node in graph.nodes:
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if type(m) in ACT_MODULES:
                out.append((node.target, f"{type(m).__name__} module", True))
            elif isinstance(m, _FLOAT_MODULES) and type(m) not in ACT_MODULES:
                out.append((node.target, f"{type(m).__name__} module (no quantized version)", True))
            elif isinstance(m, tuple(ACT_MODULES)):
                out.append((node.target, f"{type(m).__name__} (a subclass of a supported activation)", True))
        elif (node.op == "call_function" and (node.target in _FUNCTIONS or node.target in _FLOAT_FUNCTIONS)) or (
                node.op == "call_method" and (node.target in _METHODS or node.target in _FLOAT_METHODS)):
            where = _owner(node)
            supported = node.target in (_FUNCTIONS if node.op == "call_function" else _METHODS)
            out.append(
                (node.name, f"{_describe_call(node)} in {where + '.' if where else ''}forward"
                 + ("" if supported else " (no quantized version)"), False)
            )  # fmt: skip
    return out
