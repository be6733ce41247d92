"""solar_average and solar_slerp: the SOLAR paper's candidate merges as mergekit kernels.

Importing this module registers them with mergekit (once: `register` raises on duplicates).
solar_merge/__init__.py imports it right after mergekit's own registry is imported.
"""

from typing import Annotated

import torch
from mergekit.merge_methods import (
    BasePolicy,
    BatchParameter,
    InputContract,
    OptionalTensorPolicy,
    PerInput,
    TensorBatch,
    TensorGroup,
    merge_method,
    register,
    registered_methods,
)
from mergekit.merge_methods.slerp import slerp as _slerp_rows


@merge_method(
    name="solar_average",
    pretty_name="SOLAR weighted average",
    reference_url="https://arxiv.org/abs/2312.15166",
)
def solar_average(
    group: TensorGroup,
    weight: PerInput[float],
    normalize: bool = True,
) -> torch.Tensor:
    # A group kernel (not a batch kernel) so that errors can name the tensor.
    name = group.metadata.name or "<tensor>"
    first = group.tensors[0]
    if not first.is_floating_point():
        raise TypeError(f"solar_average: {name} is not floating point ({first.dtype})")
    weights = weight.values_for(group.entries)
    total = sum(weights)
    if normalize and abs(total) < 1e-12:
        raise ValueError(
            f"solar_average: the weights for {name} sum to 0 ({weights}), so they cannot be "
            "normalized. Fix: give the models weights that sum to a non-zero value, or set "
            "`normalize: false`."
        )
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    result = torch.zeros_like(first, dtype=accumulate)
    for tensor, w in zip(group.tensors, weights):
        result.add_(tensor, alpha=w)
    if normalize:
        result.div_(total)
    return result.to(first.dtype)


@merge_method(
    name="solar_slerp",
    pretty_name="SOLAR SLERP",
    reference_url="https://arxiv.org/abs/2312.15166",
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_SINGLETON,
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=2, max_inputs=2),
)
def solar_slerp(
    batch: TensorBatch,
    t: Annotated[torch.Tensor, BatchParameter(float)],
) -> torch.Tensor:
    # t=0 is the base model when one is given, else the first listed model.
    if not batch.tensors[0].is_floating_point():
        raise TypeError("solar_slerp requires floating-point tensors")
    start = batch.base_index or 0
    # mergekit's row-wise SLERP already falls back to lerp for (anti)parallel rows and
    # treats zero-norm rows without NaN; reusing it keeps us numerically identical.
    return _slerp_rows(t, batch.tensors[start], batch.tensors[1 - start])


METHODS = (solar_average, solar_slerp)


def register_all() -> None:
    """Register our methods with mergekit; safe to call any number of times."""
    known = {m.spec.name for m in registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            register(method)


register_all()
