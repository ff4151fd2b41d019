"""``skipvision`` command line: init-model, make-data, train, eval, generate, flops, bench, demo, compare, serve."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from ..config import LAYOUTS, MERGES, SkipVisionConfig, in_place_config
from ..selection import SELECTIONS
from .options import (
    MIN_IMAGE_SIZE,
    add_options,
    int_at_least,
    non_negative_int,
    options_from,
    positive_int,
)


class UsageError(ValueError):
    """A command line argparse cannot parse (unknown option, bad value); reported like any other bad input."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises instead of printing the usage block and exiting: ``main`` reports
    every bad input the same way, as one ``error: ...`` line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once: not for options whose help already says what the default is, nor for flags and
    options without a default (where argparse would print ``(default: None)`` or ``(default: False)``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        silent = flag or action.default is None or action.default == argparse.SUPPRESS
        if "default" in text or silent or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _count_or_fraction(text: str) -> int | float:
    """A token count (``100``) or a fraction of each image's tokens (``0.25``)."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a token count or a fraction, got {text!r}") from None
    if value < 0 or (isinstance(value, float) and not 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a token count >= 0 or a fraction in (0, 1], got {text}")
    return value


def _task_name(text: str) -> str:
    # the name becomes file names and the lmms-eval task id: no folders, no spaces
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '_', '-' or '.', got {text!r}")
    return text


def _add_skip_vision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Skip-Vision")
    g.add_argument("--vanilla", action="store_true", help="the vanilla model (every token retained, nothing skipped)")
    g.add_argument(
        "--num-retained",
        type=_count_or_fraction,
        help="N_r: visual tokens with full blocks, or a fraction of each image's (default: the checkpoint's)",
    )
    g.add_argument(
        "--num-skipped", type=non_negative_int, help="N_s: skipped tokens after merging (default: the checkpoint's)"
    )
    g.add_argument(
        "--selection",
        choices=list(SELECTIONS),
        help="how R is chosen among the eligible tokens (default: cls_attention; in place: the checkpoint's or grid)",
    )
    g.add_argument("--merge", choices=MERGES, help="how the skip candidates become N_s tokens (default: tome)")
    g.add_argument("--no-summary-tokens", action="store_true", help="leave out sigma_R and sigma_S")
    g.add_argument("--no-skip-kv-cache", action="store_true", help="keep S's keys/values for decoding")
    g.add_argument(
        "--skip-layers", type=non_negative_int, nargs="+", help="decoder layers that skip the FFN (default: all)"
    )
    g.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="full: [R, sigma_R, S, sigma_S] per image; inplace: tokens stay where the processor put them and the "
        "non-retained ones are skipped (needs only --num-retained)",
    )


def _skip_vision_from_args(args: argparse.Namespace, default: SkipVisionConfig | None) -> SkipVisionConfig | None:
    if args.vanilla:
        given = [
            name
            for name, value in (
                ("--num-retained", args.num_retained),
                ("--num-skipped", args.num_skipped),
                ("--layout", args.layout),
                ("--selection", args.selection),
                ("--merge", args.merge),
                ("--skip-layers", args.skip_layers),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"--vanilla has no Skip-Vision settings; drop {', '.join(given)}")
        return None
    in_place = getattr(args, "layout", None) == "inplace"
    if in_place:
        # the in-place layout skips every token it does not retain: a skipped count or a merge would be ignored
        ignored = [n for n, v in (("--num-skipped", args.num_skipped), ("--merge", args.merge)) if v is not None]
        if ignored:
            raise ValueError(
                f"--layout inplace skips every visual token it does not retain, so it takes no {' or '.join(ignored)}"
                " (only --num-retained and --selection)"
            )
        retained = args.num_retained if args.num_retained is not None else getattr(default, "num_retained", None)
        if retained is None:
            raise ValueError("--layout inplace needs --num-retained")
        selection = args.selection or getattr(default, "selection", "grid")
        base = in_place_config(retained, selection)
    elif args.num_retained is None and args.num_skipped is None:
        if default is None:
            raise ValueError("give --num-retained and --num-skipped (or --vanilla)")
        base = default
        if args.selection is not None or args.merge is not None:
            base = replace(base, selection=args.selection or base.selection, merge=args.merge or base.merge)
    else:
        if args.num_retained is None or args.num_skipped is None:
            raise ValueError("--num-retained and --num-skipped go together")
        base = SkipVisionConfig(
            args.num_retained, args.num_skipped, args.selection or "cls_attention", args.merge or "tome"
        )
    return replace(
        base,
        summary_tokens=base.summary_tokens and not args.no_summary_tokens,
        skip_kv_cache=base.skip_kv_cache and not args.no_skip_kv_cache,
        skip_layers=tuple(args.skip_layers) if args.skip_layers else base.skip_layers,
    )


def _checkpoint_skip_vision(model_dir: str) -> SkipVisionConfig | None:
    from ..api import checkpoint_skip_vision

    return checkpoint_skip_vision(model_dir)


# --- checks that run before any work: a bad path or checkpoint is refused before data, models or runs are made ---
def _check_model_dir(path: str, option: str = "--model") -> None:
    """Refuse a checkpoint that cannot load: no config.json, a model type no family knows, missing, empty or
    truncated weight files, or a processor that does not load. Reads the config, the weight files' headers and the
    processor only; the weights themselves load once, later."""
    from transformers import AutoConfig

    from ..api import load_processor
    from ..families import family_for

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{option} {path} is not a checkpoint directory (no config.json there)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        # HF's config classes fail in these ways on a config.json that does not fit its model_type
        raise ValueError(f"{option} {path}: cannot read its config.json: {type(error).__name__}: {error}") from error
    try:
        family_for(config)
    except ValueError as error:
        raise ValueError(f"{option} {path}: {error}") from error
    _check_weight_files(folder, option)
    try:
        load_processor(folder)
    except (OSError, ValueError, TypeError) as error:  # TypeError: a processor no Skip-Vision family knows
        raise ValueError(f"{option} {path}: cannot load its processor: {error}") from error


def _check_weight_files(folder: Path, option: str) -> None:
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{option} {folder}: unreadable weight index {index.name} ({error})") from error
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")):  # torch pickles: HF checks them when it loads them
            return
        raise ValueError(f"{option} {folder}: no weights in it (no *.safetensors file)")
    for file in files:
        if not file.is_file():
            raise ValueError(f"{option} {folder}: weight file {file.name}, listed in {index.name}, is missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{option} {folder}: {file.name} is not a complete safetensors file ({error}); it may be truncated, "
                "empty or still being written"
            ) from error


def _check_data(path: str, option: str = "--data") -> None:
    from .data import load_records

    try:
        load_records(path)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from error


def _check_out_dir(path: str, option: str = "--out") -> None:
    from .train import check_writable_dir

    check_writable_dir(Path(path), option)


def _check_out_file(path: str, option: str = "--out") -> None:
    """Refuse an output file that cannot be written before the work whose result it would hold."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: {target.parent} is not an existing folder")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written: {error.strerror or error}") from error
    if not existed:
        target.unlink()


def _check_device(device: str) -> None:
    """An accelerator the machine has, named before a model is built for it."""
    import torch

    kind = torch.device(device)
    if kind.type == "cpu":
        return
    backend = getattr(torch, kind.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        built = f", torch {torch.__version__} without CUDA" if kind.type == "cuda" and not torch.version.cuda else ""
        raise ValueError(f"--device {device}: no {kind.type} device is available on this machine{built}")
    count = getattr(backend, "device_count", lambda: 1)()
    if kind.index is not None and kind.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {kind.type} device(s)")


def _write_out(path: str, data: Any) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=1))
    except OSError as error:  # checked writable at the start; a full disk can still fail here
        raise ValueError(f"cannot write --out {path}: {error.strerror or error}") from error


# --- commands -----------------------------------------------------------------------------------------------------
def cmd_init_model(args: argparse.Namespace) -> None:
    from .presets import init_model

    _check_out_dir(args.out)
    print(init_model(args.preset, args.out, seed=args.seed))


def cmd_make_data(args: argparse.Namespace) -> None:
    from .data import make_dataset

    if args.n < 2:  # make_dataset says so too, but only after the folder exists
        raise ValueError(f"make_dataset needs n >= 2 records (one at least for each split), got n={args.n}")
    _check_out_dir(args.out)
    for path in make_dataset(args.out, n=args.n, seed=args.seed, image_size=args.image_size):
        print(path)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; give one of them")
    lora = _lora_from_args(args)
    extra_args = _training_args(args.training_args)
    _check_model_dir(args.model)
    _check_data(args.data)
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise ValueError(f"--image-folder {args.image_folder} is not a folder")
    skip = _skip_vision_from_args(args, _checkpoint_skip_vision(args.model))
    options = options_from(TrainConfig, args)
    summary = train(TrainConfig(**options, skip_vision=skip, lora=lora, extra_args=extra_args))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    _end_process_group()


def _end_process_group() -> None:
    """Under torchrun the rank's process group (set up by accelerate) is torn down before the process exits: left to
    interpreter shutdown, the gloo backend's worker threads can be destroyed while still running, which aborts the
    rank ("terminate called without an active exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def cmd_lmms_eval_task(args: argparse.Namespace) -> None:
    from .lmms_eval_task import write_task

    _check_data(args.data)
    _check_out_dir(args.out)
    task = write_task(args.data, args.out, args.name, args.image_folder, args.max_new_tokens)
    folder = args.image_folder or Path(args.data).parent / "images"
    print(
        f"{task['yaml']}: {task['kept']} single-question records ({task['left_out']} multi-turn records left out; "
        f"they are in neither file)\n"
        f"lmms-eval --model skipvision --model_args pretrained=MODEL_DIR --tasks {args.name} "
        f"--include_path {args.out} --batch_size 8 --device cpu\n"
        f"the same records for skipvision eval: --data {task['records']} --image-folder {folder}"
    )


def _lora_from_args(args: argparse.Namespace):
    from ..lora import DEFAULT_TARGETS, LoraSettings

    given = [args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets]
    if not args.lora:
        if any(v is not None for v in given):
            raise ValueError("--lora-r, --lora-alpha, --lora-dropout and --lora-targets need --lora")
        return None
    defaults = LoraSettings()
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    return LoraSettings(
        r=args.lora_r if args.lora_r is not None else defaults.r,
        alpha=args.lora_alpha if args.lora_alpha is not None else defaults.alpha,
        dropout=args.lora_dropout if args.lora_dropout is not None else defaults.dropout,
        targets=targets or DEFAULT_TARGETS,
    )


def _training_args(value: str | None) -> dict:
    """Extra ``TrainingArguments`` as a JSON object or a path to a JSON file (e.g. fsdp / deepspeed settings)."""
    if not value:
        return {}
    # JSON text is never taken for a file name (a long object is not a valid path on most systems)
    if value.lstrip().startswith("{"):
        text = value
    elif Path(value).is_file():
        text = Path(value).read_text()
    else:
        raise ValueError(f"--training-args {value!r} is neither a JSON object nor an existing JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--training-args is neither a JSON object nor a JSON file: {error}") from error
    if not isinstance(data, dict):
        raise ValueError("--training-args must be a JSON object of TrainingArguments fields")
    from transformers import TrainingArguments

    unknown = sorted(set(data) - set(TrainingArguments.__dataclass_fields__))
    if unknown:
        raise ValueError(f"--training-args: unknown TrainingArguments field(s) {unknown}")
    return data


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate

    _check_model_dir(args.model)
    _check_data(args.data)
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise ValueError(f"--image-folder {args.image_folder} is not a folder")
    if args.out:  # before the evaluation: a bad path must not cost the whole run
        _check_out_file(args.out)
    result = evaluate(
        args.model,
        args.data,
        args.image_folder,
        batch_size=args.batch_size,
        skip_kv_cache=False if args.no_skip_kv_cache else None,
        limit=args.limit,
        allow_outside_image_folder=args.allow_outside_image_folder,
    )
    print(f"accuracy {result['accuracy']:.3f} on {result['count']} questions")
    for kind, acc in result["per_type"].items():
        print(f"  {kind:<14} {acc:.3f}")
    if args.out:
        _write_out(args.out, result)


def cmd_flops(args: argparse.Namespace) -> None:
    from .. import flops as F
    from ..config import VisionFacts

    if args.preset not in F.PAPER_SHAPES:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(F.PAPER_SHAPES)}")
    if args.layout == "inplace" and args.num_skipped is not None:
        raise ValueError(
            "--layout inplace skips every visual token it does not retain, so it takes no --num-skipped "
            "(only --num-retained)"
        )
    preset = F.PAPER_SHAPES[args.preset]
    shape = preset.shape_for(args.tiles)
    cfg = preset.skip_vision
    if args.num_retained is not None or args.num_skipped is not None:
        cfg = replace(
            cfg,
            num_retained=args.num_retained if args.num_retained is not None else cfg.num_retained,
            num_skipped=args.num_skipped if args.num_skipped is not None else cfg.num_skipped,
        )
    if args.layout == "inplace":
        cfg = in_place_config(cfg.num_retained, cfg.selection)
    fixed = None if preset.anyres_newlines is not None else shape.visual_tokens
    cfg.check_against(VisionFacts(shape.eligible, fixed, has_cls=True, num_layers=shape.text.layers))
    result = F.compare(shape, cfg, text_tokens=args.text_tokens, new_tokens=args.new_tokens)
    paper = preset.paper_ratio(cfg)
    result.update(preset=args.preset, paper_ratio=paper, note=preset.note, tiles=args.tiles)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    tiles = f", {shape.towers_per_image - 1} tiles" if preset.anyres_newlines is not None else ""
    print(
        f"{args.preset}: N_r={cfg.num_retained} N_s={cfg.num_skipped} ({cfg.layout} layout), "
        f"V={shape.native_tokens}{tiles}, "
        f"{args.text_tokens} text tokens"
    )
    print(
        f"  language-model prefill FLOPs  vanilla {result['vanilla_flops'] / 1e12:.3f} T   "
        f"skip-vision {result['skip_vision_flops'] / 1e12:.3f} T   ratio {result['ratio']:.3f}"
        + (f"   (paper: {paper:.2f})" if paper else "")
    )
    print(f"  training-step FLOPs ratio {result['train_ratio']:.3f}")
    if args.new_tokens:
        print(f"  prefill + {args.new_tokens} decode steps ratio {result['generate_ratio']:.3f}")
    vision = result["vanilla"]["vision"]
    print(f"  vision tower {vision['tower'] / 1e12:.3f} T, projector {vision['projector'] / 1e12:.4f} T (separate)")
    print(f"  note: {preset.note}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchSettings, format_table, image_size_for_tiles, run, scaling_summary

    if args.vanilla:
        raise ValueError("bench measures Skip-Vision against vanilla itself; --vanilla leaves nothing to compare")
    if args.device:
        _check_device(args.device)
    if args.model:
        _check_model_dir(args.model)
    if args.out:
        _check_out_file(args.out)
    base, processor, skip, source = _bench_model(args)
    for tiles in args.tiles:  # before any timing: a tile count the model's grid cannot give
        image_size_for_tiles(base.config, tiles, args.image_size)
    options = options_from(BenchSettings, args)
    settings = BenchSettings(**{k: v for k, v in options.items() if v is not None})
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    header = f"# skipvision bench: {source}, N_r={skip.num_retained} N_s={skip.num_skipped} ({skip.layout} layout)"
    if args.count_ops:
        from .bench import count_variant_ops, format_op_counts

        rows = count_variant_ops(base, processor, skip, settings)
        print(f"{header}, {settings.dtypes[0]}, ops and host syncs per prefill (generate of one token), decode step")
        print(format_op_counts(rows, base.config.get_text_config().num_hidden_layers))
        if args.out:
            _write_out(args.out, {"source": source, "skip_vision": skip.to_dict(), "op_counts": rows})
        return
    if args.latency:
        from .latency import LatencySettings, format_latency, run_latency

        latency = LatencySettings(
            batch_sizes=tuple(args.batch_sizes),
            new_tokens=args.new_tokens,
            caches=tuple(args.caches),
            dtype=args.dtypes[0],
            repeats=args.repeats,
            image_size=args.image_size,
            profile=args.profile,
            device=settings.device,
        )
        rows = run_latency(base, processor, skip, latency, log=log)
        print(f"{header}, device {latency.device}, {latency.dtype}, greedy, {latency.new_tokens} new tokens, ", end="")
        print(f"median of {latency.repeats} after a warm-up round")
        print(format_latency(rows))
        if args.out:
            _write_out(args.out, {"source": source, "skip_vision": skip.to_dict(), "latency": rows})
        return
    rows = run(base, processor, skip, settings, log=log)
    print(
        f"# skipvision bench: {source}, N_r={skip.num_retained} N_s={skip.num_skipped} ({skip.layout} layout), "
        f"device {settings.device}, "
        f"{settings.new_tokens} new tokens, median of {settings.repeats} after {settings.warmup} warm-up"
    )
    print(format_table(rows))
    scaling = scaling_summary(rows)
    for entry in scaling:
        parts = [f"{k.removesuffix('_growth_ratio')} {v:.3f}" for k, v in entry.items() if k.endswith("_ratio")]
        print(
            f"# {entry['dtype']} B={entry['batch']}: growth from {entry['from_tiles']} to {entry['to_tiles']} tiles, "
            f"Skip-Vision / vanilla: " + ", ".join(parts)
        )
    if args.out:
        _write_out(args.out, {"source": source, "skip_vision": skip.to_dict(), "rows": rows, "scaling": scaling})


def _bench_model(args: argparse.Namespace):
    from ..api import family_of, load_processor
    from ..config import vanilla_config
    from .evaluate import loading_checkpoint
    from .presets import build_model, build_processor, build_tokenizer, get_preset, tokenizer_corpus

    if args.model:
        from transformers import AutoConfig

        skip = _skip_vision_from_args(args, _checkpoint_skip_vision(args.model))
        family = family_of(AutoConfig.from_pretrained(args.model))
        with loading_checkpoint(args.model):
            base = family.hf_class.from_pretrained(args.model)
        processor = load_processor(args.model, vanilla_config())
        layers = base.config.get_text_config().num_hidden_layers
        return base, processor, skip, f"model {args.model} ({family.name}, {layers} layers)"

    from .bench import DEFAULT_DEVICE, DTYPES
    from .presets import PAPER_PRESETS

    preset = get_preset(args.preset)
    skip = _skip_vision_from_args(args, preset.skip_vision)
    tokenizer = build_tokenizer(tokenizer_corpus(), family=preset.family)
    device = args.device or DEFAULT_DEVICE
    if args.preset in PAPER_PRESETS and not device.startswith("cuda"):
        raise ValueError(
            f"preset {args.preset} is a paper-size model (7-8 B parameters): run it on a GPU with --device cuda "
            "(a tiny preset counts the same per-layer ops on the CPU)"
        )
    # built on the device in the first dtype measured: a 7B model is built on its GPU in seconds
    base = build_model(preset, tokenizer, device=device, dtype=DTYPES[args.dtypes[0]])
    return base, build_processor(preset, tokenizer), skip, f"preset {args.preset} ({preset.family}, random weights)"


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import Request, generate, read_requests

    if args.batch:
        if args.prompt or args.image:
            raise ValueError("give either --batch or --prompt/--image, not both")
        requests = read_requests(args.batch)
    elif args.prompt is None:
        raise ValueError("give --prompt (with --image for each image), or --batch FILE")
    else:
        requests = [Request(args.image or [], args.prompt)]
    _check_model_dir(args.model)
    result = generate(
        args.model, requests, max_new_tokens=args.max_new_tokens, skip_kv_cache=False if args.no_skip_kv_cache else None
    )
    for request, answer in zip(requests, result["answers"]):
        print(f"{request.prompt!r} -> {answer}")
    print(
        f"prompt {result['prompt_tokens']} tokens x {len(requests)}, {result['new_tokens']} new tokens; "
        f"prefill {1e3 * result['prefill_seconds']:.1f} ms (after one untimed warm-up prefill), "
        f"generate {1e3 * result['generate_seconds']:.1f} ms; "
        f"KV cache after prefill {result['kv_cache_bytes_after_prefill'] / 1024:.1f} KiB"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import demo

    _check_out_dir(args.out)
    demo(out=args.out, preset=args.preset, steps=args.steps, seed=args.seed, num_examples=args.n)


def _fine_tune_budgets(values: list[str] | None, budgets: tuple[float, ...]) -> tuple[float, ...] | None:
    """``--fine-tune-budgets``: ``all`` (None), or values that must be among ``budgets``; by default the middle
    budget (0.4 of the default 0.25 0.4 0.6)."""
    if values is None:
        return (sorted(budgets)[len(budgets) // 2],)
    if values == ["all"]:
        return None
    chosen = []
    for text in values:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--fine-tune-budgets takes budgets or 'all', got {text!r}") from None
        match = [b for b in budgets if abs(b - value) <= 1e-9]
        if not match:
            raise ValueError(
                f"--fine-tune-budgets {text} is not one of --budgets {' '.join(f'{b:g}' for b in budgets)}: no "
                "fine-tuned row would run at it"
            )
        chosen.append(match[0])
    return tuple(chosen)


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import ABLATIONS, CompareSettings, check_settings, compare, quick

    # options left out take the full run's defaults, or with --quick the quick run's; options given always win
    given: dict[str, Any] = {}
    for option, field in (
        ("budgets", "budgets"),
        ("methods", "methods"),
        ("regimes", "regimes"),
        ("steps", "steps"),
        ("n", "num_examples"),
        ("fine_tune_methods", "fine_tune_methods"),
    ):
        if getattr(args, option) is not None:
            value = getattr(args, option)
            given[field] = tuple(value) if isinstance(value, list) else value
    if args.eval_limit is not None:
        given["eval_limit"] = args.eval_limit or None
    settings = CompareSettings(
        out=Path(args.out),
        preset=args.preset,
        ablations=ABLATIONS if args.ablations == [] else tuple(args.ablations or ()),
        seed=args.seed,
        seeds=args.seeds,
        budget_tokens=tuple(dict.fromkeys(args.budget_tokens or ())),  # each budget once, in the order given
        model=Path(args.model) if args.model else None,
        train_data=Path(args.data) if args.data else None,
        test_data=Path(args.test_data) if args.test_data else None,
    )
    if args.quick:
        settings = quick(settings, keep=frozenset(given))
    settings = replace(settings, **given)
    if args.fine_tune_budgets is not None and "fine-tuned" not in settings.regimes:
        raise ValueError("--fine-tune-budgets needs the fine-tuned regime in --regimes")
    settings = replace(settings, fine_tune_budgets=_fine_tune_budgets(args.fine_tune_budgets, settings.budgets))
    check_settings(settings)
    if args.model:
        _check_model_dir(args.model)
    for option, path in (("--data", args.data), ("--test-data", args.test_data)):
        if path:
            _check_data(path, option)
    _check_out_dir(args.out)
    compare(settings)


def _add_data_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data", required=True, help="LLaVA-format JSON file")
    p.add_argument("--image-folder", help="folder of the records' image paths (default: <data dir>/images)")
    p.add_argument(
        "--allow-outside-image-folder",
        action="store_true",
        help="let records read images outside the image folder (absolute paths, ../)",
    )


def _add_init_model(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .presets import MODEL_PRESETS

    presets = sorted(MODEL_PRESETS)
    p = add("init-model", help="write a tiny random checkpoint of a supported family (no download)")
    p.add_argument("--preset", default="tiny", choices=presets, help="model preset (family and sizes)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.set_defaults(func=cmd_init_model)


def _add_make_data(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("make-data", help="generate the embedded shapes VQA dataset (LLaVA JSON + PNG)")
    p.add_argument("--out", required=True, help="folder for train.json, test.json and images/")
    p.add_argument("--n", type=int, default=2000, help="records to generate (at least 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes and questions")
    p.add_argument(
        "--image-size",
        type=int_at_least(MIN_IMAGE_SIZE),
        default=168,
        help="scene size in pixels (336 gives tiny-next 2x2 tiles)",
    )
    p.set_defaults(func=cmd_make_data)


def _add_train(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .train import TrainConfig

    p = add("train", help="fine-tune a checkpoint with (or without) Skip-Vision on HF Trainer")
    add_options(p, TrainConfig)
    p.add_argument("--training-args", help="extra TrainingArguments, JSON or a JSON file (fsdp, deepspeed, ...)")
    p.add_argument(
        "--lora",
        action="store_true",
        help="LoRA on the language model (PEFT; projector and summary scorer fully trained); saves final_adapter/ "
        "and the merged model in final/",
    )
    p.add_argument("--lora-r", type=positive_int, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=positive_int, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout in [0, 1) (default 0.05)")
    p.add_argument("--lora-targets", help="comma-separated module names (default: q,k,v,o,gate,up,down _proj)")
    _add_skip_vision_args(p)
    p.set_defaults(func=cmd_train)


def _add_lmms_eval_task(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("lmms-eval-task", help="write an lmms-eval task (YAML + docs) for a LLaVA JSON file, for --include_path")
    p.add_argument("--data", required=True, help="LLaVA JSON with one question and answer per record")
    p.add_argument("--out", required=True, help="folder for the task files (pass it to lmms-eval --include_path)")
    p.add_argument("--name", type=_task_name, default="skipvision_shapes", help="the task name for lmms-eval --tasks")
    p.add_argument("--image-folder", help="default: images/ next to the JSON file")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=4, help="greedy tokens per answer (as skipvision eval)"
    )
    p.set_defaults(func=cmd_lmms_eval_task)


def _add_eval(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("eval", help="exact-match accuracy with generate (a vanilla checkpoint is the baseline)")
    _add_data_args(p, "checkpoint directory (a vanilla one is evaluated as the baseline)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generate call")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N records (N >= 1)")
    p.add_argument("--no-skip-kv-cache", action="store_true", help="decode with the full cache (w/o SK ablation)")
    p.add_argument("--out", help="write predictions and scores as JSON (checked writable before the evaluation)")
    p.set_defaults(func=cmd_eval)


def _add_flops(add: Callable[..., argparse.ArgumentParser]) -> None:
    from ..flops import DEFAULT_TEXT_TOKENS, PAPER_SHAPES

    p = add("flops", help="analytic FLOPs of the paper's models, vanilla vs Skip-Vision")
    p.add_argument("--preset", required=True, choices=sorted(PAPER_SHAPES), help="model geometry")
    p.add_argument("--num-retained", type=_count_or_fraction, help="override N_r (a count or a fraction)")
    p.add_argument("--num-skipped", type=non_negative_int, help="override N_s (full layout only)")
    p.add_argument("--layout", choices=LAYOUTS, default="full", help="Skip-Vision layout (inplace: skip in place)")
    p.add_argument("--text-tokens", type=non_negative_int, default=DEFAULT_TEXT_TOKENS, help="prompt text tokens")
    p.add_argument("--new-tokens", type=non_negative_int, default=0, help="also count this many decode steps")
    p.add_argument(
        "--tiles",
        type=int,
        choices=range(1, 9),
        metavar="1..8",
        help="tiles of the HD / LLaVA-NeXT presets (default 4)",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_flops)


def _add_bench(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .bench import BenchSettings
    from .presets import MODEL_PRESETS

    presets = sorted(MODEL_PRESETS)
    p = add("bench", help="latency/memory benchmark, vanilla vs Skip-Vision side by side (progress on stderr)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint directory (its own weights)")
    src.add_argument("--preset", default="tiny", choices=presets, help="a model preset with random weights")
    add_options(p, BenchSettings, device=None)
    p.add_argument("--out", help="write the rows as JSON")
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="count aten ops and host syncs of a prefill, a decode step and a training step per variant (no timing)",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="the paper's latency protocol instead: greedy generate of --new-tokens (use 256) at --batch-sizes "
        "(use 1 64) with each of --caches; ms per decode step per variant",
    )
    p.add_argument(
        "--caches", nargs="+", choices=["dynamic", "static"], default=["dynamic", "static"], help="--latency: caches"
    )
    p.add_argument("--profile", action="store_true", help="--latency: also a torch.profiler table of 4 decode steps")
    _add_skip_vision_args(p)
    p.set_defaults(func=cmd_bench)


def _add_generate(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("generate", help="answer a prompt about images with a saved model (vanilla or Skip-Vision)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--image", action="append", help="an image file (repeat for several images)")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--batch", help='JSON file of [{"image": path or [paths], "prompt": str}], paths relative to it')
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy decoding length")
    p.add_argument("--no-skip-kv-cache", action="store_true", help="decode with the full cache")
    p.set_defaults(func=cmd_generate)


def _add_demo(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .presets import MODEL_PRESETS

    presets = sorted(MODEL_PRESETS)
    p = add("demo", help="end to end: data, train vanilla and Skip-Vision, evaluate, measure, report")
    p.add_argument("--out", default="./skipvision-demo", help="output folder (its runs are replaced)")
    p.add_argument("--preset", default="tiny", choices=presets, help="model preset (tiny-next: SV-LLaVA-HD style)")
    p.add_argument("--steps", type=positive_int, help="training steps per model (default: the preset's)")
    p.add_argument("--n", type=int_at_least(2), help="examples to generate (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=cmd_demo)


def _add_compare(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .compare import FULL_DEFAULTS, QUICK
    from .presets import MODEL_PRESETS

    presets = sorted(MODEL_PRESETS)
    full, fast = FULL_DEFAULTS, QUICK
    show = lambda key, f=str: f"(default: {f(full[key])}; --quick: {f(fast[key])})"  # noqa: E731
    budgets = lambda values: " ".join(f"{v:g}" for v in values)  # noqa: E731
    p = add(
        "compare",
        help="Skip-Vision vs FastV, PyramidDrop, VisionZip, ToMe, token drop at matched FLOPs and visual-token budgets",
    )
    p.add_argument("--out", default="./skipvision-compare", help="output folder (finished rows are kept: resumable)")
    p.add_argument("--preset", default="tiny", choices=presets, help="model preset (its Skip-Vision setting)")
    p.add_argument("--model", help="checkpoint every run starts from (default: the preset's random init)")
    p.add_argument("--data", help="training LLaVA JSON (default: the embedded dataset); needs --test-data")
    p.add_argument("--test-data", help="test LLaVA JSON")
    p.add_argument(
        "--budgets", type=_budget, nargs="+", help=f"prefill FLOPs fractions in (0, 1] {show('budgets', budgets)}"
    )
    p.add_argument(
        "--methods",
        nargs="*",
        help=f"methods to compare; none: only --ablations (default: all of {', '.join(full['methods'])})",
    )
    p.add_argument("--regimes", nargs="*", help=f"regimes (default: both of {', '.join(full['regimes'])})")
    p.add_argument(
        "--fine-tune-budgets",
        nargs="+",
        help="budgets (among --budgets) trained with the method on; 'all': every one (default: the middle budget)",
    )
    p.add_argument(
        "--fine-tune-methods",
        nargs="+",
        help="methods (among --methods) with fine-tuned rows (default: every method; --quick: skip_vision)",
    )
    p.add_argument(
        "--budget-tokens",
        type=positive_int,
        nargs="+",
        metavar="N",
        help="also match every method to N visual tokens per image (the layer-average count of visual tokens that run "
        "full decoder blocks: Skip-Vision's N_r, the tokens a pre-LLM peer hands the LLM, FastV/PyramidDrop's mean "
        "over layers), in both regimes; Skip-Vision at N_r = N and the preset's N_s",
    )
    p.add_argument("--ablations", nargs="*", help="also Skip-Vision's ablations, fine-tuned (no names: all of them)")
    p.add_argument("--steps", type=positive_int, help=f"training steps per run {show('steps')}")
    p.add_argument("--n", type=int_at_least(2), help=f"examples of the embedded dataset {show('num_examples')}")
    p.add_argument(
        "--eval-limit",
        type=non_negative_int,
        help=f"evaluate the first N test records, 0: all {show('eval_limit')}",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        metavar="N",
        help="train and evaluate every row with seeds --seed .. --seed + N - 1 (each seed's rows kept apart, "
        "resumable); the table shows mean ± standard deviation, and with 1 seed the binomial standard error "
        "(default: 1)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: one budget, only vanilla and Skip-Vision trained, short runs, a slice of the test set "
        "(the run lists what it leaves out); options given explicitly still apply",
    )
    p.set_defaults(func=cmd_compare)


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import run

    code = run(args)  # returns when the server has shut down; 2: it refused to start (the reason printed)
    if code:
        raise SystemExit(code)


def _add_serve(add: Callable[..., argparse.ArgumentParser]) -> None:
    from .serve import DESCRIPTION, add_arguments

    p = add("serve", help=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


#: each command's parser, in the order ``--help`` lists them
COMMANDS = (
    _add_init_model,
    _add_make_data,
    _add_train,
    _add_lmms_eval_task,
    _add_eval,
    _add_flops,
    _add_bench,
    _add_generate,
    _add_demo,
    _add_compare,
    _add_serve,
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    fmt = _HelpFormatter
    parser = _Parser(prog="skipvision", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"skipvision {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: sub.add_parser(name, formatter_class=fmt, **kw)  # noqa: E731
    for add_command in COMMANDS:
        add_command(add)
    return parser


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of vanilla's prefill FLOPs, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is a fraction of vanilla's prefill FLOPs in (0, 1], got {text}")
    return value


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause, reported as one line: ``ValueError`` (the library's own checks, bad data, bad
    checkpoints, a bad command line), ``OSError`` (a missing, unreadable or unwritable file, a full disk),
    safetensors' errors (a damaged weight file) and running out of accelerator memory. Anything else is a bug and
    keeps its traceback."""
    kinds: list[type[BaseException]] = [ValueError, OSError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        kinds.append(torch.OutOfMemoryError)
    return tuple(kinds)


def _one_line(error: BaseException) -> str:
    torch = sys.modules.get("torch")
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    else:
        text = str(error) or type(error).__name__
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        text = f"out of memory ({text}); try a smaller batch"
    return " ".join(text.split())  # HF's messages span lines; a report is one line


def main(argv: list[str] | None = None) -> int:
    """Run one command. A bad input or environment is reported as one ``error: ...`` line on stderr with exit status
    2, never a traceback (``SKIPVISION_TRACEBACK=1`` shows it, for bug reports); other exceptions are bugs and
    propagate."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except Exception as error:
        if not isinstance(error, _expected_errors()) or os.environ.get("SKIPVISION_TRACEBACK"):
            raise
        sys.stdout.flush()
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0
