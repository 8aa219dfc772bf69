"""Tensor parallel: the steered plugin on TP 3 gives TP 1's greedy tokens (SmolLM2 has 9 attention
heads and 3 KV heads, so TP 2 is refused by vLLM; on 2 cores TP 3 runs with
``VLLM_CPU_OMP_THREADS_BIND="0|1|0"``). Every rank holds the SAE (``additional_config``) and edits
its full-width copy of the residual stream; the plan travels in the spec string.

Opt-in (``SAESTEER_TEST_TP=1``, about 90 s on 2 cores: three worker processes load the model):
``make test-vllm VLLM_ARGS="tests/vllm/test_vllm_tp.py"`` with it set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
if os.environ.get("SAESTEER_TEST_TP") != "1":
    pytest.skip("tensor-parallel check is opt-in: SAESTEER_TEST_TP=1", allow_module_level=True)

SAE_ID = "smollm2-135m-res10-k32"
SPECS = [[], [{"op": "clamp", "sae": SAE_ID, "latent": 3656, "value": 12.0}],
         [{"op": "add", "sae": SAE_ID, "latent": 3656, "value": 8.0, "positions": "prompt"},
          {"op": "ablate", "sae": SAE_ID, "latent": 100}]]

CHILD = r'''
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm
from transformers import AutoTokenizer
from saesteer.server.config import ServerSettings, python_sae_spec
from saesteer.steering.generate import render_prompt
from saesteer.steering.vllm_engine import plugin
from saesteer.steering.vllm_engine.engine import vllm_engine_args
from saesteer.steering.vllm_engine.export import vllm_model_dir

tp, specs = int(sys.argv[1]), json.loads(sys.argv[2])
model = vllm_model_dir(ServerSettings())
plugin.register()
llm = vllm.LLM(**vllm_engine_args(model, [python_sae_spec()], max_model_len=512, max_num_seqs=4,
                                  extra={"tensor_parallel_size": tp}), seed=0)
tok = AutoTokenizer.from_pretrained(model)
ids = render_prompt(tok, messages=[{"role": "user", "content": "Tell me something interesting."}])
reqs = [plugin.steer_request(ids, s) for s in specs]
outs = llm.generate([p for p, _ in reqs], [vllm.SamplingParams(temperature=0.0, max_tokens=24, extra_args=x)
                                           for _, x in reqs], use_tqdm=False)
print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
'''


def _tokens(tp: int) -> list[list[int]]:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1|0" if tp == 3 else "all"}
    if tp == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    p = subprocess.run([sys.executable, "-c", CHILD, str(tp), json.dumps(SPECS)], capture_output=True, text=True,
                       env=env, timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("TOKENS ")), None)
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[7:])


def test_tensor_parallel_3_gives_tensor_parallel_1s_steered_tokens():
    one, three = _tokens(1), _tokens(3)
    assert three == one
    assert one[0] != one[1] and one[1] != one[2]  # the specs steer
