"""LoRA in Accelerate's resumable checkpoints: `save_state` keeps only the adapter, `load_state` loads it back.

This is how the trainer checkpoints a LoRA run, so it lives beside the trainer; the model layer only says
which tensors an adapter is (`lora.is_adapter_key`) and loads them strictly (`lora.load_adapter_state`).
"""

from __future__ import annotations

from pathlib import Path

from gptforge.errors import CheckpointError
from gptforge.model.lora import is_adapter_key, load_adapter_state, lora_config, strip_wrappers


def register_adapter_checkpointing(accelerator) -> None:
    """Make `accelerator.save_state` / `load_state` keep only the adapter (and head) of LoRA models.

    The frozen base is never written to resumable checkpoints; on load the adapter tensors go into the
    model (which must already be base + `apply_lora`) strictly, and accelerate's own full-model load is
    skipped for it. Optimizer, scheduler and RNG states are saved and restored by accelerate as usual.
    """
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, m in enumerate(models):
            if lora_config(accelerator.unwrap_model(m)) is not None:
                weights[i] = {k: v for k, v in weights[i].items() if is_adapter_key(k)}

    def load_hook(models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            inner = accelerator.unwrap_model(models[i])
            if lora_config(inner) is None:
                continue
            if i != len(models) - 1:
                raise CheckpointError(
                    "adapter checkpointing supports a LoRA model only as the last prepared model"
                )
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{path}: adapter weights missing; the checkpoint is incomplete")
            device = str(next(inner.parameters()).device)
            sd = {strip_wrappers(k): v for k, v in load_file(str(path), device=device).items()}
            load_adapter_state(inner, sd, source=str(path))
            models.pop(i)  # accelerate would load the file strictly into the full model: done here instead

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
