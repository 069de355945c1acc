"""Every checkpoint format loads to the same parameters; broken ones fail clearly."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from random_models import openai_model
from service.engine import Engine, weights
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


def test_sharded_pytorch_bin_loads_the_same(tiny_model, reference, tmp_path):
    """Shards as older Hugging Face repositories have them (transformers now writes safetensors only)."""
    directory, hf = tiny_model
    state = hf.state_dict()
    names = list(state)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    copy_side_files(directory, tmp_path)
    assert_same(params_of(tmp_path), reference)


def test_safetensors_are_read_before_pytorch_bin(tiny_model, reference, tmp_path):
    directory, _ = tiny_model
    copy_side_files(directory, tmp_path)
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint: reading it would fail")
    assert_same(params_of(tmp_path), reference)


def test_openai_checkpoint_loads_the_same(tiny_model, reference, tmp_path):
    directory, hf = tiny_model
    om, dims = openai_model(hf)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": om.state_dict()}, tmp_path / "tiny.pt")
    copy_side_files(directory, tmp_path)
    ckpt = weights.resolve(str(tmp_path / "tiny.pt"))
    assert ckpt.directory == tmp_path
    assert_same(params_of(tmp_path / "tiny.pt"), reference)


def test_openai_checkpoint_without_a_tokenizer_says_where_to_get_one(tiny_model, tmp_path):
    om, dims = openai_model(tiny_model[1])
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": om.state_dict()}, tmp_path / "tiny.pt")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*needs those of the same model's Hugging Face"):
        Engine.load(str(tmp_path / "tiny.pt"))


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


@pytest.mark.parametrize("other", ["tiny_model", "en_model"])
def test_another_models_tokenizer_is_refused(v3_model, other, request, tmp_path):
    """large-v2's tokenizer (or an English-only one) beside large-v3's weights would shift every
    special token: <|translate|> would be <|yue|>."""
    shutil.copytree(v3_model[0], tmp_path, dirs_exist_ok=True)
    shutil.copy(request.getfixturevalue(other)[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="the tokenizer is not this model's: its vocabulary has 5186[45] tokens"):
        Engine.load(str(tmp_path))


def test_broken_json_files_and_single_weight_files_are_named(tiny_model, tmp_path):
    directory, _ = tiny_model
    copy_side_files(directory, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "whisper", ')  # a download cut short
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        weights.resolve(str(tmp_path))
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json has no weight_map"):
        weights.resolve(str(tmp_path))
    (tmp_path / "generation_config.json").write_text("[]")
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"generation_config.json holds a JSON list, not an object"):
        Engine.load(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.safetensors is one file of a Hugging Face model: give the "
                                              r"directory"):
        weights.resolve(str(tmp_path / "model.safetensors"))


def test_directory_without_weights_says_what_it_expects(tiny_model, tmp_path):
    copy_side_files(tiny_model[0], tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors, pytorch_model.bin"):
        weights.resolve(str(tmp_path))


def test_missing_path_is_reported():
    with pytest.raises(CheckpointError, match="does not exist"):
        weights.resolve("/nonexistent/whisper")


def test_offline_hub_without_cache_says_how_to_use_a_local_directory(tmp_path):
    """HF_HUB_OFFLINE and HF_HOME, as set for the process: it fails at once, naming the cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)  # it would win over HF_HOME
    code = "from service.engine import weights; weights.resolve('openai/whisper-large-v3')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "CheckpointError" in done.stderr
    assert str(tmp_path / "hf") in done.stderr
    assert "--model /path/to/a/local/model/directory" in done.stderr


def test_a_batch_of_no_windows_is_refused_before_the_weights_are_read(tmp_path):
    """Checked first: a path that does not exist is not even looked at."""
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_batch must be at least 1, got {bad}"):
            Engine.load(str(tmp_path / "nonexistent"), max_batch=bad)


def test_a_hub_id_loads_offline_from_the_hugging_face_cache(tiny_model, reference, tmp_path):
    """HF_HUB_OFFLINE with the model in the cache HF_HOME names (laid out as huggingface_hub
    keeps it: refs/main naming a snapshot): the hub id resolves to that snapshot, no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--openai--whisper-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    copy_side_files(tiny_model[0], snapshot)
    shutil.copy(tiny_model[0] / "model.safetensors", snapshot / "model.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)  # it would win over HF_HOME
    code = ("import numpy as np; from service.engine import weights; c = weights.resolve('openai/whisper-tiny'); "
            "p = weights.build_params(c.tensors(), c.dims, np.float32); "
            "print(c.directory); print(repr(float(np.asarray(p['decoder']['token_embedding']['kernel']).sum())))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    directory, checksum = done.stdout.split()
    assert directory == str(snapshot)
    assert float(checksum) == float(np.asarray(reference["decoder"]["token_embedding"]["kernel"]).sum())
