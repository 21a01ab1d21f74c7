"""Plan and run a merge (mergekit config) or a WARP merge, streaming tensor by tensor.

`plan_merge` resolves every model, reads only the safetensors headers and config.json
files, and works out for each output tensor which input tensors it combines and with which
parameters; every user error (missing model, different architectures, shapes or
vocabularies, a gradient that does not fit the layers, weights summing to zero under
normalize, a missing weight) is raised there, before any weight is read.

`execute_plan` then reads one tensor of each model at a time, merges it in float32 and
appends it to the output shard, so peak memory is a few tensors rather than all models.
The output is written into a temporary folder beside the target and renamed into place
only when complete.

`warp`/`warp_sweep` implement WARP's merge stage (Ramé et al., arXiv 2406.16768): the M
policies' task vectors relative to the shared init are spherically averaged per tensor
(flattened, as mergekit's nuslerp with a base model), then interpolated back towards the
init, θ_η = (1 − η)·θ_init + η·θ_slerp (LITI).
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exnihilo.errors import ExnihiloError
from exnihilo.merge import methods
from exnihilo.merge.config import (
    METHODS,
    NEEDS_BASE,
    MergeConfig,
    Parameters,
    SliceSpec,
    SourceSpec,
    gradient_lists,
    load_config,
    lookup,
)
from exnihilo.merge.shards import (
    LAYER_RE,
    NAME_TO_TORCH,
    ModelSource,
    ShardWriter,
    atomic_folders,
    check_new_folder,
    copy_side_files,
    open_model,
    write_config,
)


@dataclass
class TensorJob:
    """One output tensor: the input tensor of each source and the resolved parameters."""

    out_name: str
    in_names: list[str]
    sources: list[ModelSource]
    base: int | None  # index of the base model among sources
    options: dict[str, Any]  # method-wide: t, normalize, lambda, rescale
    per_model: list[dict[str, Any]]  # weight, density of each source
    shape: tuple[int, ...]
    out_dtype: torch.dtype


@dataclass
class MergePlan:
    method: str
    jobs: list[TensorJob]
    reference: ModelSource  # config.json, generation config come from it
    tokenizer_folder: Path | None
    num_layers: int
    out_dtype: torch.dtype
    seed: int = 0
    config_text: str | None = None


@dataclass
class MergeSummary:
    out: Path
    method: str
    tensors: int
    parameters: int
    seconds: float
    peak_rss_mb: float
    copied: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "method": self.method, "tensors": self.tensors,
                "parameters": self.parameters, "seconds": round(self.seconds, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- planning ---------------------------------------------------------------------------


def open_models(refs: Sequence[str], config_dir: Path | None, where: str
                ) -> dict[str, ModelSource]:
    models = {}
    for ref in refs:
        try:
            models[ref] = open_model(ref, config_dir)
        except ExnihiloError as e:
            raise ExnihiloError(f"{where}: {e}") from None
    return models


def check_same_architecture(models: Sequence[ModelSource], where: str) -> None:
    first = models[0]
    for other in models[1:]:
        if other.architecture != first.architecture:
            raise ExnihiloError(f"{where}: models differ in architecture: {first.ref} is "
                                f"{first.architecture}, {other.ref} is {other.architecture}")


def check_same_tensor(name: str, names: Sequence[str], models: Sequence[ModelSource],
                      where: str) -> tuple[int, ...]:
    """All models have the tensor with one shape; return it (error names the tensor)."""
    first = models[0]
    for in_name, model in zip(names, models, strict=True):
        if in_name not in model.tensors:
            raise ExnihiloError(f"{where}: tensor {in_name} is in {first.ref} but not in "
                                f"{model.ref} (different architectures?)")
    shape = first.tensors[names[0]].shape
    for in_name, model in zip(names, models, strict=True):
        other = model.tensors[in_name].shape
        if other != shape:
            hint = ""
            if "embed" in name or "lm_head" in name:
                hint = f" (vocabularies differ: {shape[0]} vs {other[0]} tokens)"
            raise ExnihiloError(f"{where}: tensor {name} has shape {list(shape)} in "
                                f"{first.ref} but {list(other)} in {model.ref}{hint}")
    return shape


def _as_slices(config: MergeConfig, models: dict[str, ModelSource], where: str
               ) -> list[SliceSpec]:
    """`models:` becomes one slice over all layers (the base added when the method needs it
    and it is not listed), as mergekit normalises it."""
    if config.slices is not None:
        return config.slices
    assert config.models is not None
    counts = {ref: models[ref].num_layers for ref in config.referenced_models()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{ref} has {n}" for ref, n in counts.items())
        raise ExnihiloError(f"{where}: models have different numbers of layers ({listed}); merge "
                            f"matching layers with slices and layer_range")
    sources = [SourceSpec(model=s.model, layer_range=(0, models[s.model].num_layers),
                          parameters=s.parameters) for s in config.models]
    if config.merge_method in NEEDS_BASE and config.base_model not in \
            [s.model for s in sources]:
        base = config.base_model
        assert base is not None
        sources.append(SourceSpec(model=base, layer_range=(0, models[base].num_layers)))
    return [SliceSpec(sources=sources)]


def _check_slice(spec: SliceSpec, index: int, config: MergeConfig,
                 models: dict[str, ModelSource], where: str) -> None:
    for source in spec.sources:
        start, end = source.layer_range  # type: ignore[misc]
        n = models[source.model].num_layers
        if end > n:
            raise ExnihiloError(f"{where}: slices.{index}: layer_range [{start}, {end}] of "
                                f"{source.model} exceeds its {n} layers")
    n_layers = spec.sources[0].layer_range[1] - spec.sources[0].layer_range[0]  # type: ignore
    scopes: list[tuple[str, Parameters]] = [("parameters", config.parameters),
                                            (f"slices.{index}.parameters", spec.parameters)]
    scopes += [(f"{source.model}.parameters", source.parameters) for source in spec.sources]
    for scope, params in scopes:
        for name, setting in params.items():
            for values in gradient_lists(setting):
                if len(values) > n_layers:
                    raise ExnihiloError(
                        f"{where}: {scope}.{name}: a gradient of {len(values)} values does not "
                        f"fit {n_layers} layers (at most one value per layer; the values are "
                        f"spread evenly over the layers)")
    method = config.merge_method
    if method == "slerp":
        base = spec.base_model or config.base_model
        names = [s.model for s in spec.sources]
        if len(names) != 2 or base not in names:
            raise ExnihiloError(f"{where}: slerp needs exactly two models, one of them the "
                                f"base_model ({base}); got {', '.join(names)}")


def _resolve_parameters(config: MergeConfig, spec: SliceSpec, name: str, t: float,
                        base: int | None, where: str) -> tuple[dict[str, Any],
                                                               list[dict[str, Any]]]:
    """Method-wide and per-source parameters for one tensor at relative depth t."""
    method = METHODS[config.merge_method]
    options: dict[str, Any] = {}
    for key, default in method["defaults"].items():
        value = lookup(key, name, t, [spec.parameters, config.parameters])
        if value is None and default is None:
            raise ExnihiloError(f"{where}: {config.merge_method} needs parameter {key!r} "
                                f"for tensor {name}")
        options[key] = default if value is None else value
    per_model = []
    for i, source in enumerate(spec.sources):
        values: dict[str, Any] = {}
        for key, default in method["per_model"].items():
            value = lookup(key, name, t, [source.parameters, spec.parameters,
                                          config.parameters])
            if value is None and default is None and i != base:
                raise ExnihiloError(f"{where}: {source.model}: missing parameter {key!r} "
                                    f"for tensor {name}")
            values[key] = default if value is None else value
        if not 0 < float(values.get("density", 1.0)) <= 1:
            raise ExnihiloError(f"{where}: {source.model}: density {values['density']} for "
                                f"{name} must be in (0, 1]")
        per_model.append(values)
    weights = [float(p["weight"]) for i, p in enumerate(per_model)
               if "weight" in p and i != base]
    if options.get("normalize") and weights and abs(sum(weights)) < 1e-8:
        raise ExnihiloError(f"{where}: weights sum to zero for tensor {name} under "
                            f"normalize: true (nothing to divide by)")
    return options, per_model


def plan_merge(config: MergeConfig, where: str = "merge config",
               config_dir: Path | None = None, seed: int = 0) -> MergePlan:
    """Every output tensor's inputs and parameters, from headers and configs only."""
    models = open_models(config.referenced_models(), config_dir, where)
    check_same_architecture(list(models.values()), where)
    slices = _as_slices(config, models, where)
    for i, spec in enumerate(slices):
        _check_slice(spec, i, config, models, where)

    reference = models[config.base_model] if config.base_model else \
        models[slices[0].sources[0].model]
    outside = [n for n in reference.tensors if not LAYER_RE.match(n)]
    for model in models.values():  # e.g. an untied lm_head against a tied one
        extra = set(model.tensors_outside_layers()) ^ set(outside)
        if extra:
            name = sorted(extra)[0]
            has, lacks = (model, reference) if name in model.tensors else (reference, model)
            raise ExnihiloError(f"{where}: tensor {name} is in {has.ref} but not in "
                                f"{lacks.ref} (different architectures?)")
    pre = [n for n in outside if "embed" in n]
    post = [n for n in outside if "embed" not in n]
    configured = config.out_dtype or config.dtype
    first_tensor = reference.tensors[next(iter(reference.tensors))]
    out_dtype = NAME_TO_TORCH[configured] if configured else first_tensor.dtype

    def base_index(spec: SliceSpec) -> int | None:
        base = spec.base_model or config.base_model
        names = [s.model for s in spec.sources]
        if config.merge_method not in NEEDS_BASE or base is None:
            return None
        if base not in names:  # a slice listing its own sources must include the base
            raise ExnihiloError(f"{where}: the base_model {base} is not a source of a slice")
        return names.index(base)

    def job(out_name: str, in_names: list[str], spec: SliceSpec, t: float) -> TensorJob:
        sources = [models[s.model] for s in spec.sources]
        shape = check_same_tensor(out_name, in_names, sources, where)
        base = base_index(spec)
        options, per_model = _resolve_parameters(config, spec, out_name, t, base, where)
        if config.merge_method == "ties":
            for p, source in zip(per_model, spec.sources, strict=True):
                if float(p["density"]) < 1 and int(float(p["density"]) * math.prod(shape)) == 0:
                    raise ExnihiloError(f"{where}: {source.model}: density {p['density']} "
                                        f"keeps no entry of {out_name}")
        # without a configured dtype each tensor keeps the stored dtype of the base (or the
        # first source), as mergekit casts results back to the base's dtype
        stored = sources[base or 0].tensors[in_names[base or 0]].dtype
        return TensorJob(out_name, in_names, sources, base, options, per_model, shape,
                         NAME_TO_TORCH[configured] if configured else stored)

    jobs = [job(n, [n] * len(slices[0].sources), slices[0], 0.0) for n in pre]
    out_layer = 0
    for spec in slices:
        start = spec.sources[0].layer_range[0]  # type: ignore[index]
        n_layers = spec.sources[0].layer_range[1] - start  # type: ignore[index]
        for offset in range(n_layers):
            t = offset / (n_layers - 1) if n_layers > 1 else 1.0
            first = spec.sources[0]
            src_layer = first.layer_range[0] + offset  # type: ignore[index]
            suffixes = _layer_suffixes(models[first.model], src_layer)
            for source in spec.sources[1:]:
                theirs = _layer_suffixes(models[source.model],
                                         source.layer_range[0] + offset)  # type: ignore
                if set(theirs) != set(suffixes):
                    odd = sorted(set(theirs) ^ set(suffixes))[0]
                    raise ExnihiloError(f"{where}: layer tensors differ: {odd[0]}N{odd[1]} is "
                                        f"in only one of {first.model}, {source.model}")
            for prefix, suffix in suffixes:
                in_names = [f"{prefix}{s.layer_range[0] + offset}{suffix}"  # type: ignore
                            for s in spec.sources]
                jobs.append(job(f"{prefix}{out_layer}{suffix}", in_names, spec, t))
            out_layer += 1
    jobs += [job(n, [n] * len(slices[-1].sources), slices[-1], 0.0) for n in post]

    tokenizer = config.tokenizer_source
    if tokenizer in (None, "base"):
        tokenizer_folder = reference.tokenizer_folder
    else:
        tokenizer_folder = (models.get(tokenizer) or open_models([tokenizer], config_dir, where)
                            [tokenizer]).tokenizer_folder
    return MergePlan(config.merge_method, jobs, reference, tokenizer_folder, out_layer,
                     out_dtype, seed)


def _layer_suffixes(model: ModelSource, layer: int) -> list[tuple[str, str]]:
    """(prefix, suffix) of every tensor of one layer, in the model's stored order."""
    found = []
    for name in model.tensors:
        match = LAYER_RE.match(name)
        if match and int(match["idx"]) == layer:
            found.append((match["pre"], match["post"]))
    return found


# --- execution ---------------------------------------------------------------------------


def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A per-tensor, per-model seed independent of processing order (DARE's drop mask)."""
    digest = hashlib.sha256(f"{seed}:{name}:{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def merge_tensor(method: str, job: TensorJob, tensors: list[torch.Tensor],
                 seed: int = 0) -> torch.Tensor:
    """Apply the method to one tensor's inputs (float32 in, float32 out)."""
    opts = job.options
    if method == "linear":
        return methods.linear(tensors, [float(p["weight"]) for p in job.per_model],
                              normalize=bool(opts["normalize"]))
    assert job.base is not None
    base = tensors[job.base]
    if method == "slerp":
        other = tensors[1 - job.base]
        return methods.slerp(float(opts["t"]), base, other)
    others = [i for i in range(len(tensors)) if i != job.base]
    models = [tensors[i] for i in others]
    weights = [float(job.per_model[i]["weight"]) for i in others]
    densities = [float(job.per_model[i]["density"]) for i in others]
    lam, normalize = float(opts["lambda"]), bool(opts["normalize"])
    if method == "task_arithmetic":
        return methods.task_arithmetic(base, models, weights, lam, normalize)
    if method == "ties":
        return methods.ties(base, models, weights, densities, lam, normalize,
                            rescale=bool(opts["rescale"]))
    if method in ("dare_ties", "dare_linear"):
        generators = [torch.Generator().manual_seed(tensor_seed(seed, job.out_name, i))
                      for i in others]
        return methods.dare(base, models, weights, densities, generators,
                            consensus=method == "dare_ties", lam=lam, normalize=normalize,
                            rescale=bool(opts["rescale"]))
    raise ValueError(f"unknown method {method}")


def execute_plan(plan: MergePlan, out: Path) -> MergeSummary:
    """Run the plan into `out` (a new folder, written atomically)."""
    started = time.perf_counter()
    inputs = sorted({src.folder for job in plan.jobs for src in job.sources})
    check_new_folder(out, inputs)
    specs = [(j.out_name, j.shape, j.out_dtype) for j in plan.jobs]
    with atomic_folders([out]) as (tmp,):
        with ShardWriter(tmp, specs) as writer:
            for job in plan.jobs:
                tensors = [src.read(name)
                           for src, name in zip(job.sources, job.in_names, strict=True)]
                merged = merge_tensor(plan.method, job, tensors, plan.seed)
                del tensors  # keep only the merged tensor alive while it is written
                writer.write(job.out_name, merged.to(job.out_dtype))
                del merged
        layers = plan.num_layers if plan.num_layers != plan.reference.num_layers else None
        write_config(plan.reference.config, tmp, plan.out_dtype, layers)
        copied = copy_side_files(plan.reference, plan.tokenizer_folder, tmp)
        if plan.config_text is not None:
            (tmp / "merge_config.yaml").write_text(plan.config_text)
    parameters = sum(math.prod(j.shape) for j in plan.jobs)
    return MergeSummary(out, plan.method, len(plan.jobs), parameters,
                        time.perf_counter() - started, peak_rss_mb(), copied)


def merge(config_path: str | Path, out: str | Path, seed: int = 0) -> MergeSummary:
    """Merge the models a mergekit YAML describes into the new folder `out`."""
    config_path = Path(config_path)
    config = load_config(config_path)
    check_new_folder(Path(out), [])  # fail fast; execute_plan checks again against inputs
    plan = plan_merge(config, str(config_path), config_path.parent, seed)
    plan.config_text = config_path.read_text(encoding="utf-8")
    return execute_plan(plan, Path(out))


# --- WARP -------------------------------------------------------------------------------


def _warp_sources(init: str, policies: Sequence[str]) -> tuple[ModelSource,
                                                                list[ModelSource]]:
    if not policies:
        raise ExnihiloError("warp: give at least one policy (WARP merges M ≥ 2 policies "
                            "trained from the same init)")
    models = open_models([init, *policies], None, "warp")
    init_model = models[init]
    policy_models = [models[p] for p in policies]
    check_same_architecture([init_model, *policy_models], "warp")
    for name in init_model.tensors:
        check_same_tensor(name, [name] * (1 + len(policies)), [init_model, *policy_models],
                          "warp")
    for policy in policy_models:
        extra = set(policy.tensors) - set(init_model.tensors)
        if extra:
            raise ExnihiloError(f"warp: tensor {sorted(extra)[0]} is in {policy.ref} but not "
                                f"in the init {init_model.ref}")
    return init_model, policy_models


def _check_etas(etas: Sequence[float]) -> None:
    if not etas:
        raise ExnihiloError("warp: no eta given")
    for eta in etas:
        if not 0 <= eta <= 1:
            raise ExnihiloError(f"warp: eta {eta} must be in [0, 1]")


def _write_warp(init_model: ModelSource, policy_models: list[ModelSource],
                etas: Sequence[float], folders: Sequence[Path], policies: Sequence[str]
                ) -> None:
    """One pass over the tensors: the slerp of the task vectors is computed once per tensor
    and each η's LITI result is appended to its own folder."""
    names = list(init_model.tensors)
    specs = [(n, init_model.tensors[n].shape, init_model.tensors[n].dtype) for n in names]
    with ExitStack() as stack:
        writers = [stack.enter_context(ShardWriter(folder, specs)) for folder in folders]
        for name in names:
            theta_init = init_model.read(name)
            deltas = [p.read(name).sub_(theta_init) for p in policy_models]
            theta_slerp = methods.slerp_task_vectors(deltas).add_(theta_init)
            del deltas
            for eta, writer in zip(etas, writers, strict=True):
                value = methods.liti(theta_init, theta_slerp, eta)
                writer.write(name, value.to(init_model.tensors[name].dtype))
    for eta, folder in zip(etas, folders, strict=True):
        write_config(init_model.config, folder, init_model.tensors[names[0]].dtype)
        copy_side_files(init_model, init_model.tokenizer_folder, folder)
        (folder / "warp.json").write_text(json.dumps(
            {"method": "warp", "init": init_model.ref, "policies": list(policies), "eta": eta,
             "merge": "slerp of the task vectors per tensor (iterated at 1/m for M > 2), "
                      "then LITI towards init"}, indent=2) + "\n")


def eta_folder_name(eta: float) -> str:
    return f"eta-{eta:.2f}"


def warp_sweep(init: str, policies: Sequence[str], etas: Sequence[float],
               out: str | Path) -> list[MergeSummary]:
    """WARP merge for each η of a grid, into `out/eta-<η>` (one pass over the weights; the
    whole folder appears only when every η is written)."""
    _check_etas(etas)
    started = time.perf_counter()
    out = Path(out)
    init_model, policy_models = _warp_sources(init, policies)
    check_new_folder(out, [init_model.folder, *(p.folder for p in policy_models)])
    with atomic_folders([out]) as (tmp,):
        folders = [tmp / eta_folder_name(eta) for eta in etas]
        for folder in folders:
            folder.mkdir()
        _write_warp(init_model, policy_models, etas, folders, policies)
    total = sum(math.prod(info.shape) for info in init_model.tensors.values())
    seconds = time.perf_counter() - started
    return [MergeSummary(out / eta_folder_name(eta), f"warp eta={eta:g}",
                         len(init_model.tensors), total, seconds, peak_rss_mb())
            for eta in etas]


def warp(init: str, policies: Sequence[str], eta: float, out: str | Path) -> MergeSummary:
    """WARP merge of M policies trained from `init`: slerp of task vectors, then LITI."""
    _check_etas([eta])
    started = time.perf_counter()
    out = Path(out)
    init_model, policy_models = _warp_sources(init, policies)
    check_new_folder(out, [init_model.folder, *(p.folder for p in policy_models)])
    with atomic_folders([out]) as (tmp,):
        _write_warp(init_model, policy_models, [eta], [tmp], policies)
    total = sum(math.prod(info.shape) for info in init_model.tensors.values())
    return MergeSummary(out, f"warp eta={eta:g}", len(init_model.tensors), total,
                        time.perf_counter() - started, peak_rss_mb())
