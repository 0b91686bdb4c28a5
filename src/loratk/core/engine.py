"""Which of Accelerate's distributed engines a launch runs, in the words loratk's checks and messages use."""

from __future__ import annotations

from typing import Any


def engine_kind(accelerator: Any) -> str:
    """Accelerate's distributed type without its enum prefix: "NO", "MULTI_GPU", "FSDP", "DEEPSPEED", ..."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def describe_engine(accelerator: Any) -> tuple[str, bool]:
    """(the launch's engine in words, whether it shards the weights across processes)."""
    kind = engine_kind(accelerator)
    if kind == "FSDP":
        return "FSDP", True
    if kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage}", stage == 3
    return (
        f"{accelerator.num_processes} processes ({kind})" if accelerator.num_processes > 1 else kind
    ), False
