"""Shared fixtures: random-weight Whisper models built once per test session (no model hub)."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The session's own compilation cache, empty at its start and removed at its end: the many
# engines, schedulers and servers of the tests compile programs of the same shapes, each once.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="dragoman-test-jax-")
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
os.environ["DRAGOMAN_COMPILATION_CACHE"] = COMPILATION_CACHE

import jax
import pytest

from random_models import build_model

# Parity with the PyTorch references needs full-precision float32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_root):
    """(directory, transformers model) of a tiny multilingual Whisper: 80 mels, 51865 tokens."""
    out = model_root / "tiny"
    return out, build_model(out, "tiny")


@pytest.fixture(scope="session")
def v3_model(model_root):
    """large-v3-like: 128 mels, 51866 tokens (Cantonese)."""
    out = model_root / "v3"
    return out, build_model(out, "v3", seed=1)


@pytest.fixture(scope="session")
def turbo_model(model_root):
    """large-v3-turbo-like: 3 encoder layers, 1 decoder layer."""
    out = model_root / "turbo"
    return out, build_model(out, "turbo", seed=2)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from service.engine import Engine

    engine = Engine.load(str(tiny_model[0]), max_batch=8)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def en_model(model_root):
    """English-only (tiny.en-like): 80 mels, GPT-2's vocabulary of 51864 tokens; its generation
    config lists suppress tokens and alignment heads of its own, as real checkpoints' do."""
    from whisper.tokenizer import get_tokenizer

    out = model_root / "en"
    model = build_model(out, "en", seed=3)
    config = json.loads((out / "generation_config.json").read_text())
    # Unlike the defaults, so that reading them shows: two more suppressed tokens (" Targ" and
    # " cellul", which this model samples often), and one head of the lower decoder layer for
    # word alignment (the default is every head of the upper half).
    config["suppress_tokens"] = sorted(get_tokenizer(multilingual=False).non_speech_tokens) + [31089, 47354]
    config["alignment_heads"] = [[0, 1]]
    (out / "generation_config.json").write_text(json.dumps(config))
    return out, model


@pytest.fixture(scope="session")
def en_engine(en_model):
    from service.engine import Engine

    engine = Engine.load(str(en_model[0]), max_batch=8)
    yield engine
    engine.close()
