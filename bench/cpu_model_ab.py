"""Whole-model forward of an exported OUT/model.onnx (one window, empty cache) with two builds of the library,
calls interleaved: the before/after of a kernel change at model level, free of the PyTorch parts of `validate`.

  python bench/cpu_model_ab.py OUT/model.onnx BEFORE.so AFTER.so THREADS(0 = default) TOKENS ROUNDS
"""

import sys
import time

import numpy as np
import onnxruntime as ort

model = sys.argv[1]
libs = {"before": sys.argv[2], "after": sys.argv[3]}
threads, S, reps = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
sess = {}
for name, lib in libs.items():
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = threads
    sess[name] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {}
for i in sess["after"].get_inputs():
    if i.name == "input_ids":
        feeds[i.name] = rng.integers(0, 1000, (1, S)).astype(np.int64)
    elif i.name == "attention_mask":
        feeds[i.name] = np.ones((1, S), np.int64)
    elif i.name == "position_ids":
        feeds[i.name] = np.arange(S, dtype=np.int64)[None]
    else:  # past_key_values.*: empty cache [1, Hkv, 0, D]
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
outs = {n: s.run(None, feeds)[0] for n, s in sess.items()}
print("max |logits after - before|", float(np.abs(outs["after"] - outs["before"]).max()))
ts = {n: [] for n in sess}
for r in range(reps):
    for n in list(sess) if r % 2 == 0 else list(sess)[::-1]:
        t = time.perf_counter()
        sess[n].run(None, feeds)
        ts[n].append(time.perf_counter() - t)
for n, v in ts.items():
    print(n, f"median s {np.median(v):.3f}  min s {min(v):.3f}")
