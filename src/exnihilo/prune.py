"""Structured pruning by activation importance (Minitron, arXiv 2407.14679 / 2408.11796).

Importance comes from forward passes only, over a calibration set of packed text rows:

* MLP neurons: the input of `down_proj` (the post-activation), |a| averaged over the
  sequence, then the L2 norm over the batch (Minitron's aggregation), per layer.
* Attention heads: the input of `o_proj` (each head's output), the same aggregation with
  an extra L2 over the head's channels. Heads are removed in whole GQA groups (a KV head and
  the query heads that share it), so the model stays a valid grouped-query model; a
  group's score is the L2 of its heads' scores.
* Embedding channels: the outputs of every pre-attention and pre-MLP norm, aggregated the
  same way and summed over layers; a channel is removed from every matrix that reads or
  writes the residual stream, from every norm, and from the (tied) embedding.
* Depth: Block Importance BI = 1 − mean cos(layer input, layer output) over tokens, or the
  increase of the calibration LM loss when the layer is skipped (`depth_method="loss"`).
  The lowest-scoring layers go (single-shot, as Minitron finds iterating adds nothing).

Width is uniform across layers (each layer keeps its own most important neurons / groups,
the same number everywhere), because Hugging Face configs hold one size per model. The
result is written as an ordinary transformers folder (safetensors): a new config of the
same class and the kept slices of every weight, loaded with `load_state_dict(strict=True)`
so a shape mistake cannot pass silently. Keeping everything reproduces the logits exactly.
Recover the pruned model with `train distill` (Minitron: logit-only forward KL, τ = 1).

Works for Llama-style (Llama, SmolLM2, Mistral, Qwen2) and Gemma 2 decoders. For Gemma 2
the embedding scale √hidden follows the new width; distillation re-adjusts the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from exnihilo import progress
from exnihilo.devices import model_device, place_model, to_device
from exnihilo.errors import ExnihiloError
from exnihilo.train.forward import token_logprobs
from exnihilo.train.tokens import TokenStream, collate_rows, open_stream, prepare_corpus

MIN_CALIBRATION_ROWS = 4  # below this an L2 over the batch says little; Minitron uses 1024

DepthMethod = Literal["block", "loss"]
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")  # Gemma 2, Llama


@dataclass
class PruneTargets:
    """What to keep. None keeps that dimension whole. `mlp` and `hidden` ≤ 1 are fractions,
    > 1 counts; `heads` counts query heads (a multiple of the heads per KV group);
    `depth` counts layers."""

    depth: int | None = None
    mlp: float | None = None
    heads: int | None = None
    hidden: float | None = None
    depth_method: DepthMethod = "block"


@dataclass
class Plan:
    """The kept indices, ascending."""

    layers: list[int]
    neurons: list[list[int]]  # per kept layer (by original layer index order)
    groups: list[list[int]]  # KV groups kept per kept layer
    channels: list[int]
    importance: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------- shapes

def decoder_layers(model: Any) -> Any:
    return model.model.layers


def pre_mlp_norm(layer: Any) -> Any:
    """The norm in front of the MLP: Gemma 2's pre_feedforward_layernorm, Llama's
    post_attention_layernorm (named for where it sits, it normalizes the MLP's input)."""
    for name in PRE_MLP_NORMS:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ExnihiloError(f"unsupported decoder layer {type(layer).__name__}: no pre-MLP norm")


def shape_of(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "heads": heads, "kv_heads": kv,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def resolve_count(value: float | None, total: int, option: str) -> int:
    """A fraction (≤ 1) or count (> 1) of `total` → a count in 1 … total."""
    if value is None:
        return total
    if value <= 0:
        raise ExnihiloError(f"{option} {value}: must be positive")
    count = int(round(value * total)) if value <= 1 else int(value)
    if value > 1 and value != int(value):
        raise ExnihiloError(f"{option} {value}: a count must be whole (or a fraction ≤ 1)")
    if count > total:
        raise ExnihiloError(f"{option} {value}: larger than the model ({total})")
    return max(count, 1)


def check_targets(config: Any, targets: PruneTargets) -> dict[str, int]:
    """The kept sizes, or a clear error for a target the model cannot take."""
    s = shape_of(config)
    per_group = s["heads"] // s["kv_heads"]
    depth = s["layers"] if targets.depth is None else int(targets.depth)
    if not 1 <= depth <= s["layers"]:
        raise ExnihiloError(f"--depth {targets.depth}: the model has {s['layers']} layers "
                            f"(keep 1 … {s['layers']})")
    heads = s["heads"] if targets.heads is None else int(targets.heads)
    if heads > s["heads"] or heads < 1:
        raise ExnihiloError(f"--heads {targets.heads}: the model has {s['heads']} heads")
    if heads % per_group:
        raise ExnihiloError(f"--heads {heads}: must be a multiple of {per_group} (heads are "
                            f"removed in whole grouped-query groups of {per_group})")
    kept = {"layers": depth, "intermediate": resolve_count(targets.mlp, s["intermediate"],
                                                           "--mlp"),
            "heads": heads, "kv_heads": heads // per_group,
            "hidden": resolve_count(targets.hidden, s["hidden"], "--hidden")}
    if kept["hidden"] % heads:
        raise ExnihiloError(f"--hidden {kept['hidden']} must be a multiple of the kept heads "
                            f"({heads}): transformers requires hidden_size % heads == 0")
    return kept


# ---------------------------------------------------------------------------- importance

class ActivationStats:
    """Forward hooks that accumulate Minitron's importance statistics over batches."""

    def __init__(self, model: Any):
        self.model = model
        s = shape_of(model.config)
        self.heads, self.head_dim = s["heads"], s["head_dim"]
        n = s["layers"]
        self.neurons = [torch.zeros(s["intermediate"], dtype=torch.float64) for _ in range(n)]
        self.head_sq = [torch.zeros(s["heads"], dtype=torch.float64) for _ in range(n)]
        self.channels = torch.zeros(s["hidden"], dtype=torch.float64)
        self.channel_sq = [torch.zeros(s["hidden"], dtype=torch.float64) for _ in range(2 * n)]
        self.cos_sum = [0.0] * n
        self.tokens = 0
        self.handles: list[Any] = []

    @staticmethod
    def _seq_abs_mean_sq(a: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of (mean over the sequence of |a|)²: the L2-over-batch's square."""
        return _on_cpu(a).abs().mean(dim=1).pow(2).sum(dim=0)

    def attach(self) -> ActivationStats:
        for i, layer in enumerate(decoder_layers(self.model)):
            self.handles += [
                layer.mlp.down_proj.register_forward_pre_hook(self._neuron_hook(i)),
                layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(i)),
                layer.input_layernorm.register_forward_hook(self._channel_hook(2 * i)),
                pre_mlp_norm(layer).register_forward_hook(self._channel_hook(2 * i + 1)),
                layer.register_forward_hook(self._block_hook(i), with_kwargs=True)]
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _neuron_hook(self, i: int):
        def hook(module: Any, args: tuple) -> None:
            self.neurons[i] += self._seq_abs_mean_sq(args[0])
        return hook

    def _head_hook(self, i: int):
        def hook(module: Any, args: tuple) -> None:
            a = args[0]
            per_head = _on_cpu(a).abs().mean(dim=1).view(a.shape[0], self.heads,
                                                                   self.head_dim)
            self.head_sq[i] += per_head.pow(2).sum(dim=(0, 2))
        return hook

    def _channel_hook(self, k: int):
        def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
            self.channel_sq[k] += self._seq_abs_mean_sq(output)
        return hook

    def _block_hook(self, i: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            x, y = _on_cpu(x), _on_cpu(y)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            # A zero vector left zero (e.g. a padding-index embedding) is unchanged: cos 1.
            both_zero = (x.norm(dim=-1) == 0) & (y.norm(dim=-1) == 0)
            cos = torch.where(both_zero, torch.ones_like(cos), cos)
            self.cos_sum[i] += float(cos.sum())
            if i == 0:
                self.tokens += cos.numel()
        return hook

    def neuron_importance(self) -> list[torch.Tensor]:
        return [n.sqrt() for n in self.neurons]

    def head_importance(self) -> list[torch.Tensor]:
        return [h.sqrt() for h in self.head_sq]

    def channel_importance(self) -> torch.Tensor:
        return torch.stack([c.sqrt() for c in self.channel_sq]).sum(dim=0)

    def block_importance(self) -> list[float]:
        """BI_i = 1 − mean cos(input, output) of layer i."""
        return [1.0 - c / max(self.tokens, 1) for c in self.cos_sum]


def _on_cpu(a: torch.Tensor) -> torch.Tensor:
    """An activation as float64 on the CPU, where the statistics accumulate: the same sums
    whatever device the model runs on (MPS has no float64)."""
    return a.detach().cpu().double()


def calibration_batches(stream: TokenStream, rows: int, batch_size: int
                        ) -> list[dict[str, torch.Tensor]]:
    if stream.n_rows < max(rows, MIN_CALIBRATION_ROWS):
        need = max(rows, MIN_CALIBRATION_ROWS)
        raise ExnihiloError(f"--calibration: {stream.n_rows} rows of {stream.seq_len} tokens, "
                            f"fewer than the {need} needed to estimate importance (add text, "
                            f"lower --calibration-rows or --seq-len)")
    return [collate_rows(stream, range(k, min(k + batch_size, rows)))
            for k in range(0, rows, batch_size)]


def forward_batch(model: Any, batch: dict[str, torch.Tensor]) -> None:
    batch = to_device(batch, model_device(model))
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def collect_stats(model: Any, batches: list[dict[str, torch.Tensor]]) -> ActivationStats:
    stats = ActivationStats(model).attach()
    try:
        with torch.no_grad():
            for batch in batches:
                forward_batch(model, batch)
    finally:
        stats.detach()
    return stats


def calibration_loss(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            lp = token_logprobs(model, to_device(batch, model_device(model)))
            total -= float(lp.sum())
            n += lp.numel()
    return total / n


def skip_layer(layer: Any) -> Any:
    """A hook that makes `layer` return its input (the layer dropped)."""
    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x
    return layer.register_forward_hook(hook, with_kwargs=True)


def loss_importance(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Per layer, the calibration LM loss with that layer skipped minus the full model's."""
    base = calibration_loss(model, batches)
    scores = []
    for layer in decoder_layers(model):
        handle = skip_layer(layer)
        try:
            scores.append(calibration_loss(model, batches) - base)
        finally:
            handle.remove()
    return scores


def top_indices(scores: torch.Tensor | list[float], keep: int) -> list[int]:
    """The `keep` highest-scoring indices, ascending (ties: the lower index stays)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    return sorted(order[:keep])


def make_plan(model: Any, batches: list[dict[str, torch.Tensor]], targets: PruneTargets
              ) -> Plan:
    kept = check_targets(model.config, targets)
    s = shape_of(model.config)
    stats = collect_stats(model, batches)
    if targets.depth_method == "loss" and kept["layers"] < s["layers"]:
        depth_scores = loss_importance(model, batches)
    else:
        depth_scores = stats.block_importance()
    layers = top_indices(depth_scores, kept["layers"])
    per_group = s["heads"] // s["kv_heads"]
    neurons, groups = [], []
    for i in layers:
        neurons.append(top_indices(stats.neuron_importance()[i], kept["intermediate"]))
        heads = stats.head_importance()[i].view(s["kv_heads"], per_group)
        groups.append(top_indices(heads.pow(2).sum(-1).sqrt(), kept["kv_heads"]))
    channels = top_indices(stats.channel_importance(), kept["hidden"])
    importance = {"depth_method": targets.depth_method, "depth": list(map(float, depth_scores)),
                  "block_importance": stats.block_importance(),
                  "heads": [h.tolist() for h in stats.head_importance()],
                  "channels_top": channels[:16]}
    return Plan(layers, neurons, groups, channels, importance)


# ------------------------------------------------------------------------------- slicing

def pruned_config(config: Any, plan: Plan) -> Any:
    s = shape_of(config)
    per_group = s["heads"] // s["kv_heads"]
    values = config.to_dict()
    values.update(num_hidden_layers=len(plan.layers), hidden_size=len(plan.channels),
                  intermediate_size=len(plan.neurons[0]) if plan.neurons else
                  s["intermediate"],
                  num_attention_heads=len(plan.groups[0]) * per_group if plan.groups
                  else s["heads"],
                  num_key_value_heads=len(plan.groups[0]) if plan.groups else s["kv_heads"],
                  head_dim=s["head_dim"])
    if values.get("layer_types"):
        values["layer_types"] = [config.layer_types[i] for i in plan.layers]
    return type(config).from_dict(values)


def head_rows(groups: list[int], per_group: int, head_dim: int) -> list[int]:
    """Rows of q_proj (query heads of the kept groups) — heads of group g are
    g·per_group … (g+1)·per_group − 1, as transformers' repeat_kv lays them out."""
    return [(g * per_group + h) * head_dim + c for g in groups for h in range(per_group)
            for c in range(head_dim)]


def kv_rows(groups: list[int], head_dim: int) -> list[int]:
    return [g * head_dim + c for g in groups for c in range(head_dim)]


def sliced_state(model: Any, plan: Plan) -> dict[str, torch.Tensor]:
    """Every weight of the pruned model, as slices of the original's."""
    s = shape_of(model.config)
    per_group, hd = s["heads"] // s["kv_heads"], s["head_dim"]
    ch = torch.tensor(plan.channels)
    out: dict[str, torch.Tensor] = {}
    new_index = {old: new for new, old in enumerate(plan.layers)}
    for name, tensor in model.state_dict().items():
        tensor = tensor.cpu()  # sliced on the CPU; apply_plan moves the result back
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers")
            old = int(parts[at + 1])
            if old not in new_index:
                continue
            j = new_index[old]
            parts[at + 1] = str(j)
            out[".".join(parts)] = slice_layer_param(parts[at + 2:], tensor, ch,
                                                     plan.neurons[j], plan.groups[j],
                                                     per_group, hd)
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            out[name] = tensor[:, ch].clone()
        elif name.endswith("norm.weight"):
            out[name] = tensor[ch].clone()
        else:
            out[name] = tensor.clone()
    return out


def slice_layer_param(path: list[str], t: torch.Tensor, ch: torch.Tensor, neurons: list[int],
                      groups: list[int], per_group: int, hd: int) -> torch.Tensor:
    module, kind = path[-2], path[-1]
    n = torch.tensor(neurons)
    if module in ("gate_proj", "up_proj"):
        return t[n][:, ch].clone()
    if module == "down_proj":
        return t[ch][:, n].clone()
    q = torch.tensor(head_rows(groups, per_group, hd))
    kvr = torch.tensor(kv_rows(groups, hd))
    if module == "q_proj":
        return t[q][:, ch].clone() if kind == "weight" else t[q].clone()
    if module in ("k_proj", "v_proj"):
        return t[kvr][:, ch].clone() if kind == "weight" else t[kvr].clone()
    if module == "o_proj":
        return t[ch][:, q].clone() if kind == "weight" else t[ch].clone()
    if "norm" in module:
        return t[ch].clone()
    raise ExnihiloError(f"prune: unsupported parameter {'.'.join(path)}")


def apply_plan(model: Any, plan: Plan) -> Any:
    """A new model of the same class holding the plan's slices (strict load: every
    parameter of the new model gets exactly one slice of the right shape)."""
    config = pruned_config(model.config, plan)
    config._attn_implementation = model.config._attn_implementation
    small = type(model)(config).to(next(model.parameters()).dtype)
    small.load_state_dict(sliced_state(model, plan), strict=True)
    return small.to(model_device(model)).eval()


# ----------------------------------------------------------------------------------- run

@dataclass
class PruneResult:
    out: str
    params_before: int
    params_after: int
    layers: list[int]
    shape_before: dict[str, int]
    shape_after: dict[str, int]
    calibration_loss_before: float
    calibration_loss_after: float


def run_prune(model_name: str, calibration: str, out: str, targets: PruneTargets,
              rows: int = 64, seq_len: int = 256, batch_size: int = 4, seed: int = 0,
              model_obj: Any = None, tokenizer: Any = None, dtype: str = "float32",
              device: str | None = None) -> PruneResult:
    """Score, prune and save. Targets and calibration are checked before the model loads.
    The model runs on `device` (None: the process default; `model_obj` stays put then)."""
    from exnihilo.models import load_model, load_tokenizer, resolve_model
    from exnihilo.train.run import count_parameters, prepare_out, save_final_model

    if not Path(calibration).expanduser().exists():
        raise ExnihiloError(f"--calibration {calibration}: no such file or folder")
    if model_obj is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(model_name))
    else:
        config = model_obj.config
    check_targets(config, targets)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_name)
    folder = prepare_corpus(calibration, tokenizer, 0.0, seed)
    batches = calibration_batches(open_stream(folder, "train", seq_len), rows, batch_size)
    model = place_model(model_obj, device) if model_obj is not None else \
        load_model(model_name, dtype, device=device)
    model.eval()
    outp = Path(out)
    identity = {"kind": "prune", "model": model_name, "targets": asdict(targets),
                "calibration": folder.name, "rows": rows, "seq_len": seq_len}
    prepare_out(outp, identity, resume=False)
    progress.note(f"scoring {shape_of(config)['layers']} layers on {rows} calibration rows "
                  f"of {seq_len} tokens")
    plan = make_plan(model, batches, targets)
    small = apply_plan(model, plan)
    before, after = calibration_loss(model, batches), calibration_loss(small, batches)
    info = {"kind": "prune", "style": None, "base_model": model_name,
            "config": identity, "kept_layers": plan.layers, "importance": plan.importance,
            "shape_before": shape_of(model.config), "shape_after": shape_of(small.config),
            "calibration_loss_before": before, "calibration_loss_after": after,
            "calibration_perplexity_after": math.exp(min(after, 50.0))}
    save_final_model(small, tokenizer, outp, info, lora=False)
    return PruneResult(out=str(outp), params_before=count_parameters(model)[1],
                       params_after=count_parameters(small)[1], layers=plan.layers,
                       shape_before=shape_of(model.config), shape_after=shape_of(small.config),
                       calibration_loss_before=before, calibration_loss_after=after)
