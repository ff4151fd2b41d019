"""Where each image's tokens sit in ``input_ids`` (the input contract) and which of them are skipped.

Image features are scattered into placeholders in row-major order (as HF's ``masked_scatter`` does), so image k
occupies the k-th run of its length among all placeholders; nothing depends on offsets or padding side.
"""

from __future__ import annotations

import torch

from .config import SkipVisionConfig


def image_token_counts(is_image: torch.Tensor, span: int, config: SkipVisionConfig) -> torch.Tensor:
    """Images per sample for a fixed per-image count of ``span`` placeholders, from the ``(batch, seq)``
    placeholder mask, checking whole image spans. Returns ``(batch,)``."""
    per_sample = is_image.sum(dim=1)
    bad = (per_sample % span).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(
            f"sample {b} has {int(per_sample[b])} image placeholder tokens, which is not a multiple of "
            f"{span}, an image's placeholder count (N_r={config.num_retained}, N_s={config.num_skipped}"
            f"{' + 2 summary tokens' if config.summary_tokens else ''}); expand each <image> to exactly {span} tokens "
            "(see skipvision.configure_processor)"
        )
    return per_sample // span


def check_image_spans(is_image: torch.Tensor, counts: list[int]) -> None:
    """Raise ``ValueError`` unless the placeholders (``(batch, seq)`` mask) hold exactly the images of ``counts``,
    each within one sample."""
    per_sample = is_image.sum(dim=1).tolist()
    total = sum(per_sample)
    if total != sum(counts):
        raise ValueError(
            f"input_ids hold {total} image placeholder tokens but the {len(counts)} image(s) given need "
            f"{sum(counts)} ({', '.join(map(str, counts[:8]))}{' ...' if len(counts) > 8 else ''} per image); "
            "expand each <image> with a processor set up by skipvision.configure_processor / load_processor"
        )
    boundaries = set(torch.tensor([0, *counts]).cumsum(0).tolist())
    seen = 0
    for b, n in enumerate(per_sample):
        seen += n
        if seen not in boundaries:
            raise ValueError(
                f"sample {b} ends inside an image: its {n} placeholder tokens do not cover whole images "
                f"(per-image counts {counts[:8]})"
            )
    # each image's placeholders must be one unbroken run: a break may only fall on an image boundary
    flat = is_image.flatten().nonzero().squeeze(1)
    breaks = ((flat[1:] - flat[:-1]) != 1).nonzero().squeeze(1) + 1
    inside = [int(i) for i in breaks.tolist() if int(i) not in boundaries]
    if inside:
        image = int(torch.searchsorted(torch.tensor(sorted(boundaries)), inside[0], right=True)) - 1
        raise ValueError(
            f"image {image}'s placeholder tokens are split by other tokens; each image's placeholders must be one "
            "unbroken run (as the processor writes them)"
        )


def skipped_token_mask(
    input_ids: torch.Tensor, image_token_id: int, config: SkipVisionConfig, counts: list[int] | None = None
) -> torch.Tensor:
    """Boolean ``(batch, seq)`` mask of the skipped tokens S of every image in ``input_ids``.

    ``counts`` are the per-image visual token counts V (default: every image has ``config.num_image_tokens``
    placeholders, a fixed-size tower with at least N_s candidates).
    """
    is_image = input_ids == image_token_id
    if counts is None:
        rank = is_image.flatten().cumsum(0).view_as(input_ids) - 1
        offset = rank % config.num_image_tokens
        start, end = config.skipped_span
        return is_image & (offset >= start) & (offset < end)
    flags = [config.image_layout(visual).skipped_flags(input_ids.device) for visual in counts]
    return scatter_image_flags(is_image, torch.cat(flags))


def scatter_image_flags(is_image: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Place per-placeholder ``flags`` (row-major order of the placeholders) into a ``(batch, seq)`` mask."""
    mask = torch.zeros_like(is_image)
    mask[is_image] = flags
    return mask


def placeholder_runs(is_image: torch.Tensor) -> list[int]:
    """Lengths of the unbroken runs of placeholders (row-major; a run never spans two samples)."""
    counts: list[int] = []
    for row in is_image:
        flat = row.nonzero().squeeze(1)
        if flat.numel() == 0:
            continue
        breaks = ((flat[1:] - flat[:-1]) != 1).nonzero().squeeze(1) + 1
        edges = [0, *breaks.tolist(), flat.numel()]
        counts.extend(b - a for a, b in zip(edges[:-1], edges[1:]))
    return counts
