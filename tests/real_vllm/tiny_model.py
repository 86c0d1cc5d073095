"""Builds a tiny random model with olmOCR-7B's architecture (Qwen2.5-VL), offline, for the real-vLLM tier.

Run with the real-vLLM environment's interpreter (it needs transformers and tokenizers, which the
project's own ``.venv`` does not have)::

    python tests/real_vllm/tiny_model.py OUTPUT_DIR

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a little text from this file, with
Qwen's 14 special tokens appended in Qwen's order (so the config's image/vision token ids match), the
chat template is Qwen2-VL's, and the image processor has a small ``max_pixels`` so that one page image
costs at most 64 tokens. The weights are random: the model writes garbage unless its output is
constrained (structured outputs), which is what the tier's happy-path tests do.

The output directory name is keyed by this file's content hash (see ``model_dir`` in conftest.py), so
editing this builder rebuilds the model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Qwen2's special tokens, in the order (and so with the relative ids) of the real tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2-VL's chat template (images become <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: One page image is at most this many pixels: (64 * 28 * 28) / (28 * 28) = 64 image tokens.
MAX_PIXELS = 64 * 28 * 28
MIN_PIXELS = 4 * 28 * 28
BPE_VOCAB = 1000


def training_text() -> list[str]:
    """A little local text: this file, and the olmOCR prompt and front matter the tests will send."""
    text = Path(__file__).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    lines += [
        "Attached is one page of a document that you must process. Just return the plain text representation.",
        "The quick brown fox jumps over the lazy dog. 0123456789 <table><tr><td>cell</td></tr></table>",
    ]
    return lines * 4


def build_tokenizer(out: Path) -> int:
    """Trains the byte-level BPE, appends the special tokens, writes tokenizer files; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(fast)


def token_ids(out: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def build_model(out: Path, vocab_size: int, ids: dict[str, int]) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    hidden = 128
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,  # head_dim 64: vLLM's CPU attention wants 32/64/...
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [8, 12, 12]},  # sums to 32
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        torch_dtype="bfloat16",
    )
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[1], in_chans=3,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    shape_answers(model, ids["<|im_end|>"], *token_classes(out))
    model.to(torch.bfloat16).save_pretrained(str(out))
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def token_classes(out: Path) -> tuple[list[int], list[int], int]:
    """(tokens that are only dashes, tokens that are dashes then a newline, one word token)."""
    import re

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    dashes, newline = [], []
    for token_id in range(len(tok)):
        text = tok.decode([token_id])
        if re.fullmatch(r"\n?-+", text):
            dashes.append(token_id)
        elif re.fullmatch(r"-*\n", text):
            newline.append(token_id)
    newline.sort(key=lambda t: tok.decode([t]) != "\n")  # the bare newline first: the one preferred
    word = tok.encode("The", add_special_tokens=False)[0]
    return dashes, newline, word


def shape_answers(model, end_id: int, dashes: list[int], newline: list[int], word: int) -> None:
    """Makes the random model end its answers, so that a constrained answer is a usable page.

    A random model rarely ends its answer, so every page would run to ``max_tokens`` and be rejected
    (``finish_reason: length``). Instead three residual dimensions carry the current token's class only
    (token embeddings write them, no layer does): dimension 0 is 4.0 for every token, 1 for tokens made of
    dashes, 2 for a newline after dashes. The output layer reads them: after dashes a newline is likeliest,
    after that newline the word "The", anywhere else ``<|im_end|>``. Unconstrained, the model therefore
    answers at once with no front matter (at most "The"); under structured outputs it writes the front
    matter the grammar forces (random choices inside it), then "---", a newline, "The", and stops: a page
    answered by the model proves the constraint reached vLLM.
    """
    import torch

    with torch.no_grad():
        lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
        emb = lm.embed_tokens.weight
        emb[:, 0:3] = 0.0
        emb[:, 0] = 4.0
        emb[dashes, 1] = 4.0
        emb[newline, 2] = 4.0
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[0:3, :] = 0.0
            layer.mlp.down_proj.weight[0:3, :] = 0.0
        head = model.lm_head.weight
        head[:, 0:3] = 0.0
        head[end_id, 0] = 1.0
        for nl in newline:
            head[nl, 1] = 3.0 if nl == newline[0] else 0.0
        head[word, 2] = 3.0


def build_processor(out: Path) -> None:
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def build(out: Path) -> None:
    """Builds into ``out.partial`` and renames, so a half-built model is never used."""
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True)
    vocab = build_tokenizer(partial)
    ids = token_ids(partial)
    build_model(partial, vocab, ids)
    build_processor(partial)
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(str(partial))  # what vLLM will do: fail here, not in the server
    try:
        partial.rename(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        # another build won the race; keep theirs
        import shutil

        shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tiny_model.py OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if (out / "config.json").exists():
        print(out)
        return 0
    build(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
