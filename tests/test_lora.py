"""LoRA on vlkit's linear layers against peft: an adapter trained in vlkit, saved in peft's layout,
gives the same logits when peft loads it onto the transformers export of the base model; merged
weights equal peft's ``merge_and_unload``; an adapter peft wrote loads into vlkit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import vlkit  # noqa: E402
from vlkit.errors import CheckpointError, ConfigError, VlkitError  # noqa: E402
from vlkit.interop.export import to_hf  # noqa: E402
from vlkit.interop.peft import load_adapter, save_adapter  # noqa: E402
from vlkit.lm import LlamaConfig, LlamaLM, OPTConfig, OPTLM  # noqa: E402
from vlkit.nn.linear import Linear  # noqa: E402
from vlkit.nn.lora import LoraConfig, LoraLinear, add_lora, lora_layers, lora_parameters, merge_lora  # noqa: E402
from vlkit.train.checkpoint import save_model  # noqa: E402

from _interop_util import convert, perturb  # noqa: E402
from _lm_models import hf_logits, padded_batch, real  # noqa: E402

TOL = 1e-4
MIXED = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]
"""Some parts of each fused layer and not others (k, gate), so a row offset off by a part shows."""
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama-gqa": (dict(family="llama", tie_word_embeddings=False), LoraConfig(r=4, alpha=8, target_modules=MIXED)),
    "qwen2-bias-rslora": (dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True),
                          LoraConfig(r=2, alpha=6, target_modules=ALL, rslora=True)),
    "opt": (dict(family="opt"), LoraConfig(r=3, alpha=3, target_modules=["k_proj", "attn.proj", "fc1"])),
}
HF_TARGETS = {"opt": ["fc1", "k_proj", "out_proj"]}
"""The target modules peft's config names where transformers' names differ from the ones given."""


def tiny_llama(family: str, **overrides) -> LlamaLM:
    torch.manual_seed(0)
    if family == "opt":
        cfg = OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=32)
        return perturb(OPTLM(cfg), scale=0.2)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=32, family=family, **overrides)
    return perturb(LlamaLM(cfg), scale=0.2)


def randomise_adapters(model, seed: int = 1) -> None:
    """Non-zero B (peft's and vlkit's init leave it zero, which would hide a swapped A/B or scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@torch.no_grad()
def logits(model, ids, mask):
    return real(model(input_ids=ids, attention_mask=mask).logits, mask)


def exported(tmp_path, model, name="export"):
    """The base model written by ``vlkit convert --to hf`` from a native vlkit folder, loaded by transformers."""
    save_model(tmp_path / f"{name}-native", model, "opt" if isinstance(model, OPTLM) else "llama")
    assert convert("--to", "hf", str(tmp_path / f"{name}-native"), str(tmp_path / name)) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_vlkit_adapter_in_peft_gives_the_same_logits(tmp_path, case):
    overrides, cfg = CASES[case]
    model = tiny_llama(**overrides)
    hf = exported(tmp_path, model)
    ids, mask = padded_batch()
    base = logits(model, ids, mask)
    names = add_lora(model, cfg)
    assert len(names) == 2 * len(cfg.target_modules) - ("lm_head" in cfg.target_modules)
    randomise_adapters(model)
    adapted = logits(model, ids, mask)
    assert (adapted - base).abs().max() > 0.05, "the adapter must change the logits for the test to mean anything"

    save_adapter(model, cfg, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == cfg.r and written["use_rslora"] == cfg.rslora
    assert sorted(written["target_modules"]) == HF_TARGETS.get(case, sorted(cfg.target_modules))
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert (logits(peft_model, ids, mask) - adapted).abs().max() <= TOL

    merge_lora(model)
    assert not lora_layers(model) and all(type(m) is Linear and m.onednn for m in model.modules() if isinstance(m, Linear))
    scale = adapted.abs().max().clamp(min=1)  # merging only re-rounds: ~1e-6 of the logits' size
    assert (logits(model, ids, mask) - adapted).abs().max() <= 1e-5 * scale
    to_hf(model, tmp_path / "merged")
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_merged = peft_model.merge_and_unload()
    theirs = peft_merged.state_dict()
    for key, value in merged_hf.state_dict().items():
        assert (value - theirs[key]).abs().max() <= 1e-5, key
    assert (hf_logits(merged_hf, ids, mask)[mask.bool()] - adapted).abs().max() <= TOL


def test_peft_adapter_loads_into_vlkit(tmp_path):
    """An adapter peft created and saved gives vlkit the logits peft gives; saved again by vlkit,
    it holds the same tensors under the same keys."""
    model = tiny_llama("llama", tie_word_embeddings=False)
    hf = exported(tmp_path, model)
    peft_cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "gate_proj", "o_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, peft_cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(tmp_path / "from-peft")
    ids, mask = padded_batch()
    want = hf_logits(peft_model.eval(), ids, mask)[mask.bool()]

    loaded = vlkit.load(tmp_path / "export")
    cfg = load_adapter(loaded, tmp_path / "from-peft")
    assert (cfg.r, cfg.alpha, sorted(cfg.target_modules)) == (3, 5.0, ["gate_proj", "k_proj", "o_proj"])
    assert (logits(loaded, ids, mask) - want).abs().max() <= TOL
    save_adapter(loaded, cfg, tmp_path / "again")
    from safetensors.torch import load_file

    theirs, ours = load_file(tmp_path / "from-peft" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_only_adapters_train_when_the_base_is_frozen():
    model = tiny_llama("llama")
    model.requires_grad_(False)
    cfg = LoraConfig(r=2, alpha=4, target_modules=["qkv", "mlp.down"])
    names = add_lora(model, cfg)
    assert names[:3] == ["layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.v_proj"]
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(torch.count_nonzero(p) == 0 for p in params[1::2]), "B starts at zero, as peft's does"
    ids, mask = padded_batch()
    model.train()
    loss = model(input_ids=ids, attention_mask=mask).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params) and all(p.grad.count_nonzero() for p in params[1::2])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_forward_is_the_base_plus_the_scaled_update():
    """One fused layer checked against the formula written out: y = W x + b + s · B_i A_i x on part i's rows."""
    from vlkit.nn.attention import Attention

    torch.manual_seed(0)
    attn = Attention(16, 4, bias=True, num_kv_heads=2)
    x = torch.randn(3, 5, 16)
    w, bias = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
    add_lora(attn, LoraConfig(r=2, alpha=3, target_modules=["k_proj"]))
    layer = attn.qkv
    assert isinstance(layer, LoraLinear) and [p.name for p in layer.parts] == ["k_proj"]
    randomise_adapters(attn)
    want = F.linear(x, w, bias)
    want[..., 16:24] += F.linear(F.linear(x, layer.lora_A), layer.lora_B) * 1.5
    torch.testing.assert_close(layer(x), want)


@torch.no_grad()
def test_onednn_fast_path_with_adapters_and_after_merge():
    """A layer big enough for oneDNN: adapters on top of the fast path, and the merged layer back on it."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = Linear(512, 512)
    holder.proj.onednn = True
    add_lora(holder, LoraConfig(r=4, alpha=4, target_modules=["proj"]))
    randomise_adapters(holder)
    x = torch.randn(2, 7, 512)
    want = F.linear(x, holder.proj.weight + holder.proj.delta(), holder.proj.bias)
    torch.testing.assert_close(holder.proj(x), want, atol=1e-4, rtol=1e-5)
    merge_lora(holder)
    assert type(holder.proj) is Linear and holder.proj.onednn
    torch.testing.assert_close(holder.proj(x), want, atol=1e-4, rtol=1e-5)


def test_plain_nn_linear_is_adapted_and_restored():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6)
    add_lora(net, LoraConfig(r=2, target_modules=["0"]))
    randomise_adapters(net)
    with torch.no_grad():
        y = net(x)
    assert merge_lora(net) == ["0"] and type(net[0]) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(net(x), y)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.fc = Linear(32, 32)
    add_lora(holder, LoraConfig(r=4, dropout=0.5, target_modules=["fc"]))
    randomise_adapters(holder)
    x = torch.randn(8, 32)
    holder.eval()
    assert torch.equal(holder.fc(x), holder.fc(x))
    holder.train()
    assert not torch.equal(holder.fc(x), holder.fc(x))


def test_bad_configs_and_targets_are_named():
    with pytest.raises(ConfigError, match="r"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="target_modules"):
        LoraConfig(target_modules=[])
    model = tiny_llama("llama")
    with pytest.raises(VlkitError, match=r"\['wq'\] match no linear layer.*layers\.0\.attn\.q_proj"):
        add_lora(model, LoraConfig(target_modules=["q_proj", "wq"]))
    assert not lora_layers(model), "a refused target list changes nothing"
    add_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(VlkitError, match="already has LoRA adapters"):
        add_lora(model, LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(VlkitError, match="r=8, scaling 2.*r=4"):
        save_adapter(model, LoraConfig(r=4), "unused")


def test_bad_adapter_folders_are_named(tmp_path):
    model = tiny_llama("llama")
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    fresh = tiny_llama("llama")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: sets \['use_dora'\]"):
        load_adapter(fresh, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A.weight is of shape \(2, 48\); expected \(3, 48\)"):
        load_adapter(fresh, tmp_path / "a")
    assert not lora_layers(fresh), "a refused adapter changes nothing"
    with pytest.raises(CheckpointError, match="adapter_config.json: missing"):
        load_adapter(fresh, tmp_path)


@torch.no_grad()
def test_adapted_tower_pools_through_its_adapters():
    """A ViT's ``pooled`` runs the last block's attention for the class row alone (Attention.attend):
    it must see the adapters as ``forward`` does."""
    from vlkit.vision.vit import ViT, ViTConfig

    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2)).eval()
    add_lora(vit, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomise_adapters(vit)
    pixels = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit.pooled(pixels), vit(pixels).pooled, atol=1e-5, rtol=1e-5)


def test_export_refuses_unmerged_adapters_by_name(tmp_path):
    model = tiny_llama("llama")
    add_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(VlkitError, match=r"unmerged LoRA adapters on 2 layers \(layers.0.attn.qkv, layers.1.attn.qkv\).*merge_lora"):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    merge_lora(model)
    to_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
