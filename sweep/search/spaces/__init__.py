"""Search spaces: each turns Optuna parameters into a LayerPlan that honours every constraint.

| kind | parameters |
| --- | --- |
| uniform | first_size, jump, middle_size, n_middle |
| growing | start_size, growth, jump |
| free | n_slices, size_i, jump_i (define-by-run) |
| repeat_block | block_start, block_size |
| interleave | slice_size, overlap, first_source, last_source |

Over several source models (``model.sources``) each space also draws ``source_i`` per slice, except
``interleave``, which alternates them itself. With ``space.scale.qk`` / ``space.scale.out`` set, a plan
that repeats a layer also draws ``scale_qk`` / ``scale_out`` (attenuated repeats, ``scales.py``).
"""

from __future__ import annotations

import dataclasses

import optuna

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan
from merge_core.model_shape import ModelShape
from sweep.search.spaces.base import SearchSpace
from sweep.search.spaces.free import FreeSpace, FreeSpaceConfig
from sweep.search.spaces.growing import GrowingSpace, GrowingSpaceConfig
from sweep.search.spaces.interleave import InterleaveSpace, InterleaveSpaceConfig
from sweep.search.spaces.repeat_block import RepeatBlockSpace, RepeatBlockSpaceConfig
from sweep.search.spaces.scales import ScaleSpaceConfig, with_scales
from sweep.search.spaces.sources import SourcedSpace
from sweep.search.spaces.uniform import UniformSpace, UniformSpaceConfig

SPACES = {
    "uniform": (UniformSpace, UniformSpaceConfig),
    "growing": (GrowingSpace, GrowingSpaceConfig),
    "free": (FreeSpace, FreeSpaceConfig),
    "repeat_block": (RepeatBlockSpace, RepeatBlockSpaceConfig),
    "interleave": (InterleaveSpace, InterleaveSpaceConfig),
}

__all__ = ["SPACES", "ScaleSpaceConfig", "SearchSpace", "build_space", "sample_plans",
           *(cls.__name__ for pair in SPACES.values() for cls in pair)]  # fmt: skip


def build_space(kind: str, shape: ModelShape, config, sources: tuple[str, ...] = (),
                scale: ScaleSpaceConfig | None = None) -> SearchSpace:  # fmt: skip
    """The space ``kind``; over several source models (``sources``), each slice also picks its model;
    with ``scale``, a plan that repeats a layer also draws its factors."""
    if kind not in SPACES:
        raise SelfMergeError(f"unknown space {kind!r}; choose one of {sorted(SPACES)}")
    space_cls, _ = SPACES[kind]
    if getattr(space_cls, "picks_sources", False):
        space = space_cls(shape, config, sources)
    elif sources:  # the layers drawn as if from one model, up to max_repeats of each source's layer
        space = SourcedSpace(space_cls(shape, _per_source(config, len(sources))), sources, config.constraints)
    else:
        space = space_cls(shape, config)
    space = with_scales(space, scale)
    space.check_not_empty()
    return space


def _per_source(config, n_sources: int):
    """``config`` with max_repeats read per source: a base layer index may then appear max_repeats
    times from each source; SourcedSpace checks the plan once each slice has its model."""
    limit = config.constraints.max_repeats
    return dataclasses.replace(
        config, constraints=dataclasses.replace(config.constraints, max_repeats=limit and limit * n_sources)
    )


def sample_plans(space: SearchSpace, n: int, seed: int = 0) -> list[LayerPlan]:
    """``n`` plans drawn by Optuna's RandomSampler through the same ``suggest`` path as a sweep."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return plans
