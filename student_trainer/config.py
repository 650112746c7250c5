"""The student trainer's typed configuration (YAML preset < env `OPD_TRAIN__*` < CLI).

Owns every option of `opd train`: the student model, the teacher service it
scores against, Redis and the prompt data it feeds, the loss (nested
`LossConfig` from `student_trainer.loss.config`), optimisation, batching,
staleness, publishing, checkpoints, evaluation, distribution (FSDP2) and the
ops port. Holds data only; what the loss needs from the teacher is checked
against the divergence registry when the config loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from opd.auth import NAME_RE
from opd.config import ConfigError, ConfigModel, Port
from opd.ops_app import OpsConfig
from opd.prompts import PromptSourceConfig
from opd.redaction import SECRET
from opd.streams import RedisConfig
from opd.tls import TeacherTLSOptions
from student_trainer.loss.config import LossConfig
from student_trainer.loss.registry import TeacherNeed, divergence, divergence_need, selection_need, teacher_needs


class TeacherEndpointConfig(TeacherTLSOptions):
    enabled: bool = Field(
        default=True,
        description="false: pure RL, no teacher is asked (the `none` score source; addresses are ignored): needs "
        "loss.distill_weight=0 and loss.rl_weight>0 (GRPO, optionally with loss.kl); eval rounds then report "
        "rewards without a divergence",
    )
    addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="teacher addresses, balanced: gRPC (host:port or dns:///name:port), or http(s)://host:port "
        "of an OpenAI-compatible server (vLLM's, or an opd teacher's --openai-port; needs teacher.tokenizer)",
    )
    token: str | None = Field(
        default=None,
        description="bearer token (prefer the env variable OPD_TRAIN__TEACHER__TOKEN); shown as <redacted>",
        json_schema_extra=SECRET,
    )
    token_file: str | None = Field(
        default=None,
        description="file holding the bearer token (e.g. a mounted Kubernetes Secret), read when the client is "
        "made; instead of teacher.token",
    )
    client_name: str = Field(
        default="trainer", description="client name for the teacher's fair share and metrics when its auth is off"
    )
    timeout_s: float = Field(default=300.0, gt=0, description="deadline of one scoring request, retries included")
    top_k: int | None = Field(
        default=None,
        ge=0,
        description="top-k asked of the teacher (default: 0 for a sampled-token "
        "divergence, else 20); 0 is refused when the loss reads the top-k",
    )
    logprob_dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float32", description="wire dtype")
    tokenizer: str | None = Field(
        default=None,
        description="http(s):// teacher: local directory of the teacher's tokenizer, for the start-up tokenizer "
        "check (vLLM's OpenAI API does not expose its vocabulary)",
    )
    served_model: str | None = Field(
        default=None, description="http(s):// teacher: the model id to ask for (default: the first one of /v1/models)"
    )
    scores_file: str | None = Field(
        default=None,
        description="train on offline teacher scores from this Parquet file (`opd score`) instead of a live "
        "teacher: the trainer feeds the file's sequences as rollouts itself (run no rollout workers)",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> TeacherEndpointConfig:
        if self.token and self.token_file:
            raise ValueError("teacher.token and teacher.token_file are both set; keep one of them")
        http = [a.startswith(("http://", "https://")) for a in self.addresses]
        if any(http) and not all(http):
            raise ValueError("teacher.addresses mixes http(s):// and gRPC addresses; list one kind of teacher")
        if any(http) and not self.tokenizer:
            raise ValueError(
                "an http(s):// teacher needs teacher.tokenizer: a local directory with the teacher's tokenizer "
                "(its OpenAI API does not expose the vocabulary the start-up check compares)"
            )
        return self

    def bearer_token(self) -> str | None:
        """teacher.token, or the content of teacher.token_file (one trailing newline dropped); ConfigError naming
        the option, never the content, when the file cannot be read or is empty."""
        if not self.token_file:
            return self.token
        try:
            token = Path(self.token_file).read_text().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"teacher.token_file {self.token_file!r} cannot be read: {reason}") from None
        if not token.strip():
            raise ConfigError(f"teacher.token_file {self.token_file!r} is empty; write the teacher token into it")
        return token

    @property
    def is_http(self) -> bool:
        """The addresses are OpenAI-compatible HTTP servers (else gRPC teacher services)."""
        return self.addresses[0].startswith(("http://", "https://")) if self.addresses else False


class OptimConfig(ConfigModel):
    lr: float = Field(default=1e-5, gt=0, description="peak learning rate (AdamW)")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps")
    schedule: Literal["constant", "cosine"] = Field(default="constant", description="after warm-up")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine: final lr / peak lr")
    max_grad_norm: float = Field(default=1.0, gt=0, description="clip the global gradient norm to this")


class BatchConfig(ConfigModel):
    groups_per_step: int = Field(
        default=8, ge=1, description="prompt groups (all samples of a prompt) per optimizer step"
    )
    max_tokens_per_micro_batch: int = Field(default=8192, ge=16, description="tokens per forward pass (packed)")
    micro_batch_sequences: int = Field(
        default=0,
        ge=0,
        description="> 0: micro-batches of this many sequences each, in arrival order, as the recipe's "
        "ppo_micro_batch_size_per_gpu (max_tokens_per_micro_batch is then ignored); 0: packed by tokens",
    )
    mini_batches: int = Field(
        default=1,
        ge=1,
        description="optimizer updates per batch, as verl's PPO mini-batches (the recipe's GRPO runs: "
        "train_batch_size / ppo_mini_batch_size = 4): each rank's share is cut into this many parts of whole "
        "groups, each its own step loss, clip and AdamW step; sample weights, GRPO advantages, the PPO ratio's "
        "behaviour log-probs, the LR schedule, the policy version, publishing, acks and max_steps stay per batch. "
        "> 1 with a policy-gradient term needs loss.policy_gradient.importance=ppo_clip",
    )
    max_staleness: int = Field(
        default=4,
        ge=0,
        description="rollouts sampled more than this many policy versions ago are dropped or down-weighted",
    )
    stale_policy: Literal["drop", "downweight"] = Field(default="drop", description="what happens to stale rollouts")
    stale_weight: float = Field(default=0.5, gt=0, le=1, description="downweight: weight per version beyond the bound")
    prefetch_depth: int = Field(
        default=1,
        ge=0,
        description="batches whose teacher scores are fetched while the current one trains (0 = fetch, then train)",
    )
    read_block_ms: int = Field(default=1000, ge=1, description="how long one Redis read waits for rollouts")
    attention: Literal["auto", "sdpa", "flex", "mask"] = Field(
        default="auto",
        description="attention over a packed micro-batch: sdpa = causal SDPA per sequence (flash kernels on CUDA, "
        "memory linear in tokens), flex = compiled flex_attention with a document mask (CUDA only), mask = dense "
        "[T, T] mask (reference; quadratic memory); auto = sdpa",
    )
    sampling_mismatch: Literal["refuse", "warn"] = Field(
        default="refuse",
        description="a rollout whose recorded sampling temperature differs from loss.student_temperature, or whose "
        "top-p is below 1: 'refuse' stops the run with an error naming both values (the rollout stays in Redis, "
        "unacknowledged); 'warn' logs it once per setting and trains on it",
    )
    prefetch_max_mib: float = Field(
        default=4096.0,
        gt=0,
        description="cap on the teacher replies held for prefetched batches (full-vocabulary replies cost 4 * V "
        "bytes per token); a batch over the cap waits to be requested until the one before it trains",
    )


class PublishConfig(ConfigModel):
    every_steps: int = Field(default=1, ge=1, description="publish weights every N steps")
    uri: str = Field(default="runs/weights", description="directory (shared filesystem) for versioned weights")
    keep_last: int = Field(default=3, ge=1, description="weight versions kept on disk")
    prune_grace_s: float = Field(
        default=300.0,
        ge=0,
        description="a version beyond keep_last is deleted only this long after the next one was published "
        "(a worker may still be loading it)",
    )


class LoraConfig(ConfigModel):
    """A LoRA student (peft): the base stays frozen, only the adapters train, and a published version is the
    adapter (megabytes) instead of the whole model. rank 0: a full-weight student."""

    rank: int = Field(default=0, ge=0, description="LoRA rank r (0: train and publish the full weights)")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA branch's input while training")
    target_modules: list[str] = Field(
        default_factory=list,
        description="module names the adapters wrap (peft's target_modules); empty: every linear projection "
        "of the decoder (attention and MLP; not the lm-head)",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class CheckpointConfig(ConfigModel):
    dir: str = Field(default="runs/checkpoints", description="torch.distributed.checkpoint directory")
    every_steps: int = Field(default=10, ge=1, description="checkpoint every N steps (rollouts are acked then)")
    resume: bool = Field(default=False, description="continue from the latest checkpoint in dir")
    keep_last: int = Field(default=2, ge=1, description="checkpoints kept on disk")


class DataConfig(ConfigModel):
    prompts: str | None = Field(
        default=None,
        description="prompt file (JSONL/Parquet) the trainer feeds to the "
        "workers; None = someone else feeds {ns}:prompts",
    )
    eval_prompts: str | None = Field(default=None, description="held-out prompt file (split eval)")
    source: PromptSourceConfig = Field(default_factory=PromptSourceConfig)
    max_inflight_groups: int | None = Field(
        default=None,
        ge=1,
        description="prompt groups in flight between "
        "the feeder and the trainer (admission=inflight: default groups_per_step * "
        "max(1, max_staleness - prefetch_depth); admission=version: a further cap when set)",
    )
    admission: Literal["version", "inflight"] = Field(
        default="version",
        description="when the feeder feeds another prompt: version = while the group, sampled at the oldest live "
        "worker's loaded version, would be trained within batch.max_staleness (no stale drops in steady state); "
        "inflight = the older rule, max_inflight_groups in flight whatever the workers' versions",
    )
    max_refeeds: int = Field(
        default=3,
        ge=0,
        description="a prompt that produced no group (dead-lettered, no group within group_timeout_s, or "
        "its group went stale) is fed again under the same id up to this many times, then recorded as lost",
    )
    group_timeout_s: float = Field(
        default=1800.0, gt=0, description="a fed prompt whose whole group has not arrived within this is fed again"
    )


class EvalConfig(ConfigModel):
    every_steps: int = Field(
        default=0,
        ge=0,
        description="feed the eval prompts (data.eval_prompts) every N steps "
        "and report pass@1, mean reward and divergence to the teacher (0 = off); training "
        "pauses until the round's samples, all of the policy version it names, are in",
    )
    round_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="an eval round gives up after this (reported as incomplete) and training resumes",
    )
    temperature: float | None = Field(
        default=None,
        gt=0,
        description="eval rounds sample at this temperature (carried on the prompt records to the "
        "workers); unset = the workers' training setting",
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="eval rounds' nucleus mass; unset = the workers'")
    top_k: int | None = Field(default=None, ge=-1, description="eval rounds' top-k (-1 = off); unset = the workers'")
    n: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="samples per eval prompt (pass@k over them); unset = data.source.n_samples",
    )


class DistConfig(ConfigModel):
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="process group backend (auto: nccl with CUDA, else gloo)"
    )
    mixed_precision: Literal["auto", "none", "bf16"] = Field(
        default="auto", description="FSDP2 parameter/compute dtype (auto: bf16 on GPU, none on CPU)"
    )
    activation_checkpointing: bool = Field(default=False, description="recompute decoder layers in backward")
    cpu_offload: bool = Field(default=False, description="FSDP2 CPU offload of parameters and optimizer state")


class LoggingConfig(ConfigModel):
    tensorboard_dir: str | None = Field(
        default=None,
        description="write per-step statistics as TensorBoard scalars here (needs the tensorboard package)",
    )
    wandb_project: str | None = Field(
        default=None, description="log per-step statistics to this Weights & Biases project (needs the wandb package)"
    )
    wandb_run_name: str | None = Field(default=None, description="W&B run name")
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        default="online", description="W&B mode (offline: sync later with `wandb sync`)"
    )


class TrainerOpsConfig(OpsConfig):
    port: Port = Field(
        default=9103,
        description="ops HTTP port, served by rank 0: /metrics /healthz /readyz /status (0 = pick a free one)",
    )


class TrainerConfig(ConfigModel):
    model: str = Field(..., description="student: Hugging Face model directory")
    tokenizer: str | None = Field(default=None, description="tokenizer directory if not the model's")
    max_steps: int = Field(default=100, ge=1, description="optimizer steps to run")
    seed: int = Field(default=0, description="seed of everything random in the trainer")
    log_level: str = Field(default="INFO", description="logging level")
    stop_grace_s: float = Field(
        default=60.0,
        gt=0,
        description="on SIGTERM: interrupt every wait, checkpoint the steps trained, and exit within this "
        "many seconds (forced exit after it); give torchrun the same --shutdown-timeout",
    )
    wait_log_s: float = Field(
        default=10.0,
        gt=0,
        description="while the trainer waits (rollouts, teacher scores, other ranks, eval samples) it logs "
        "what for and how long, once every this many seconds",
    )
    teacher: TeacherEndpointConfig = Field(default_factory=TeacherEndpointConfig)
    teachers: dict[str, TeacherEndpointConfig] = Field(
        default_factory=dict,
        description="several teachers: a prompt's `teacher` field (a domain name) -> that domain's teacher "
        "service; rollouts without one, or naming none of these, are scored by `teacher`",
    )
    redis: RedisConfig = Field(default_factory=RedisConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ops: TrainerOpsConfig = Field(default_factory=TrainerOpsConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.eval.every_steps and not self.data.eval_prompts:
            raise ValueError("eval.every_steps > 0 needs data.eval_prompts (a held-out prompt file)")
        needs = teacher_needs(self.loss)
        if TeacherNeed.TOPK in needs and self.teacher.top_k == 0:
            fixes = ["set teacher.top_k > 0 or leave it unset (20)"]
            if divergence_need(self.loss) == TeacherNeed.TOPK:
                fixes.append("use a sampled-token divergence (loss.divergence=rkl_sampled)")
            if selection_need(self.loss) == TeacherNeed.TOPK:
                fixes.append("set loss.token_selection.divergence_exponent=0")
            raise ValueError(
                f"teacher.top_k=0 (flag --teacher-top-k) but {self._readers(TeacherNeed.TOPK)} needs "
                f"the teacher's top-k log-probs: {', or '.join(fixes)}"
            )
        _check_mini_batches(self)
        _check_teacher_sources(self)
        if not self.teacher.enabled:
            _check_no_teacher(self)
        return self

    def _readers(self, need: TeacherNeed) -> str:
        """Which loss settings read this part of the teacher's reply, for an error message."""
        readers = []
        if divergence_need(self.loss) == need:
            readers.append(f"loss.divergence={self.loss.divergence!r} with loss.support={self.loss.support!r}")
        if selection_need(self.loss) == need:
            readers.append(f"loss.token_selection.jsd_support={self.loss.token_selection.jsd_support!r}")
        return " and ".join(readers)

    def teacher_top_k(self) -> int:
        """k asked of the teacher: `teacher.top_k`, else 20 when the loss reads a top-k (or TIP runs), else 0."""
        if self.teacher.top_k is not None:
            return self.teacher.top_k
        uses_topk = TeacherNeed.TOPK in teacher_needs(self.loss) or self.loss.token_selection.enabled
        return 20 if uses_topk else 0


def _check_mini_batches(config: TrainerConfig) -> None:
    """Updates 2..k of a batch train on samples of an older policy: a policy-gradient term (sampled reverse KL or
    GRPO) then needs the PPO ratio against the behaviour log-probs, as verl uses its old log-probs whenever it
    runs more than one mini-batch."""
    loss = config.loss
    uses_pg = (loss.distill_weight > 0 and divergence(loss.divergence).sampled) or loss.rl_weight > 0
    if config.batch.mini_batches > 1 and uses_pg and loss.policy_gradient.importance == "none":
        raise ValueError(
            f"batch.mini_batches={config.batch.mini_batches} trains the later mini-batches off-policy, but "
            f"loss.policy_gradient.importance='none' treats them as on-policy: set "
            f"loss.policy_gradient.importance=ppo_clip (flag --loss-policy-gradient-importance) or batch.mini_batches=1"
        )


def _check_teacher_sources(config: TrainerConfig) -> None:
    """What the HTTP teachers, offline scores and several teachers cannot do, refused when the config loads."""
    k, needs = config.teacher_top_k(), teacher_needs(config.loss)
    endpoints = {"teacher": config.teacher, **{f"teachers.{n}": t for n, t in config.teachers.items()}}
    for name in config.teachers:
        if not NAME_RE.match(name):
            raise ValueError(f"teachers: domain name {name!r} must be 1-64 of [A-Za-z0-9_.-]")
    for where, endpoint in endpoints.items():
        if endpoint.top_k is not None and endpoint.top_k != k:
            raise ValueError(
                f"{where}.top_k={endpoint.top_k} but the loss trains on one top-k for every token "
                f"(teacher.top_k resolves to {k}): leave {where}.top_k unset or set it to {k}"
            )
        if endpoint.is_http and config.loss.teacher_temperature != 1.0:
            raise ValueError(
                f"{where} is an OpenAI-compatible server, whose prompt log-probs are at temperature 1: "
                f"set loss.teacher_temperature=1, or use an opd teacher on the hf backend over gRPC"
            )
        if endpoint.is_http and TeacherNeed.FULL in needs:
            raise ValueError(
                f"{where} is an OpenAI-compatible server, which returns top-k log-probs only, but the loss "
                f"needs the full vocabulary: use a top-k loss (loss.support=topk) or an opd teacher over gRPC"
            )
    if config.teacher.scores_file:
        if config.teachers:
            raise ValueError("teacher.scores_file trains from one file of offline scores: leave `teachers` empty")
        if config.data.prompts or config.eval.every_steps:
            raise ValueError(
                "teacher.scores_file trains on the file's own sequences (off-policy); data.prompts and eval "
                "rounds feed rollout workers for on-policy training: set teacher.scores_file or those"
            )
        if needs == {TeacherNeed.SAMPLED_TOKEN}:
            raise ValueError(
                f"loss.divergence={config.loss.divergence!r} trains on the student's own samples (a policy "
                f"gradient); offline scores need a top-k divergence (fkl, rkl or jsd with loss.support=topk)"
            )


def _check_no_teacher(config: TrainerConfig) -> None:
    """teacher.enabled=false (pure RL): nothing may need a teacher's scores."""
    if config.loss.distill_weight != 0.0:
        raise ValueError(
            f"teacher.enabled=false asks no teacher, but loss.distill_weight={config.loss.distill_weight} trains on "
            "teacher scores: set loss.distill_weight=0 and loss.rl_weight>0 (GRPO), or enable the teacher"
        )
    if config.teachers or config.teacher.scores_file:
        raise ValueError("teacher.enabled=false asks no teacher: leave `teachers` and teacher.scores_file unset")
