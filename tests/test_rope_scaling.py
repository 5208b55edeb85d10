"""RoPE scaling for long context (``AquilaConfig.rope_scaling``), checked against
transformers' own Llama: the same rope_scaling gives the same rotary tables and logits."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lightning_aquila.model import AquilaConfig, AquilaModel, export_hf, import_hf
from lightning_aquila.model.model import rope_cos_sin, rope_scaling_key

THETA = 5000.0
ORIGINAL = 64  # the "pretraining" context; the tests run to MAX_LEN, four times beyond it
MAX_LEN = 256
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-options": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                     ORIGINAL, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
                     "mscale_all_dim": 0.5, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def _hf_config(scaling, head_dim=16, **extra):
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": THETA}
    return LlamaConfig(vocab_size=512, hidden_size=4 * head_dim, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=head_dim, max_position_embeddings=MAX_LEN, rope_parameters=rope,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, **extra)


def _ours(scaling, head_dim=16):
    config = AquilaConfig(vocab_size=512, hidden_size=4 * head_dim, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=96, max_seq_len=MAX_LEN,
                          rope_theta=THETA, rope_scaling=scaling, norm_eps=1e-6,
                          bos_token_id=1, eos_token_id=2)
    return rope_cos_sin(MAX_LEN, head_dim, THETA, torch.device("cpu"), torch.float32,
                        rope_scaling_key(config.rope_scaling))


def _transformers(scaling, head_dim=16):
    rotary = LlamaRotaryEmbedding(_hf_config(scaling, head_dim))
    cos, sin = rotary(torch.zeros(1), torch.arange(MAX_LEN)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rotary_tables_equal_transformers_beyond_the_original_context(name, head_dim):
    ours, theirs = _ours(SCALINGS[name], head_dim), _transformers(SCALINGS[name], head_dim)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    # the check can fail: without the scaling the tables are far off past the original context
    plain, _ = _ours(None, head_dim)
    assert (plain[ORIGINAL:] - theirs[0][ORIGINAL:]).abs().max() > 0.1


def test_no_rope_scaling_is_plain_rope_bit_for_bit():
    ours, theirs = _ours(None), _transformers(None)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "yarn", "llama3"])
def test_import_of_scaled_transformers_llama_gives_equal_logits_past_original_context(
        tmp_path, name):
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(_hf_config(SCALINGS[name])).eval()
    hf_model.save_pretrained(tmp_path / "llama")
    ours = import_hf(tmp_path / "llama").eval()
    assert ours.config.rope_scaling == SCALINGS[name]
    ids = torch.randint(0, 512, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(ids).logits
        torch.testing.assert_close(ours(ids), reference, rtol=0, atol=1e-6)
        plain = AquilaModel(AquilaConfig.from_dict({**ours.config.to_dict(),
                                                    "rope_scaling": None})).eval()
        plain.load_state_dict(ours.state_dict())
        assert (plain(ids) - reference)[:, ORIGINAL:].abs().max() > 1e-3


@pytest.mark.parametrize("name", ["linear", "yarn", "llama3"])
def test_export_writes_rope_scaling_transformers_reads_and_import_reads_back(tmp_path, name):
    torch.manual_seed(0)
    config = AquilaConfig.from_name("aquila2-tiny", rope_theta=THETA, rope_scaling=SCALINGS[name])
    model = AquilaModel(config).eval()
    export_hf(model, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["rope_parameters"] == {**SCALINGS[name], "rope_theta": THETA}
    assert written["rope_scaling"] == SCALINGS[name]  # for transformers 4
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf_model.config.rope_parameters == {**SCALINGS[name], "rope_theta": THETA}
    assert import_hf(tmp_path / "hf").config == replace(config, name="imported")
    ids = torch.randint(0, config.vocab_size, (1, 160), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=0, atol=1e-6)


def test_import_reads_the_legacy_rope_scaling_form():
    from lightning_aquila.model.hf import config_from_hf

    data = _hf_config(None).to_dict()
    del data["rope_parameters"]
    data.update(rope_theta=THETA, rope_scaling={"type": "linear", "factor": 2.0})
    config = config_from_hf(data)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.rope_theta == THETA


@pytest.mark.parametrize(("scaling", "message"), [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported: dynamic NTK"),
    ({"rope_type": "ntk", "factor": 2.0}, r"rope_scaling\['rope_type'\] must be one of"),
    ({"factor": 2.0}, r"rope_scaling\['rope_type'\] must be one of"),
    ({"rope_type": "linear"}, r"rope_type 'linear' lacks \['factor'\]"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 8}, r"unknown key\(s\) \['beta_fast'\]"),
    ({"rope_type": "linear", "factor": 0.5}, r"rope_scaling\['factor'\] must be a number >= 1"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64.5},
     r"\['original_max_position_embeddings'\] must be a positive integer"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
      "low_freq_factor": 4.0, "high_freq_factor": 1.0}, r"\['high_freq_factor'\] \(1.0\) must"),
    ("linear", "rope_scaling must be None or a mapping"),
])
def test_invalid_rope_scaling_is_refused_naming_the_field(scaling, message):
    with pytest.raises(ValueError, match=message):
        AquilaConfig.from_name("aquila2-tiny", rope_scaling=scaling)


def test_legacy_type_key_is_read_as_rope_type():
    config = AquilaConfig.from_name("aquila2-tiny", rope_scaling={"type": "linear", "factor": 2})
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2}
    assert AquilaConfig.from_dict(config.to_dict()) == config


def test_init_from_takes_the_context_from_the_run_config_and_the_rest_from_the_checkpoint(
        tmp_path):
    """Extending a checkpoint's context: a model saved without scaling, imported with a
    run's ``max_seq_len`` and ``rope_scaling``, computes what transformers' scaled Llama
    with the same weights does; shape fields of ``config`` stay the checkpoint's."""
    from lightning_aquila.module import AquilaLM

    torch.manual_seed(0)
    scaled = LlamaForCausalLM(_hf_config(SCALINGS["linear"])).eval()
    scaled.save_pretrained(tmp_path / "llama")
    unscaled = json.loads((tmp_path / "llama" / "config.json").read_text())
    unscaled["rope_parameters"] = {"rope_type": "default", "rope_theta": THETA}
    unscaled.pop("rope_scaling", None)
    unscaled["max_position_embeddings"] = ORIGINAL
    (tmp_path / "llama" / "config.json").write_text(json.dumps(unscaled))
    module = AquilaLM(init_from=str(tmp_path / "llama"), config={
        "max_seq_len": MAX_LEN, "rope_scaling": SCALINGS["linear"], "vocab_size": 9000})
    module.configure_model()
    model = module.model.eval()
    assert model.config.rope_scaling == SCALINGS["linear"]
    assert (model.config.max_seq_len, model.config.vocab_size) == (MAX_LEN, 512)
    assert module.config is model.config
    ids = torch.randint(0, 512, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), scaled(ids).logits, rtol=0, atol=1e-6)


def test_the_scaled_frequencies_are_made_once_and_a_table_first_made_in_validation_trains():
    from lightning_aquila.model.model import _cached_frequencies

    config = AquilaConfig.from_name("aquila2-tiny", rope_theta=THETA,
                                    rope_scaling=SCALINGS["yarn"])
    model = AquilaModel(config)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    _cached_frequencies.cache_clear()
    with torch.inference_mode():  # Lightning's validation: the first forward may be there
        model(ids)
    for _ in range(3):
        model(ids).float().mean().backward()
    assert _cached_frequencies.cache_info().misses == 1  # not one per forward
