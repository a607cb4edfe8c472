"""GGUF files as parscale models: a tiny llama GGUF written here with the gguf package (as llama.cpp's
converter writes one: q/k rows permuted, a GPT-2-style BPE in the metadata, a chat template), read back."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

import parscale  # noqa: E402
from parscale.cli import main  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it reads a llama GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(folder, architecture="llama"):
    """A tiny random llama (a Qwen2 model without biases, which a llama GGUF cannot hold) as an F32 GGUF;
    returns (file, the Hugging Face model it came from)."""
    from hf_oracle import make_hf_model

    from parscale.training.tokenizer import byte_tokenizer

    hf = make_hf_model("qwen2", folder / "hf")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    cfg = hf.config
    tok = byte_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merged = ["he", "ll", "Ġt"]
    extra = cfg.vocab_size - len(vocab) - len(merged)
    file = folder / "tiny.gguf"
    w = gguf.GGUFWriter(str(file), architecture)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(vocab + merged + [f"<extra_{i}>" for i in range(extra)])
    w.add_token_types([1] * 256 + [3] * (len(vocab) - 256) + [1] * len(merged) + [5] * extra)
    w.add_token_merges(["h e", "l l", "Ġ t"])
    w.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_eos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", sd[p + ours + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file, hf


def test_a_gguf_file_becomes_a_folder_with_transformers_logits_and_tokens(tmp_path):
    import transformers

    file, hf = write_tiny_gguf(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=file.name,
                                                            dtype=torch.float32).eval()
    assert main(["convert", "--model", str(file), "--out", str(tmp_path / "p1")]) == 0
    ours = parscale.load(tmp_path / "p1")
    ids = torch.tensor([[5, 70, 100, 33, 200, 9, 259]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)  # the weights it was written from
    greedy = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert torch.equal(parscale.generate(ours, ids, max_new_tokens=12, eos_token_id=[])[0], greedy)
    # the tokenizer, its chat template and the end of turn travel with the weights
    tok = parscale.load_tokenizer(tmp_path / "p1")
    assert tok.encode("hello", add_special_tokens=False).tokens[:2] == ["he", "ll"]
    prompt = parscale.apply_chat_template(tmp_path / "p1", [{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ends = json.loads((tmp_path / "p1" / "generation_config.json").read_text())["eos_token_id"]
    assert tok.token_to_id("<|im_end|>") in ends and tok.token_to_id("<|endoftext|>") in ends
    # and parscale.load reads the file itself; --streams gives it P streams
    with torch.no_grad():
        torch.testing.assert_close(parscale.load(file)(ids), ours(ids), atol=0, rtol=0)
    assert main(["convert", "--model", str(file), "--out", str(tmp_path / "p4"), "--streams", "4"]) == 0
    assert parscale.load(tmp_path / "p4").config.parscale_n == 4


def test_an_unsupported_architecture_or_a_damaged_file_is_one_error(tmp_path, capsys):
    file = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(file), "falcon")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["convert", "--model", str(file), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF architecture 'falcon' is not supported" in capsys.readouterr().err
    file.write_bytes(b"GGUF" + b"\x00" * 10)
    assert main(["convert", "--model", str(file), "--out", str(tmp_path / "o")]) == 2
    assert "is not a readable GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
