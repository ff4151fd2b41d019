"""Each image's token sequence as it enters the language model: ``[R, sigma_R, S, sigma_S]``.

Model-agnostic: a family hands over each image's visual tokens (tower + projector output), how many of the
leading ones may be retained, and optional selection scores over those (or the token grid a grid selection
needs); this module splits, merges and adds the summary tokens (method.md 3.4b). Images with the same token count
are processed as one batch. For every placeholder it also records which visual token it stands for (its
``source``), so families with spatial positions (M-RoPE) can place it, and it carries per-token extras (Qwen3-VL's
deepstack features) through the same split and merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SkipVisionConfig
from .merge import merge_plan
from .selection import selection_strategy
from .summary import SummaryScorer


@dataclass
class ImageTokens:
    """One image's visual tokens ``(V, d)``; the first ``eligible`` may be retained, ranked by ``scores``.

    ``grid``: the ``(t, h, w)`` raster grid of the eligible tokens, for grid selection and summary positions.
    ``extras``: per-token features ``(V, d_k)`` that follow the tokens through the split and merge.
    """

    tokens: torch.Tensor
    eligible: int
    scores: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    extras: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ImageSequence:
    """One image's placeholder embeddings ``(n, d)``, which of them are skipped ``(n,)``, and ``sources (n,)``:
    the visual token each placeholder stands for (retained: itself; merged: the token the others were merged
    into; summary: the image's centre token). ``extras``: the per-token extras, summary rows zero. ``visual``: the
    image's visual token count V."""

    embeds: torch.Tensor
    skipped: torch.Tensor
    sources: torch.Tensor | None = None
    extras: list[torch.Tensor] = field(default_factory=list)
    visual: int = 0  # the image's visual token count V (what the vanilla layout gives it)


def retained_indices(
    eligible: int, num_retained: int, scores: torch.Tensor | None, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R (n, N_r), rest (n, eligible - N_r))`` indices, both ascending: top-N_r by ``scores (n, eligible)``,
    or the first N_r without scores."""
    if scores is None or num_retained == eligible:
        index = torch.arange(eligible, device=device).expand(n, eligible)
        return index[:, :num_retained], index[:, num_retained:]
    top = scores.topk(num_retained, dim=-1).indices.sort(dim=-1).values
    keep = torch.zeros(n, eligible, dtype=torch.uint8, device=device)
    keep.scatter_(1, top, 1)
    # the rest in ascending order: a stable sort puts the unkept (0) first; a shape known in advance, unlike
    # nonzero's, so the host never waits for the device here
    return top, keep.argsort(dim=1, stable=True)[:, : eligible - num_retained]


def image_scores(image: ImageTokens, config: SkipVisionConfig) -> torch.Tensor | None:
    """The ranking of an image's eligible tokens: the family's scores, or the selection's own (grid, random)."""
    if image.scores is not None:
        return image.scores
    strategy = selection_strategy(config.selection)
    return strategy.tower_free_scores(image.eligible, image.grid, image.tokens.device)


def centre_index(grid: tuple[int, int, int] | None, eligible: int) -> int:
    """Raster index of the token at the centre of the first frame (the middle token without a grid)."""
    if grid is None:
        return eligible // 2
    _, h, w = grid
    return (h // 2) * w + w // 2


def assemble(images: list[ImageTokens], config: SkipVisionConfig, scorer: SummaryScorer | None) -> list[ImageSequence]:
    """The placeholder sequence of every image, in input order."""
    out: list[ImageSequence | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        scores = image_scores(image, config)
        key = (image.tokens.shape[0], image.eligible, image.grid, scores is not None, len(image.extras))
        groups.setdefault(key, []).append(index)
    for (visual, eligible, grid, scored, _), members in groups.items():
        tokens = torch.stack([images[i].tokens for i in members])
        extras = [torch.stack([images[i].extras[k] for i in members]) for k in range(len(images[members[0]].extras))]
        scores = torch.stack([image_scores(images[i], config) for i in members]) if scored else None
        n, device = len(members), tokens.device
        layout = config.image_layout(visual, eligible)
        gather = lambda x, idx: x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        if layout.native or layout.in_place:
            sources = torch.arange(visual, device=device).expand(n, visual)
            parts, extra_parts = [tokens], [[x] for x in extras]
            flags = torch.ones(n, visual, dtype=torch.bool, device=device)
            if layout.in_place:
                retained, _ = retained_indices(eligible, layout.retained, scores, n, device)
                flags.scatter_(1, retained, False)
            else:
                flags.zero_()
        else:
            retained, rest = retained_indices(eligible, layout.retained, scores, n, device)
            candidates = torch.cat([rest, torch.arange(eligible, visual, device=device).expand(n, -1)], dim=1)
            candidate_tokens = gather(tokens, candidates)
            if config.merge == "drop":  # token pruning: the candidates leave the sequence
                merge = lambda x: x[:, :0]  # noqa: E731
                skipped_sources = candidates[:, :0]
            elif candidates.shape[1] > layout.skipped:
                if config.merge != "tome":
                    raise ValueError(
                        f"an image has {candidates.shape[1]} skip candidates but merge='none' and num_skipped="
                        f"{config.num_skipped}; use merge='tome' or a larger num_skipped"
                    )
                plan = merge_plan(candidate_tokens, layout.skipped)
                merge = plan.apply
                skipped_sources = candidates.gather(1, plan.destinations)
            else:
                merge = lambda x: x  # noqa: E731
                skipped_sources = candidates
            kept, skipped = gather(tokens, retained), merge(candidate_tokens)
            extra_parts = [[gather(x, retained), merge(gather(x, candidates))] for x in extras]
            centre = torch.full((n, 1), centre_index(grid, eligible), device=device)
            if layout.summary_tokens:
                if scorer is None:
                    raise ValueError("summary_tokens=True but the model has no summary scorer")
                parts = [kept, scorer(kept), skipped, scorer(skipped)]
                source_parts = [retained, centre, skipped_sources, centre]
                for chunks in extra_parts:  # summary tokens are new: no per-token extras
                    zero = chunks[0].new_zeros(n, 1, chunks[0].shape[-1])
                    chunks[:] = [chunks[0], zero, chunks[1], zero]
            else:
                parts, source_parts = [kept, skipped], [retained, skipped_sources]
            sources = torch.cat(source_parts, dim=1)
            flags = layout.skipped_flags(device).expand(n, -1)
        sequences = torch.cat(parts, dim=1)
        extra_sequences = [torch.cat(chunks, dim=1) for chunks in extra_parts]
        for row, index in enumerate(members):
            extra_rows = [x[row] for x in extra_sequences]
            out[index] = ImageSequence(sequences[row], flags[row], sources[row], extra_rows, visual)
    return out  # type: ignore[return-value]


def in_place_flags(
    counts: list[int], grids: list[tuple[int, int, int] | None], config: SkipVisionConfig, device: torch.device
) -> torch.Tensor:
    """Skipped flags of the in-place layout for images of ``counts`` tokens with token ``grids`` (row-major order
    of all their placeholders): every token not retained by the selection. Needs no features (grid, random or
    position selection)."""
    strategy = selection_strategy(config.selection)
    if strategy.needs_cls:
        raise ValueError(
            "the in-place layout selects before the tower runs, so it takes selection='grid', 'random' or "
            f"'position', not {config.selection!r}"
        )
    blocks: dict[tuple, torch.Tensor] = {}  # images of one shape share their flags: computed once per shape
    for count, grid in set(zip(counts, grids)):
        retained = config.retained_count(count)
        scores = strategy.tower_free_scores(count, grid, device)
        keep, _ = retained_indices(count, retained, None if scores is None else scores[None], 1, device)
        blocks[count, grid] = torch.ones(count, dtype=torch.bool, device=device).index_fill_(0, keep[0], False)
    flags = [blocks[count, grid] for count, grid in zip(counts, grids)]
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool, device=device)
