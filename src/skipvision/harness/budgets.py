"""Setting a method to a budget: the methods and regimes ``skipvision compare`` and the demo know, each method's knob
(``method_configs``), and the setting closest to a FLOPs budget (``match_budget``: a fraction of vanilla's
language-model prefill FLOPs, from the analytic FLOPs model) or to a visual-token budget (``match_tokens``: the
layer-average number of visual tokens per image that run full decoder blocks, ``visual_token_count``, as the paper's
comparison table counts them).
"""

from __future__ import annotations

from dataclasses import replace

from .. import flops as F
from ..config import SkipVisionConfig
from ..drop_schedule import visual_per_layer
from ..peers import (
    fastervlm,
    fastv,
    prumerge,
    prumerge_plus,
    pyramid_drop,
    sparsevlm,
    token_drop,
    tome,
    tome_after_projector,
    visionzip,
)
from ..peers.prumerge import prumerge_plus_budgets
from ..peers.tome import smallest_reachable

METHODS = (
    "skip_vision",
    "fastv",
    "pyramid_drop",
    "sparsevlm",
    "visionzip",
    "fastervlm",
    "prumerge",
    "prumerge_plus",
    "tome",
    "tome_after_projector",
    "drop_random",
    "drop_position",
)
#: how a method meets the model: applied to the vanilla-trained checkpoint, or trained with the method on
REGIMES = ("training-free", "fine-tuned")


# --- matching a method to a FLOPs budget ---------------------------------------------------------------------------
def method_configs(method: str, shape: F.ModelShape, preset_cfg: SkipVisionConfig) -> list[SkipVisionConfig]:
    """Every setting of ``method``'s knob on a model of this shape (the budget picks one)."""
    visual, layers = shape.visual_tokens, shape.text.layers
    fractions = [k / 40 for k in range(1, 41)]
    if method == "skip_vision":
        skipped = preset_cfg.num_skipped or 1
        return [replace(preset_cfg, num_retained=r) for r in range(1, visual - skipped + 1)]
    if method == "fastv":
        layer = max(1, round(2 * layers / 32))  # the paper's K = 2 of 32 layers, scaled to the model's depth
        return [fastv(f, layer=layer) for f in fractions]
    if method == "pyramid_drop":
        return [pyramid_drop(f, layers, stages=min(4, layers)) for f in fractions]
    if method == "sparsevlm":
        return [sparsevlm(n, layers, visual) for n in range(1, visual)]
    if method == "visionzip":  # the paper's 54 dominant : 10 contextual split (dominant counts CLS)
        return [visionzip(n - round(n * 10 / 64), round(n * 10 / 64)) for n in range(2, visual + 1)]
    if method == "fastervlm":
        return [fastervlm(n) for n in range(1, visual + 1)]
    if method == "prumerge":
        return [prumerge(n) for n in range(1, visual + 1)]
    if method == "prumerge_plus":
        return [prumerge_plus(n) for n in prumerge_plus_budgets(visual)]
    if method == "tome":  # inside the tower: the layers before the features (LLaVA: all but the last) can merge
        return [tome(n) for n in range(smallest_reachable(visual, shape.vision.layers - 1), visual + 1)]
    if method == "tome_after_projector":
        return [tome_after_projector(n) for n in range(1, visual + 1)]
    if method in ("drop_random", "drop_position"):
        return [token_drop(n, method.removeprefix("drop_")) for n in range(1, visual + 1)]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def prefill_ratio(shape: F.ModelShape, cfg: SkipVisionConfig, text_tokens: int = F.DEFAULT_TEXT_TOKENS) -> float:
    """Language-model prefill FLOPs of ``cfg`` over vanilla's, one image and ``text_tokens`` prompt tokens (the
    budget's unit)."""
    vanilla = F.report(shape, None, text_tokens)["prefill_total"]
    return F.report(shape, cfg, text_tokens)["prefill_total"] / vanilla


def match_budget(
    method: str,
    budget: float,
    shape: F.ModelShape,
    preset_cfg: SkipVisionConfig,
    text_tokens: int = F.DEFAULT_TEXT_TOKENS,
) -> tuple[SkipVisionConfig, float]:
    """The setting of ``method`` whose prefill FLOPs ratio is closest to ``budget`` (and that ratio)."""
    ratios = [(prefill_ratio(shape, c, text_tokens), c) for c in method_configs(method, shape, preset_cfg)]
    return min(((c, r) for r, c in ratios), key=lambda pair: abs(pair[1] - budget))


# --- matching a method to a visual-token budget ---------------------------------------------------------------------
def visual_tokens_per_layer(shape: F.ModelShape, cfg: SkipVisionConfig | None) -> list[int]:
    """Visual tokens of one image that run full decoder blocks (attention and FFN) in each decoder layer.

    * vanilla (and a native config): every visual token (and LLaVA-NeXT's row newlines) in every layer;
    * Skip-Vision: the N_r retained tokens in a layer where the skipped tokens bypass the FFN (every layer by
      default), retained + skipped in the others (``skip_layers``); the two summary tokens are not counted;
    * peers before the LLM (VisionZip, ToMe, token drop, FasterVLM): the tokens they hand the LLM, in every layer;
    * peers inside the LLM (FastV, PyramidDrop, ``llm_drop``): the visual tokens present in each layer's input,
      the FLOPs model's count (``drop_schedule.visual_per_layer``).
    """
    layers = shape.text.layers
    if cfg is None or cfg.native:
        drop, rule = (cfg.llm_drop, cfg.llm_drop_rule) if cfg is not None else ((), "fastv")
        return visual_per_layer(shape.native_tokens, drop, layers, rule)
    layout = cfg.image_layout(shape.visual_tokens, shape.eligible)
    if cfg.llm_drop:  # nothing is skipped beside an in-LLM drop (config.py refuses it)
        return visual_per_layer(layout.retained + layout.skipped, cfg.llm_drop, layers, cfg.llm_drop_rule)
    skips = lambda layer: cfg.skip_layers is None or layer in cfg.skip_layers  # noqa: E731
    return [layout.retained + (0 if skips(layer) else layout.skipped) for layer in range(layers)]


def visual_token_count(shape: F.ModelShape, cfg: SkipVisionConfig | None) -> float:
    """A setting's visual tokens, the unit of ``--budget-tokens``: the layer-average number of visual tokens per
    image that run full decoder blocks (``visual_tokens_per_layer``). Skip-Vision counts its N_r, as the paper's
    comparison table does (N_r = 64, N_s = 156 is "64 tokens"); a peer before the LLM counts what it hands the LLM;
    FastV / PyramidDrop count the mean over decoder layers of the visual tokens present in each."""
    counts = visual_tokens_per_layer(shape, cfg)
    return sum(counts) / len(counts)


def check_token_budgets(
    tokens: tuple[int, ...], visual: int | None, eligible: int | None, methods: tuple[str, ...]
) -> None:
    """Token budgets are whole numbers of tokens per image, at most the model's ``visual`` tokens per image (with
    ``eligible`` retainable; None: not known yet). Skip-Vision's row sets N_r to the budget, so there it must leave
    at least one token to skip and be retainable."""
    for target in tokens:
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError(f"a token budget is a whole number of visual tokens per image >= 1, got {target!r}")
        if visual is not None and target > visual:
            raise ValueError(
                f"--budget-tokens {target} is above the {visual} visual tokens of one image of this model: no "
                f"method can keep more than every token (choose 1..{visual})"
            )
        if "skip_vision" not in methods:
            continue
        if (eligible is not None and target > eligible) or (visual is not None and target >= visual):
            most = min(n for n in (eligible, None if visual is None else visual - 1) if n is not None)
            raise ValueError(
                f"--budget-tokens {target}: Skip-Vision's row retains N_r = {target} of each image's tokens, which "
                f"leaves none to skip or is more than it may retain; choose at most {most} (or leave skip_vision "
                "out of --methods)"
            )


def match_tokens(
    method: str, target: int, shape: F.ModelShape, preset_cfg: SkipVisionConfig
) -> tuple[SkipVisionConfig, float]:
    """``method``'s setting whose ``visual_token_count`` is closest to ``target`` (and that count; a tie goes to the
    first in ``method_configs``' order, the fewer tokens). Skip-Vision's row is the paper's: N_r = ``target`` and the
    preset's N_s (fewer when fewer than N_s tokens remain to skip)."""
    check_token_budgets((target,), shape.visual_tokens, shape.eligible, (method,))
    if method == "skip_vision":
        skipped = preset_cfg.num_skipped
        if skipped is not None:
            skipped = min(skipped, shape.visual_tokens - target)
        cfg = replace(preset_cfg, num_retained=target, num_skipped=skipped)
        return cfg, visual_token_count(shape, cfg)
    counts = [(visual_token_count(shape, c), c) for c in method_configs(method, shape, preset_cfg)]
    count, cfg = min(counts, key=lambda pair: abs(pair[0] - target))
    return cfg, count
