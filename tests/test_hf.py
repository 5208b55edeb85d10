"""Hugging Face interop: export loads in transformers, import reads transformers/BAAI layouts."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_aquila.model import AquilaConfig, AquilaModel, export_hf, import_hf


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    # rope_theta off the default so a mapping mistake shows in the logits
    return AquilaModel(AquilaConfig.from_name("aquila2-tiny", rope_theta=5000.0)).eval()


def _ids(vocab=8192):
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


def test_export_loads_in_transformers_with_equal_logits(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    ids = _ids()
    with torch.no_grad():
        diff = (hf_model(ids).logits - tiny_model(ids)).abs().max().item()
    assert diff < 1e-4


def test_import_of_transformers_saved_llama_gives_equal_logits(tmp_path):
    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            max_position_embeddings=128, rope_theta=20000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    hf_model = LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "llama")
    ours = import_hf(tmp_path / "llama").eval()
    assert ours.config.rope_theta == 20000.0 and ours.config.num_kv_heads == 2
    ids = _ids(512)
    with torch.no_grad():
        diff = (hf_model(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4


def test_import_reads_baai_aquila2_layout(tmp_path, tiny_model):
    # BAAI's Aquila2 checkpoints: model_type "aquila", rope_theta at top level, .bin shards
    # behind an index, a rotary inv_freq buffer saved alongside the weights.
    from lightning_aquila.model.hf import to_hf_state_dict

    cfg = tiny_model.config
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "aquila", "architectures": ["AquilaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": False,
    }))
    state = to_hf_state_dict(tiny_model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = sorted(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half],
              "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = import_hf(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), tiny_model(ids))


def test_sharded_export_round_trips(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "hf", max_shard_bytes=1_000_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    back = import_hf(tmp_path / "hf")
    for (name, a), b in zip(tiny_model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_refuses_to_overwrite_a_nonempty_directory(tmp_path, tiny_model):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="hf"):
        export_hf(tiny_model, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"


def test_export_in_bf16_halves_the_file(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "fp32")
    export_hf(tiny_model, tmp_path / "bf16", dtype=torch.bfloat16)
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    bf16 = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert bf16 < 0.51 * fp32
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_import_names_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        import_hf(tmp_path)
