"""Fine-tuning with Skip-Vision on HF ``Trainer``.

Why ``Trainer``: it is what LLaVA users already run, and it brings gradient accumulation, schedules, bf16,
resumable checkpoints and multi-process training through existing engines (torchrun/accelerate DDP, FSDP,
DeepSpeed via ``TrainingArguments``) with no training loop of our own. We add atomic checkpoints, per-step
timing and a rank-sync check.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import rotate_checkpoints

from ..api import family_of, from_pretrained, load_processor, save_processor
from ..config import SkipVisionConfig, vanilla_config
from ..lora import LoraSettings, apply_lora, base_model, is_peft_model, load_adapter_weights
from .data import LlavaCollator, LlavaJsonDataset, load_records
from .evaluate import loading_checkpoint
from .options import flag, option, positive_float, positive_int


@dataclass
class TrainConfig:
    """One fine-tuning run; each field with help text is also a ``skipvision train`` option (``options.py``)."""

    model: str = option(help="checkpoint directory (vanilla or Skip-Vision) with its processor")
    data: str = option(help="LLaVA-format JSON file")
    output_dir: str = option(flag="--out", help="output folder of the run (checkpoints, final/, summary)")
    skip_vision: SkipVisionConfig | None = None  # None = vanilla LLaVA through the same code path
    image_folder: str | None = option(None, help="folder of the records' image paths (default: <data dir>/images)")
    allow_outside_image_folder: bool = option(
        False, help="let records read images outside the image folder (absolute paths, ../)"
    )
    overwrite: bool = option(False, help="replace whatever --out holds")
    resume: bool = option(
        False,
        help="continue this run from its last checkpoint in --out; give the run's own settings again (a changed "
        "setting is refused)",
    )
    max_steps: int = option(100, type=positive_int, help="optimizer steps")
    batch_size: int = option(8, type=positive_int, help="per-device batch size")
    grad_accum: int = option(1, type=positive_int, help="gradient accumulation steps")
    learning_rate: float = option(1e-3, flag="--lr", type=positive_float, help="peak learning rate (cosine schedule)")
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    bf16: bool = option(False, help="train in bf16 mixed precision")
    seed: int = option(0, type=int, help="seed of the initialisation and the data order")
    save_steps: int = option(50, type=positive_int, help="write a checkpoint every N steps")
    save_total_limit: int | None = 2
    logging_steps: int = option(10, type=positive_int, help="log the loss every N steps")
    max_length: int = option(1024, type=positive_int, help="longest tokenised conversation; longer are cut")
    freeze_vision_tower: bool = option(
        True, flag="--train-vision-tower", negate=True, help="also train the tower (default: frozen)"
    )
    skip_bad_records: bool = option(False, help="drop records that cannot be read, with a warning")
    lora: LoraSettings | None = None  # LoRA adapters on the language model (PEFT); None = full fine-tuning
    extra_args: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments (fsdp, deepspeed, ...)


RUN_MANIFEST = "skipvision_run.json"


def _is_main_process() -> bool:
    # before the process group exists; torchrun / accelerate set RANK
    return int(os.environ.get("RANK", "0")) == 0


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The run manifest of the output folder ``out`` (checkpoints written, finished or not), or None."""
    path = out / RUN_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_json_atomically(out / RUN_MANIFEST, manifest)


def write_json_atomically(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, written to a hidden sibling first and renamed: on disk whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


#: TrainConfig fields that do not change what a run computes: a resumed run may give other values
NOT_RUN_SETTINGS = ("output_dir", "resume", "overwrite", "save_steps", "save_total_limit", "logging_steps")


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What makes a run's result, as JSON (paths resolved): a resumed run must use the same."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_RUN_SETTINGS}
    for key in ("model", "data", "image_folder"):
        if settings[key] is not None:
            settings[key] = str(Path(settings[key]).resolve())
    settings["skip_vision"] = cfg.skip_vision.to_dict() if cfg.skip_vision else None
    return json.loads(json.dumps(settings))  # tuples as lists, as read back from the manifest


def _spelled(setting: str) -> str:
    """How the command line spells a run setting, for messages."""
    named = {"lora": "the LoRA settings", "extra_args": "--training-args", "skip_vision": "the Skip-Vision settings"}
    return named.get(setting) or flag(TrainConfig, setting)


def _differences(run: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``setting: <the run's> -> <now>`` for every setting in both that differs."""
    changes = []
    for key in (k for k in now if k in run and run[k] != now[k]):
        old, new = run[key], now[key]
        if key == "skip_vision" and isinstance(old, dict) and isinstance(new, dict):
            parts = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
            changes.append(f"Skip-Vision settings: {', '.join(parts)}")
        elif key == "skip_vision":
            changes.append(f"Skip-Vision settings: {_describe(old)} -> {_describe(new)}")
        else:
            changes.append(f"{_spelled(key)}: {old!r} -> {new!r}")
    return changes


def _describe(skip_vision: dict[str, Any] | None) -> str:
    if skip_vision is None or skip_vision.get("num_retained") is None:
        return "vanilla"
    skipped = skip_vision.get("num_skipped")
    skipped = "all others" if skipped is None else skipped  # the in-place layout skips every token not retained
    return f"N_r={skip_vision['num_retained']} N_s={skipped} ({skip_vision.get('layout')} layout)"


def _check_resumable(cfg: TrainConfig, manifest: dict[str, Any], out: Path) -> None:
    """Refuse to resume a run with other settings than it started with: the result would be neither run (a model
    trained under two settings, with ``final/`` and the manifest disagreeing)."""
    run = manifest.get("settings")
    now = run_settings(cfg)
    if run is None:  # a manifest from before settings were recorded: what it has
        run = {
            "model": str(Path(manifest["model"]).resolve()) if manifest.get("model") else None,
            "data": str(Path(manifest["data"]).resolve()) if manifest.get("data") else None,
            "max_steps": manifest.get("max_steps"),
            "skip_vision": manifest.get("skip_vision"),
        }
        run = {k: v for k, v in run.items() if k in manifest}
    changes = _differences(run, now)
    if not changes:
        return
    if manifest.get("finished") and [c for c in changes if not c.startswith("--max-steps")] == []:
        raise ValueError(
            f"the run in {out} finished at step {run['max_steps']}; it cannot be continued to --max-steps "
            f"{cfg.max_steps} as the same run (its learning-rate schedule ends at step {run['max_steps']}): start a "
            f"new run with --max-steps {cfg.max_steps}, in another --out or with --overwrite"
        )
    raise ValueError(
        f"cannot resume the run in {out} with other settings ({'; '.join(changes)}): resume with the run's own "
        "settings, or start a new run in another --out (or replace this one with --overwrite)"
    )


def check_writable_dir(path: Path, option: str = "output folder") -> None:
    """Refuse an output folder that cannot be written, before any work: a file, a path under a file, a read-only
    place. Creates the folder (empty) if needed."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written: {error.strerror or error}") from error


def prepare_output_dir(cfg: TrainConfig) -> tuple[str | None, bool]:
    """Check ``output_dir`` before anything runs; returns ``(checkpoint to resume from, run already finished)``.

    A run owns its folder through a manifest listing the checkpoints it wrote. A non-empty folder without one, or
    another run's folder, is refused unless ``overwrite``; ``resume`` only considers this run's checkpoints, and
    only with the settings the run started with. Nothing is written here but an empty folder; ``claim_output_dir``
    takes the folder once the model and data have loaded.
    """
    out = Path(cfg.output_dir)
    manifest = read_manifest(out)
    if cfg.resume:
        if manifest is None:
            raise ValueError(f"nothing to resume: {out} holds no skipvision run")
        _check_resumable(cfg, manifest, out)
        if manifest.get("finished"):
            return None, True
        names = [n for n in manifest.get("checkpoints", []) if _is_checkpoint(out / n)]
        if not names:
            raise ValueError(
                f"nothing to resume: the run in {out} saved no checkpoint yet; start over with --overwrite"
            )
        return str(out / max(names, key=lambda n: int(n.rsplit("-", 1)[1]))), False
    if not _is_main_process():  # rank 0 checks and prepares the folder (the others may see its new manifest)
        return None, False
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not cfg.overwrite:
        what = "already holds a skipvision run; pass --resume to continue it" if manifest else "is not empty"
        raise ValueError(f"output folder {out} {what}, or --overwrite to replace its contents")
    check_writable_dir(out)
    return None, False


def claim_output_dir(cfg: TrainConfig) -> None:
    """Empty ``output_dir`` (``overwrite``) and write the new run's manifest, with the settings ``--resume`` checks."""
    out = Path(cfg.output_dir)
    if not _is_main_process():
        return
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(
        out,
        {
            "model": cfg.model,
            "data": cfg.data,
            "max_steps": cfg.max_steps,
            "skip_vision": cfg.skip_vision.to_dict() if cfg.skip_vision else None,
            "settings": run_settings(cfg),
            "checkpoints": [],
            "finished": False,
        },
    )


def _is_checkpoint(path: Path) -> bool:
    # a full model, or a PEFT adapter (LoRA runs)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run replays the exact batch order."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class SkipVisionTrainer(Trainer):
    """``Trainer`` with atomic checkpoints and a resumable data order (tokens/s is logged by Trainer itself)."""

    _staging: str | None = None
    skip_vision_processor = None  # saved into every checkpoint (the family knows how)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededSampler(len(dataset), seed)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Trainer's own resume does a non-strict load_state_dict of the raw file, which misses keys that
        # save_pretrained wrote in Llava's legacy layout; load through from_pretrained and insist on every key
        model = model if model is not None else self.model
        if is_peft_model(model):
            load_adapter_weights(model, resume_from_checkpoint)
            return
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        # write checkpoint-N into a staging folder, then rename: a crash never leaves a half checkpoint that
        # resume would pick up (get_last_checkpoint only looks at checkpoint-N folders)
        final_root = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = os.path.join(final_root, ".staging")
        if self.args.should_save:  # whatever is left there is a checkpoint a crash cut short
            shutil.rmtree(self._staging, ignore_errors=True)
        if self.args.world_size > 1:
            torch.distributed.barrier()
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.skip_vision_processor is not None:
                save_processor(self.skip_vision_processor, os.path.join(self._staging, name))
        finally:
            self._staging = None
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(final_root, ".staging", name), target)
            os.rmdir(os.path.join(final_root, ".staging"))
            manifest = read_manifest(Path(final_root)) or {"checkpoints": []}
            manifest["checkpoints"] = sorted(set(manifest["checkpoints"]) | {name})
            _write_manifest(Path(final_root), manifest)
            rotate_checkpoints(final_root, self.args.save_total_limit, self.state.best_model_checkpoint)
        if self.args.world_size > 1:
            torch.distributed.barrier()


def load_for_training(model_dir: str, skip_vision: SkipVisionConfig | None, dtype: torch.dtype = torch.float32):
    """Model + processor for a run; ``skip_vision=None`` gives the exactly-vanilla configuration."""
    skip_vision = skip_vision or vanilla_config()
    model = from_pretrained(model_dir, skip_vision=skip_vision, dtype=dtype)
    return model, load_processor(model_dir, skip_vision)


def params_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def save_atomically(model, processor, out: Path) -> None:
    """save_pretrained into a temporary sibling, then rename over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    save_processor(processor, tmp)
    _replace(tmp, out)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_with_trainer(trainer: Trainer, out: Path, processor) -> None:
    """``trainer.save_model`` into a staging sibling, then rename over ``out``. Every rank calls it: under FSDP
    and ZeRO-3 gathering the full weights is collective; only the main process writes."""
    staging = out.parent / f".{out.name}-staging"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        if processor is not None:
            save_processor(processor, staging)
        _replace(staging, out)
    if trainer.args.world_size > 1:
        torch.distributed.barrier()


def merge_saved_adapter(base_dir: str, skip_vision: SkipVisionConfig | None, adapter: Path):
    from peft import PeftModel

    base = from_pretrained(base_dir, skip_vision=skip_vision or vanilla_config())
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def is_sharded(trainer: Trainer) -> bool:
    """FSDP or ZeRO-3: each rank holds a shard of the parameters, not a replica."""
    if trainer.is_fsdp_enabled:
        return True
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return plugin is not None and plugin.zero_stage == 3


def checkpoint_checksum(path: Path) -> float:
    from safetensors.torch import load_file

    return float(sum(t.double().sum() for f in sorted(path.glob("*.safetensors")) for t in load_file(f).values()))


def with_fsdp_wrap_classes(extra_args: dict[str, Any], block_classes: list[str]) -> dict[str, Any]:
    """FSDP settings with the layers to wrap taken from the model (decoder and vision blocks) unless given."""
    if not extra_args.get("fsdp"):
        return extra_args
    if isinstance(extra_args.get("fsdp_config"), str):
        raise ValueError("give fsdp_config inline in --training-args (a JSON object), not as a file path")
    fsdp_config = dict(extra_args.get("fsdp_config") or {})
    fsdp_config.setdefault("transformer_layer_cls_to_wrap", block_classes)
    return {**extra_args, "fsdp_config": fsdp_config}


def check_engine_request(trainer: Trainer, extra_args: dict[str, Any]) -> None:
    """Fail instead of silently training without the engine asked for. accelerate only turns FSDP on for
    accelerator devices: on a CPU-only machine Trainer would quietly run plain DDP."""
    if extra_args.get("fsdp") and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"FSDP was requested but accelerate set up {trainer.accelerator.distributed_type} instead (accelerate "
            "enables FSDP on GPU/XPU/NPU-like devices only, not on the CPU); drop 'fsdp' from --training-args, or "
            "run on accelerators"
        )
    if extra_args.get("deepspeed") and not trainer.is_deepspeed_enabled:
        raise ValueError(f"DeepSpeed was requested but accelerate set up {trainer.accelerator.distributed_type}")


def _engine(trainer: Trainer) -> dict[str, Any]:
    """What actually ran: accelerate's distributed type and, for FSDP, its version and the wrapped layer classes."""
    accelerator = trainer.accelerator
    engine: dict[str, Any] = {"distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1]}
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FSDPModule

        plugin = accelerator.state.fsdp_plugin
        engine["fsdp_version"] = plugin.fsdp_version
        engine["sharded_modules"] = sorted(
            {type(m).__name__ for m in trainer.model_wrapped.modules() if isinstance(m, FSDPModule)}
        )
    return engine


def check_numbers(cfg: TrainConfig) -> None:
    """Counts and rates that would make a run do nothing or fail inside Trainer, refused by name."""
    for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "logging_steps", "max_length"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {cfg.learning_rate}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume continues the run in output_dir and overwrite replaces it; choose one")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train and save ``<output_dir>/final``; returns timings, losses and the final checkpoint path.

    Resuming a finished run changes nothing and returns its saved summary; resuming with other settings than the
    run started with is refused.
    """
    check_numbers(cfg)
    load_records(cfg.data)  # a missing or empty data file fails before the output folder is touched
    resume_from, finished = prepare_output_dir(cfg)
    if finished:
        return _finished_run(cfg)
    # the processor and the data before the model: a bad record fails in seconds, before the weights load
    skip_vision = cfg.skip_vision or vanilla_config()
    with loading_checkpoint(cfg.model):
        processor = load_processor(cfg.model, skip_vision)
    dataset = LlavaJsonDataset(
        cfg.data,
        cfg.image_folder,
        processor,
        max_length=cfg.max_length,
        skip_bad_records=cfg.skip_bad_records,
        allow_outside_image_folder=cfg.allow_outside_image_folder,
    )
    set_seed(cfg.seed)  # before loading: new parameters (the summary scorer) are initialised at load time
    with loading_checkpoint(cfg.model):
        model = from_pretrained(cfg.model, skip_vision=skip_vision, dtype=torch.float32)
    if cfg.freeze_vision_tower:
        family_of(model).vision_tower(model).requires_grad_(False)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    args = training_arguments(cfg, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    timer = StepTimer()
    trainer = SkipVisionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(processor.tokenizer.pad_token_id),
        callbacks=[timer],
    )
    trainer.skip_vision_processor = processor
    check_engine_request(trainer, cfg.extra_args)
    if not cfg.resume:  # everything loaded and checked: only now is the output folder emptied and claimed
        claim_output_dir(cfg)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    final = save_final(cfg, trainer, processor)
    in_sync, checksum = check_ranks_in_sync(trainer, model, final)
    steady = timer.durations[2:] or timer.durations
    summary = {
        "final": str(final),
        "train_seconds": seconds,
        "train_step_seconds": statistics.median(steady) if steady else None,
        "steps": trainer.state.global_step,
        "resumed_from": resume_from,
        "train_loss": result.training_loss,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "world_size": args.world_size,
        "engine": _engine(trainer),
        "ranks_in_sync": in_sync,
        "params_checksum": checksum,
        "trainable_parameters": trainable,
        "config": {**asdict(cfg), "skip_vision": cfg.skip_vision.to_dict() if cfg.skip_vision else None},
    }
    if args.should_save:
        (Path(cfg.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=1))
        manifest = read_manifest(Path(cfg.output_dir)) or {}
        _write_manifest(Path(cfg.output_dir), {**manifest, "finished": True, "steps": trainer.state.global_step})
    return summary


def _finished_run(cfg: TrainConfig) -> dict[str, Any]:
    summary_file = Path(cfg.output_dir) / "train_summary.json"
    steps = (read_manifest(Path(cfg.output_dir)) or {}).get("steps", cfg.max_steps)
    print(f"the run in {cfg.output_dir} already finished (step {steps}, the same settings); nothing to do")
    return {**json.loads(summary_file.read_text()), "already_finished": True}


#: the TrainConfig fields HF's ``TrainingArguments`` takes, and the names it takes them by
TRAINING_ARGUMENT_NAMES = {
    "output_dir": "output_dir",
    "max_steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "warmup_ratio": "warmup_steps",  # a float below 1 is a ratio of the steps there
    "weight_decay": "weight_decay",
    "bf16": "bf16",
    "seed": "seed",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "logging_steps": "logging_steps",
}


def training_arguments(cfg: TrainConfig, model: Any) -> TrainingArguments:
    """HF ``TrainingArguments`` of a run: its settings, the cosine schedule, and the FSDP wrap classes of the
    model's family (any ``extra_args`` on top)."""
    unwrapped = base_model(model)
    extra_args = with_fsdp_wrap_classes(cfg.extra_args, family_of(unwrapped).block_class_names(unwrapped))
    return TrainingArguments(
        **{hf_name: getattr(cfg, name) for name, hf_name in TRAINING_ARGUMENT_NAMES.items()},
        lr_scheduler_type="cosine",
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        # the unused last tower layer (features come from layer -2) gets no gradient when the tower trains
        ddp_find_unused_parameters=not cfg.freeze_vision_tower,
        dataloader_num_workers=0,
        **extra_args,
    )


def save_final(cfg: TrainConfig, trainer: Trainer, processor: Any) -> Path:
    """Save the trained model as ``<output_dir>/final`` (with LoRA: the adapter, and the merged model in final/)."""
    final = Path(cfg.output_dir) / "final"
    if cfg.lora is not None:
        # the adapter as Trainer saves it (gathered under any engine), merged onto a fresh base on the main
        # process: the final model loads and evaluates like any checkpoint
        adapter = Path(cfg.output_dir) / "final_adapter"
        save_with_trainer(trainer, adapter, None)
        if trainer.args.should_save:
            save_atomically(merge_saved_adapter(cfg.model, cfg.skip_vision, adapter), processor, final)
    else:
        save_with_trainer(trainer, final, processor)
    return final


def check_ranks_in_sync(trainer: Trainer, model: Any, final: Path) -> tuple[bool | None, float | None]:
    """``(ranks in sync, parameter checksum)`` after training; raises when data-parallel replicas differ."""
    args = trainer.args
    if is_sharded(trainer):
        # one sharded copy: no replicas to compare; the checksum is that of the gathered final weights
        return None, checkpoint_checksum(final) if args.should_save else None
    checksum = params_checksum(model)
    if args.world_size > 1:
        sums = [None] * args.world_size
        torch.distributed.all_gather_object(sums, checksum)
        if not all(abs(s - sums[0]) <= 1e-6 * max(1.0, abs(sums[0])) for s in sums):
            raise RuntimeError(f"ranks out of sync after training: parameter checksums {sums}")
    return True, checksum
