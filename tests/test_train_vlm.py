"""`vlkit train vlm`: what trains in each stage (frozen parts unchanged and in eval mode, learning
rates per part), stage 2 from stage 1 (and the error when they differ), exact resume, skips
counted, LoRA merged on export, and the command line end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vlkit
import vlkit.train.vlm as vlm
from _vlm_train_util import RECORDS, VISION, clip_folder, llava_folder, lm_folder, recipe
from vlkit.cli import main
from vlkit.data.images import BadSample
from vlkit.errors import CheckpointError, ConfigError, VlkitError
from vlkit.train.loop import _optimizer
from vlkit.train.vlm import build_model, load_init, load_recipe, plan_training, train_vlm


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {"lm": lm_folder(root / "lmf"), "data": llava_folder(root / "data", repeat=2), "root": root}


@pytest.fixture(scope="module")
def stage1(parts):
    out = parts["root"] / "stage1"
    summary = train_vlm(load_recipe(recipe(parts["lm"], parts["data"], stage=1, steps=3)), out)
    return out, summary


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def latest(run) -> dict[str, torch.Tensor]:
    return weights(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())


def watch_modes(monkeypatch) -> list[tuple[str, bool, bool]]:
    """Records, at every forward of the tower and the LM during training, (part, training mode, any gradient)."""
    seen, build = [], vlm.build_model

    def built(recipe):
        model = build(recipe)
        for name, called in (("vision", model.vision.transformer.blocks[0]), ("lm", model.lm)):  # Llava runs the tower block by block
            part = getattr(model, name)
            called.register_forward_pre_hook(lambda m, args, name=name, part=part: seen.append(
                (name, part.training and all(m.training for m in part.modules()), any(p.requires_grad for p in part.parameters()))))
        return model

    monkeypatch.setattr(vlm, "build_model", built)
    return seen


def test_stage1_trains_only_the_connector_with_the_rest_frozen_in_eval_mode(parts, monkeypatch, capsys, tmp_path):
    seen = watch_modes(monkeypatch)
    r = load_recipe(recipe(parts["lm"], parts["data"], stage=1, steps=2))
    before = {k: v.clone() for k, v in build_model(r).state_dict().items()}
    summary = train_vlm(r, tmp_path / "run")
    after = latest(tmp_path / "run")
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"connector"}
    connector = sum(v.numel() for k, v in before.items() if k.startswith("connector."))
    assert summary["trainable"] == connector
    assert f"trainable parameters: {connector:,} of {summary['parameters']:,}" in capsys.readouterr().out
    assert seen and all(not training and not grad for _, training, grad in seen)
    assert {name for name, *_ in seen} == {"vision", "lm"}
    model = vlkit.load(tmp_path / "run" / "model")
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
    assert model.tokenizer.token_to_id("<image>") == model.cfg.image_token_id and model.processor.size == 32


def test_each_part_gets_its_learning_rate(parts):
    r = load_recipe(recipe(parts["lm"], parts["data"], stage=2, train={"connector_lr": 3e-3, "lm_lr": 2e-4, "vision_lr": 1e-5}))
    model = build_model(r)
    frozen, lrs = plan_training(model, r)
    assert frozen == [] and lrs == {"connector": 3e-3, "vision": 1e-5, "lm": 2e-4}
    optimizer, _ = _optimizer(model, r.optim, 10, lrs)
    by_name = {}
    for group in optimizer.param_groups:
        by_name.setdefault(group.get("name", ""), []).append(group)
    for name, lr in lrs.items():
        ids = {id(p) for g in by_name[name] for p in g["params"]}
        assert ids == {id(p) for p in getattr(model, name).parameters()}
        assert all(g["initial_lr"] == lr for g in by_name[name])
        assert {g["weight_decay"] for g in by_name[name]} == {r.optim.weight_decay, 0.0}
    assert [p for g in by_name[""] for p in g["params"]] == []


def test_stage2_starts_from_stage1_and_refuses_a_different_model(parts, stage1):
    out, _ = stage1
    r = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out)))
    model = build_model(r)
    assert load_init(model, r.init_from) == out / "model"
    trained = weights(out / "model")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    linear = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out), model={"connector": "linear"}))
    with pytest.raises(CheckpointError, match=r'stage1/model: its connector is "mlp" but this recipe builds "linear" \(model.connector\)'):
        load_init(build_model(linear), str(out))
    spelled_out = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out),
                                     model={"connector_options": {"act": "gelu", "bias": True}}))
    assert load_init(build_model(spelled_out), str(out)) == out / "model"  # the defaults, written down
    no_bias = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out),
                                 model={"connector_options": {"bias": False}}))
    with pytest.raises(CheckpointError, match=r"its connector_options.bias is true but this recipe builds false"):
        load_init(build_model(no_bias), str(out))
    wider = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out),
                               model={"vision_config": {**VISION, "width": 64}}))
    with pytest.raises(CheckpointError, match=r"its vision.width is 32 but this recipe builds 64 \(the tower of model.vision\)"):
        load_init(build_model(wider), str(out))
    layer = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out), model={"vision_feature_layer": -1}))
    with pytest.raises(CheckpointError, match=r"its vision_feature_layer is -2 but this recipe builds -1"):
        train_vlm(layer, parts["root"] / "never")
    with pytest.raises(ConfigError, match="init_from: .*nowhere: no such folder"):
        load_init(model, str(parts["root"] / "nowhere"))


def test_recipes_that_cannot_train_are_refused_by_key(parts, tmp_path):
    with pytest.raises(ConfigError, match="stage 1 trains only the connector; got train.lm='full'"):
        load_recipe(recipe(parts["lm"], parts["data"], stage=1, train={"lm": "full"}))
    with pytest.raises(ConfigError, match="data.length_groups 2 under loop.parallel fsdp"):
        load_recipe(recipe(parts["lm"], parts["data"], data={"length_groups": 2}, loop={"parallel": "fsdp"}))
    with pytest.raises(ConfigError, match="exactly one of model.vision .* and model.vision_config"):
        load_recipe(recipe(parts["lm"], parts["data"], model={"vision": "somewhere"}))
    not_a_tower = recipe(parts["lm"], parts["data"], model={"vision": str(parts["lm"])})
    del not_a_tower["model"]["vision_config"]
    with pytest.raises(ConfigError, match="model.vision .*lmf.*: a LlamaLM, which has no ViT vision tower"):
        build_model(load_recipe(not_a_tower))
    with pytest.raises(ConfigError, match="data.max_length 999 exceeds the language model's 256 positions"):
        train_vlm(load_recipe(recipe(parts["lm"], parts["data"], data={"max_length": 999})), tmp_path / "run")
    with pytest.raises(ConfigError, match="data.source .*nothing.json.*: no such file; expected a LLaVA conversation JSON or 'shapes'"):
        train_vlm(load_recipe(recipe(parts["lm"], tmp_path / "nothing.json")), tmp_path / "run")
    with pytest.raises(ConfigError, match="model.lm .*: a CLIP; LLaVA takes a Llama-family language model"):
        train_vlm(load_recipe(recipe(clip_folder(tmp_path / "clip"), parts["data"])), tmp_path / "run")
    for frozen in (["connector"], ["connector.proj"]):
        with pytest.raises(ConfigError, match=r"loop.freeze .*: the connector always trains"):
            load_recipe(recipe(parts["lm"], parts["data"], loop={"freeze": frozen}))


def test_loop_freeze_is_counted_and_a_resume_refuses_new_learning_rates(parts, stage1, tmp_path, capsys):
    out, _ = stage1
    r = recipe(parts["lm"], parts["data"], stage=2, steps=2, init_from=str(out), loop={"freeze": ["lm.layers.0"]})
    summary = train_vlm(load_recipe(r), tmp_path / "run", stop_at=1)
    model = build_model(load_recipe(r))
    layer = sum(p.numel() for p in model.lm.layers[0].parameters())
    full = train_vlm(load_recipe({**r, "loop": {k: v for k, v in r["loop"].items() if k != "freeze"}}), tmp_path / "whole",
                     stop_at=1)
    assert summary["trainable"] == full["trainable"] - layer  # the frozen layer is left out of the count
    faster = {**r, "train": {**r["train"], "lm_lr": 0.5}}
    with pytest.raises(CheckpointError, match=r"keeps the learning rates .* changes train.lm_lr .* → 0.5"):
        train_vlm(load_recipe(faster), tmp_path / "run", resume=True)


@pytest.mark.parametrize("lm_mode", ["full", "lora"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(parts, stage1, tmp_path, lm_mode):
    out, _ = stage1
    r = recipe(parts["lm"], parts["data"], stage=2, steps=4, init_from=str(out), data={"bucket_window": 2},
               train={"vision_lr": 1e-4, "lm": lm_mode}, loop={"save_every": 1})
    straight = train_vlm(load_recipe(r), tmp_path / "straight")
    stopped = train_vlm(load_recipe(r), tmp_path / "resumed", stop_at=2)
    assert stopped["steps"] == 2 and "model" not in stopped
    # an interrupted run loads, and starts a next stage, as its newest checkpoint (a LoRA run's adapters merged)
    trained = build_model(load_recipe(r))
    plan_training(trained, load_recipe(r))
    trained.load_state_dict(latest(tmp_path / "resumed"))
    init = build_model(load_recipe(r))
    load_init(init, str(tmp_path / "resumed"))
    ids, pixels = torch.tensor([[1, 2] + [init.cfg.image_token_id] * 16 + [5, 6, 7]]), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = trained.eval()(ids, pixels).logits
        assert torch.allclose(vlkit.load(tmp_path / "resumed")(ids, pixels).logits, want, atol=1e-5)
        assert torch.allclose(init.eval()(ids, pixels).logits, want, atol=1e-5)
    resumed = train_vlm(load_recipe(r), tmp_path / "resumed", resume=True)
    assert resumed["steps"] == straight["steps"] == 4
    a, b = latest(tmp_path / "straight"), latest(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["vision.patch_embed.weight"], weights(out / "model")["vision.patch_embed.weight"])
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    # a fresh run into a finished run's folder: its first checkpoint takes the old final model away
    assert (tmp_path / "straight" / "model").is_dir()
    train_vlm(load_recipe({**r, "loop": {**r["loop"], "seed": 7}}), tmp_path / "straight", stop_at=1)
    assert not (tmp_path / "straight" / "model").exists() and not (tmp_path / "straight" / "adapter").exists()
    newest = latest(tmp_path / "straight")
    key = next(k for k in newest if k.startswith("connector."))
    assert torch.equal(vlkit.load(tmp_path / "straight").state_dict()[key], newest[key])


def test_length_groups_train_as_the_whole_batch(parts, stage1, tmp_path):
    """A batch run as length-sorted parts (data.length_groups) takes the whole batch's steps."""
    out, _ = stage1
    runs = {}
    for k in (1, 3):
        r = recipe(parts["lm"], parts["data"], stage=2, steps=3, init_from=str(out), data={"bucket_window": 0, "length_groups": k},
                   train={"vision_lr": 1e-4, "loss": "answer"}, loop={"batch_size": 6})  # fmt: skip
        summary = train_vlm(load_recipe(r), tmp_path / f"groups{k}")
        runs[k] = (latest(tmp_path / f"groups{k}"), summary["samples"])
    (whole, seen), (grouped, grouped_seen) = runs[1], runs[3]
    assert seen == grouped_seen == 18
    assert all(torch.allclose(whole[k], grouped[k], atol=1e-5) for k in whole)
    assert not torch.equal(whole["lm.layers.0.mlp.down.weight"], weights(out / "model")["lm.layers.0.mlp.down.weight"])


def test_bad_samples_are_counted_or_stop_the_run(parts, tmp_path, capsys):
    mute = {"id": "mute", "image": "images/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
    recs = [*RECORDS, {**RECORDS[0], "id": "lost", "image": "images/gone.png"}, mute]
    data = llava_folder(tmp_path / "data", recs)
    r = recipe(parts["lm"], data, stage=1, steps=3, data={"on_bad_sample": "skip", "bucket_window": 0})
    summary = train_vlm(load_recipe(r), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert summary["skipped"] + summary["skipped_records"] == len(lines) and summary["skipped"] >= 1
    # the record skipped as the data was read (no answer to train on) is listed too, first, as step 0; it was not
    assert (lines[0]["step"], lines[0]["record"], lines[0]["reason"]) == (0, "record 5 (id 'mute')", "bad record")
    assert {(s["source"], s["record"], s["reason"]) for s in lines[1:]} == {(str(data), "record 4 (id 'lost')", "missing image")}
    # stage 1 trains the connector only, which the text-only record "text" cannot reach: left out up front
    assert "left out 1 records without images" in capsys.readouterr().out
    r["data"]["on_bad_sample"] = "error"
    with pytest.raises(VlkitError, match=r"data\.json, record 5 \(id 'mute'\): 1 turns; expected human/gpt pairs"):
        train_vlm(load_recipe(r), tmp_path / "stops")
    llava_folder(tmp_path / "data", recs[:-1])
    with pytest.raises(BadSample, match=r"data\.json, record 4 \(id 'lost'\): image 0 .*gone\.png: file not found"):
        train_vlm(load_recipe(r), tmp_path / "stops")


def test_lora_trains_adapters_only_and_exports_them_merged_and_in_peft_layout(parts, stage1, tmp_path):
    out, _ = stage1
    r = load_recipe(recipe(parts["lm"], parts["data"], stage=2, steps=3, init_from=str(out),
                           train={"lm": "lora", "lm_lr": 0.05},  # large, so the adapters move the logits measurably
                           lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    summary = train_vlm(r, tmp_path / "lora")
    state = latest(tmp_path / "lora")
    start = weights(out / "model")
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all(k.startswith("lm.") for k in lora_keys)
    base = [k for k in state if k.startswith("lm.") and "lora_" not in k]
    assert all(torch.equal(state[k], start[k]) for k in base)  # the LM's own weights stay as stage 1 left them
    assert any(not torch.equal(state[k], start[k]) for k in state if k.startswith("connector."))
    assert summary["trainable"] == sum(state[k].numel() for k in lora_keys) + sum(
        v.numel() for k, v in state.items() if k.startswith("connector."))
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    merged = vlkit.load(tmp_path / "lora" / "model")
    assert vlkit.load(tmp_path / "lora").state_dict().keys() == merged.state_dict().keys()  # the run folder loads its merged model
    trained = build_model(r)
    plan_training(trained, r)
    trained.load_state_dict(state)
    trained.eval()
    ids = torch.tensor([[1, 2] + [merged.cfg.image_token_id] * 16 + [5, 6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(merged(ids, pixels).logits, trained(ids, pixels).logits, atol=1e-5)
        assert not torch.allclose(merged(ids, pixels).logits, vlkit.load(out / "model")(ids, pixels).logits, atol=1e-3)
    # the adapter applies, in peft, to the transformers export of the LM it was trained on (stage 1 left it as loaded)
    import peft
    import transformers

    from _interop_util import convert

    assert convert("--to", "hf", str(parts["lm"]), str(tmp_path / "lm-hf")) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm-hf").eval()
    text = torch.tensor([[1, 5, 9, 40, 7, 2]])
    with torch.no_grad():
        ours, before = merged.lm(input_ids=text).logits, hf(input_ids=text).logits
        assert (before - ours).abs().max() > 0.05  # the adapters changed the LM's answers
        tuned = peft.PeftModel.from_pretrained(hf, adapter).eval()  # (adapts hf in place)
        assert (tuned(input_ids=text).logits - ours).abs().max() < 1e-4


def test_the_command_line_trains_both_stages_from_a_clip_folder(parts, tmp_path, capsys):
    tower = clip_folder(tmp_path / "clip")
    recipe_file = tmp_path / "stage1.yaml"
    r = recipe(parts["lm"], parts["data"], stage=1, steps=2)
    r["model"] = {"vision": str(tower), "lm": str(parts["lm"]), "connector": "linear"}
    recipe_file.write_text(json.dumps(r))
    assert main(["train", "vlm", "--recipe", str(recipe_file), "--out", str(tmp_path / "s1"), "--loop.steps=3"]) == 0
    assert json.loads((tmp_path / "s1" / "recipe.json").read_text())["loop"]["steps"] == 3
    assert main(["train", "vlm", "--recipe", str(recipe_file), "--out", str(tmp_path / "s2"), "--stage=2",
                 f"--init_from={tmp_path / 's1'}", "--train.lm=full", "--data.template=llava_v1"]) == 0
    printed = capsys.readouterr().out
    assert f"the model at {tmp_path / 's2' / 'model'} (vlkit.load reads it)" in printed
    model = vlkit.load(tmp_path / "s2" / "model")
    clip = vlkit.load(tower)
    assert torch.equal(model.vision.patch_embed.weight, clip.vision.patch_embed.weight)
    assert model.cfg.connector == "linear"
    rows = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]


def test_help_lists_the_recipe_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "vlm", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in ("--stage=1", "--init_from=null", "--model.vision=", "--model.lm=", "--train.lm=frozen", "--train.vision_lr=null",
                "--lora.r=8", "--lora.target_modules=", "--data.max_length=null", "--data.bucket_window=16", "--loop.steps=1000"):
        assert key in text


def test_stage2_says_when_its_lm_is_not_the_one_the_init_run_trained(parts, stage1, tmp_path):
    out, _ = stage1
    same = load_recipe(recipe(parts["lm"], parts["data"], stage=2, init_from=str(out)))
    assert vlm.init_notes(out / "model", same) == []
    other = load_recipe(recipe(tmp_path / "elsewhere", parts["data"], stage=2, init_from=str(out)))
    (note,) = vlm.init_notes(out / "model", other)
    assert "model.lm is" in note and "elsewhere" in note and "its weights are the ones trained on" in note


def test_a_resume_that_cannot_load_names_what_the_recipe_changed(parts, stage1, tmp_path):
    import shutil

    out, _ = stage1
    run = tmp_path / "run"
    shutil.copytree(out, run)
    r = recipe(parts["lm"], parts["data"], stage=2, steps=8, train={"lm_lr": None})  # over a stage-1 run: other parameter groups
    with pytest.raises(CheckpointError, match=r"cannot resume from it .*The recipe differs from .*recipe.json in .*stage 1 → 2"):
        train_vlm(load_recipe(r), run, resume=True)


@pytest.mark.parametrize("template, used", [("llava_v1", "llava_v1"), ("chatml", "chat_template"), (None, "chat_template")])
def test_a_model_prompts_with_the_template_stage_2_trained_it_on(parts, stage1, tmp_path, template, used):
    """llava_v1 renders other ids than the LM's chatml chat template, so the model records it; chatml renders the same."""
    from vlkit.models.llava_processor import LlavaProcessor

    out, _ = stage1
    r = recipe(parts["lm"], parts["data"], stage=2, steps=1, init_from=str(out), data={"template": template})
    train_vlm(load_recipe(r), tmp_path / "run")
    assert LlavaProcessor.for_model(vlkit.load(tmp_path / "run")).template.name == used
    lora = {**r, "train": {**r["train"], "lm": "lora"}}  # the merged model/ is saved apart
    train_vlm(load_recipe(lora), tmp_path / "lora")
    assert LlavaProcessor.for_model(vlkit.load(tmp_path / "lora")).template.name == used
