"""The layout the design relies on (shared/ARCHITECTURE.md): floors that import only downwards, no module over
400 lines, family names only in `models/`, the recipe read only by `recipe` and `components`, and a training
loop that runs a toy model with a fake objective, no SDXL anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "loratk"

# Lowest first: a module may import its own floor or the floors below, never one above.
FLOORS = [
    {"files", "prompts", "plan", "logs", "__init__"},
    {"core"},
    {"data"},
    {"export"},
    {"models"},
    {"adapters", "objectives"},
    {"sampling", "captioning", "evaluation", "baselines"},
    {"recipe", "components", "memory"},
    {"run_folder", "run", "run_eval", "run_gan"},
    {"train", "commands", "cli"},
]


def _floor(module: str) -> int:
    top = module.split(".")[1] if module.startswith("loratk.") else module
    for number, names in enumerate(FLOORS):
        if top in names:
            return number
    raise AssertionError(f"{module} is on no floor; add it to FLOORS (and to ARCHITECTURE.md)")


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> list[str]:
    """Every loratk module `path` imports, at the top or inside a function (lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loratk"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("loratk")]
    return names


def test_every_import_goes_to_the_same_floor_or_below():
    upward = []
    for name, path in _modules().items():
        if name == "loratk":
            continue
        for target in _imports(path):
            if target != "loratk" and _floor(target) > _floor(name):
                upward.append(f"{name} (floor {_floor(name)}) imports {target} (floor {_floor(target)})")
    assert not upward, "\n".join(upward)


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_only_models_names_a_family_s_parts():
    outside = []
    for name, path in _modules().items():
        if name.startswith("loratk.models"):
            continue
        text = path.read_text()
        for word in ("text_encoder_2", "StableDiffusionXLPipeline", "tokenizer_2"):
            if word in text:
                outside.append(f"{name}: {word}")
    assert not outside, outside


def test_only_recipe_and_components_read_the_recipe_method():
    readers = [
        name
        for name, path in _modules().items()
        if "recipe.method" in path.read_text() and not name.startswith(("loratk.recipe", "loratk.components"))
    ]
    assert not readers, readers


def test_the_loop_trains_a_toy_module_with_a_fake_objective():
    """minGPT's test of a trainer: nothing in the loop knows the model, the method or the data."""
    from accelerate import Accelerator

    from loratk.core.loop import MetricsWriter, run_training
    from loratk.core.protocols import LossOutput, Objective
    from loratk.plan import compute_plan

    class Regression:
        """Fits y = 3x; logs its own extra scalar, as the DreamBooth objective logs the prior loss."""

        def __init__(self, model: torch.nn.Module):
            self.model = model

        def compute_loss(self, batch: dict) -> LossOutput:
            error = self.model(batch["x"]) - 3 * batch["x"]
            loss = error.pow(2).mean()
            return LossOutput(loss=loss, logs={"train/abs_error": error.abs().mean().detach()}, num_images=4)

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    objective = Regression(model)
    assert isinstance(objective, Objective)
    batches = [{"x": torch.randn(4, 1)} for _ in range(8)]
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    plan = compute_plan(
        num_examples=32,
        batches_per_epoch=8,
        per_device_batch=4,
        gradient_accumulation_steps=1,
        num_processes=1,
        epochs=3,
        max_steps=None,
    )
    epochs_seen = []

    def evaluate(epoch: int, step: int) -> dict[str, float]:  # an epoch hook that reports a metric
        epochs_seen.append(epoch)
        return {"eval/weight": float(model.weight.item())}

    lines = []

    class Collect(MetricsWriter):
        def write(self, record: dict) -> None:
            lines.append(record)

    result = run_training(
        accelerator,
        objective=objective,
        modules=[model],
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        dataloader=batches,
        plan=plan,
        seed=0,
        metrics=Collect(None),
        epoch_hooks=[evaluate],
    )
    assert result.global_step == 24 and epochs_seen == [1, 2, 3]
    assert model.weight.item() == pytest.approx(3.0, abs=1e-2)
    steps = [r for r in lines if "train/loss" in r]
    assert len(steps) == 24 and all("train/abs_error" in r for r in steps)  # the objective's logs arrive
    assert steps[-1]["train/abs_error"] < steps[0]["train/abs_error"]
    evaluations = [r for r in lines if "eval/weight" in r]
    assert [(r["epoch"], r["step"]) for r in evaluations] == [(1, 8), (2, 16), (3, 24)]


def test_the_text_cache_asks_the_method_whether_the_text_encoders_train():
    """Found by the redesign: the check read `lora.train_text_encoders` even for full DreamBooth."""
    from loratk.components.caches import text_cache_off_reason
    from loratk.recipe import validate_recipe

    db = {"instance_dir": "i", "instance_prompt": "p", "class_prompt": "c"}
    full = validate_recipe(
        {"name": "x", "method": "dreambooth", "dreambooth": db, "full": {"train_text_encoders": True}}
    )
    assert "full.train_text_encoders = true" in text_cache_off_reason(full)
    lora = validate_recipe({"name": "x", "data": {"dir": "i"}, "lora": {"train_text_encoders": True}})
    assert "lora.train_text_encoders = true" in text_cache_off_reason(lora)


def test_the_metadata_of_a_full_run_carries_no_lora_keys():
    """Found by the redesign: every method's metadata had LoRA rank and alpha, which the full export stripped."""
    from types import SimpleNamespace

    from loratk.components.hooks import build_export_metadata
    from loratk.recipe import validate_recipe

    db = {"instance_dir": "i", "instance_prompt": "p", "class_prompt": "c"}
    recipe = validate_recipe({"name": "x", "method": "dreambooth", "dreambooth": db})
    dataset = SimpleNamespace(records=[SimpleNamespace(path=Path("i/a.png"), subset="i", caption="p")])
    metadata = build_export_metadata(recipe, dataset, SimpleNamespace(num_epochs=1))(1, 3)
    assert metadata["ss_steps"] == "3" and metadata["loratk.method"] == "dreambooth"
    assert not [k for k in metadata if k.startswith("ss_network") or k == "modelspec.architecture"]


def test_the_strategies_follow_their_protocols():
    from loratk.adapters.full import FullAdapter
    from loratk.adapters.lora import LoraAdapter
    from loratk.core.protocols import Adapter, Objective
    from loratk.objectives.caption import CaptionObjective
    from loratk.objectives.dreambooth import DreamBoothObjective

    assert isinstance(LoraAdapter(rank=2, alpha=2), Adapter) and isinstance(FullAdapter(), Adapter)
    assert isinstance(CaptionObjective(None), Objective) and isinstance(DreamBoothObjective(None), Objective)
    # The exporter calls export(model, path, metadata, weights=...): the protocol's signature.
    import inspect

    for adapter in (LoraAdapter, FullAdapter):
        assert list(inspect.signature(adapter.export).parameters) == [
            "self",
            "model",
            "path",
            "metadata",
            "weights",
        ]
