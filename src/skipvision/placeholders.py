"""Where each image's tokens sit in ``input_ids`` (the input contract) and which of them are skipped.

Image features are scattered into placeholders in row-major order (as HF's ``masked_scatter`` does), so image k
occupies the k-th run of its length among all placeholders; nothing depends on offsets or padding side.
"""

from __future__ import annotations

import bisect
import itertools

import torch

from .config import SkipVisionConfig


def image_token_counts(per_sample: list[int], span: int, config: SkipVisionConfig) -> list[int]:
    """Images per sample for a fixed per-image count of ``span`` placeholders, from each sample's placeholder count
    (read once to the host), checking whole image spans."""
    for b, count in enumerate(per_sample):
        if count % span:
            raise ValueError(
                f"sample {b} has {count} image placeholder tokens, which is not a multiple of "
                f"{span}, an image's placeholder count (N_r={config.num_retained}, N_s={config.num_skipped}"
                f"{' + 2 summary tokens' if config.summary_tokens else ''}); expand each <image> to exactly {span} "
                "tokens (see skipvision.configure_processor)"
            )
    return [count // span for count in per_sample]


def check_image_spans(is_image: torch.Tensor, counts: list[int], per_sample: list[int]) -> torch.Tensor:
    """Raise ``ValueError`` unless the placeholders (``(batch, seq)`` mask; ``per_sample`` their count in each
    sample) hold exactly the images of ``counts``, each within one sample.

    Returns a device flag, true when some image's placeholders are not one unbroken run: the host reads it with
    the prefill's other counts (:func:`raise_for_split_images` then names the image), so this check adds no wait.
    """
    total = sum(per_sample)
    if total != sum(counts):
        raise ValueError(
            f"input_ids hold {total} image placeholder tokens but the {len(counts)} image(s) given need "
            f"{sum(counts)} ({', '.join(map(str, counts[:8]))}{' ...' if len(counts) > 8 else ''} per image); "
            "expand each <image> with a processor set up by skipvision.configure_processor / load_processor"
        )
    boundaries = set(itertools.accumulate(counts, initial=0))
    for b, seen in enumerate(itertools.accumulate(per_sample)):
        if seen not in boundaries:
            raise ValueError(
                f"sample {b} ends inside an image: its {per_sample[b]} placeholder tokens do not cover whole images "
                f"(per-image counts {counts[:8]})"
            )
    # a run of placeholders may only start on an image boundary (its rank among all placeholders)
    rank, starts = placeholder_ranks(is_image), run_starts(is_image)
    if len(set(counts)) <= 1:
        on_boundary = rank % max(counts[0] if counts else 1, 1) == 0
    else:
        table = torch.zeros(total + 1, dtype=torch.bool, device=is_image.device)
        table[host_to_device(sorted(boundaries), is_image.device)] = True
        on_boundary = table[rank.clamp_min(0)]
    return (starts & ~on_boundary).any()


def raise_for_split_images(is_image: torch.Tensor, counts: list[int]) -> None:
    """Name the first image whose placeholders are split by other tokens (the slow path of a failed check)."""
    boundaries = list(itertools.accumulate(counts, initial=0))
    rank, starts = placeholder_ranks(is_image).cpu(), run_starts(is_image).cpu()
    inside = [r for r in rank[starts].tolist() if r not in boundaries]
    image = bisect.bisect_right(boundaries, inside[0]) - 1 if inside else 0
    raise ValueError(
        f"image {image}'s placeholder tokens are split by other tokens; each image's placeholders must be one "
        "unbroken run (as the processor writes them)"
    )


def placeholder_ranks(is_image: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)``: each placeholder's rank among all placeholders, in row-major order (image features fill
    them in that order); -1 before the first."""
    return is_image.flatten().cumsum(0).view_as(is_image) - 1


def run_starts(is_image: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)``: the placeholders that start a run (the token before them, in the same sample, is not one)."""
    return is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0))


def host_to_device(values: list, device: torch.device) -> torch.Tensor:
    """A small long tensor from host values (nested lists), copied without making the host wait for the device
    (pinned memory, non-blocking; a plain copy to a GPU synchronises the stream)."""
    tensor = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def skipped_token_mask(
    input_ids: torch.Tensor, image_token_id: int, config: SkipVisionConfig, counts: list[int] | None = None
) -> torch.Tensor:
    """Boolean ``(batch, seq)`` mask of the skipped tokens S of every image in ``input_ids``.

    ``counts`` are the per-image visual token counts V (default: every image has ``config.num_image_tokens``
    placeholders, a fixed-size tower with at least N_s candidates).
    """
    is_image = input_ids == image_token_id
    if counts is None:
        offset = placeholder_ranks(is_image) % config.num_image_tokens
        start, end = config.skipped_span
        return is_image & (offset >= start) & (offset < end)
    flags = [config.image_layout(visual).skipped_flags(input_ids.device) for visual in counts]
    return scatter_image_flags(is_image, torch.cat(flags))


def scatter_image_flags(is_image: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Place per-placeholder ``flags`` (row-major order of the placeholders) into a ``(batch, seq)`` mask."""
    # a gather by each placeholder's rank, not boolean indexing: no output shape depends on the data, so the host
    # never waits for the device, and a count that does not match (checked by the caller) cannot index out of range
    if flags.numel() == 0:
        return torch.zeros_like(is_image)
    return is_image & flags[placeholder_ranks(is_image).clamp(0, flags.numel() - 1)]


def placeholder_runs(is_image: torch.Tensor) -> list[int]:
    """Lengths of the unbroken runs of placeholders (row-major; a run never spans two samples). The mask is read to
    the host once."""
    counts: list[int] = []
    for row in is_image.cpu().tolist():
        run = 0
        for flag in [*row, False]:
            if flag:
                run += 1
            elif run:
                counts.append(run)
                run = 0
    return counts
