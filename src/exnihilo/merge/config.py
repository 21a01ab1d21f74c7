"""mergekit's YAML merge configuration, parsed into pydantic models, and its parameter lookup.

Users' existing mergekit configs should work unchanged, so the schema follows mergekit's
(`merge_method`, `base_model`, `models` or `slices`/`sources` with `layer_range`,
`parameters` whose values are a number, a per-layer gradient list, or a list of
`{filter, value}` conditions, `dtype`, `out_dtype`, `tokenizer_source`). Keys mergekit has
but this merger does not implement (`modules`, `tokenizer`, `tokenizer_source: union`,
other methods) are refused with one clear line instead of being silently ignored.

Parameter lookup mirrors mergekit's `ConfigReader.parameter`: a source's own parameters,
then its slice's, then the top level; a gradient list is evaluated at the layer's relative
depth t = idx/(n − 1) within its slice, and tensors outside the layers at t = 0; a
conditional list takes the first entry whose `filter` is a substring of the tensor name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from exnihilo.errors import ExnihiloError
from exnihilo.merge.methods import evaluate_gradient

Scalar = bool | float | int
ScalarOrGradient = Scalar | list[float]


class Conditional(BaseModel):
    """One `{filter: substring, value: ...}` entry; no filter (or "*") matches every tensor."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


Setting = ScalarOrGradient | Conditional | list[Conditional]
Parameters = dict[str, Setting]


class SourceSpec(BaseModel):
    """A model taking part: a `models:` entry, or a slice source with its `layer_range`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int] | None = None
    parameters: Parameters = {}

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with "
                             f"0 <= start < end")
        return value

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class SliceSpec(BaseModel):
    """An output slice: its sources all contribute the same number of layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SourceSpec]
    base_model: str | None = None
    parameters: Parameters = {}

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _sources(self) -> SliceSpec:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        for source in self.sources:
            if source.layer_range is None:
                raise ValueError(f"slice source {source.model!r} needs a layer_range")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}  # type: ignore
        if len(lengths) != 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return self


# Methods implemented, with mergekit's defaults for the method-wide parameters and the
# per-model parameters each one reads.
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"defaults": {"normalize": True}, "per_model": {"weight": None}},
    "slerp": {"defaults": {"t": None}, "per_model": {}},
    "task_arithmetic": {"defaults": {"normalize": False, "lambda": 1.0, "rescale": False},
                        "per_model": {"weight": None, "density": 1.0}},
    "ties": {"defaults": {"normalize": True, "lambda": 1.0, "rescale": False},
             "per_model": {"weight": None, "density": 1.0}},
    "dare_ties": {"defaults": {"normalize": False, "lambda": 1.0, "rescale": True},
                  "per_model": {"weight": None, "density": 1.0}},
    "dare_linear": {"defaults": {"normalize": False, "lambda": 1.0, "rescale": True},
                    "per_model": {"weight": None, "density": 1.0}},
}
NEEDS_BASE = {"slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class MergeConfig(BaseModel):
    """A whole mergekit configuration (only the parts this merger implements)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[SourceSpec] | None = None
    slices: list[SliceSpec] | None = None
    parameters: Parameters = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge_method {value!r} (known: {', '.join(METHODS)})")
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r} (known: {', '.join(DTYPES)})")
        return None if value is None else DTYPES[value]

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer(cls, value: str | None) -> str | None:
        if value == "union":
            raise ValueError("tokenizer_source: union is not supported (it rebuilds the "
                             "vocabulary; use base or a model of the merge)")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value not in (None, "auto"):
            raise ValueError("chat_template: only 'auto' is supported (the tokenizer's "
                             "template is copied from the tokenizer source)")
        return value

    @model_validator(mode="after")
    def _inputs(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        if self.merge_method in NEEDS_BASE and not self.base_model \
                and not any(s.base_model for s in self.slices or []):
            raise ValueError(f"merge_method {self.merge_method} needs a base_model")
        return self

    def referenced_models(self) -> list[str]:
        """Every model reference, in order of first mention, base first."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for source in self.models or []:
            refs.append(source.model)
        for spec in self.slices or []:
            if spec.base_model:
                refs.append(spec.base_model)
            refs.extend(s.model for s in spec.sources)
        return list(dict.fromkeys(refs))


def _describe(error: ValidationError) -> str:
    """The first pydantic error as `key.path: message`, on one line."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (not a mergekit key this merger implements)"
    return f"{where}: {message}" if where else message


def parse_config(data: Any, source: str = "<config>") -> MergeConfig:
    """Validate an already-loaded YAML document; errors name `source` and the key."""
    if not isinstance(data, dict):
        raise ExnihiloError(f"{source}: expected a mapping with merge_method, models or "
                            f"slices, got {type(data).__name__}")
    if "modules" in data:
        raise ExnihiloError(f"{source}: modules: multi-module configs are not supported "
                            f"(use models or slices)")
    if isinstance(data.get("tokenizer"), dict):
        raise ExnihiloError(f"{source}: tokenizer: the tokenizer block is not supported "
                            f"(use tokenizer_source: base)")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ExnihiloError(f"{source}: {_describe(e)}") from None
    _check_settings(config, source)
    return config


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML file (no model is touched)."""
    path = Path(path)
    if not path.is_file():
        raise ExnihiloError(f"merge config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ExnihiloError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})"
                            ) from None
    return parse_config(data, str(path))


def _settings(config: MergeConfig) -> list[tuple[str, str, Setting]]:
    """(where, name, setting) for every parameter in the config, for validation."""
    found = [(f"parameters.{k}", k, v) for k, v in config.parameters.items()]
    for i, source in enumerate(config.models or []):
        found += [(f"models.{i}.parameters.{k}", k, v) for k, v in source.parameters.items()]
    for i, spec in enumerate(config.slices or []):
        found += [(f"slices.{i}.parameters.{k}", k, v) for k, v in spec.parameters.items()]
        for j, source in enumerate(spec.sources):
            found += [(f"slices.{i}.sources.{j}.parameters.{k}", k, v)
                      for k, v in source.parameters.items()]
    return found


# Parameters of other mergekit methods: mergekit ignores those a method does not read, so a
# config written for one method still runs with another; any other name is a typo.
OTHER_MERGEKIT_PARAMETERS = {"epsilon", "gamma", "select_topk", "filter_wise",
                             "nuslerp_flatten", "nuslerp_row_wise", "int8_mask"}


def _check_settings(config: MergeConfig, source: str) -> None:
    known = {name for spec in METHODS.values() for group in ("defaults", "per_model")
             for name in spec[group]} | OTHER_MERGEKIT_PARAMETERS
    for where, name, setting in _settings(config):
        if name not in known:
            raise ExnihiloError(f"{source}: {where}: {config.merge_method} has no parameter "
                                f"{name!r} (known: {', '.join(sorted(known))})")
        for values in gradient_lists(setting):
            if not values:
                raise ExnihiloError(f"{source}: {where}: empty gradient list")


def gradient_lists(setting: Setting) -> list[list[float]]:
    """Every per-layer gradient list inside a setting (for the layer-count check)."""
    if isinstance(setting, list) and setting and all(isinstance(v, Conditional)
                                                     for v in setting):
        return [c.value for c in setting if isinstance(c.value, list)]  # type: ignore
    if isinstance(setting, Conditional):
        return [setting.value] if isinstance(setting.value, list) else []
    if isinstance(setting, list):
        return [setting]  # type: ignore[list-item]
    return []


def evaluate_setting(tensor_name: str, setting: Setting, t: float) -> Scalar | None:
    """A setting's value for one tensor at relative layer depth t (None: no filter matched)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, Conditional)
                                                     for c in setting):
        for condition in setting:
            if condition.filter in (None, "*") or condition.filter in tensor_name:
                return evaluate_setting(tensor_name, condition.value, t)
        return None
    if isinstance(setting, list):
        return evaluate_gradient(setting, t)  # type: ignore[arg-type]
    return setting  # type: ignore[return-value]


def lookup(name: str, tensor_name: str, t: float, levels: list[Parameters]) -> Scalar | None:
    """The first level (most specific first) whose setting for `name` applies to the tensor."""
    for level in levels:
        if name in level:
            value = evaluate_setting(tensor_name, level[name], t)
            if value is not None:
                return value
    return None
