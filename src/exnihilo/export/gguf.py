"""GGUF export: a Llama-family Hugging Face folder → one .gguf for llama.cpp, Ollama, LM Studio.

Why our own writer rather than llama.cpp's `convert_hf_to_gguf.py`: that script is not
installable (it lives in the llama.cpp repository, not in the `gguf` package), covers hundreds of
architectures through a registry, and creates its output before it has checked everything. We
need one architecture (the Llama family this product trains: SmolLM2 and its finetunes) and want
every check done before a byte is written. The file format, the tensor names and the
quantization kernels all come from the `gguf` package (llama.cpp's own Python library); only the
conversion choices live here:

- Tensor names: gguf's `TensorNameMap` for `MODEL_ARCH.LLAMA`, the same map transformers uses
  to read a GGUF back (`exnihilo.models.resolve_model("x.gguf")`), so writer and reader agree.
- Q and K projections: llama.cpp rotates adjacent pairs (2i, 2i+1) of each head, transformers
  rotates halves (i, i + d/2); `llama_permute` reorders the rows (the reader undoes it).
- Tokenizer: byte-level BPE ("gpt2" in llama.cpp): tokens, token types, merges, the
  pre-tokenizer name (which regex split llama.cpp applies before BPE), the special ids and
  whether BOS/EOS are added (found by encoding, not guessed from the config).
- Chat template: the tokenizer's own for runs trained in the "chat" style, or a template that
  renders exactly the prompt a run trained in the "alpaca"/"phi3" style was trained on.
- Types: 1-D tensors (norms) stay F32, as in llama.cpp; 2-D tensors take the requested type,
  except that the 4/5-bit types keep the token embedding (also the output head when tied) at
  Q8_0, as llama-quantize keeps it at higher precision; a tensor whose rows do not divide into
  quantization blocks falls back to F16.

The file is written to a temporary file beside the target and renamed, so an error never
leaves a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from exnihilo.errors import ExnihiloError

ARCHITECTURE = "LlamaForCausalLM"  # the one HF class the writer supports


@dataclass(frozen=True)
class QType:
    """How one `--type` stores the 2-D tensors and the token embedding."""

    tensor: gguf.GGMLQuantizationType
    embedding: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


_T, _F = gguf.GGMLQuantizationType, gguf.LlamaFileType
QTYPES: dict[str, QType] = {
    "f32": QType(_T.F32, _T.F32, _F.ALL_F32),
    "f16": QType(_T.F16, _T.F16, _F.MOSTLY_F16),
    "bf16": QType(_T.BF16, _T.BF16, _F.MOSTLY_BF16),
    "q8_0": QType(_T.Q8_0, _T.Q8_0, _F.MOSTLY_Q8_0),
    "q5_1": QType(_T.Q5_1, _T.Q8_0, _F.MOSTLY_Q5_1),
    "q5_0": QType(_T.Q5_0, _T.Q8_0, _F.MOSTLY_Q5_0),
    "q4_1": QType(_T.Q4_1, _T.Q8_0, _F.MOSTLY_Q4_1),
    "q4_0": QType(_T.Q4_0, _T.Q8_0, _F.MOSTLY_Q4_0),
}

# llama.cpp's names for the regex split it applies before byte-level BPE.
PRE_GPT2 = "gpt-2"  # the GPT-2 regex alone
PRE_SMOLLM = "smollm"  # each digit split off first, then the GPT-2 regex

ALPACA_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\\n\\n### Instruction:\\n' + message['content'] + "
    "'\\n\\n### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('the alpaca prompt style has no ' + message['role'] + "
    "' role') }}{%- endif %}{%- endfor %}")
PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n<|assistant|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('the phi3 prompt style has no ' + message['role'] + "
    "' role') }}{%- endif %}{%- endfor %}")
STYLE_TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "phi3": PHI3_TEMPLATE}


@dataclass
class ExportResult:
    """What `export_gguf` wrote."""

    path: Path
    qtype: str
    size_bytes: int
    n_tensors: int
    tensor_types: dict[str, int]  # GGML type name → how many tensors
    pre_tokenizer: str
    chat_template: str | None
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- the model

def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExnihiloError(f"{path}: cannot read the model config ({e})") from None


def check_supported(config: dict[str, Any], folder: Path) -> None:
    """Raise unless the config describes a model the writer converts faithfully."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or ARCHITECTURE not in archs:
        raise ExnihiloError(
            f"{folder}: architecture {', '.join(archs) or config.get('model_type')!s} is not "
            f"supported by the GGUF export (supported: {ARCHITECTURE}, e.g. SmolLM2 and its "
            f"finetunes)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ExnihiloError(f"{folder}: {flag}=true is not supported by the GGUF export")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ExnihiloError(f"{folder}: rope scaling {rope.get('rope_type')!r} is not supported "
                            f"by the GGUF export (supported: default, linear)")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; older folders `rope_theta` + `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights (one file, or the shards of an index)."""
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise ExnihiloError(f"{index}: shard {missing[0]} is missing")
        return [folder / s for s in shards]
    raise ExnihiloError(f"{folder}: no safetensors weights (model.safetensors or its index); "
                        f"only safetensors folders can be exported")


def hf_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every stored tensor, one at a time (bf16 goes through torch)."""
    import torch
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K projection rows from HF's rotary layout to llama.cpp's.

    Within each head of dimension d, HF rotates the pairs (i, i + d/2) and llama.cpp the pairs
    (2i, 2i + 1); row 2i of the result is row i of the input, row 2i+1 is row i + d/2. For d=4:
    rows [0, 1, 2, 3] → [0, 2, 1, 3]. (`n_head` is the KV head count for K.)
    """
    d = weights.shape[0] // n_head
    return (weights.reshape(n_head, 2, d // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `llama_permute` (what a GGUF reader applies)."""
    d = weights.shape[0] // n_head
    return (weights.reshape(n_head, d // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensor_name(hf_name: str, name_map: gguf.TensorNameMap) -> str | None:
    """The GGUF name of an HF tensor, or None for buffers llama.cpp recomputes (rotary freqs)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExnihiloError(f"tensor {hf_name!r} has no GGUF name for a Llama model; the GGUF "
                            f"export supports plain {ARCHITECTURE} weights only")
    return name


def tensor_type(gguf_name: str, array: np.ndarray, qtype: QType) -> gguf.GGMLQuantizationType:
    """The GGML type one tensor is stored in (see the module docstring for the rules)."""
    if array.ndim == 1:
        return _T.F32
    wanted = qtype.embedding if gguf_name.startswith(("token_embd.", "output.")) else qtype.tensor
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if array.shape[-1] % block != 0:
        return _T.F16
    return wanted


def encode_tensor(array: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """The array as the writer stores it: float32/float16 as is, other types as packed bytes."""
    if ggml_type == _T.F32:
        return array.astype(np.float32)
    if ggml_type == _T.F16:
        return array.astype(np.float16)
    return gguf.quantize(array.astype(np.float32), ggml_type)


def convert_tensors(folder: Path, config: dict[str, Any], qtype: QType
                    ) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(GGUF name, stored array, GGML type) for every weight, Q/K permuted, in file order."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    for hf_name, array in hf_tensors(weight_files(folder)):
        name = gguf_tensor_name(hf_name, name_map)
        if name is None or (tied and name == "output.weight"):
            continue  # a tied head is the embedding: llama.cpp reuses token_embd
        if name.endswith("attn_q.weight"):
            array = llama_permute(array, n_head)
        elif name.endswith("attn_k.weight"):
            array = llama_permute(array, n_kv)
        ggml_type = tensor_type(name, array, qtype)
        yield name, encode_tensor(array, ggml_type), ggml_type


# --------------------------------------------------------------------------- the tokenizer

@dataclass
class GGUFVocab:
    """The tokenizer metadata llama.cpp's "gpt2" (byte-level BPE) tokenizer reads."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, unk, pad → id
    add_bos: bool
    add_eos: bool


def pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name for an HF tokenizer.json `pre_tokenizer`, or an error."""
    def byte_level(p: dict[str, Any]) -> bool:
        return (p.get("type") == "ByteLevel" and p.get("use_regex", True)
                and not p.get("add_prefix_space", False))

    if spec and byte_level(spec):
        return PRE_GPT2
    parts = (spec or {}).get("pretokenizers") or []
    if (spec and spec.get("type") == "Sequence" and len(parts) == 2
            and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and byte_level(parts[1])):
        return PRE_SMOLLM
    raise ExnihiloError(f"tokenizer pre-tokenizer {json.dumps(spec)[:200]} is not supported by "
                        f"the GGUF export (supported: GPT-2 byte-level, SmolLM digits + "
                        f"byte-level)")


def _merge_strings(merges: list[Any]) -> list[str]:
    out = []
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ExnihiloError(f"tokenizer merge {merge!r} is not a byte-level BPE pair")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): encode a probe with and without special tokens and compare."""
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos and plain[:1] != [bos]
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos


def vocab_metadata(tokenizer: Any, n_vocab: int) -> GGUFVocab:
    """Tokens (padded to the embedding's rows), types, merges and special ids of a fast
    byte-level BPE tokenizer."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExnihiloError(f"tokenizer model {model.get('type')!r} is not supported by the GGUF "
                            f"export (supported: byte-level BPE, as in SmolLM2, GPT-2, Llama 3)")
    if spec.get("normalizer") is not None:
        raise ExnihiloError("tokenizer has a normalizer; the GGUF byte-level BPE tokenizer has "
                            "none, so the export would tokenize differently")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise ExnihiloError(f"tokenizer has token id {max(by_id)} but the model's embedding has "
                            f"only {n_vocab} rows")
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the tokenizer: padding llama.cpp never emits
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    special = {kind: getattr(tokenizer, f"{kind}_token_id", None)
               for kind in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _adds_special(tokenizer)
    return GGUFVocab(tokens=tokens, token_types=[int(t) for t in types],
                     merges=_merge_strings(model.get("merges") or []), pre=pre,
                     special_ids={k: int(v) for k, v in special.items() if v is not None},
                     add_bos=add_bos, add_eos=add_eos)


def chat_template(tokenizer: Any, style: str) -> str | None:
    """The template a chat runtime should prompt this model with: the tokenizer's own for the
    "chat" style, else the one that renders the style the run was trained on."""
    if style in STYLE_TEMPLATES:
        return STYLE_TEMPLATES[style]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default is the chat one
        template = template.get("default")
    return template or None


# ------------------------------------------------------------------------------------ Ollama

CHATML_GO_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n"
                      "{{ .Content }}<|im_end|>\n"
                      "{{ end }}<|im_start|>assistant\n")
STYLE_GO_TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n"
               "### Response:\n"),
    "phi3": "<|user|>\n{{ .Prompt }}\n<|assistant|>\n",
}
STYLE_STOPS = {"alpaca": ["### Instruction:"], "phi3": ["<|user|>"]}


def _chatml(messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def chatml_default_system(tokenizer: Any, template: str) -> str | None:
    """If `template` renders ChatML, its default system prompt ("" for none); else None.

    Decided by rendering probe conversations with the template and comparing them with
    ChatML written out by hand, so any template that behaves like ChatML qualifies."""
    def render(messages: list[dict[str, str]]) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template,
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that refuses the probe is not ChatML
            return None

    full = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    if render(full) != _chatml(full, True):
        return None
    user = [{"role": "user", "content": "U1"}]
    bare, got = _chatml(user, True), render(user)
    if got == bare:
        return ""
    head = "<|im_start|>system\n"
    if got and got.endswith(bare) and got.startswith(head):
        system = got[len(head):-len(bare)]
        if system.endswith("<|im_end|>\n") and "<|im_" not in system[:-len("<|im_end|>\n")]:
            return system[:-len("<|im_end|>\n")]
    return None


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise ExnihiloError(f"--ollama: the {what} contains \"\"\", which a Modelfile cannot quote")
    return f'"""{text}"""'


def ollama_modelfile(gguf_name: str, tokenizer: Any, template: str | None, style: str) -> str:
    """A Modelfile that runs the GGUF in Ollama with the prompt format the model was trained on.

    Supported: ChatML chat templates (SmolLM2's, Qwen's; found by rendering, see
    `chatml_default_system`) and the alpaca/phi3 prompt styles."""
    eos = tokenizer.eos_token
    lines = [f"FROM ./{gguf_name}", ""]
    if style in STYLE_GO_TEMPLATES:
        lines.append(f"TEMPLATE {_quote(STYLE_GO_TEMPLATES[style], 'template')}")
        stops = [eos, *STYLE_STOPS[style]]
    else:
        system = chatml_default_system(tokenizer, template) if template else None
        if system is None:
            raise ExnihiloError(
                "--ollama: the model's chat template is not ChatML, and no Ollama template "
                "can be derived from it (supported: ChatML templates such as SmolLM2's, and "
                "runs trained with --style alpaca or phi3); export without --ollama and write "
                "the Modelfile's TEMPLATE by hand")
        lines.append(f"TEMPLATE {_quote(CHATML_GO_TEMPLATE, 'template')}")
        if system:
            lines.append(f"SYSTEM {_quote(system, 'default system prompt')}")
        stops = ["<|im_end|>", "<|im_start|>", eos]
    lines.append("")
    for stop in dict.fromkeys(s for s in stops if s):  # ordered, no repeats
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- the export

def resolve_style(folder: Path) -> str:
    """The prompt style a run folder was trained with (exnihilo_run.json), else "chat"."""
    info = folder / "exnihilo_run.json"
    if not info.exists():
        return "chat"
    try:
        return str(json.loads(info.read_text(encoding="utf-8")).get("style") or "chat")
    except (OSError, json.JSONDecodeError) as e:
        raise ExnihiloError(f"{info}: cannot read ({e})") from None


def add_model_metadata(writer: gguf.GGUFWriter, config: dict[str, Any], qtype: QType,
                       name: str) -> None:
    rope = rope_parameters(config)
    n_head = config["num_attention_heads"]
    writer.add_type("model")
    writer.add_name(name)
    writer.add_description("exported by exnihilo")
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if head_dim(config) != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(qtype.file_type)
    if qtype.tensor not in (_T.F32, _T.F16, _T.BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer_metadata(writer: gguf.GGUFWriter, vocab: GGUFVocab,
                           template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if template:
        writer.add_chat_template(template)


def check_out_path(out: Path) -> None:
    if out.is_dir():
        raise ExnihiloError(f"output {out} is a folder; give a file name such as model.gguf")
    if out.suffix != ".gguf":
        raise ExnihiloError(f"output {out} should end in .gguf")
    if out.parent.exists() and not os.access(out.parent, os.W_OK):
        raise ExnihiloError(f"output folder {out.parent} is not writable")


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_gguf(model: str | Path, out_path: str | Path, qtype: str = "f16",
                ollama: bool = False) -> ExportResult:
    """Write `model` (a run folder, HF folder, embedded name or .gguf) as one GGUF file.

    Every check (type, architecture, weights, tokenizer, Ollama template) runs before the
    file is created; the GGUF is written to a temporary file in the target folder and renamed.
    With `ollama`, a `Modelfile` is written beside it (FROM ./<name>.gguf).
    """
    from transformers import AutoTokenizer

    from exnihilo.models import resolve_model

    if qtype not in QTYPES:
        raise ExnihiloError(f"unknown GGUF type {qtype!r} (known: {', '.join(QTYPES)})")
    out = Path(out_path).expanduser()
    check_out_path(out)
    folder = resolve_model(str(model))
    config = read_config(folder)
    check_supported(config, folder)
    weight_files(folder)  # no weights → error now, not after the header is written
    style = resolve_style(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as e:
        raise ExnihiloError(f"{folder}: cannot load the tokenizer ({type(e).__name__})") from None
    vocab = vocab_metadata(tokenizer, int(config["vocab_size"]))
    template = chat_template(tokenizer, style)
    modelfile = ollama_modelfile(out.name, tokenizer, template, style) if ollama else None

    out.parent.mkdir(parents=True, exist_ok=True)
    spec = QTYPES[qtype]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    types: Counter[str] = Counter()
    writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        add_model_metadata(writer, config, spec, _model_name(model, folder))
        add_tokenizer_metadata(writer, vocab, template)
        # The writer keeps every tensor until the end (about the model's f32 size at peak:
        # 1.2 GB RSS for the 135M model), then writes header, metadata and data in one go.
        for name, data, ggml_type in convert_tensors(folder, config, spec):
            writer.add_tensor(name, data, raw_dtype=ggml_type)
            types[ggml_type.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()  # a second close is a no-op; after an error it releases the file
        tmp.unlink(missing_ok=True)
    result = ExportResult(path=out, qtype=qtype, size_bytes=out.stat().st_size,
                          n_tensors=sum(types.values()), tensor_types=dict(types),
                          pre_tokenizer=vocab.pre, chat_template=template)
    if template is None:
        result.notes.append("the tokenizer has no chat template: chat runtimes will fall back "
                            "to their own default format")
    if style != "chat":
        result.notes.append(f"chat template: the {style!r} prompt style the run was trained with")
    if modelfile is not None:
        result.modelfile = out.parent / "Modelfile"
        write_text_atomic(result.modelfile, modelfile)
    return result


def _model_name(model: str | Path, folder: Path) -> str:
    """A readable general.name: the run folder's name, or the embedded model's."""
    text = str(model)
    return Path(text).name if Path(text).expanduser().exists() else text or folder.name
