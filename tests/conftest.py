"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models, the real 135M model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")
# Wide enough that rich never wraps a message mid-phrase: under pytest-xdist the temporary
# paths in messages are longer ("popen-gw0/"), and an 80-column wrap split what tests read.
os.environ.setdefault("COLUMNS", "200")
# The suite compares against CPU numbers: models load on the CPU even where a GPU is present
# (tests of the GPU path ask for device="cuda" themselves, tests/test_devices.py).
os.environ.setdefault("EXNIHILO_DEVICE", "cpu")

EMBEDDED = "smollm2-135m-instruct"
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


# Tests that need a llama.cpp server (its fixtures start one) or a browser are marked by
# what they use, so `make test-fast` can leave them out without a list to maintain.
SERVER_FIXTURES = {"llama_server", "proxy"}
BROWSER_TESTS = {"test_report_in_headless_chromium"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
        if item.name in BROWSER_TESTS:
            item.add_marker(pytest.mark.browser)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread; on a busy shared CPU, two threads' handoffs
    made each small matmul ~20x slower (measured: 1.6-23 ms vs 0.07 ms). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's real tokenizer (ChatML template, 49,152 tokens)."""
    from exnihilo.models import load_tokenizer

    return load_tokenizer(EMBEDDED)


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture
def tiny_llama(smol_tokenizer):
    """A randomly initialised 2-layer Llama over the real SmolLM2 vocabulary (seeded)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(smol_tokenizer)))
    model.eval()
    return model


@pytest.fixture
def tiny_gemma2(smol_tokenizer):
    """A randomly initialised 2-layer Gemma 2 (local/global attention, soft-capping)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=512, sliding_window=16,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def embedder():
    """The packaged all-MiniLM-L6-v2 sentence embedder (loads offline in about a second)."""
    from exnihilo.embedder import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def real_engine():
    """The embedded SmolLM2-135M-Instruct behind the local transformers engine (slow)."""
    from exnihilo.engines.transformers import TransformersEngine

    return TransformersEngine(EMBEDDED, batch_size=16)


@pytest.fixture(scope="session")
def shared_dir():
    path = os.path.abspath(SHARED)
    if not os.path.isdir(os.path.join(path, "evalsets")):
        pytest.fail(f"../shared/evalsets not found at {path}")
    return path
