"""The typed configuration of `opd eval` (YAML preset < env `OPD_EVAL__*` < CLI).

Owns the options of one evaluation: the model (an HF directory, `embedded`,
or a trainer checkpoint with its base model), the prompt file and how its rows
read, the sampling settings (independent of the rollout workers'), the
reward, the pass@k values, the engine (the rollout workers' `RolloutEngineConfig`),
the optional teacher endpoint (the fields of the trainer's teacher endpoint, with
no default address: no teacher, no divergence) and the report directory.
Holds data only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from opd.config import ConfigModel
from opd.prompts import PromptSourceConfig
from opd.redaction import SECRET
from opd.tls import TeacherTLSOptions
from rollout_workers.config import RolloutEngineConfig

# Flags the command line accepts as a short form of a nested flag.
ALIASES = {"--teacher": "--teacher-addresses"}


class EvalSamplingConfig(ConfigModel):
    n: int = Field(default=4, ge=1, le=4096, description="samples per prompt (pass@k needs k <= n)")
    temperature: float = Field(default=1.0, gt=0, le=10, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(default=-1, ge=-1, description="top-k sampling (-1 = off)")
    max_tokens: int = Field(default=1024, ge=1, description="tokens generated per response")
    seed: int = Field(
        default=0, description="base seed: sample i of a prompt gets a seed derived from it, the prompt id and i"
    )


class EvalRewardConfig(ConfigModel):
    function: str = Field(
        default="math",
        description="reward: `math` (boxed / `Answer:` line, checked with math-verify), `exact` "
        "(normalised exact match) or a `module:function` plug-in fn(response_text, prompt_record) -> float|None",
    )
    timeout_s: float = Field(
        default=10.0, gt=0, description="time limit of one reward call (a failed call scores nothing)"
    )
    pass_threshold: float = Field(default=0.0, description="a sample is correct when its reward exceeds this")


class EvalPromptsConfig(ConfigModel):
    format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto", description="prompt file format (auto: by extension)"
    )
    id_field: str = Field(default="id", description="row field with the prompt id (else FILE_STEM:ROW)")
    prompt_field: str = Field(default="prompt", description="row field with the user prompt text")
    messages_field: str = Field(default="messages", description="row field with chat turns [{role, content}]")
    answer_field: str = Field(default="answer", description="row field with the reference answer")
    system_prompt: str | None = Field(default=None, description="system message prepended when a row has none")
    instruction: Literal["none", "boxed", "answer-line", "concise"] = Field(
        default="none", description="instruction appended to the last user turn (boxed: math, answer in \\boxed{})"
    )
    instruction_text: str | None = Field(
        default=None, description="custom instruction text (overrides --dataset-instruction)"
    )
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N rows")

    def source_config(self) -> PromptSourceConfig:
        return PromptSourceConfig(**self.model_dump(), split="eval")


class EvalTeacherConfig(TeacherTLSOptions):
    addresses: list[str] = Field(
        default_factory=list,
        description="teacher gRPC address(es) (`--teacher HOST:PORT`); unset = no divergence or teacher diagnostics",
    )
    token: str | None = Field(
        default=None,
        description="bearer token (prefer the env variable OPD_EVAL__TEACHER__TOKEN); shown as <redacted>",
        json_schema_extra=SECRET,
    )
    client_name: str = Field(default="eval", description="client name for the teacher's fair share and metrics")
    timeout_s: float = Field(default=300.0, gt=0, description="deadline of one scoring request, retries included")
    top_k: int | None = Field(
        default=None,
        ge=0,
        description="teacher top-k for the top-k divergences and diagnostics (default: min(20, max_top_k))",
    )
    logprob_dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float32", description="wire dtype")
    concurrency: int = Field(default=16, ge=1, description="scoring requests in flight at once")


class EvalCommandConfig(ConfigModel):
    """Options of `opd eval` (the trainer's periodic eval rounds are `student_trainer.config.EvalConfig`)."""

    model: str = Field(
        ...,
        description="student: a Hugging Face model directory, `embedded`, or a trainer checkpoint "
        "(a step-XXXXXXXX directory, or the checkpoint directory: its latest step)",
    )
    base_model: str | None = Field(
        default=None,
        description="with a checkpoint --model: the run's student model directory (architecture, tokenizer)",
    )
    tokenizer: str | None = Field(default=None, description="tokenizer directory if not the model's")
    prompts: str = Field(..., description="prompt file (JSONL/Parquet, opd's prompt schema; see `opd convert-prompts`)")
    out: str | None = Field(default=None, description="report directory (default: runs/eval-YYYYmmdd-HHMMSS)")
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="generation engine (hf = transformers generate)")
    ks: list[int] = Field(default_factory=list, description="k values of pass@k (default: 1, 2, 4, ... and n)")
    concurrency: int = Field(default=64, ge=1, description="samples in flight at once (vllm batches them)")
    enable_thinking: bool | None = Field(
        default=None, description="chat template thinking switch (Qwen3-style templates)"
    )
    progress: bool = Field(default=True, description="show progress bars on stderr")
    log_level: str = Field(default="WARNING", description="logging level")
    sampling: EvalSamplingConfig = Field(default_factory=EvalSamplingConfig)
    reward: EvalRewardConfig = Field(default_factory=EvalRewardConfig)
    dataset: EvalPromptsConfig = Field(default_factory=EvalPromptsConfig)
    engine: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig)
    teacher: EvalTeacherConfig = Field(default_factory=EvalTeacherConfig)

    @model_validator(mode="after")
    def _check(self) -> EvalCommandConfig:
        too_big = [k for k in self.ks if not 1 <= k <= self.sampling.n]
        if too_big:
            raise ValueError(
                f"ks {too_big} outside 1..n = {self.sampling.n}: pass@k needs k <= samples per prompt; "
                f"raise --sampling-n or lower --ks"
            )
        if self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) leaves no room for the prompt within "
                f"engine.max_model_len ({self.engine.max_model_len}); lower --sampling-max-tokens or raise "
                f"--engine-max-model-len"
            )
        return self

    def pass_ks(self) -> list[int]:
        from student_trainer.evaluation import default_ks

        return sorted(set(self.ks)) or default_ks(self.sampling.n)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Expand the short flags (`--teacher ADDR` = `--teacher-addresses ADDR`)."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(ALIASES[flag] + eq + value if flag in ALIASES else arg)
    return out
