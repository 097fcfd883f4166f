"""Each parameter's parallel role, declared once by the module that owns it and read by name.

Checkpoints (which dimension to reassemble), the gradient norm (which squares to sum over TP), the
data-parallel engines (which gradients to sum over TP under sequence parallelism) and DeepSpeed all
ask `param_roles(model)`. The roles live in the modules, not on the tensors, so wrappers that
re-create parameters keep them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParamRole:
    tp_dim: int | None = None  # the dimension split over the TP ranks; None: every TP rank holds it whole
    sequence_parallel: bool = False  # whole, but applied to sequence-split activations: its gradient is summed over TP


REPLICATED = ParamRole()


def declare_roles(module: nn.Module, **roles: ParamRole) -> None:
    """Record the roles of `module`'s own parameters, by attribute name; undeclared ones are REPLICATED."""
    module.__dict__.setdefault("declared_roles", {}).update(roles)


def param_roles(model: nn.Module) -> dict[str, ParamRole]:
    """Every parameter of `model`, by its name in model.named_parameters(), with the role its module declared."""
    declared = {}
    for prefix, module in model.named_modules():
        for name, role in module.__dict__.get("declared_roles", {}).items():
            declared[f"{prefix}.{name}" if prefix else name] = role
    return {name: declared.get(name, REPLICATED) for name, _ in model.named_parameters()}


def roles_of(model: nn.Module, params: list[nn.Parameter]) -> list[ParamRole]:
    """The roles of `params`, parameters of `model`, in their order."""
    roles = param_roles(model)
    by_id = {id(p): roles[name] for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]
