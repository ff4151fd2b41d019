"""Where each image's tokens sit in ``input_ids`` (the input contract): ``[R, sigma_R, S, sigma_S]`` per image."""

from __future__ import annotations

import torch

from .config import SkipVisionConfig


def image_token_counts(input_ids: torch.Tensor, image_token_id: int, config: SkipVisionConfig) -> torch.Tensor:
    """Images per sample, checking that each sample holds whole image spans. Returns ``(batch,)``."""
    per_sample = (input_ids == image_token_id).sum(dim=1)
    span = config.num_image_tokens
    bad = (per_sample % span).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(
            f"sample {b} has {int(per_sample[b])} image placeholder tokens, which is not a multiple of "
            f"{span} = num_image_tokens(config) (N_r={config.num_retained} + N_s={config.num_skipped}"
            f"{' + 2 summary tokens' if config.summary_tokens else ''}); expand each <image> to exactly {span} tokens "
            "(see skipvision.configure_processor)"
        )
    return per_sample // span


def skipped_token_mask(input_ids: torch.Tensor, image_token_id: int, config: SkipVisionConfig) -> torch.Tensor:
    """Boolean ``(batch, seq)`` mask of the skipped tokens S of every image in ``input_ids``.

    Images are counted in row-major order, the order in which image features are scattered into placeholders,
    so adjacent images and any padding side work without offsets.
    """
    is_image = input_ids == image_token_id
    rank = is_image.flatten().cumsum(0).view_as(input_ids) - 1
    offset = rank % config.num_image_tokens
    start, end = config.skipped_span
    return is_image & (offset >= start) & (offset < end)
