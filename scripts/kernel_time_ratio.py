"""Kernel time vs analytic FLOPs: how much of Skip-Vision's wall-clock gap is outside the kernels.

For one preset and batch, builds vanilla and Skip-Vision copies of the same random model and reports, against
vanilla: the wall-clock ratio (median of interleaved rounds), the sum of kernel (op) times under
``torch.profiler``, and the analytic FLOPs ratio of the exact batch, for prefill and for a training forward +
backward. Usage::

    python scripts/kernel_time_ratio.py --preset tiny-qwen2.5-vl --layout inplace --batch 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from skipvision import configure_processor, convert, family_of, vanilla_config
from skipvision import flops as F
from skipvision.bench import make_inputs
from skipvision.config import in_place_config
from skipvision.presets import build_model, build_processor, build_tokenizer, get_preset, tokenizer_corpus


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
        variants[name] = (model, inputs, F.batch_flops(model, inputs, train_tower=True))

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


if __name__ == "__main__":
    main()
