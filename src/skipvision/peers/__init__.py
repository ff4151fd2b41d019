"""Peer token-reduction methods, one module each (as kvpress's presses), expressed in Skip-Vision's own config so
they run on every supported family through the same entry points (``skipvision.convert``, the processor count,
the FLOPs model, the benchmark):

- ``visionzip``: dominant tokens by CLS attention plus contextual tokens merged from the rest, before the LLM;
- ``tome``: ToMe before the LLM, every visual token merged down to the budget;
- ``token_drop``: keep a random or a raster-order subset, drop the rest (the floors).

Every reduced token runs full decoder blocks and stays in the cache (no Skip-FFN, no Skip KV-cache): these methods
shorten the sequence instead. The methods that drop tokens inside the language model (FastV, PyramidDrop) are not
here yet.
"""

from __future__ import annotations

from .token_drop import token_drop
from .tome import tome
from .visionzip import visionzip

PEERS = {"visionzip": visionzip, "tome": tome, "token_drop": token_drop}

__all__ = ["PEERS", "token_drop", "tome", "visionzip"]
