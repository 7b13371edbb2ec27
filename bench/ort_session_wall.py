"""Cross-check of the onnxruntime decode timings of attention_bench.py with a plain host clock.

For onnxruntime's dense GroupQueryAttention and the Top-θ op (V rows 1/3), each in its own CUDA-EP session
with onnxruntime's CUDA graphs on (enable_cuda_graph=1, inputs bound once), times 50 synchronous Runs
(Run, then synchronize the session's stream) and prints the median of 5 such groups per Run. That is an
upper bound of the GPU time per Run (it includes the session's host overhead and the graph launch), but it
cannot undercount GPU work, unlike a kernel timer. The difference between two context lengths of the same
method is about the added GPU time, since the host overhead does not depend on the length.

Usage: python bench/ort_session_wall.py LIB  (needs onnxruntime-gpu)
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import DT, HKV, HQ, D, Ort, decode_scores, ort_gqa_model, ort_toptheta_model, theta_for_vrows  # noqa: E402


def main():
    lib = sys.argv[1]
    ort = Ort(lib)
    stream = torch.cuda.Stream()
    print("| B | L | method | sync wall per Run, µs (median of 5 x 50) |")
    print("|---|---|---|---|")
    for B, L in ((1, 16384), (1, 32768), (8, 16384), (8, 32768)):
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DT)
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
        v = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
        th = theta_for_vrows(decode_scores(q, k), 1 / 3)
        for name in ("ORT GroupQueryAttention (dense)", "Top-θ op, V rows 1/3 (union)"):
            so = ort.ort.SessionOptions()
            so.log_severity_level = 3
            gqa = name.startswith("ORT")
            if not gqa:
                so.register_custom_ops_library(lib)
            prov = [
                (
                    "CUDAExecutionProvider",
                    {"device_id": 0, "user_compute_stream": str(stream.cuda_stream), "enable_cuda_graph": "1"},
                )
            ]
            model = ort_gqa_model(True) if gqa else ort_toptheta_model()
            sess = ort.ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=prov)
            if gqa:
                kn = k[:, :, L - 1 :].transpose(1, 2).reshape(B, 1, HKV * D).contiguous()
                vn = v[:, :, L - 1 :].transpose(1, 2).reshape(B, 1, HKV * D).contiguous()
                o = torch.empty(B, 1, HQ * D, device="cuda", dtype=DT)
                seq = torch.full((B,), L - 1, device="cuda", dtype=torch.int32)
                keep = (kn, vn, o, seq)
                bd = Ort.bind(
                    sess,
                    {
                        "query": q.reshape(B, 1, HQ * D),
                        "key": kn,
                        "value": vn,
                        "past_key": k,
                        "past_value": v,
                        "seqlens_k": seq,
                    },
                    {"output": o, "present_key": k, "present_value": v},
                    {"total_sequence_length": np.array([L], np.int32)},
                )
            else:
                o = torch.empty(B, HQ, 1, D, device="cuda", dtype=DT)
                kept = torch.empty(B, HQ, 1, device="cuda", dtype=torch.int32)
                keep = (o, kept)
                bd = Ort.bind(sess, {"query": q, "key": k, "value": v, "thresholds": th}, {"output": o, "kept": kept})
            torch.cuda.synchronize()
            for _ in range(5):
                sess.run_with_iobinding(bd)
                stream.synchronize()
            walls = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(50):
                    sess.run_with_iobinding(bd)
                    stream.synchronize()
                walls.append((time.perf_counter() - t0) * 1e6 / 50)
            print(f"| {B} | {L} | {name} | {statistics.median(walls):.1f} |", flush=True)
            del sess, keep


if __name__ == "__main__":
    main()
