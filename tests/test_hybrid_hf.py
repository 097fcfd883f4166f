"""Hybrids in and out of transformers' NemotronHForCausalLM and BambaForCausalLM: an exported model gives
transformers' logits (fp32) on the same ids and its greedy tokens; a folder transformers itself wrote loads
with its logits; the round trip keeps every tensor; a model a format cannot hold is refused naming the key,
and one that does not fit the configured model names the fields; checkpoint.init_from starts from an exported
hybrid; the command-line tools export, import and generate with a hybrid."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BambaConfig, BambaForCausalLM, NemotronHConfig, NemotronHForCausalLM

from megassm.data import SampleLoader, TokenStream, load_tokenizer
from megassm.data.shards import TOKENIZER_DIR
from megassm.generate import generate
from megassm.model import Mamba2LM, ModelConfig
from megassm.pretrained import PretrainedError, load_pretrained, save_transformers
from tests.commands import load_tool, user_error
from tests.test_generate import greedy_text, nontrivial, trained_checkpoint
from tests.test_train import CONFIG, train

TINY = ModelConfig.from_preset("debug-hybrid", d_model=32, vocab_size=96, d_state=8, headdim=8, chunk_size=8, attn_head_dim=8,
                               mlp_hidden=48)
NEMOTRON_H = dataclasses.replace(TINY, rope=False, mlp_activation="relu2")
BAMBA = dataclasses.replace(TINY, pattern="M-*-M-*-", rope_theta=500.0)
EXPORTS = {  # (model_type, config): each mapping rule the formats' fields have, tied and untied
    "nemotron_h-tied": ("nemotron_h", NEMOTRON_H),
    "nemotron_h-untied-mqa-biases-dt_limit": ("nemotron_h", dataclasses.replace(
        NEMOTRON_H, pattern="M*-*MM-M", tie_embeddings=False, attn_kv_heads=1, proj_bias=True, conv_bias=False, ngroups=2,
        dt_limit=(0.02, 0.3), dt_min=0.005, norm_eps=1e-6)),
    "bamba-tied-half_rotary": ("bamba", BAMBA),
    "bamba-untied-full_rotary-dt_limit-eps": ("bamba", dataclasses.replace(
        BAMBA, pattern="*-M-M-M-", tie_embeddings=False, rope_fraction=1.0, proj_bias=True, dt_limit=(0.0, 0.05), norm_eps=1e-6)),
}


def exported(model_type: str, cfg: ModelConfig, tmp_path) -> tuple[Mamba2LM, torch.nn.Module]:
    """A megassm model with non-trivial norms and D, and transformers' model loaded from its export."""
    model = nontrivial(Mamba2LM(cfg)).eval()
    save_transformers(cfg, model.state_dict(), tmp_path / "hf", model_type=model_type)
    return model, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def kept_by_nemotron_h(cfg: ModelConfig) -> ModelConfig:
    """cfg as a NemotronH folder reads back: no rope_fraction (no RoPE)."""
    return dataclasses.replace(cfg, rope_fraction=ModelConfig.rope_fraction)


def one_document_per_row(cfg: ModelConfig) -> torch.Tensor:
    """transformers has no document ids: each row is one document, of a length that is not a whole number of chunks."""
    return torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 5))


@pytest.mark.parametrize("model_type, cfg", EXPORTS.values(), ids=EXPORTS.keys())
def test_export_gives_transformers_logits_and_reads_back_whole(model_type, cfg, tmp_path):
    model, hf = exported(model_type, cfg, tmp_path)
    assert type(hf).__name__ == {"nemotron_h": "NemotronHForCausalLM", "bamba": "BambaForCausalLM"}[model_type]
    ids = one_document_per_row(cfg)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours, hf(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)

    cfg_back, state = load_pretrained(tmp_path / "hf", expect=cfg)
    assert cfg_back == (cfg if model_type == "bamba" else kept_by_nemotron_h(cfg))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    back = Mamba2LM(cfg_back).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(back(ids), ours)


@pytest.mark.parametrize("export", ["nemotron_h-tied", "bamba-tied-half_rotary"])
def test_greedy_generation_gives_transformers_tokens(export, tmp_path):
    model_type, cfg = EXPORTS[export]
    model, hf = exported(model_type, cfg, tmp_path)
    prompt = torch.randint(0, cfg.vocab_size, (1, 11))
    ours = generate(model, prompt, 6, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type, pattern", [("nemotron_h", "M-M-"), ("nemotron_h", "MMMM"), ("bamba", "M-M-")])
def test_a_hybrid_without_attention_generates_in_transformers(model_type, pattern, tmp_path):
    """transformers' caches of these models need an attention layer (get_mask_sizes raised): the folder turns the
    cache off, and generation gives our tokens."""
    base = NEMOTRON_H if model_type == "nemotron_h" else BAMBA
    model, hf = exported(model_type, dataclasses.replace(base, pattern=pattern, n_layer=len(pattern)), tmp_path)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), hf(prompt).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, prompt, 4, temperature=0), hf.generate(prompt, max_new_tokens=4, do_sample=False))


def nemotron_h_twin() -> NemotronHForCausalLM:
    """A NemotronH as transformers builds it: its own init, dt clamped below at 0.05 (time_step_limit), the legacy pattern field."""
    config = NemotronHConfig(vocab_size=96, hidden_size=32, hybrid_override_pattern="M-M*-M*-", num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8,
                             ssm_state_size=8, n_groups=2, chunk_size=8, time_step_min=0.05,
                             time_step_limit=(0.05, float("inf")))
    return NemotronHForCausalLM(config).eval()


def bamba_twin() -> BambaForCausalLM:
    """A Bamba as transformers builds it (half of each head rotated, its default), tied."""
    config = BambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2,
                         mamba_chunk_size=8, tie_word_embeddings=True)
    return BambaForCausalLM(config).eval()


@pytest.mark.parametrize("build", [nemotron_h_twin, bamba_twin], ids=["nemotron_h", "bamba"])
def test_a_folder_transformers_wrote_loads_with_its_logits(build, tmp_path):
    hf = build()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("D", "norm.weight", "layernorm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith("dt_bias"):  # dt on both sides of NemotronH's clamp
                p.add_(torch.randn_like(p) * 2)
            if name.endswith(("in_proj.weight", "out_proj.weight")):  # transformers' init leaves the SSM's share of the output tiny
                p.mul_(10)
    hf.save_pretrained(tmp_path)
    if isinstance(hf, NemotronHForCausalLM):  # the pattern as the published Nemotron-H folders name it
        config = json.loads((tmp_path / "config.json").read_text())
        del config["layers_block_type"]
        (tmp_path / "config.json").write_text(json.dumps({**config, "hybrid_override_pattern": "M-M*-M*-"}))
    cfg, state = load_pretrained(tmp_path)
    assert cfg.pattern == {NemotronHForCausalLM: "M-M*-M*-", BambaForCausalLM: "M-*-M-"}[type(hf)]
    model = Mamba2LM(cfg).eval()
    model.load_state_dict(state)
    ids = one_document_per_row(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


REFUSALS = {  # id: (config, model_type, the error)
    "nemotron_h-rope": (TINY, "nemotron_h", r"transformers' nemotron_h cannot hold this model: model.rope = true, but NemotronH's "
                        r"attention has no position embedding \(it needs model.rope = false\); bamba does not fit either"),
    "nemotron_h-swiglu": (dataclasses.replace(BAMBA, rope=False), "nemotron_h",
                          r"model.mlp_activation = 'swiglu', but NemotronH's MLP is 'relu2'"),
    "nemotron_h-rope-bamba_fits": (BAMBA, "nemotron_h", r"model.rope = true, .*; export to bamba instead \(it fits\)"),
    "bamba-pattern": (TINY, "bamba",
                      r"transformers' bamba cannot hold this model: model.pattern = 'M-M\*-M\*-' is not pairs 'M-' or '\*-'"),
    "bamba-relu2": (dataclasses.replace(BAMBA, mlp_activation="relu2"), "bamba",
                    r"model.mlp_activation = 'relu2', but Bamba's MLP is 'swiglu'"),
    "bamba-relu2-nemotron_h_fits": (dataclasses.replace(NEMOTRON_H, pattern="M-*-M-*-"), "bamba",
                                    r"model.mlp_activation = 'relu2', .*; export to nemotron_h instead \(it fits\)"),
    "bamba-mamba2_only": (dataclasses.replace(BAMBA, pattern=""), "bamba",
                          r"model.pattern = '' is not pairs .*; export a model of Mamba-2 blocks only to mamba2$"),
    "mamba2-hybrid": (NEMOTRON_H, "mamba2",
                      r"model.pattern = 'M-M\*-M\*-' has attention or MLP blocks: the transformers Mamba2 and mamba-ssm formats"),
}


@pytest.mark.parametrize("cfg, model_type, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_model_the_format_cannot_hold_is_refused_before_writing(cfg, model_type, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        save_transformers(cfg, Mamba2LM(cfg).state_dict(), tmp_path / "hf", model_type=model_type)
    assert not (tmp_path / "hf").exists()


def test_loading_names_what_does_not_fit(tmp_path):
    exported("nemotron_h", NEMOTRON_H, tmp_path)
    with pytest.raises(PretrainedError, match=r"does not fit the configured model; it has pattern M-M\*-M\*- \(configured: M-\*-M-\*-\)"):
        load_pretrained(tmp_path / "hf", expect=dataclasses.replace(NEMOTRON_H, pattern="M-*-M-*-"))
    with pytest.raises(PretrainedError, match=r"it has rope False \(configured: True\)"):  # the same shapes, another attention
        load_pretrained(tmp_path / "hf", expect=dataclasses.replace(NEMOTRON_H, rope=True))

    nemotron_h = nemotron_h_twin()
    nemotron_h.config.tie_word_embeddings = True  # NemotronH never ties: it computes with its own lm_head
    nemotron_h.save_pretrained(tmp_path / "tied")
    with pytest.raises(PretrainedError, match=r"tie_word_embeddings is true, but lm_head.weight is not backbone.embeddings.weight"):
        load_pretrained(tmp_path / "tied")
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**config, "layers_block_type": ["linear_attention", "moe"] * 4}))
    with pytest.raises(PretrainedError, match=r"config.json: layers_block_type has 'moe': megassm builds"):
        load_pretrained(tmp_path / "tied")


def test_init_from_a_nemotron_h_folder_starts_from_its_weights(prepared_data, tmp_path):
    """checkpoint.init_from = an exported hybrid: the first step's loss is that model's loss on the first global batch."""
    cfg = ModelConfig.from_preset("debug-hybrid", chunk_size=16, rope=False, mlp_activation="relu2")
    model = nontrivial(Mamba2LM(cfg))
    save_transformers(cfg, model.state_dict(), tmp_path / "hf")  # a hybrid's default: NemotronH
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG.format(data=prepared_data, steps=1))
    records = train(config, tmp_path / "run", 1, "--model.preset=debug-hybrid", "--model.rope=false", "--model.mlp_activation=relu2",
                    f"--checkpoint.init_from={tmp_path / 'hf'}", "--train.eval_every=0")
    batch = SampleLoader(TokenStream(prepared_data), seq_len=88, seed=0).batch(0, 8)
    with torch.no_grad():
        want = model(batch.input_ids, batch.seq_idx, batch.labels).mean().item()
    assert records[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_command_line_exports_imports_and_generates_a_hybrid(tmp_path, prepared_data, capsys):
    convert, generate_tool = load_tool("convert_checkpoint.py"), load_tool("generate.py")
    tokenizer = load_tokenizer(prepared_data / TOKENIZER_DIR)
    model = nontrivial(Mamba2LM(dataclasses.replace(NEMOTRON_H, vocab_size=512))).eval()
    trained_checkpoint(tmp_path / "run", 3, model, prepared_data)
    want = greedy_text(model, tokenizer, "def fibonacci(", 12)
    greedy = ["--prompt", "def fibonacci(", "--max-new-tokens", "12", "--temperature", "0"]

    convert.main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert "transformers NemotronHForCausalLM" in capsys.readouterr().out
    assert "backbone.layers.1.mixer.up_proj.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    capsys.readouterr()
    given = ["--tokenizer", str(prepared_data / TOKENIZER_DIR)]
    for folder in ("run", "hf", "back"):  # a hybrid run (its data's tokenizer), its export and the import (the same tokenizer given)
        generate_tool.main([str(tmp_path / folder), *greedy, *([] if folder == "run" else given)])
        assert capsys.readouterr().out == want + "\n", folder

    assert user_error(capsys, convert.main, ["to-hf", str(tmp_path / "run"), str(tmp_path / "bamba"), "--format", "bamba"]).startswith(
        "convert_checkpoint.py: error: transformers' bamba cannot hold this model: model.pattern = 'M-M*-M*-' is not pairs")
    assert not (tmp_path / "bamba").exists()
