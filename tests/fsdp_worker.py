"""Train a Skip-Vision model sharded with torch FSDP2 (``fully_shard``), one rank of ``torchrun`` on CPU (gloo).

accelerate 1.15 only turns Trainer's FSDP path on for accelerator devices, so on this CPU-only machine the test
drives FSDP2 directly: the same wrap units the Trainer path uses (``Family.block_class_names``), the same data
pipeline, a global batch split across ranks and token-weighted loss as Trainer computes it. It writes the losses
and, from rank 0, the gathered full model as a normal checkpoint.

Usage: torchrun --nproc_per_node=N fsdp_worker.py MODEL_DIR DATA_JSON OUT_DIR GLOBAL_BATCH STEPS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import skipvision
from skipvision.harness.data import LlavaCollator, LlavaJsonDataset
from skipvision.harness.presets import MODEL_PRESETS
from skipvision.harness.train import load_for_training

SKIP = MODEL_PRESETS["tiny"].skip_vision


def load(model_dir: str):
    torch.manual_seed(0)  # the summary scorer is initialised at load time
    model, processor = load_for_training(model_dir, SKIP)
    skipvision.family_of(model).vision_tower(model).requires_grad_(False)
    return model, processor


def batches(processor, data: str, global_batch: int, steps: int):
    dataset = LlavaJsonDataset(data, None, processor)
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    return [[dataset[step * global_batch + i] for i in range(global_batch)] for step in range(steps)], collate


def train_steps(model, examples, collate, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW steps on global batches; each rank takes its contiguous share and the loss is normalised by the
    global label-token count (Trainer's ``average_tokens_across_devices``), so the update is the global one."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for global_batch in examples:
        share = len(global_batch) // world
        batch = collate(global_batch[rank * share : (rank + 1) * share])
        tokens = sum(int((collate([e])["labels"] != -100).sum()) for e in global_batch)
        # FSDP averages gradients over ranks, hence * world
        loss = model(**batch, num_items_in_batch=torch.tensor(tokens)).loss * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reported = loss.detach() / world
        if world > 1:
            dist.all_reduce(reported)
        losses.append(float(reported))
    return losses


def main() -> None:
    model_dir, data, out, global_batch, steps = sys.argv[1:6]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, processor = load(model_dir)
    examples, collate = batches(processor, data, int(global_batch), int(steps))
    blocks = set(skipvision.family_of(model).block_class_names(model))
    sharded = [m for m in model.modules() if type(m).__name__ in blocks]
    for module in sharded:
        fully_shard(module)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    full = sum(p.numel() for p in model.parameters())
    losses = train_steps(model, examples, collate, rank, world)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain, _ = load(model_dir)
        plain.load_state_dict(state, strict=True)
        plain.save_pretrained(Path(out) / "final")
        skipvision.api.save_processor(processor, Path(out) / "final")
        report = {"losses": losses, "sharded_blocks": len(sharded), "local_params": local, "params": full}
        (Path(out) / "fsdp.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
