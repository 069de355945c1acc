"""Several local devices: the batch is split across a mesh, results do not change, and the warm-up
compiles every program serving runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
from audio_signals import speechlike
from compile_events import compiles
from service.engine import Engine, TranscribeOptions
engine = Engine.load({model!r}, max_batch=4)
engine.warmup()
# The encoder's work on each device for its fewest windows, which a mesh splits over its devices.
n = engine.programs.encode_sizes[0]
call = engine.programs._encode_call(np.zeros((n, engine.dims.n_mels, 3000), np.float32), None)
cost = call.program.lower(*call.args, **call.static).compile().cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
audio = speechlike(45.0, seed=3)
with compiles() as compiled:
    greedy = engine.transcribe(audio, TranscribeOptions(language="en", temperatures=(0.0,), word_timestamps=True))
    beams = engine.transcribe(audio, TranscribeOptions(language="en", temperatures=(0.0,), beam_size=2))
    jax.jit(lambda x: x + 1)(0.0)  # the listener hears compiles
print(json.dumps({{"devices": jax.local_device_count(), "mesh": engine.programs.mesh is not None,
                  "greedy": [s.tokens for s in greedy.segments], "beams": [s.tokens for s in beams.segments],
                  "compiled": compiled, "encode": [n, cost["flops"]]}}))
engine.close()
"""


def run(model_dir, devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DRAGOMAN_COMPILATION_CACHE": "off",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    code = SCRIPT.format(tests=str(ROOT / "tests"), model=str(model_dir))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_batch_split_over_four_devices_gives_the_same_tokens(tiny_model):
    one, four = run(tiny_model[0], 1), run(tiny_model[0], 4)
    assert (one["devices"], one["mesh"]) == (1, False)
    assert (four["devices"], four["mesh"]) == (4, True)
    assert four["greedy"] == one["greedy"] and any(four["greedy"])
    assert four["beams"] == one["beams"]
    # Each device encodes a window of its own: four windows on four devices, each at one's cost.
    assert one["encode"][0] == 1 and four["encode"][0] == 4
    assert four["encode"][1] == pytest.approx(one["encode"][1], rel=0.05)
    # The warm-up compiled every program for the mesh's placements as for one device's, and
    # nothing else compiles while serving: not even the glue between the programs.
    for result in (one, four):
        assert result["compiled"] == ["jit(<lambda>)"], result["compiled"]
