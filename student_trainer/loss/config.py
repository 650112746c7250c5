"""Typed configuration of the distillation losses (data only).

Owns `LossConfig` and its nested sub-configs: which divergence (a name in
`student_trainer.loss.registry`), over which support, the temperatures, the
policy-gradient knobs shared by sampled-token divergences and the GRPO term,
token selection (TIP), sample weighting (reward softmax, PACED pass-rate
frontier), the KL penalty to the reference policy and the
forward-then-reverse KL schedule. It does not compute
anything: `student_trainer.loss.compute` reads it. The trainer nests
`LossConfig` in its own config, so YAML presets, environment variables and
CLI flags reach it through the shared loader in `opd/`. Imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from student_trainer.loss.registry import DIVERGENCES, divergence

Support = Literal["topk", "full"]
Normalization = Literal["token_mean", "sequence_mean", "sum"]
Reduction = Literal["step", "micro_batch_mean"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenSelectionConfig(_Strict):
    """TIP token selection (arXiv 2604.14084), as `weighting.tip_weights` and `select_tokens` apply it."""

    enabled: bool = Field(default=False, description="Keep only a weighted random fraction of response tokens (TIP).")
    keep_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="rho: share of the valid tokens kept, drawn without replacement."
    )
    entropy_exponent: float = Field(
        default=1.0, ge=0.0, description="alpha in w = e^alpha * d^gamma (e: student entropy / ln V)."
    )
    divergence_exponent: float = Field(
        default=0.0, ge=0.0, description="gamma in w = e^alpha * d^gamma (d: JSD(p_S, p_T) / ln 2); 0 = entropy only."
    )
    jsd_support: Support = Field(
        default="topk",
        description="Distribution for d: 'topk' = teacher's top-k ids, both sides renormalised; "
        "'full' = whole vocabulary.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the draw; the step is added, so runs are reproducible.")


class RewardSoftmaxConfig(_Strict):
    """Reward-weighted distillation: sample weights from a softmax of rewards (`weighting`).

    `batch_binary` (default): rewards binarised (reward > `loss.pass_threshold`
    is 1, else 0), weights softmax(reward / beta) over the whole step's scored
    samples, scaled to mean 1 over them, entering the step loss as r in
    sum_i s_i r_i l_i / D (one step-wide normalisation). `micro_batch` is the
    recipe's arithmetic exactly (OPSD on verl, `opd_worker.py`
    `_opd_training_step`): the same step-wide softmax, then renormalised within
    each micro-batch, whose loss is sum_i w_i m_i / sum_i w_i with m_i each
    sequence's token mean (needs `normalization=sequence_mean`; with
    `reduction=micro_batch_mean` and `batch.micro_batch_sequences` it is the
    recipe's step). With micro-batches that are all correct or all wrong the
    renormalisation cancels the softmax: the form then has no effect.
    `group_raw` is opd's earlier form: softmax(raw reward / beta) within each
    group, mean 1 per group. In every form a sample without a reward weighs 1
    and is left out of the softmax (the recipe scores it 0).
    """

    enabled: bool = Field(default=False, description="Weight samples by a softmax of their rewards (form: see `form`).")
    beta: float = Field(default=1.0, gt=0.0, description="Softmax temperature over rewards; weights average 1.")
    form: Literal["batch_binary", "micro_batch", "group_raw"] = Field(
        default="batch_binary",
        description="'batch_binary': softmax(binarised reward / beta) over the whole step, mean 1 over the step; "
        "'micro_batch': the recipe's (OPSD opd_worker.py): the same softmax renormalised within each "
        "micro-batch, sum w m / sum w over its sequences' token means m (needs normalization=sequence_mean); "
        "'group_raw': softmax(raw reward / beta) within each group, mean 1 per group.",
    )


class PassRateConfig(_Strict):
    """Pass-rate frontier prompt weight (PACED, arXiv 2603.11178)."""

    enabled: bool = Field(
        default=False,
        description="Weight groups by w(p) = p^alpha (1 - p)^beta, p = share of the group's scored samples with "
        "reward > loss.pass_threshold.",
    )
    alpha: float = Field(default=1.0, ge=0.0, description="Exponent of the pass rate p.")
    beta: float = Field(default=1.0, ge=0.0, description="Exponent of the failure rate 1 - p.")
    floor: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Lower bound of w(p); 0 drops groups with p = 0 or 1."
    )
    normalize: bool = Field(
        default=True,
        description="Divide w(p) by its mean over the step's samples (mean 1), so PACED reweights prompts without "
        "cutting the effective learning rate (raw w(p) <= 1/4 for alpha = beta = 1); false: the paper's raw w(p).",
    )


class KlPenaltyConfig(_Strict):
    """KL penalty of the RL term to a reference policy, the frozen initial student (verl's `use_kl_loss`)."""

    coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the per-token KL(p_S || p_ref) estimate added to the GRPO term (0 = off; needs "
        "rl_weight > 0). The trainer then holds a frozen copy of the initial student.",
    )
    estimator: Literal["k3", "k1", "k2"] = Field(
        default="k3",
        description="Per-token estimate, with d = log p_ref(y) - log p_S(y) on the sampled token y: 'k3' "
        "exp(d) - d - 1 clamped to [-10, 10] (verl's low_var_kl); 'k1' -d (verl's kl); 'k2' d^2 / 2 (mse).",
    )


class ScheduleConfig(_Strict):
    """Forward-then-reverse KL schedule (PACED); used by scheduled divergences ('fkl_to_rkl')."""

    mode: Literal["switch", "linear"] = Field(
        default="switch", description="'switch': forward KL before switch_step, reverse KL from it; 'linear': blend."
    )
    switch_step: int = Field(default=1000, ge=0, description="First step of pure reverse KL in 'switch' mode.")
    blend_start_step: int = Field(default=0, ge=0, description="Last step of pure forward KL in 'linear' mode.")
    blend_end_step: int = Field(default=1000, ge=0, description="First step of pure reverse KL in 'linear' mode.")

    @model_validator(mode="after")
    def _check_blend(self) -> ScheduleConfig:
        if self.mode == "linear" and self.blend_end_step <= self.blend_start_step:
            raise ValueError(
                f"schedule.blend_end_step ({self.blend_end_step}) must be greater than "
                f"schedule.blend_start_step ({self.blend_start_step})"
            )
        return self


class PolicyGradientConfig(_Strict):
    """Importance ratio shared by the sampled reverse KL and the GRPO term."""

    importance: Literal["none", "ppo_clip"] = Field(
        default="none",
        description="'ppo_clip': ratio exp(log p_S - behaviour log-prob) in PPO's clipped surrogate; "
        "'none': on-policy score-function gradient.",
    )
    clip_low: float = Field(default=0.2, ge=0.0, lt=1.0, description="Ratio lower clip 1 - clip_low.")
    clip_high: float = Field(default=0.2, ge=0.0, description="Ratio upper clip 1 + clip_high.")
    dual_clip: float | None = Field(
        default=None,
        gt=1.0,
        description="verl's dual-clip c (clip_ratio_c, Ye et al. 2020): for a negative advantage the clipped "
        "surrogate is capped at -c * A, so a very large ratio cannot dominate; None = off (verl default c = 3).",
    )

    @model_validator(mode="after")
    def _check_dual_clip(self) -> PolicyGradientConfig:
        if self.dual_clip is not None and self.importance == "none":
            raise ValueError("policy_gradient.dual_clip caps the clipped ratio: set importance='ppo_clip' or unset it")
        return self


class RlConfig(_Strict):
    """GRPO group-normalised reward advantages (Shao et al. 2024, DeepSeekMath)."""

    scale_by_std: bool = Field(
        default=True, description="Divide advantages by the group's reward std (False: Dr. GRPO)."
    )
    std_epsilon: float = Field(default=1e-6, gt=0.0, description="Added to the group std before dividing.")
    singleton: Literal["zero", "reward"] = Field(
        default="zero",
        description="Advantage of a group with a single scored sample: 'zero' (no signal) or 'reward' (verl's "
        "compute_grpo_outcome_advantage: mean 0 and std 1 for a group of one, so A = r).",
    )


class LossConfig(_Strict):
    """Everything `compute_distillation_loss` needs besides tensors and the step."""

    divergence: str = Field(
        default="rkl_sampled",
        description="Distillation term, a name in student_trainer/loss/registry.py: rkl_sampled (sampled-token "
        "reverse KL), fkl (forward KL), rkl (reverse KL), jsd (JSD(beta)), fkl_to_rkl (forward-then-reverse "
        "KL under `schedule`).",
    )
    support: Support = Field(
        default="topk",
        description="For divergences over distributions (fkl/rkl/jsd/fkl_to_rkl): teacher top-k plus "
        "tail bucket, or full teacher log-probs; sampled-token divergences ignore it.",
    )
    jsd_beta: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="beta of JSD(beta) (GKD): M = beta p_T + (1-beta) p_S."
    )
    distill_weight: float = Field(default=1.0, ge=0.0, description="a in loss = a * distill + b * rl.")
    rl_weight: float = Field(default=0.0, ge=0.0, description="b in loss = a * distill + b * rl (GRPO term).")
    student_temperature: float = Field(
        default=1.0, gt=0.0, description="Student logits are divided by this (match the sampling temperature)."
    )
    teacher_temperature: float = Field(
        default=1.0, gt=0.0, description="Temperature the teacher was asked to apply; scores must report the same."
    )
    discount: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Sampled-token divergences (rkl_sampled): the advantage sums future per-token "
        "terms with this discount.",
    )
    logprob_floor: float = Field(
        default=-100.0,
        lt=0.0,
        description="Log-probs below this (including -inf) are raised to it, so KLs stay finite.",
    )
    pass_threshold: float = Field(
        default=0.0,
        description="A reward above this counts as correct (1), else 0: the binarised rewards of reward_softmax "
        "(form batch_binary) and PACED's pass rate. A missing reward (None: timed out, raised, no reference) is "
        "neither: left out of every reward-based term.",
    )
    normalization: Normalization = Field(
        default="token_mean", description="Reduce per-token losses by kept-token mean, per-sequence mean, or sum."
    )
    reduction: Reduction = Field(
        default="step",
        description="'step': one normalisation over the whole step (D counted over every micro-batch of every "
        "rank); 'micro_batch_mean': the recipe's (verl): each micro-batch normalised by its own D, the mean over "
        "a rank's micro-batches, averaged over ranks, so a token's weight depends on how the step is cut.",
    )
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows per lm-head chunk (one matmul each way); None: rows such that one [rows, V] fp32 "
        "tensor is chunk_budget_mib.",
    )
    chunk_budget_mib: float = Field(
        default=64.0, gt=0.0, description="Size of one [rows, V] fp32 logits chunk when chunk_size is None."
    )
    block_budget_mib: float | None = Field(
        default=None,
        gt=0.0,
        description="The softmax/divergence math of a chunk runs in row blocks whose [rows, V] fp32 "
        "temporaries are this size, its d logits written back into the chunk; None: 32 on CPU (16 saves "
        "~36 MiB at V = 151,936 for ~1.3x the loss's CPU time; BENCHMARKS.md), the whole chunk on CUDA "
        "(fewer, larger kernels). Peak extra memory ~ one chunk + ~3 blocks.",
    )
    chunking: Literal["rows", "tiles"] = Field(
        default="rows",
        description="Schedule of the lm-head pass: 'rows' = chunks of rows over the whole vocabulary "
        "(chunk_size / chunk_budget_mib, block_budget_mib); 'tiles' = large row blocks x vocabulary tiles "
        "(tile_vocab, tile_budget_mib): larger matmuls at bounded memory, one more sweep of lm-head matmuls "
        "(two with support=full), the weight gradient summed in float32 per vocabulary tile.",
    )
    tile_vocab: int = Field(default=4096, ge=1, description="chunking=tiles: vocabulary entries per tile.")
    tile_budget_mib: float = Field(
        default=32.0,
        gt=0.0,
        description="chunking=tiles: rows per block such that one fp32 [rows, tile_vocab] tile is this size "
        "(a few such tiles are alive at once).",
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile the per-block math (fused kernels): 'auto' = on CUDA only; the eager "
        "PyTorch path is the reference and the fallback if compiling fails.",
    )
    policy_gradient: PolicyGradientConfig = Field(default_factory=PolicyGradientConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    kl: KlPenaltyConfig = Field(default_factory=KlPenaltyConfig)
    token_selection: TokenSelectionConfig = Field(default_factory=TokenSelectionConfig)
    reward_softmax: RewardSoftmaxConfig = Field(default_factory=RewardSoftmaxConfig)
    pass_rate: PassRateConfig = Field(default_factory=PassRateConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @field_validator("divergence")
    @classmethod
    def _registered(cls, name: str) -> str:
        divergence(name)  # ValueError listing the registered names
        return name

    @model_validator(mode="after")
    def _check_combinations(self) -> LossConfig:
        if self.distill_weight == 0.0 and self.rl_weight == 0.0:
            raise ValueError("distill_weight and rl_weight are both 0: set at least one of them above 0")
        if self.kl.coef > 0 and self.rl_weight == 0.0:
            raise ValueError(
                f"kl.coef={self.kl.coef} penalises the GRPO term, but rl_weight is 0: set rl_weight > 0 or kl.coef=0"
            )
        rs = self.reward_softmax
        if rs.enabled and rs.form == "micro_batch" and self.normalization != "sequence_mean":
            raise ValueError(
                "reward_softmax.form='micro_batch' weighs per-sequence means, as the recipe does: set "
                f"normalization='sequence_mean' (got {self.normalization!r})"
            )
        row = DIVERGENCES[self.divergence]
        if self.discount > 0.0 and not row.sampled:
            sampled = sorted(name for name, r in DIVERGENCES.items() if r.sampled)
            raise ValueError(
                f"discount > 0 needs a sampled-token divergence ({', '.join(sampled)}), "
                f"got divergence={self.divergence!r}"
            )
        if self.chunking == "tiles" and self.support == "full" and not row.sampled and not row.separable:
            raise ValueError(
                f"divergence={self.divergence!r} is not a sum over buckets, which chunking='tiles' needs with "
                "support='full': set chunking='rows'"
            )
        if not row.sampled and self.support not in row.needs:
            raise ValueError(
                f"divergence={self.divergence!r} cannot use support={self.support!r}: it works on "
                f"{' or '.join(sorted(row.needs))}; set support accordingly"
            )
        return self
