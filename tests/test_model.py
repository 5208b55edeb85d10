"""The Aquila2 decoder: presets, shapes, causality, GQA, meta-device init, attention paths."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_aquila.model import PRESETS, AquilaConfig, AquilaModel
from lightning_aquila.model.hf import hf_config_dict

# Published sizes of BAAI's Aquila2 models, in billions of parameters.
PUBLISHED_BILLIONS = {"aquila2-7b": 7, "aquila2-34b": 34, "aquila2-70b": 70}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_published_preset_parameter_count_matches_published_size(name):
    config = AquilaConfig.from_name(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in AquilaModel(config).parameters())
    assert ours == config.num_params
    # A nominal "7B" is 7.3B (the 100k vocabulary's untied embeddings add 0.8B), so the
    # published size is matched to 5% ...
    assert ours / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.05)


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_published_preset_parameter_count_equals_transformers_llama(name):
    # ... and exactly the count of the same architecture built by transformers.
    config = AquilaConfig.from_name(name)
    hf_config = LlamaConfig(**{k: v for k, v in hf_config_dict(config, torch.bfloat16).items()
                               if k not in ("architectures", "torch_dtype", "dtype")})
    with torch.device("meta"):
        theirs = sum(p.numel() for p in LlamaForCausalLM(hf_config).parameters())
    assert config.num_params == theirs


def test_aquila2_presets_share_vocabulary_and_special_tokens():
    for name in PUBLISHED_BILLIONS:
        config = AquilaConfig.from_name(name)
        special = (config.vocab_size, config.bos_token_id, config.eos_token_id)
        assert special == (100008, 100006, 100007)
    assert AquilaConfig.from_name("aquila2-34b").num_kv_heads == 8
    assert AquilaConfig.from_name("aquila2-7b").num_kv_heads == 32


def test_one_billion_benchmark_preset_is_about_one_billion():
    assert 0.9e9 < AquilaConfig.from_name("aquila2-1b").num_params < 1.3e9


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="aquila2-7b"):
        AquilaConfig.from_name("aquila2-8b")


def test_config_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_kv_heads"):
        AquilaConfig(hidden_size=64, num_heads=4, num_kv_heads=3)


def test_forward_gives_logits_over_the_vocabulary():
    config = AquilaConfig.from_name("aquila2-tiny")
    model = AquilaModel(config)
    logits = model(torch.randint(0, config.vocab_size, (3, 17)))
    assert logits.shape == (3, 17, config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("rope_scaling", [
    None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_compiled_graph_takes_the_rotary_tables_from_one_opaque_op(rope_scaling):
    """Traced as plain ops, inductor recomputes cos/sin inside every q/k rotation kernel
    (per batch row and head); the tables must enter the graph as one op's outputs, scaled
    or not."""
    config = AquilaConfig.from_name("aquila2-tiny", rope_scaling=rope_scaling)
    model = AquilaModel(config)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    ids = torch.randint(0, config.vocab_size, (2, 16))
    loss, _ = torch.compile(model, backend=capture)(ids, ids)
    targets = [node.target for graph in graphs for node in graph.graph.nodes
               if node.op == "call_function"]
    assert targets.count(torch.ops.lightning_aquila.rope_tables) == 1
    assert not {torch.sin, torch.cos, torch.outer} & set(targets)
    torch.testing.assert_close(loss, model(ids, ids)[0], rtol=0, atol=0)


def test_model_is_causal():
    torch.manual_seed(0)
    model = AquilaModel(AquilaConfig.from_name("aquila2-tiny")).eval()
    ids = torch.randint(0, 8000, (1, 24))
    changed = ids.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % 8000
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_grouped_query_attention_has_fewer_kv_projections():
    config = AquilaConfig.from_name("aquila2-tiny")
    attention = AquilaModel(config).layers[0].attention
    assert attention.k_proj.out_features == config.num_kv_heads * config.head_dim
    assert attention.q_proj.out_features == config.num_heads * config.head_dim
    assert config.num_kv_heads < config.num_heads


def test_sequence_longer_than_context_is_rejected():
    config = AquilaConfig.from_name("aquila2-tiny", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        AquilaModel(config)(torch.zeros(1, 17, dtype=torch.long))


def test_meta_device_model_materialises_and_initialises():
    config = AquilaConfig.from_name("aquila2-tiny")
    with torch.device("meta"):
        model = AquilaModel(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    std = model.layers[0].mlp.gate_proj.weight.std().item()
    assert std == pytest.approx(config.init_std, rel=0.1)
    residual = model.layers[0].mlp.down_proj.weight.std().item()
    assert residual == pytest.approx(config.init_std / (2 * config.num_layers) ** 0.5, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(config.hidden_size))
    assert torch.isfinite(model(torch.randint(0, 100, (1, 8)))).all()


def test_all_presets_build_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            AquilaModel(AquilaConfig.from_name(name))


def test_unknown_attention_implementation_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"attention='flash2' is not one of \['auto', 'sdpa', "
                                         r"'cudnn', 'flash'\]"):
        AquilaModel(AquilaConfig.from_name("aquila2-tiny"), attention="flash2")


def test_flash_attention_without_flash_attn_4_names_the_extra():
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn-4 is installed here")
    with pytest.raises(ImportError, match=r"lightning-aquila\[flash\]"):
        AquilaModel(AquilaConfig.from_name("aquila2-tiny"), attention="flash")


def test_attention_implementations_give_equal_logits_on_cpu():
    """On CPU every choice runs PyTorch's SDPA (cuDNN and flash-attn-4 need CUDA): a config
    written for a GPU still runs, with the same numbers, on a laptop."""
    config = AquilaConfig.from_name("aquila2-tiny")
    torch.manual_seed(0)
    reference = AquilaModel(config, attention="sdpa")
    ids = torch.randint(0, 8000, (2, 16))
    for impl in ("auto", "cudnn"):
        other = AquilaModel(config, attention=impl)
        other.load_state_dict(reference.state_dict())
        assert torch.equal(other(ids), reference(ids)), impl


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["cudnn", "flash"])
def test_fast_attention_equals_sdpa_in_bf16(impl):
    """Forward and backward of each fast kernel against SDPA's default choice, bf16, at the
    benchmark's head dim (128) and grouped-query ratio (4:1). Tolerance: bf16 rounding of
    attention outputs and of gradients summed over 256 positions."""
    if impl == "flash":
        pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not installed")
    config = AquilaConfig.from_name("aquila2-tiny", hidden_size=512, num_heads=4,
                                    num_kv_heads=1, intermediate_size=1024)
    torch.manual_seed(0)
    reference = AquilaModel(config, attention="sdpa").cuda().to(torch.bfloat16)
    fast = AquilaModel(config, attention=impl).cuda().to(torch.bfloat16)
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 8000, (2, 256), device="cuda")
    out_ref, out_fast = reference(ids).float(), fast(ids).float()
    assert (out_fast - out_ref).abs().max().item() < 5e-2
    out_ref.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        scale = p_ref.grad.float().abs().max().item()
        assert (p_fast.grad.float() - p_ref.grad.float()).abs().max().item() <= 5e-2 * scale, name
