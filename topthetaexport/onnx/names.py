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

# Graph inputs and outputs of an exported model (docs/graph.md).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
LAST_HIDDEN_STATE = "last_hidden_state"
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def theta_name(layer: int) -> str:
    return f"{THETA_PREFIX}{layer}"


def sdc_name(layer: int) -> str:
    return f"{SDC_PREFIX}{layer}"


def kept_name(layer: int) -> str:
    return f"{KEPT_PREFIX}{layer}"
