"""Every name the graphs use: the op's identity, initializer and metadata names, graph I/O names.

One place, so that the rewrite rules, the graph variants, the sessions and the inspector agree.
"""

from __future__ import annotations

import re

DOMAIN = "ai.toptheta"
OP_TYPE = "TopThetaAttention"
OP_VERSION = 1

META_PREFIX = "toptheta."  # model metadata keys written by export and rewrite

# Initializers the rewrite adds per layer.
THETA_PREFIX = "toptheta.theta."
SDC_PREFIX = "toptheta.sdc."
KEPT_PREFIX = "toptheta.kept."
THETA_RE = re.compile(r"toptheta\.theta\.(\d+)$")
MASK_NAME = "toptheta.key_padding_mask"  # the bool [B, Ktot] mask every rewritten layer shares
IO_PREFIX = "toptheta.io."  # per-layer operator inputs/outputs exposed for parity checks
LAYER_META = "toptheta.layer"  # node metadata: the layer a TopThetaAttention node belongs to
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # node metadata written by torch.onnx: the module path
ATTENTION_NODE_PREFIX = "toptheta/attention."
MASK_NODE = "toptheta/key_padding_mask"
TOPK_NODE_PREFIX = "toptheta/topk."

# Graph inputs and outputs of an exported model (docs/graph.md).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
LAST_HIDDEN_STATE = "last_hidden_state"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
KV_KINDS = ("key", "value")
PAST_SEQUENCE_LENGTH = "past_sequence_length"  # shared-buffer KV cache: int32 [batch], valid rows per batch row
MAX_SEQUENCE = "max_sequence"  # shared-buffer KV cache: the symbolic capacity dimension of the buffers
KV_CACHE_META = META_PREFIX + "kv_cache"  # "concat" | "shared" (docs/graph.md)
KV_CACHE_FORMS = ("concat", "shared")
NEXT_TOKEN = "toptheta.next_token"  # int64 [batch, 1]: greedy next token (onnx/decoding.py GreedyNextToken)
THETA_INPUT = "toptheta.theta"  # float32 [Hq, R]: θ of every layer as one graph input (onnx/decoding.py ThetaInput)
# Shadow K of the shared cache (onnx/kv_cache.py AddShadowK, docs/op.md "Shadow K"): past_shadow.{i}.key (uint8 codes
# [batch, Hkv, max_sequence, D/2]) and .range (the cache's type, [batch, Hkv, shadow_blocks, 2, D]), and present_*.
PAST_SHADOW_PREFIX = "past_shadow."
PRESENT_SHADOW_PREFIX = "present_shadow."
SHADOW_KINDS = ("key", "range")
PAST_SHADOW_RE = re.compile(r"^past_shadow\.(\d+)\.(key|range)$")
SHADOW_BLOCKS = "shadow_blocks"  # ceil(max_sequence / 64)
SHADOW_META = META_PREFIX + "shadow_k"
GENAI_INPUTS_META = (
    META_PREFIX + "genai_inputs"
)  # "1": the shared form with genai's inputs (kv_cache.GenaiSharedInputs)
GENAI_MODEL = "model.genai.onnx"  # that graph, beside model.onnx and reading its external data


def kv_cache_form(input_names) -> str | None:
    """The KV-cache form of a graph from its input names: ``shared`` (it has ``past_sequence_length``),
    ``concat`` (``past_key_values.*`` only) or None (no cache)."""
    input_names = set(input_names)
    if PAST_SEQUENCE_LENGTH in input_names:
        return "shared"
    return "concat" if any(PAST_RE.match(n or "") for n in input_names) else None


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def past_shadow_name(layer: int, kind: str) -> str:
    return f"{PAST_SHADOW_PREFIX}{layer}.{kind}"


def present_shadow_name(layer: int, kind: str) -> str:
    return f"{PRESENT_SHADOW_PREFIX}{layer}.{kind}"


def theta_name(layer: int) -> str:
    return f"{THETA_PREFIX}{layer}"


def sdc_name(layer: int) -> str:
    return f"{SDC_PREFIX}{layer}"


def kept_name(layer: int) -> str:
    return f"{KEPT_PREFIX}{layer}"


def io_name(layer: int, slot: str) -> str:
    """``toptheta.io.{layer}.{slot}``, slot one of q, k, v, mask, y."""
    return f"{IO_PREFIX}{layer}.{slot}"


def layer_of_theta(name: str) -> int | None:
    """The layer of a ``toptheta.theta.{layer}`` initializer name, None for any other name."""
    m = THETA_RE.search(name)
    return int(m.group(1)) if m else None
