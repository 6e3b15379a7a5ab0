"""A GGUF file as MODEL: a tiny Llama written to GGUF here (float32 tensors, llama.cpp's
names and q/k row order), loaded through transformers, calibrated by the CLI, and its PEFT
output loaded onto the same GGUF file. The real quantized file is in test_real_model.py."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import evagraph_cmd
from safetensors.torch import save_file

from evagraph.data.text import is_gguf
from evagraph.errors import ModelLoadError
from evagraph.loading import load_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS, LAYERS = 4, 2, 2
_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _gguf_name(name: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem = name.removesuffix(".weight")
    if stem in top:
        return f"{top[stem]}.weight"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_NAMES[rest]}.weight"


def _rope_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q/k projection (transformers undoes it when loading)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path) -> torch.nn.Module:
    """Write a random tiny Llama to ``path`` as GGUF; return the model it holds."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(64)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            tensor = _rope_order(tensor, HEADS)
        if name.endswith("k_proj.weight"):
            tensor = _rope_order(tensor, KV_HEADS)
        writer.add_tensor(_gguf_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def tiny(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    ids = torch.randint(3, 64, (12, 10), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids}, str(tmp_path / "tokens.safetensors"))
    return model, tmp_path / "tiny.gguf", ids


def test_gguf_loads_as_the_model_it_holds(tiny):
    model, path, ids = tiny
    loaded, kind = load_model(path)
    assert kind == "gguf" and is_gguf(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:2]).logits, model(ids[:2]).logits)


def test_gguf_told_by_content_not_name(tiny, tmp_path):
    _, path, _ = tiny
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(path.read_bytes())
    assert load_model(renamed)[1] == "gguf"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])  # the header, then nothing
    with pytest.raises(ModelLoadError, match="cannot load GGUF model"):
        load_model(cut)


def test_cli_compiles_a_gguf_file_and_peft_loads_onto_it(tiny):
    peft = pytest.importorskip("peft")
    model, path, ids = tiny
    proc = subprocess.run(
        [*evagraph_cmd(), "compile", path.name, "--data", "tokens.safetensors", "--batch-size",
         "4", "--budget", "2", "--format", "peft", "-o", "out", "-q"],
        cwd=path.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((path.parent / "out" / "report.json").read_text())
    assert report["run"]["model_format"].startswith("GGUF, de-quantized")
    config = json.loads((path.parent / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path.resolve().parent)  # not "."
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    ).eval()
    with torch.no_grad():
        expected = base(ids[:3]).logits
    loaded = peft.PeftModel.from_pretrained(base, path.parent / "out").eval()
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if hasattr(m, "lora_A") and m.lora_A
    }
    assert adapted == {layer["name"] for layer in report["layers"] if layer["rank"]}
    assert len(report["layers"]) == 7 * LAYERS  # every projection of every block calibrated
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:3]).logits, expected)  # B = 0 at init
