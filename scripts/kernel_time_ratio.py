"""Kernel time vs analytic FLOPs: how much of Skip-Vision's wall-clock gap is outside the kernels.

For one preset and batch, builds vanilla and Skip-Vision copies of the same random model and reports, against
vanilla: the wall-clock ratio (median of interleaved rounds), the sum of kernel (op) times under
``torch.profiler``, and the analytic FLOPs ratio of the exact batch, for prefill and for a training forward +
backward. Then the prefill by part (forward hooks, interleaved rounds): the vision tower, every decoder layer's
attention block and FFN, and the rest (embedding, norms, LM head, selection, cache pruning), each part's time ratio
next to its FLOPs ratio and its speed in GFLOP/s: a part that Skip-Vision does not shrink but that runs at a
lower FLOP rate than the FFN keeps the total time ratio above the FLOPs ratio. Usage::

    python scripts/kernel_time_ratio.py --preset tiny-qwen2.5-vl --layout inplace --batch 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch

from skipvision import configure_processor, convert, family_of, vanilla_config
from skipvision.config import in_place_config
from skipvision.harness import measure
from skipvision.harness.bench import ModuleClock, make_inputs
from skipvision.harness.presets import build_model, build_processor, build_tokenizer, get_preset, tokenizer_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-qwen2.5-vl")
    parser.add_argument("--layout", choices=("full", "inplace"), default="full")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    preset = get_preset(args.preset)
    tokenizer = build_tokenizer(tokenizer_corpus(), family=preset.family)
    base, processor = build_model(preset, tokenizer), build_processor(preset, tokenizer)
    skip = preset.skip_vision
    if args.layout == "inplace":
        skip = in_place_config(skip.num_retained, skip.selection)
    variants = {}
    for name, cfg in (("vanilla", vanilla_config()), ("skip_vision", skip)):
        model = convert(copy.deepcopy(base), cfg)
        proc = configure_processor(copy.deepcopy(processor), cfg, base.config)
        prompt = family_of(model).image_prompt(proc, base.config)
        size = (args.image_size, args.image_size)
        inputs = make_inputs(proc, args.batch, 24, size, "cpu", torch.float32, prompt)
        variants[name] = (model, inputs, measure.batch_flops(model, inputs, train_tower=True))

    def prefill(model, inputs) -> None:
        model.eval()
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=True, logits_to_keep=1)

    def train(model, inputs) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(**inputs, use_cache=False).loss.backward()

    print(f"# {args.preset}, {args.layout} layout, B={args.batch}, fp32, {args.rounds} interleaved rounds")
    for phase, run, flops_key in (("prefill", prefill, "prefill"), ("train fwd+bwd", train, "train")):
        wall: dict[str, list[float]] = {name: [] for name in variants}
        for model, inputs, _ in variants.values():
            run(model, inputs)  # warm-up
        for _ in range(args.rounds):
            for name, (model, inputs, _) in variants.items():
                start = time.perf_counter()
                run(model, inputs)
                wall[name].append(time.perf_counter() - start)
        kernel = {}
        for name, (model, inputs, _) in variants.items():
            with torch.profiler.profile() as profile:
                for _ in range(5):
                    run(model, inputs)
            kernel[name] = sum(event.self_cpu_time_total for event in profile.key_averages())
        median = {name: statistics.median(times) for name, times in wall.items()}
        flops = {name: entry[2][flops_key] for name, entry in variants.items()}
        print(
            f"{phase:14} wall x {median['skip_vision'] / median['vanilla']:.3f}   "
            f"kernel time x {kernel['skip_vision'] / kernel['vanilla']:.3f}   "
            f"analytic FLOPs x {flops['skip_vision'] / flops['vanilla']:.3f}"
        )
    prefill_parts(variants, prefill, args.rounds)


def prefill_parts(variants: dict, prefill, rounds: int) -> None:
    """Median time of each prefill part per variant, against the part's analytic FLOPs."""
    spent: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in variants}
    for round_index in range(rounds + 1):
        for name, (model, inputs, _) in variants.items():
            layers = family_of(model).decoder_layers(model)
            modules = {
                "tower": [family_of(model).vision_tower(model)],
                "attention block": [layer.self_attn for layer in layers],
                "FFN": [layer.mlp for layer in layers],
            }
            with ModuleClock(modules, "cpu") as clock:
                start = time.perf_counter()
                prefill(model, inputs)
                total = time.perf_counter() - start
            if round_index:  # the first round warms up
                parts = {**clock.seconds, "rest": total - sum(clock.seconds.values())}
                for part, seconds in parts.items():
                    spent[name][part].append(seconds)
    flops = {}
    for name, (_, _, analytic) in variants.items():
        lm = analytic["prefill_language_model_parts"]
        flops[name] = {
            "tower": analytic["prefill"] - analytic["prefill_language_model"],  # tower, projector, selection
            "attention block": lm["projections"] + lm["attention"],
            "FFN": lm["ffn"],
            "rest": lm.get("lm_head", 0.0) + lm.get("drop_ranking", 0.0),
        }
    print("\nprefill by part (tower FLOPs include the projector and selection; rest: embedding, norms, LM head)")
    print("| part | vanilla ms | skip_vision ms | time x | FLOPs x | vanilla GFLOP/s | skip_vision GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for part in ("tower", "attention block", "FFN", "rest"):
        ms = {name: 1e3 * statistics.median(spent[name][part]) for name in variants}
        speed = {name: flops[name][part] / ms[name] / 1e6 if ms[name] > 0 else 0.0 for name in variants}
        print(
            f"| {part} | {ms['vanilla']:.1f} | {ms['skip_vision']:.1f} | {ms['skip_vision'] / ms['vanilla']:.3f} | "
            f"{flops['skip_vision'][part] / flops['vanilla'][part]:.3f} | {speed['vanilla']:.0f} | "
            f"{speed['skip_vision']:.0f} |"
        )


if __name__ == "__main__":
    main()
