"""Peer token-reduction methods, one module each (as kvpress's presses), expressed in Skip-Vision's own config so
they run on every supported family through the same entry points (``skipvision.convert``, the processor count,
the FLOPs model, the benchmark):

- ``visionzip``: CLS and dominant tokens by CLS attention plus contextual tokens merged from the rest by key
  similarity, before the projector (``tower_reduction``);
- ``tome``: ToMe inside the vision tower, as its official code runs it (bipartite soft matching on each layer's
  keys, size-weighted merge and proportional attention in every layer up to the feature layer), down to the budget;
- ``tome_after_projector``: ToMe's matching and size-weighted merge applied in rounds to the projector's output, as
  token-merging baselines for VLMs do (not ToMe's host placement);
- ``token_drop``: keep a random or a raster-order subset, drop the rest (the floors);
- ``fastervlm``: the ``keep`` tokens with the largest CLS attention in the tower's feature layer, before the
  projector (``tower_reduction``);
- ``fastv``: drop visual tokens inside the language model once, after layer K-1, by the last instruction token's
  attention;
- ``pyramid_drop``: the same at the end of each of several stages, by a ratio each time;
- ``sparsevlm``: SparseVLM v1.5 inside the language model (batch 1, inference): after three layers, the visual
  tokens least attended by text raters picked from the input embeddings leave, and DPC-KNN clusters of the
  best-scored dropped ones join the sequence;
- ``prumerge`` / ``prumerge_plus``: LLaVA-PruMerge(+) on its fixed-ratio path, kept tokens by the next layer's CLS
  attention (PruMerge+: plus evenly spaced ones), each merged with its key neighbours, and one token merging the
  pruned ones, before the projector (``tower_reduction``).

Every token that is kept runs full decoder blocks and stays in the cache (no Skip-FFN, no Skip KV-cache): these
methods shorten the sequence instead (``fastv``, ``pyramid_drop`` and ``sparsevlm`` through
``SkipVisionConfig.llm_drop``).
"""

from __future__ import annotations

from .fastervlm import fastervlm
from .fastv import fastv
from .prumerge import prumerge, prumerge_plus
from .pyramid_drop import pyramid_drop
from .sparsevlm import sparsevlm
from .token_drop import token_drop
from .tome import tome, tome_after_projector
from .visionzip import visionzip

PEERS = {
    "visionzip": visionzip,
    "tome": tome,
    "tome_after_projector": tome_after_projector,
    "token_drop": token_drop,
    "fastv": fastv,
    "fastervlm": fastervlm,
    "pyramid_drop": pyramid_drop,
    "sparsevlm": sparsevlm,
    "prumerge": prumerge,
    "prumerge_plus": prumerge_plus,
}

__all__ = [
    "PEERS",
    "fastervlm",
    "fastv",
    "prumerge",
    "prumerge_plus",
    "pyramid_drop",
    "sparsevlm",
    "token_drop",
    "tome",
    "tome_after_projector",
    "visionzip",
]
