"""Each image's token sequence as it enters the language model: ``[R, sigma_R, S, sigma_S]``.

Model-agnostic: a family hands over each image's visual tokens (tower + projector output), how many of the
leading ones may be retained, and optional selection scores over those; this module splits, merges and adds the
summary tokens (method.md 3.4b). Images with the same token count are processed as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SkipVisionConfig
from .merge import bipartite_merge
from .selection import split_tokens
from .summary import SummaryScorer


@dataclass
class ImageTokens:
    """One image's visual tokens ``(V, d)``; the first ``eligible`` may be retained, ranked by ``scores``."""

    tokens: torch.Tensor
    eligible: int
    scores: torch.Tensor | None = None


@dataclass
class ImageSequence:
    """One image's placeholder embeddings ``(n, d)`` and which of them are skipped ``(n,)``."""

    embeds: torch.Tensor
    skipped: torch.Tensor


def assemble(images: list[ImageTokens], config: SkipVisionConfig, scorer: SummaryScorer | None) -> list[ImageSequence]:
    """The placeholder sequence of every image, in input order."""
    out: list[ImageSequence | None] = [None] * len(images)
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for index, image in enumerate(images):
        key = (image.tokens.shape[0], image.eligible, image.scores is not None)
        groups.setdefault(key, []).append(index)
    for (visual, eligible, scored), members in groups.items():
        tokens = torch.stack([images[i].tokens for i in members])
        scores = torch.stack([images[i].scores for i in members]) if scored else None
        layout = config.image_layout(visual)
        if layout.native:
            sequences = tokens
        else:
            retained, candidates = split_tokens(tokens[:, :eligible], layout.retained, scores)
            candidates = torch.cat([candidates, tokens[:, eligible:]], dim=1)
            if candidates.shape[1] > layout.skipped:
                if config.merge != "tome":
                    raise ValueError(
                        f"an image has {candidates.shape[1]} skip candidates but merge='none' and num_skipped="
                        f"{config.num_skipped}; use merge='tome' or a larger num_skipped"
                    )
                skipped = bipartite_merge(candidates, layout.skipped)
            else:
                skipped = candidates
            if layout.summary_tokens:
                if scorer is None:
                    raise ValueError("summary_tokens=True but the model has no summary scorer")
                parts = [retained, scorer(retained), skipped, scorer(skipped)]
            else:
                parts = [retained, skipped]
            sequences = torch.cat(parts, dim=1)
        flags = layout.skipped_flags(tokens.device)
        for row, index in enumerate(members):
            out[index] = ImageSequence(sequences[row], flags)
    return out  # type: ignore[return-value]
