"""The demo's models, built without a model hub.

- `truncated_student(teacher_dir, target, keep_first, keep_last)`: the
  teacher with its middle decoder layers removed, keeping its first
  `keep_first` and last `keep_last` layers (copied from the teacher) and its
  tokenizer. Removing a contiguous middle block keeps the embedding-side and
  the output-side layers that fit each other. The demo keeps 12 + 12 of 30:
  measured greedy on the 120 held-out plural prompts, that student writes
  sentences in the teacher's format ("The plural of the word baby is a
  baby.") yet scores 0/120 (the teacher 99/120); 4 + 8, 6 + 10, 10 + 10,
  11 + 11 and 4 + 14 also score 0 but start from word salad (further from
  the teacher than the demo's budget was tried on); 14 + 14 already scores
  28/120. Evenly spaced layers gave word salad at every depth tried.
- `demo_models()`: the demo's (teacher, student) pair, the embedded model
  and its 12 + 12 truncation, cached (the demo and the benchmarks on the
  demo's models).
- `tiny_pair(dir)`: a random tiny teacher and student (Qwen2-style, head_dim
  64, float32) with an offline byte-level BPE tokenizer, for `opd demo --quick`
  and the tests.
Both write Hugging Face directories that transformers and vLLM load.
"""

from __future__ import annotations

import os
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Distillation trains a small student to match a large teacher.",
    "Please put the final answer in \\boxed{}.",
    "user: hello there\nassistant: hi, how can I help you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.",
    '<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>',
] * 20
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on a small built-in corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: Path, *, arch: str = "qwen2", num_layers: int = 2, hidden_size: int = 128, seed: int = 0, tokenizer=None
) -> Path:
    """Save a random tiny causal LM + tokenizer to `path` and return it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if hidden_size < 64 or hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (heads of 64: vLLM's CPU attention), got {hidden_size}")
    tokenizer = tokenizer or build_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if not isinstance(eos, int) or not isinstance(pad, int):
        raise ValueError(f"the tokenizer needs one eos and one pad token (got eos {eos!r}, pad {pad!r})")
    config_class = Qwen2Config if arch == "qwen2" else LlamaConfig
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,  # head_dim = hidden_size / heads = 64
        max_position_embeddings=512,
        tie_word_embeddings=False,
        dtype="float32",
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger logits than the default init, so distributions are far from uniform
        model.get_output_embeddings().weight.mul_(20.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """(teacher, student) tiny random models with one tokenizer, built once under `root`."""
    teacher, student = root / "tiny-teacher", root / "tiny-student"
    if not (teacher / "config.json").is_file():
        build_tiny_model(teacher, seed=5)
    if not (student / "config.json").is_file():
        build_tiny_model(student, seed=0)
    return teacher, student


def kept_layers(total: int, keep_first: int, keep_last: int) -> list[int]:
    """Indices of the first `keep_first` and the last `keep_last` of `total` layers (all when they cover it)."""
    if keep_first < 0 or keep_last < 0 or keep_first + keep_last < 1:
        raise ValueError(f"keep at least one layer (got keep_first={keep_first}, keep_last={keep_last})")
    if keep_first + keep_last >= total:
        return list(range(total))
    return [*range(keep_first), *range(total - keep_last, total)]


def demo_models(keep_first: int = 12, keep_last: int = 12) -> tuple[Path, Path]:
    """The demo's (teacher, student): the embedded SmolLM2-135M-Instruct and its truncated student, converted
    once and cached under opd's cache directory (the demo, and the benchmarks that run on the demo's models)."""
    from opd.model_source import cache_dir, embedded_model_dir

    teacher = embedded_model_dir()
    name = f"SmolLM2-135M-Instruct-first{keep_first}-last{keep_last}"
    return teacher, truncated_student(teacher, cache_dir() / "models" / name, keep_first, keep_last)


def truncated_student(teacher_dir: Path, target: Path, keep_first: int, keep_last: int) -> Path:
    """Write the teacher with only its first `keep_first` and last `keep_last` decoder layers to `target`, once."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    decoder = model.get_decoder()
    layers = decoder.layers
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{teacher_dir}: expected a decoder whose .layers is a ModuleList, got {type(layers).__name__}"
        )
    keep = kept_layers(len(layers), keep_first, keep_last)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    decoder.layers = kept
    for new_index, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, torch.nn.Module) and hasattr(attn, "layer_idx"):
            # torch types Module.__setattr__'s value as Tensor | Module; a plain int attribute is what it stores
            attn.layer_idx = new_index  # pyright: ignore[reportArgumentType]
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp)
    tmp.rename(target)
    return target
