"""Language models out of vlkit: ``vlkit convert --to hf`` writes folders transformers loads with no
missing or unexpected keys and the same logits; native vlkit checkpoints (``vlkit_llama``/``vlkit_opt``)
round-trip; sharded transformers folders and dtypes load."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.lm import LlamaConfig, LlamaLM, OPTConfig, OPTLM  # noqa: E402
from vlkit.nn.rope import RopeConfig  # noqa: E402
from vlkit.train.checkpoint import save_model  # noqa: E402

from _interop_util import convert, perturb  # noqa: E402
from _lm_models import hf_logits, hf_model, padded_batch, real, save  # noqa: E402
from test_lm_parity import VARIANTS  # noqa: E402

TOL = 1e-4




def hf_reload(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def vlkit_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", ["llama", "llama-tied", "llama-bias", "llama3-rope", "dynamic-rope", "qwen2", "mistral",
                                  "opt", "opt-post-ln-proj", "opt-no-bias-no-affine"])
@torch.no_grad()
def test_convert_to_hf_gives_transformers_the_same_logits(tmp_path, name):
    family, overrides = VARIANTS[name]
    save(hf_model(family, **overrides), tmp_path / "src")
    model = vlkit.load(tmp_path / "src")
    assert convert("--to", "hf", str(tmp_path / "src"), str(tmp_path / "out")) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family
    back = hf_reload(tmp_path / "out")
    ids, mask = padded_batch()
    assert (real(hf_logits(back, ids, mask), mask) - real(vlkit_logits(model, ids, mask), mask)).abs().max() <= TOL
    again = vlkit.load(tmp_path / "out")
    assert again.cfg == model.cfg


def native_llama() -> LlamaLM:
    """A Llama as vlkit trains one (issue 11): built from its config, not from any checkpoint."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=32, rope=RopeConfig(theta=5000.0),
                      tie_word_embeddings=True, eos_token_id=[2, 3])
    return perturb(LlamaLM(cfg), scale=0.2)


def native_opt() -> OPTLM:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=32, word_embed_proj_dim=24, do_layer_norm_before=False)
    return perturb(OPTLM(cfg), scale=0.2)


@pytest.mark.parametrize("build, kind", [(native_llama, "llama"), (native_opt, "opt")])
@torch.no_grad()
def test_native_checkpoint_round_trip_and_export(tmp_path, build, kind):
    """``save_model`` writes ``vlkit_llama``/``vlkit_opt``; ``vlkit.load`` gives the same logits; convert
    writes a folder transformers reads with the same logits."""
    model = build()
    save_model(tmp_path / "native", model, kind)
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == f"vlkit_{kind}"
    loaded = vlkit.load(tmp_path / "native")
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    ids, mask = padded_batch()
    want = vlkit_logits(model, ids, mask)
    assert torch.equal(vlkit_logits(loaded, ids, mask), want)
    assert convert("--to", "hf", str(tmp_path / "native"), str(tmp_path / "hf")) == 0
    back = hf_reload(tmp_path / "hf")
    assert (real(hf_logits(back, ids, mask), mask) - real(want, mask)).abs().max() <= TOL


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      qkv_bias=True, out_bias=False)
    from vlkit.interop.export import to_hf

    with pytest.raises(ValueError, match="LlamaForCausalLM exactly: qkv_bias=True with out_bias=False"):
        to_hf(LlamaLM(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_sharded_folder_loads(tmp_path):
    """``save_pretrained(max_shard_size=...)`` writes ``model.safetensors.index.json`` and shards."""
    hf = hf_model("llama", num_hidden_layers=3)
    save(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    model = vlkit.load(tmp_path)
    ids, mask = padded_batch()
    assert (real(vlkit_logits(model, ids, mask), mask) - real(hf_logits(hf, ids, mask), mask)).abs().max() <= TOL


@torch.no_grad()
def test_dtype(tmp_path):
    """``dtype`` casts every weight; the KV cache follows the model's dtype."""
    hf = hf_model("qwen2")
    model = vlkit.load(save(hf, tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.new_cache(1, 4).keys.dtype == torch.bfloat16
    ids, mask = padded_batch()
    out = vlkit_logits(model, ids, mask)
    assert out.dtype == torch.bfloat16
    ref = real(hf_logits(hf, ids, mask), mask)
    assert (real(out, mask).float() - ref).abs().max() <= 0.05 * ref.abs().max()


@torch.no_grad()
def test_pytorch_bin_with_bare_decoder_keys(tmp_path):
    """An older OPT folder: ``pytorch_model.bin`` (read with ``weights_only=True``) whose keys lack the
    ``model.`` prefix, as a bare ``OPTModel`` saves them; the tied head needs no ``lm_head.weight``."""
    hf = hf_model("opt")
    save(hf, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = vlkit.load(tmp_path)
    ids, mask = padded_batch()
    assert (real(vlkit_logits(model, ids, mask), mask) - real(hf_logits(hf, ids, mask), mask)).abs().max() <= TOL
