"""Every checkpoint format loads to the same parameters; broken ones fail clearly."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from random_models import openai_model
from service.engine import weights
from service.engine.weights import CheckpointError


def params_of(path) -> dict:
    ckpt = weights.resolve(str(path))
    return weights.build_params(ckpt.tensors(), ckpt.dims, np.float32)


def flat(tree, prefix=""):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def assert_same(a: dict, b: dict):
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return params_of(tiny_model[0])


def copy_side_files(src, dst):
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def test_sharded_safetensors_load_the_same(tiny_model, reference, tmp_path):
    directory, hf = tiny_model
    hf.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    copy_side_files(directory, tmp_path)
    assert_same(params_of(tmp_path), reference)


def test_pytorch_bin_loads_the_same(tiny_model, reference, tmp_path):
    directory, hf = tiny_model
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    copy_side_files(directory, tmp_path)
    assert_same(params_of(tmp_path), reference)


def test_openai_checkpoint_loads_the_same(tiny_model, reference, tmp_path):
    directory, hf = tiny_model
    om, dims = openai_model(hf)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": om.state_dict()}, tmp_path / "tiny.pt")
    copy_side_files(directory, tmp_path)
    ckpt = weights.resolve(str(tmp_path / "tiny.pt"))
    assert ckpt.directory == tmp_path
    assert_same(params_of(tmp_path / "tiny.pt"), reference)


def test_bfloat16_load_keeps_values_to_bfloat16_precision(tiny_model, reference):
    import ml_dtypes

    ckpt = weights.resolve(str(tiny_model[0]))
    bf16 = weights.build_params(ckpt.tensors(), ckpt.dims, ml_dtypes.bfloat16)
    a = dict(flat(bf16))["decoder/token_embedding/kernel"]
    assert a.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(a.astype(np.float32), dict(flat(reference))["decoder/token_embedding/kernel"], rtol=1e-2, atol=1e-3)


def test_truncated_safetensors_fail_with_the_file_named(tiny_model, tmp_path):
    directory, _ = tiny_model
    copy_side_files(directory, tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        params_of(tmp_path)


def test_config_that_does_not_match_the_weights_fails(tiny_model, tmp_path):
    directory, _ = tiny_model
    copy_side_files(directory, tmp_path)
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks"):
        params_of(tmp_path)
    config["decoder_layers"], config["d_model"] = 2, 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        params_of(tmp_path)


def test_directory_without_weights_says_what_it_expects(tiny_model, tmp_path):
    copy_side_files(tiny_model[0], tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors, pytorch_model.bin"):
        weights.resolve(str(tmp_path))


def test_missing_path_is_reported():
    with pytest.raises(CheckpointError, match="does not exist"):
        weights.resolve("/nonexistent/whisper")


def test_offline_hub_without_cache_says_how_to_use_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="--model /path/to/a/local/model/directory"):
        weights.resolve("openai/whisper-large-v3")
