"""Loading Whisper weights: Hugging Face directories or hub ids, and OpenAI `.pt` checkpoints.

Every format is read tensor by tensor (memory-mapped where the format allows) and written
straight into the stacked arrays of the parameter tree, so a large model is never held twice.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import torch

from .dims import ModelDimensions

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
                 "normalizer.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the architecture it declares."""


# Hugging Face parameter names -> openai-whisper names; the tree below uses the latter.
_HF_RENAMES = [
    (r"^model\.", ""),
    (r"^(encoder|decoder)\.layers\.", r"\1.blocks."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"^decoder\.embed_tokens\.weight$", "decoder.token_embedding.weight"),
    (r"^(encoder|decoder)\.embed_positions\.weight$", r"\1.positional_embedding"),
]


def hf_to_openai_name(name: str) -> str | None:
    """The openai-whisper name of a Hugging Face parameter, or None for ones it does not keep."""
    if name.startswith("proj_out."):
        return None  # tied to the token embedding
    for pattern, repl in _HF_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")
_LEAF = {"weight": "kernel", "bias": "bias"}
_MODULES = {"attn_ln": "attn_ln", "cross_attn_ln": "cross_attn_ln", "mlp_ln": "mlp_ln",
            "mlp.0": "mlp1", "mlp.2": "mlp2"}


def _tree_path(name: str) -> tuple[tuple[str, ...], int | None, str]:
    """openai-whisper name -> (path in the tree, layer index or None, how to lay the tensor out)."""
    m = _BLOCK.match(name)
    if m:
        side, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        module, leaf = rest.rsplit(".", 1)
        if module.endswith("_ln"):
            return (side, "blocks", module, "scale" if leaf == "weight" else "bias"), layer, "copy"
        if module in _MODULES:
            return (side, "blocks", _MODULES[module], _LEAF[leaf]), layer, "linear"
        attn, proj = module.split(".")  # attn.query, cross_attn.out, ...
        return (side, "blocks", attn, proj, _LEAF[leaf]), layer, "linear"
    if name.endswith("positional_embedding"):
        return (name.split(".")[0], "positional_embedding"), None, "copy"
    if name == "decoder.token_embedding.weight":  # [in, out] as the output projection reads it (model.py)
        return ("decoder", "token_embedding", "kernel"), None, "linear"
    side, module, leaf = name.split(".")
    if module.startswith("conv"):
        return (side, module, _LEAF[leaf]), None, "conv" if leaf == "weight" else "copy"
    if module in ("ln_post", "ln"):
        return (side, module, "scale" if leaf == "weight" else "bias"), None, "copy"
    raise CheckpointError(f"unexpected parameter {name!r}")


def expected_shapes(dims: ModelDimensions) -> dict[str, tuple[int, ...]]:
    """openai-whisper name -> shape, for every parameter of the architecture."""
    d_a, d_t = dims.n_audio_state, dims.n_text_state
    shapes = {
        "encoder.conv1.weight": (d_a, dims.n_mels, 3), "encoder.conv1.bias": (d_a,),
        "encoder.conv2.weight": (d_a, d_a, 3), "encoder.conv2.bias": (d_a,),
        "encoder.positional_embedding": (dims.n_audio_ctx, d_a),
        "encoder.ln_post.weight": (d_a,), "encoder.ln_post.bias": (d_a,),
        "decoder.token_embedding.weight": (dims.n_vocab, d_t),
        "decoder.positional_embedding": (dims.n_text_ctx, d_t),
        "decoder.ln.weight": (d_t,), "decoder.ln.bias": (d_t,),
    }

    def block(side: str, i: int, d: int, attns: tuple[str, ...]) -> None:
        pre = f"{side}.blocks.{i}"
        for a in attns:
            shapes[f"{pre}.{a}_ln.weight"] = shapes[f"{pre}.{a}_ln.bias"] = (d,)
            for proj in ("query", "key", "value", "out"):
                shapes[f"{pre}.{a}.{proj}.weight"] = (d, d)
                if proj != "key":
                    shapes[f"{pre}.{a}.{proj}.bias"] = (d,)
        shapes[f"{pre}.mlp_ln.weight"] = shapes[f"{pre}.mlp_ln.bias"] = (d,)
        shapes[f"{pre}.mlp.0.weight"], shapes[f"{pre}.mlp.0.bias"] = (4 * d, d), (4 * d,)
        shapes[f"{pre}.mlp.2.weight"], shapes[f"{pre}.mlp.2.bias"] = (d, 4 * d), (d,)

    for i in range(dims.n_audio_layer):
        block("encoder", i, d_a, ("attn",))
    for i in range(dims.n_text_layer):
        block("decoder", i, d_t, ("attn", "cross_attn"))
    return shapes


def _to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    if dtype == ml_dtypes.bfloat16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.to(getattr(torch, np.dtype(dtype).name)).numpy()


def build_params(tensors: Iterator[tuple[str, torch.Tensor]], dims: ModelDimensions, dtype) -> dict:
    """Lay out openai-named tensors as the JAX parameter tree (numpy leaves, on the host)."""
    expected = expected_shapes(dims)
    seen: set[str] = set()
    tree: dict = {}
    layers = {"encoder": dims.n_audio_layer, "decoder": dims.n_text_layer}
    for name, tensor in tensors:
        if name not in expected:
            if name in ("decoder.mask", "alignment_heads"):
                continue
            raise CheckpointError(f"checkpoint has parameter {name!r}, which a Whisper model of {dims} does not")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"parameter {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]} for {dims}")
        path, layer, layout = _tree_path(name)
        value = {"linear": lambda t: t.T if t.ndim == 2 else t, "conv": lambda t: t.permute(2, 1, 0), "copy": lambda t: t}[layout](tensor)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if layer is None:
            node[path[-1]] = np.ascontiguousarray(_to_numpy(value, dtype))
        else:
            if path[-1] not in node:
                node[path[-1]] = np.empty((layers[path[0]], *value.shape), dtype)
            node[path[-1]][layer] = _to_numpy(value, dtype)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    # The decoder runs its layers unrolled, each from its own buffers (see model.py).
    stacked = tree["decoder"]["blocks"]
    tree["decoder"]["blocks"] = [_map_leaves(stacked, lambda a: a[i]) for i in range(dims.n_text_layer)]
    return tree


def _map_leaves(tree: dict, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


@dataclass
class Checkpoint:
    """Where a model's files are, and its dimensions."""
    directory: Path  # tokenizer, generation and preprocessor configs live here
    dims: ModelDimensions
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # openai-named tensors, read lazily
    config: dict


def _safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read safetensors file {f}: {e}") from e


def _torch_files(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        yield from _torch_load(f).items()


def _torch_load(f: Path) -> dict:
    try:
        return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:  # legacy (non-zip) serialisation cannot be memory-mapped
            return torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read PyTorch checkpoint {f}: {e}") from e
    except Exception as e:
        raise CheckpointError(f"cannot read PyTorch checkpoint {f}: {e}") from e


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, index, generation config), refused naming the file when
    it is not a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); is the download complete?") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _hf_weight_files(directory: Path) -> tuple[list[Path], Callable]:
    for index_name, reader in (("model.safetensors.index.json", _safetensors), ("pytorch_model.bin.index.json", _torch_files)):
        single = directory / index_name.replace(".index.json", "")
        if single.exists():
            return [single], reader
        index = directory / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map naming the shard of each tensor")
            return [directory / f for f in sorted(set(weight_map.values()))], reader
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, pytorch_model.bin or a sharded index of either")


def _hf_checkpoint(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face Whisper model directory?")
    config = read_json(config_path)
    if config.get("model_type") != "whisper":
        raise CheckpointError(f"{config_path} describes model_type {config.get('model_type')!r}, not 'whisper'")
    files, reader = _hf_weight_files(directory)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in reader(files):
            openai_name = hf_to_openai_name(name)
            if openai_name is not None:
                yield openai_name, t

    return Checkpoint(directory, ModelDimensions.from_hf_config(config), tensors, config)


def _openai_checkpoint(path: Path) -> Checkpoint:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an OpenAI Whisper checkpoint (expected 'dims' and 'model_state_dict')")
    dims = ModelDimensions(**ckpt["dims"])
    state = ckpt["model_state_dict"]
    return Checkpoint(path.parent, dims, lambda: iter(state.items()), {})


def resolve(model: str) -> Checkpoint:
    """A local directory, a local OpenAI `.pt` file, or a Hugging Face hub id."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix in (".safetensors", ".bin", ".json"):
        raise CheckpointError(f"{path} is one file of a Hugging Face model: give the directory that holds it "
                              "(with config.json, the weights and the tokenizer)")
    if path.is_file():
        return _openai_checkpoint(path)
    if path.is_dir():
        return _hf_checkpoint(path)
    if model.startswith((".", "/", "~")) or model.endswith(".pt"):
        raise CheckpointError(f"model path {model!r} does not exist")
    return _hf_checkpoint(_download(model))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE  # where HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME put it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = list(HF_SIDE_FILES) + ["model.safetensors*", "model-*.safetensors"]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any((local / f).exists() for f in HF_WEIGHT_FILES):  # older repositories have only .bin
            local = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin*"]))
        return local
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"model {repo_id!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) "
            "and the hub cannot be reached (HF_HUB_OFFLINE set, or no network). Download it where there is a network "
            "(huggingface-cli download " + repo_id + ") or pass --model /path/to/a/local/model/directory"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"cannot fetch model {repo_id!r} from the Hugging Face hub: {e}") from e
