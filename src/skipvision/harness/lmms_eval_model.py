"""lmms-eval plugin: any skipvision model directory as an lmms-eval model, registered through the
``lmms_eval.models`` entry point (no fork of lmms-eval).

    lmms-eval --model skipvision --model_args pretrained=run/final,skip_kv_cache=true --tasks ... --batch_size 8

Model args: ``pretrained`` (a saved model, vanilla or Skip-Vision), optional ``num_retained`` / ``num_skipped``
(re-configure the model and its processor, e.g. training-free Skip-Vision on a vanilla checkpoint),
``skip_kv_cache``. The plugin measures time to first token (the prefill) and time per output token itself, within
the one ``generate`` call that answers (no extra prefill), and reports them through lmms-eval's ``log_metrics``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from ..api import checkpoint_skip_vision, family_of, from_pretrained, load_processor
from ..config import SkipVisionConfig, vanilla_config

IMAGE_MARKER = "<image>"


def manifests() -> list[ModelManifest]:
    """The ``lmms_eval.models`` entry point."""
    return [ModelManifest(model_id="skipvision", simple_class_path="skipvision.harness.lmms_eval_model.SkipVisionLMM")]


class _StepClock(LogitsProcessor):
    """Records when each generation step's logits are ready (it changes nothing): the first is the prefill's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels, not just their launch
        self.times.append(time.perf_counter())
        return scores


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("true", "1")


class SkipVisionLMM(lmms):
    """A skipvision model for lmms-eval: batched greedy ``generate_until`` and ``loglikelihood``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        device: str = "cpu",
        num_retained: int | str | None = None,
        num_skipped: int | str | None = None,
        skip_kv_cache: bool | str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches here are batch_size
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown skipvision model args {sorted(unknown)}; see skipvision.harness.lmms_eval_model")
        cfg = checkpoint_skip_vision(pretrained) or vanilla_config()
        if (num_retained is None) != (num_skipped is None):
            raise ValueError("give both num_retained and num_skipped (or neither)")
        if num_retained is not None:
            cfg = SkipVisionConfig(num_retained=int(num_retained), num_skipped=int(num_skipped))
        if skip_kv_cache is not None:
            cfg = replace(cfg, skip_kv_cache=_flag(skip_kv_cache))
        self.model = from_pretrained(pretrained, skip_vision=cfg).to(device).eval()
        self.processor = load_processor(pretrained, cfg)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._device = torch.device(device)
        self.image_token_id = family_of(self.model).image_token_id(self.model.config)

    # --- prompts ---------------------------------------------------------------------------------------------
    def _prompt(self, context: str, num_images: int) -> str:
        """The chat prompt of one request; images without ``<image>`` markers go before the text (LLaVA)."""
        if context.count(IMAGE_MARKER) not in (0, num_images):
            raise ValueError(f"the prompt has {context.count(IMAGE_MARKER)} <image> markers for {num_images} images")
        if IMAGE_MARKER not in context:
            context = f"{IMAGE_MARKER}\n" * num_images + context
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v.convert("RGB") for v in (visuals or [])]

    def _inputs(self, prompts: list[str], images: list) -> dict[str, torch.Tensor]:
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        return {k: v.to(self._device) for k, v in inputs.items()}

    # --- lmms-eval API ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        ttft, tpot, new_tokens, elapsed = [], [], 0, 0.0
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))  # similar lengths batch well
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="skipvision generate")
        for start in range(0, len(order), self.batch_size_per_gpu):
            chunk = order[start : start + self.batch_size_per_gpu]
            prompts, images = [], []
            for i in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                prompts.append(self._prompt(context, len(visuals)))
                images += visuals
            gen_kwargs = dict(requests[chunk[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(gen_kwargs.pop("max_new_tokens", 128))
            inputs = self._inputs(prompts, images)
            clock = _StepClock(self._device)
            begin = time.perf_counter()
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                suppress_tokens=[self.image_token_id],
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([clock]),
            )
            seconds = time.perf_counter() - begin
            generated = out[:, inputs["input_ids"].shape[1] :]
            # time to first token: up to the first step's logits (the prefill); then one decode step per token
            ttft.append(clock.times[0] - begin)
            if len(clock.times) > 1:
                tpot.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
            elapsed += seconds
            for row, i in enumerate(chunk):
                text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                count = int((generated[row] != self.tokenizer.pad_token_id).sum())
                new_tokens += count
                prompt_tokens = int(inputs["attention_mask"][row].sum())
                results[i] = GenerationResult(text=text, token_counts=TokenCounts(prompt_tokens, count))
            bar.update(len(chunk))
        bar.close()
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=new_tokens,
            avg_speed=new_tokens / elapsed if elapsed > 0 else 0.0,
            additional_metrics={
                "ttft": sum(ttft) / max(1, len(ttft)),
                "tpot": sum(tpot) / max(1, len(tpot)),
                "skip_vision": str(self.model.skip_vision_config.to_dict()),
            },
        )
        return results

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | context, images): the context is prefilled (and, with Skip KV-cache, pruned), then
        the continuation is scored as decoding would see it."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="skipvision loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            inputs = self._inputs([self._prompt(context, len(visuals))], visuals)
            target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            target = target.to(self._device)
            if target.shape[1] == 0:
                raise ValueError(f"empty continuation for doc {doc_id} of {task}")
            prefill = self.model(**inputs, use_cache=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(target)], dim=1)
            rest = self.model(input_ids=target, attention_mask=mask, past_key_values=prefill.past_key_values)
            logits = torch.cat([prefill.logits[:, -1:], rest.logits[:, :-1]], dim=1).float()
            logprobs = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            greedy = bool((logits.argmax(-1) == target).all())
            results.append((float(logprobs.sum()), greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("skipvision's lmms-eval model answers single-round requests")
