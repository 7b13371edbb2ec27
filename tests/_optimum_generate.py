"""Greedy generate() of an output folder through optimum's ORTModelForCausalLM, in optimum's own venv.

    python _optimum_generate.py OUT TOKEN_IDS NEW_TOKENS   (TOKEN_IDS comma-separated; prints JSON)

optimum-onnx pins transformers 4.x, so this runs in a separate venv (docs/deploy.md, "optimum"); the package
comes from the checkout on PYTHONPATH: ``tt.session_options`` needs only onnxruntime there.
"""

from __future__ import annotations

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM

import topthetaexport as tt

out, token_ids, new_tokens = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(
    out, session_options=tt.session_options(threads=1, library=out), provider="CPUExecutionProvider"
)
ids = torch.tensor([token_ids])
generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)  # stops early at eos
print(json.dumps({"tokens": generated[0, ids.shape[1] :].tolist()}))
