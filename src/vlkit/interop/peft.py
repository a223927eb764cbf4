"""LoRA adapters in ``peft``'s folder layout: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<transformers module>.lora_A.weight``
(and ``lora_B``), so ``peft.PeftModel.from_pretrained`` applies a vlkit-trained adapter to the
transformers export of its base model. Module names come from the export's own key map, run
backwards: vlkit's fused q|k|v and gate|up parts become ``q_proj``, ``k_proj``, ... ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlkit.errors import CheckpointError, VlkitError
from vlkit.interop.export import _write_folder, hf_layout
from vlkit.lm import DecoderLM
from vlkit.nn.lora import LoraConfig, add_lora, linear_parts, lora_layers

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""What ``PeftModel`` puts before the transformers model's own module names."""

UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "layer_replication", "trainable_token_indices", "target_parameters")
"""adapter_config.json options vlkit's LoRA does not implement: an adapter setting any is refused."""


def _check_model(model) -> None:
    if not isinstance(model, DecoderLM):
        raise VlkitError(f"peft adapters are written and read for language models (LlamaLM, OPTLM), not a "
                         f"{type(model).__name__}; adapt its language model (e.g. model.lm) and pass that")


def _spans(model) -> dict[tuple[str, int, int], str]:
    """``(vlkit layer path, first row, end row)`` → transformers module name, for each block of
    rows of a linear layer that the transformers export writes as one module's weight."""
    _, rules, _, _ = hf_layout(model)
    linear = linear_parts(model)
    out = {}
    for rule in rules:
        layer = rule.target.removesuffix(".weight")
        if layer not in linear or layer == rule.target or rule.kind not in ("copy", "cat"):
            continue
        rows = linear[layer][-1].stop
        splits = rule.splits or (rows // len(rule.sources),) * len(rule.sources)
        start = 0
        for source, n in zip(rule.sources, splits):
            out[(layer, start, start + n)] = source.removesuffix(".weight")
            start += n
    return out


def _target_modules(adapted: list[str], every: list[str]) -> list[str]:
    """peft's ``target_modules``: the adapted modules' last names where those pick out exactly the
    adapted modules (``q_proj``, ``v_proj``), else their full names."""
    leaves = {m.rpartition(".")[2] for m in adapted}
    if {m for m in every if m.rpartition(".")[2] in leaves} == set(adapted):
        return sorted(leaves)
    return sorted(adapted)


def adapter_state(model, cfg: LoraConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors)`` for the adapters inside ``model`` (see :func:`save_adapter`)."""
    _check_model(model)
    layers = lora_layers(model)
    if not layers:
        raise VlkitError(f"the {type(model).__name__} has no LoRA adapters to save (add_lora adds them)")
    spans = _spans(model)
    tensors, adapted = {}, []
    for path, layer in layers.items():
        if layer.r != cfg.r or not math.isclose(layer.scaling, cfg.scaling):
            raise VlkitError(f"{path}: its adapter has r={layer.r}, scaling {layer.scaling:g}; the LoraConfig given says "
                             f"r={cfg.r}, scaling {cfg.scaling:g} (pass the config the adapters were added with)")
        for part, a, b in layer.part_weights():
            name = spans.get((path, part.start, part.stop))
            if name is None:
                raise VlkitError(f"{part.name} (rows {part.start}:{part.stop} of {path}) is not one module of the "
                                 "transformers export, so peft has no place for its adapter")
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
            adapted.append(name)
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=cfg.r, lora_alpha=alpha, lora_dropout=cfg.dropout,
                  use_rslora=cfg.rslora, target_modules=_target_modules(adapted, list(spans.values())), bias="none",
                  fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
                  base_model_name_or_path=None, revision=None)
    return config, tensors


def save_adapter(model, cfg: LoraConfig, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``model``'s LoRA adapters (added by :func:`vlkit.nn.lora.add_lora` with ``cfg``) as a
    peft adapter folder; ``overwrite`` replaces a non-empty ``folder`` whole."""
    config, tensors = adapter_state(model, cfg)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return _write_folder(folder, overwrite, write)


def _read_config(path: Path) -> dict:
    """adapter_config.json, checked to ask for nothing vlkit's LoRA lacks."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a peft adapter folder has {CONFIG} and {WEIGHTS}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: peft_type is {kind!r}; vlkit reads LoRA adapters ('LORA')")
    if used := [k for k in UNSUPPORTED if raw.get(k)]:
        raise CheckpointError(f"{path}: sets {used}, which vlkit's LoRA does not implement")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias is {raw['bias']!r}; vlkit's LoRA trains no biases ('none' expected)")
    return raw


def _config(raw: dict, targets: list[str], path: Path) -> LoraConfig:
    """The adapter's LoraConfig; ``target_modules`` from the modules its weights adapt (the file's
    own may be a pattern, such as "all-linear")."""
    try:
        return LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                          target_modules=targets, rslora=raw.get("use_rslora", False))
    except KeyError as err:
        raise CheckpointError(f"{path}: no {err.args[0]!r}; a LoRA adapter config names r and lora_alpha") from None
    except VlkitError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_adapter(model, folder: str | Path) -> LoraConfig:
    """Add the adapters of a peft LoRA folder (trained by peft or by vlkit) to ``model``, whose
    base weights must be the ones the adapter was trained on; returns the adapter's config."""
    _check_model(model)
    folder = Path(folder)
    raw = _read_config(folder / CONFIG)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder / WEIGHTS}: cannot be read as safetensors ({err})") from None
    names = {name: span for span, name in _spans(model).items()}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, which = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or which not in ("A.weight", "B.weight") or module not in names:
            raise CheckpointError(f"{folder / WEIGHTS}: unexpected key {key!r}; expected "
                                  f"{PREFIX}<module>.lora_A.weight / lora_B.weight for a linear module of this model")
        found.setdefault(module, {})[which[0]] = value
    if not found:
        raise CheckpointError(f"{folder / WEIGHTS}: holds no adapter weights")
    cfg = _config(raw, _target_modules(list(found), list(names)), folder / CONFIG)
    for module, pair in found.items():
        path, start, stop = names[module]
        want = {"A": (cfg.r, model.get_submodule(path).in_features), "B": (stop - start, cfg.r)}
        for which, shape in want.items():
            got = pair.get(which)
            if got is None or tuple(got.shape) != shape:
                problem = "missing" if got is None else f"of shape {tuple(got.shape)}"
                raise CheckpointError(f"{folder / WEIGHTS}: {PREFIX}{module}.lora_{which}.weight is {problem}; expected "
                                      f"{shape} (r={cfg.r} from {CONFIG}, the layer's size from the model)")
    parts = {(path, p.start, p.stop): p.name for path, ps in linear_parts(model).items() for p in ps}
    add_lora(model, LoraConfig(cfg.r, cfg.alpha, cfg.dropout, [parts[names[m]] for m in found], cfg.rslora))
    by_span = {names[m]: pair for m, pair in found.items()}
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            for part, a, b in layer.part_weights():
                pair = by_span[(path, part.start, part.stop)]
                a.copy_(pair["A"])
                b.copy_(pair["B"])
    return cfg

