"""Fixtures for the runner tests: the bundled model (loaded once per session), the
transformers reference, and a tiny random-weight Llama written as GGUF and safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_VOCAB_BYTES = 256
TINY_SPECIALS = ("<|im_start|>", "<|im_end|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": TINY_VOCAB_BYTES + len(TINY_SPECIALS),
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": TINY_ROPE,
    "bos_token_id": None, "eos_token_id": TINY_VOCAB_BYTES + 1, "torch_dtype": "float32",
}


@dataclass(slots=True)
class TinyLlama:
    """A random-weight Llama (GQA, untied embeddings, llama3 rope scaling) in three files."""

    folder: Path  # config.json + model.safetensors + tokenizer.json (float32)
    gguf_path: Path  # the same weights, float32 tensors
    gguf_q_path: Path  # the same weights as Q4_0 / Q4_1 / Q8_0 blocks
    q_state: dict[str, np.ndarray]  # what gguf_q_path holds, dequantized, HF names and layout


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from tokenguard.tokens import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def runner_fp32():
    from tokenguard.runner import LlamaRunner

    runner = LlamaRunner(dtype="float32")
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def runner_auto(bundled_runner):
    """The bundled model in the default mode: the session's one copy (loading takes seconds)."""
    return bundled_runner


@pytest.fixture(scope="session")
def hf_reference(default_gguf: Path):
    """transformers' Llama loaded from the same GGUF (dequantized to float32)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLlama:
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("tiny_llama")
    state = _random_state(TINY_CONFIG)
    folder = root / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(state, str(folder / "model.safetensors"))
    _write_tokenizer_json(folder)
    gguf_path = root / "tiny-f32.gguf"
    _write_gguf(gguf_path, TINY_CONFIG, state, quantized=False)
    gguf_q_path = root / "tiny-q.gguf"
    q_state = _write_gguf(gguf_q_path, TINY_CONFIG, state, quantized=True)
    return TinyLlama(folder, gguf_path, gguf_q_path, q_state)


@pytest.fixture(scope="session")
def tiny_reference(tiny_llama: TinyLlama):
    """transformers' LlamaForCausalLM reading the tiny folder, and a copy holding the
    quantized GGUF's dequantized weights."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(tiny_llama.folder), dtype=torch.float32, attn_implementation="eager").eval()
    q_model = transformers.LlamaForCausalLM.from_pretrained(
        str(tiny_llama.folder), dtype=torch.float32, attn_implementation="eager").eval()
    q_model.load_state_dict({k: torch.from_numpy(v) for k, v in tiny_llama.q_state.items()})
    return model, q_model


def _random_state(cfg: dict) -> dict[str, np.ndarray]:
    """Weights large enough that the logits are far from uniform."""
    rng = np.random.default_rng(0)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q_rows, d), p + "self_attn.k_proj.weight": (kv_rows, d),
            p + "self_attn.v_proj.weight": (kv_rows, d), p + "self_attn.o_proj.weight": (d, q_rows),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        }
    return {
        name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.15 * rng.standard_normal(shape))
        .astype(np.float32)
        for name, shape in shapes.items()
    }


# -- writers ---------------------------------------------------------------------------


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_tokenizer_json(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(_byte_tokens())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TINY_CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None,
        "add_bos_token": False,
    }))


def _llama3_rope_factors(head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling (convert_hf_to_gguf.py's formula)."""
    r = TINY_ROPE
    freqs = 1.0 / (r["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = r["original_max_position_embeddings"] / r["low_freq_factor"]
    high_wavelen = r["original_max_position_embeddings"] / r["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(r["factor"])
        else:
            smooth = (r["original_max_position_embeddings"] / wavelen - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / r["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# quantized variant: a mix of the block types the runner executes or dequantizes
_QUANT_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_1",
                "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q4_1", "output": "Q8_0", "token_embd": "Q8_0"}


def _write_gguf(path: Path, cfg: dict, state: dict[str, np.ndarray], quantized: bool) -> dict[str, np.ndarray]:
    """Write ``state`` (HF names) as a llama GGUF; return the weights as the file holds them (HF layout)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(TINY_ROPE["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_tokens() + list(TINY_SPECIALS))
    w.add_token_types([1] * TINY_VOCAB_BYTES + [3] * len(TINY_SPECIALS))
    w.add_token_merges([])
    w.add_eos_token_id(TINY_VOCAB_BYTES + 1)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)
    stored: dict[str, np.ndarray] = {}
    w.add_tensor("rope_freqs.weight", _llama3_rope_factors(head_dim))
    for name, array in state.items():
        stem = name.removesuffix(".weight")
        if stem == "model.embed_tokens":
            gname = "token_embd"
        elif stem == "lm_head":
            gname = "output"
        elif stem == "model.norm":
            gname = "output_norm"
        else:
            _, _, layer, rest = stem.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        kind = gname.rsplit(".", 1)[-1]
        data = array
        if kind == "attn_q":
            data = _permute(array, heads)
        elif kind == "attn_k":
            data = _permute(array, kv_heads)
        if quantized and kind in _QUANT_TYPES:
            qtype = gguf.GGMLQuantizationType[_QUANT_TYPES[kind]]
            blocks = gguf.quants.quantize(data, qtype)
            w.add_tensor(f"{gname}.weight", blocks, raw_dtype=qtype)
            held = gguf.quants.dequantize(blocks, qtype).reshape(data.shape)
            if kind in ("attn_q", "attn_k"):  # back to HF row order
                n = heads if kind == "attn_q" else kv_heads
                held = held.reshape(n, held.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(held.shape)
            stored[name] = held.astype(np.float32)
        else:
            w.add_tensor(f"{gname}.weight", np.ascontiguousarray(data, dtype=np.float32))
            stored[name] = array
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
