"""Peer token-reduction methods, one module each (as kvpress's presses), expressed in Skip-Vision's own config so
they run on every supported family through the same entry points (``skipvision.convert``, the processor count,
the FLOPs model, the benchmark):

- ``visionzip``: dominant tokens by CLS attention plus contextual tokens merged from the rest, before the LLM;
- ``tome``: ToMe before the LLM, every visual token merged down to the budget;
- ``token_drop``: keep a random or a raster-order subset, drop the rest (the floors);
- ``fastervlm``: the ``keep`` tokens with the largest CLS attention in the tower's feature layer, before the
  projector (``tower_reduction``);
- ``fastv``: drop visual tokens inside the language model once, after layer K-1, by the last instruction token's
  attention;
- ``pyramid_drop``: the same at the end of each of several stages, by a ratio each time.

Every token that is kept runs full decoder blocks and stays in the cache (no Skip-FFN, no Skip KV-cache): these
methods shorten the sequence instead (``fastv`` and ``pyramid_drop`` through ``SkipVisionConfig.llm_drop``).
"""

from __future__ import annotations

from .fastervlm import fastervlm
from .fastv import fastv
from .pyramid_drop import pyramid_drop
from .token_drop import token_drop
from .tome import tome
from .visionzip import visionzip

PEERS = {
    "visionzip": visionzip,
    "tome": tome,
    "token_drop": token_drop,
    "fastv": fastv,
    "fastervlm": fastervlm,
    "pyramid_drop": pyramid_drop,
}

__all__ = ["PEERS", "fastervlm", "fastv", "pyramid_drop", "token_drop", "tome", "visionzip"]
