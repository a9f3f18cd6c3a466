"""Write a tiny llama-architecture GGUF model with random weights.

The model exists only so that a real llama-server can load it in well under a
second and serve every endpoint lcha forwards. Its output is noise. The file
is about 250 KB and is byte-for-byte identical for the same seed and name.

Run as a script to write one: ``python tests/e2e/tinymodel.py OUT.gguf``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX_TRAIN = 4096

# SentencePiece writes a space as U+2581 inside pieces.
SPACE_MARK = "\u2581"

# A ChatML template written so that llama.cpp's Jinja engine renders it without
# model-specific extensions. llama.cpp marks <|im_end|> as an end-of-generation
# token by its text, so chat replies stop there when the sampler picks it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = ("hello", "world", "the", "and", "lcha", "llama", "slot", "cache")


def write_tiny_model(path: str | os.PathLike[str], *, seed: int = 0, name: str = "tiny") -> Path:
    """Write the model to ``path`` and return it as a Path.

    ``seed`` selects the weights, so models with different seeds generate
    different text. ``name`` goes to ``general.name``.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _build_vocab()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for tensor_name, array in _build_tensors(rng, len(tokens)):
        writer.add_tensor(tensor_name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _build_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]

    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 2

    # The SPM tokenizer merges adjacent pieces only when the merged piece is in
    # the vocabulary, so single characters and a few words give it something
    # to merge. Anything else falls back to the byte tokens above.
    pieces = [SPACE_MARK] + [chr(code) for code in range(0x21, 0x7F)]
    pieces += [SPACE_MARK + word for word in _WORDS]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)

    # Longer pieces score higher, so the tokenizer prefers whole words.
    scores = [0.0] * (len(tokens) - len(pieces)) + [float(len(piece)) for piece in pieces]
    return tokens, scores, [int(kind) for kind in types]


def _build_tensors(rng: np.random.Generator, n_vocab: int) -> list[tuple[str, np.ndarray]]:
    head_dim = N_EMBD // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV

    def matrix(rows: int, cols: int) -> np.ndarray:
        # Scaled so that activations stay finite through both layers.
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    # numpy shapes are (rows, cols). GGUF stores dimensions in reverse order,
    # which gives the {n_embd, n_vocab} order that llama.cpp expects.
    tensors = [
        ("token_embd.weight", matrix(n_vocab, N_EMBD)),
        ("output_norm.weight", norm()),
        ("output.weight", matrix(n_vocab, N_EMBD)),
    ]
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}."
        tensors += [
            (prefix + "attn_norm.weight", norm()),
            (prefix + "attn_q.weight", matrix(N_EMBD, N_EMBD)),
            (prefix + "attn_k.weight", matrix(n_embd_kv, N_EMBD)),
            (prefix + "attn_v.weight", matrix(n_embd_kv, N_EMBD)),
            (prefix + "attn_output.weight", matrix(N_EMBD, N_EMBD)),
            (prefix + "ffn_norm.weight", norm()),
            (prefix + "ffn_gate.weight", matrix(N_FF, N_EMBD)),
            (prefix + "ffn_up.weight", matrix(N_FF, N_EMBD)),
            (prefix + "ffn_down.weight", matrix(N_EMBD, N_FF)),
        ]
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output GGUF file")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    parser.add_argument("--name", default="tiny", help="value of general.name (default: tiny)")
    args = parser.parse_args()
    written = write_tiny_model(args.path, seed=args.seed, name=args.name)
    print(written)


if __name__ == "__main__":
    main()
