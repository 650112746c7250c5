"""The tiled lm-head pass: row blocks x vocabulary tiles (`loss.chunking = "tiles"`).

Owns the second schedule of the fused lm-head loss. Where `fused_linear`
bounds memory by taking few rows with the whole vocabulary (small matmuls),
this pass takes large row blocks and bounds memory by tiling the vocabulary
too: every temporary is one `[rows, tile]` float32 tile. A row's softmax needs
its whole vocabulary, so the pass sweeps the tiles more than once:

1. statistics sweep: per tile `z = (h W_t^T + b_t) / T_s`, the running
   log-sum-exp, the student entropy (merged per tile in log space), argmax,
   the sampled token's logit, the teacher top-k ids' logits and the tail
   log-mass (the rest of the vocabulary, summed directly). That is all the
   top-k + tail and sampled-token forms need: their bucket math runs once
   per row afterwards, on `[rows, k + 1]`;
2. divergence sweep (support "full" only): `s = z - lse` exactly, the
   divergence's bucket function on the tile, summed: the row's divergence
   and `G = sum_b g_b` (so divergences must be sums of per-bucket terms,
   as every built-in one is; the floor's gradient mask is applied exactly);
3. gradient sweep (when a gradient is wanted): `d z = (g - p G) / T_s` tile
   by tile, folded at once into d hidden (a float32 `[rows, H]` buffer) and
   d weight. The vocabulary tiles are the outer loop, so each tile's weight
   gradient is summed over the row blocks in a float32 `[tile, H]` buffer and
   written once in the weight's dtype (bf16 weights: one rounding per
   element instead of one per chunk).

Matmuls return float32: on CUDA with `out_dtype` where torch has it, on CPU
by multiplying float32 copies of the bf16 values (CPU matmuls have no
float32-output bf16 form). The formulas are those of `divergences` and
`block_math.token_terms`; this module does not weight rows or keep
statistics (`compute` does), and runs eager PyTorch (no compiled kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from student_trainer.loss import divergences as dv
from student_trainer.loss.block_math import BlockRows, BlockSettings, BlockTerms, token_terms, top1_agreement
from student_trainer.loss.registry import DivergenceArgs, divergence


@dataclass(frozen=True)
class TileShape:
    """Rows per block and vocabulary entries per tile."""

    rows: int
    vocab: int

    @classmethod
    def of(cls, num_rows: int, vocab_size: int, tile_vocab: int, budget_mib: float) -> TileShape:
        """Tiles `tile_vocab` wide (at most V), with as many rows as fit one fp32 tile in `budget_mib`."""
        vocab = max(1, min(tile_vocab, vocab_size))
        rows = max(1, int(budget_mib * 2**20 // (4 * vocab)))
        return cls(rows=max(1, min(rows, num_rows)), vocab=vocab)


class _Matmul:
    """float32 (or float64) products of the lm-head operands, whatever their dtype."""

    out_dtype_ok = True  # torch.mm(..., out_dtype=) exists on CUDA in recent torch; probed once

    def __init__(self, weight_VH: Tensor, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.operand = weight_VH.dtype if weight_VH.device.type == "cuda" else dtype

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.to(self.operand), b.to(self.operand)
        if self.operand == self.dtype:
            return a @ b
        if _Matmul.out_dtype_ok:
            try:
                return torch.mm(a, b, out_dtype=self.dtype)
            except (TypeError, RuntimeError, NotImplementedError):
                _Matmul.out_dtype_ok = False
        return (a @ b).to(self.dtype)


@dataclass
class _Rows:
    """Per-row state of the active rows [A] (compute dtype)."""

    lse: Tensor
    neg_entropy: Tensor  # sum_j p_j (z_j - lse)
    best: Tensor  # max_j z_j
    top: Tensor  # argmax_j z_j
    target_z: Tensor
    topk_z: Tensor | None  # [A, K]
    tail_lse: Tensor | None  # log sum_{j not in top-k} exp(z_j)


class TiledPass:
    """One loss evaluation over `active` rows: sweeps, per-row terms and (wanted) gradients."""

    def __init__(
        self,
        settings: BlockSettings,
        rows: BlockRows,
        active_A: Tensor,
        reverse_weight: float,
        shape: TileShape,
        dtype: torch.dtype,
    ) -> None:
        self.settings, self.rows, self.active_A, self.shape, self.dtype = settings, rows, active_A, shape, dtype
        row = divergence(settings.divergence)
        self.fn, self.sampled = row.function(), row.sampled
        self.args = DivergenceArgs(settings.floor, settings.jsd_beta, reverse_weight)
        self.full = not self.sampled and settings.support == "full"
        self.terms: BlockTerms | None = None  # per active row, after `__call__`

    def __call__(self, hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, needs_grad) -> tuple:
        """(loss sum, d hidden, d weight, d bias), the signature `fused_linear.fused_pass_loss` runs."""
        self.mm = _Matmul(weight_VH, self.dtype)
        self.hidden_AH = hidden_NH[self.active_A].to(self.mm.operand)
        self.weight_VH, self.bias_V = weight_VH, bias_V
        self.blocks = [slice(r, r + self.shape.rows) for r in range(0, self.active_A.numel(), self.shape.rows)]
        state = self._statistics_sweep()
        loss, g_AB, grad_total_A, scale_A = self._row_terms(state, any(needs_grad))
        grads = (None, None, None)
        if any(needs_grad):
            grads = self._gradient_sweep(state, g_AB, grad_total_A, scale_A, hidden_NH, needs_grad)
        del self.hidden_AH
        return (loss, *grads)

    # ------------------------------------------------------------------------- sweeps

    def _tiles(self):
        """(vocabulary slice, row block, z [R, T], weight tile as a matmul operand) over vocabulary tiles
        (outer) and row blocks (inner)."""
        vocab = self.weight_VH.shape[0]
        for v0 in range(0, vocab, self.shape.vocab):
            cols = slice(v0, min(v0 + self.shape.vocab, vocab))
            weight_TH = self.weight_VH[cols].to(self.mm.operand)
            bias_T = None if self.bias_V is None else self.bias_V[cols].to(self.dtype)
            for block in self.blocks:
                z_RT = self.mm(self.hidden_AH[block], weight_TH.T)
                if bias_T is not None:
                    z_RT += bias_T
                if self.settings.temperature != 1.0:
                    z_RT /= self.settings.temperature
                yield cols, block, z_RT, weight_TH

    def _part(self, t: Tensor | None, block: slice) -> Tensor | None:
        return None if t is None else t[self.active_A[block]]

    def _statistics_sweep(self) -> _Rows:
        a, device, dt = self.active_A.numel(), self.active_A.device, self.dtype
        topk_ids = None
        if not (self.sampled or self.full):
            ids_CK = self.rows.topk_ids_CK
            assert ids_CK is not None, "support='topk' has the teacher's top-k (check_inputs)"
            topk_ids = ids_CK.long()[self.active_A]
        state = _Rows(
            lse=torch.full((a,), -math.inf, dtype=dt, device=device),
            neg_entropy=torch.zeros(a, dtype=dt, device=device),
            best=torch.full((a,), -math.inf, dtype=dt, device=device),
            top=torch.zeros(a, dtype=torch.long, device=device),
            target_z=torch.zeros(a, dtype=dt, device=device),
            topk_z=None if topk_ids is None else torch.zeros(topk_ids.shape, dtype=dt, device=device),
            tail_lse=None if topk_ids is None else torch.full((a,), -math.inf, dtype=dt, device=device),
        )
        targets_A = self.rows.target_C.long()[self.active_A]
        for cols, block, z_RT, _ in self._tiles():
            _merge_logsumexp(state, block, z_RT, first=cols.start == 0)
            tile_best, tile_top = z_RT.max(-1)
            better = tile_best > state.best[block]
            state.best[block] = torch.where(better, tile_best, state.best[block])
            state.top[block] = torch.where(better, tile_top + cols.start, state.top[block])
            inside, local = _in_tile(targets_A[block][:, None], cols, z_RT.shape[1])
            state.target_z[block] = torch.where(inside, z_RT.gather(1, local), state.target_z[block][:, None])[:, 0]
            if topk_ids is not None:
                assert state.topk_z is not None and state.tail_lse is not None, "made with topk_ids"
                inside, local = _in_tile(topk_ids[block], cols, z_RT.shape[1])
                state.topk_z[block] = torch.where(inside, z_RT.gather(1, local), state.topk_z[block])
                rows_i, ks = inside.nonzero(as_tuple=True)
                z_RT.index_put_((rows_i, local[rows_i, ks]), torch.tensor(-math.inf, dtype=dt, device=device))
                state.tail_lse[block] = torch.logaddexp(state.tail_lse[block], torch.logsumexp(z_RT, -1))
            del z_RT
        return state

    def _divergence_sweep(self, state: _Rows) -> tuple[Tensor, Tensor]:
        """support "full": the divergence [A] and sum_b d/ds^_b [A] (unscaled), tile by tile."""
        distill_A, g_sum_A = torch.zeros_like(state.lse), torch.zeros_like(state.lse)
        for cols, block, z_RT, _ in self._tiles():
            loss_R, g_RT = self._full_tile(z_RT, state, cols, block)[:2]
            distill_A[block] += loss_R
            g_sum_A[block] += g_RT.sum(-1)
            del z_RT, g_RT
        return distill_A, g_sum_A

    def _full_tile(self, z_RT: Tensor, state: _Rows, cols: slice, block: slice) -> tuple[Tensor, Tensor, Tensor]:
        """(divergence part [R], d/ds^ [R, T], p [R, T]) of one tile; `z_RT` becomes s^."""
        s_RT = z_RT.sub_(state.lse[block][:, None])
        p_RT = s_RT.exp()
        student = dv.StudentChunk(logprobs_CV=s_RT.clamp_(min=self.settings.floor), probs_CV=p_RT)
        full_CV = self.rows.full_CV
        assert full_CV is not None, "support='full' has the teacher's full log-probs (check_inputs)"
        teacher_RT = full_CV[self.active_A[block], cols]
        loss_R, g_RT = dv.bucket_divergence(dv.full_buckets(student, teacher_RT), self.fn, self.args)
        return loss_R, g_RT, p_RT

    def _row_terms(self, state: _Rows, need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Per-row terms (kept in `self.terms`), the loss sum, the scaled top-k bucket gradient [A, K+1],
        G = the scaled sum of every d/ds [A] and the distillation scale [A]."""
        full_CV = self.rows.full_CV  # never indexed whole: [A, V] is what this pass avoids
        self.rows.full_CV = None
        rows = BlockRows.of(self._part(t, slice(None)) for t in self.rows.tensors())
        self.rows.full_CV = full_CV
        floor = self.settings.floor
        logp_A = (state.target_z - state.lse).clamp(min=floor)
        token = token_terms(self.settings, self.fn, self.sampled, logp_A, rows, self.args, need_grad)
        scale_A = rows.distill_scale_C.to(self.dtype)
        g_AB, grad_total_A = None, torch.zeros_like(logp_A)
        if self.sampled:
            distill_A, divergence_A = token.distill_C, token.divergence_C
            assert distill_A is not None and divergence_A is not None, "a sampled divergence has its token terms"
        elif self.full:
            distill_A, g_sum_A = self._divergence_sweep(state)
            divergence_A, grad_total_A = distill_A, g_sum_A * scale_A
        else:
            distill_A, g_AB = self._topk_buckets(state, rows)
            divergence_A, g_AB = distill_A, g_AB * scale_A[:, None]
            grad_total_A = g_AB.sum(-1)
        if token.grad_C is not None:
            grad_total_A = grad_total_A + token.grad_C
        entropy_A = -state.neg_entropy
        if full_CV is not None:
            agree_A = (state.top == full_CV.argmax(-1)[self.active_A]).to(self.dtype)
        else:
            agree_A = top1_agreement(state.top, rows, self.dtype)
        self.terms = BlockTerms(distill_A, token.rl_C, divergence_A, entropy_A, agree_A, None, token.kl_C)
        self.token_grad_A = token.grad_C
        loss = (scale_A * distill_A).sum() + (rows.rl_scale_C.to(self.dtype) * token.rl_C).sum()
        return loss, g_AB, grad_total_A, scale_A

    def _topk_buckets(self, state: _Rows, rows: BlockRows) -> tuple[Tensor, Tensor]:
        floor = self.settings.floor
        assert state.topk_z is not None and state.tail_lse is not None, "support='topk'"
        assert rows.topk_logprobs_CK is not None and rows.tail_C is not None, "support='topk' (check_inputs)"
        tail_log_A = state.tail_lse - state.lse
        student_AB = torch.cat(
            [(state.topk_z - state.lse[:, None]).clamp(min=floor), tail_log_A.clamp(min=floor)[:, None]], 1
        )
        teacher_AB = torch.cat([rows.topk_logprobs_CK, rows.tail_C[:, None]], 1).to(self.dtype)
        buckets = dv.Buckets(student_CB=student_AB, student_probs_CB=student_AB.exp(), teacher_CB=teacher_AB)
        self.tail_mass_A = tail_log_A.exp()
        return dv.bucket_divergence(buckets, self.fn, self.args)

    def _gradient_sweep(self, state, g_AB, grad_total_A, scale_A, hidden_NH, needs_grad) -> tuple:
        """d hidden, d weight, d bias (those wanted; None otherwise), tile by tile: vocabulary tiles outer,
        each tile's weight and bias gradients summed over the row blocks in float32 and written once."""
        need_hidden, need_weight, need_bias = needs_grad
        grad = _Gradients(g_AB, grad_total_A, scale_A, self.rows.target_C.long()[self.active_A])
        if g_AB is not None:
            assert self.rows.topk_ids_CK is not None, "bucket gradients come from a top-k"
            grad.topk_ids = self.rows.topk_ids_CK.long()[self.active_A]
            grad.tail_scale_A = torch.where(self.tail_mass_A > 0, g_AB[:, -1] / self.tail_mass_A, 0.0)
        h = self.weight_VH.shape[1]
        grad_hidden_AH = torch.zeros(self.active_A.numel(), h, dtype=self.dtype, device=hidden_NH.device)
        grad_weight_VH = torch.zeros_like(self.weight_VH) if need_weight else None
        grad_bias_V = torch.zeros_like(self.bias_V) if need_bias and self.bias_V is not None else None
        for cols, block, z_RT, weight_TH in self._tiles():
            if block.start == 0:  # a new vocabulary tile: float32 sums of its weight and bias gradients
                acc_TH = torch.zeros(cols.stop - cols.start, h, dtype=self.dtype, device=z_RT.device)
                acc_T = torch.zeros(cols.stop - cols.start, dtype=self.dtype, device=z_RT.device)
            dz_RT = self._tile_dlogits(z_RT, state, grad, cols, block)
            if need_hidden:
                grad_hidden_AH[block] += self.mm(dz_RT, weight_TH)
            if grad_weight_VH is not None:
                acc_TH += self.mm(dz_RT.T, self.hidden_AH[block])
            if grad_bias_V is not None:
                acc_T += dz_RT.sum(0)
            del z_RT, dz_RT
            if block.stop >= self.active_A.numel():  # the tile's last row block: write its gradients once
                if grad_weight_VH is not None:
                    grad_weight_VH[cols] = acc_TH
                if grad_bias_V is not None:
                    grad_bias_V[cols] = acc_T
        grad_hidden_NH = None
        if need_hidden:
            grad_hidden_NH = torch.zeros_like(hidden_NH)
            grad_hidden_NH[self.active_A] = grad_hidden_AH.to(hidden_NH.dtype)
        return grad_hidden_NH, grad_weight_VH, grad_bias_V

    def _tile_dlogits(self, z_RT: Tensor, state: _Rows, grad: _Gradients, cols: slice, block: slice) -> Tensor:
        """d loss / d logits of one tile (`z_RT` is overwritten): (g - p G) / T_s, with g the scaled bucket
        gradient (full: the tile's; top-k: g_k at the ids, g_tail p_j / p_tail elsewhere) plus the sampled
        token's gradient at its id."""
        total_R1 = grad.total_A[block][:, None]
        if self.full:
            _, dz_RT, p_RT = self._full_tile(z_RT, state, cols, block)
            dz_RT.mul_(grad.scale_A[block][:, None]).addcmul_(p_RT, total_R1, value=-1.0)
        else:
            dz_RT = z_RT.sub_(state.lse[block][:, None]).exp_()  # p
            if grad.g_AB is not None:
                assert grad.topk_ids is not None and grad.tail_scale_A is not None, "set with g_AB"
                inside, local = _in_tile(grad.topk_ids[block], cols, z_RT.shape[1])
                rows_i, ks = inside.nonzero(as_tuple=True)
                cols_i = local[rows_i, ks]
                p_k = dz_RT[rows_i, cols_i]
                dz_RT.mul_(grad.tail_scale_A[block][:, None] - total_R1)
                dz_RT[rows_i, cols_i] = grad.g_AB[block][rows_i, ks] - p_k * total_R1[rows_i, 0]
            else:
                dz_RT.mul_(-total_R1)
        if self.token_grad_A is not None:
            inside, local = _in_tile(grad.targets_A[block][:, None], cols, z_RT.shape[1])
            dz_RT.scatter_add_(1, local, torch.where(inside, self.token_grad_A[block][:, None], 0.0))
        if self.settings.temperature != 1.0:
            dz_RT /= self.settings.temperature
        return dz_RT


@dataclass
class _Gradients:
    """What the gradient sweep reads per active row [A]."""

    g_AB: Tensor | None  # scaled top-k + tail bucket gradients (top-k support)
    total_A: Tensor  # G: the scaled sum of every d/ds of the row
    scale_A: Tensor  # distillation scale a * c_i
    targets_A: Tensor
    topk_ids: Tensor | None = None
    tail_scale_A: Tensor | None = None  # g_tail / p_tail (0 where p_tail = 0)


def _in_tile(ids_RK: Tensor, cols: slice, width: int) -> tuple[Tensor, Tensor]:
    """(ids inside the tile [R, K] bool, their column in it, clamped to the tile for a safe gather)."""
    local = ids_RK - cols.start
    inside = (local >= 0) & (local < width)
    return inside, local.clamp(0, width - 1)


def _merge_logsumexp(state: _Rows, block: slice, z_RT: Tensor, first: bool) -> None:
    """Running log-sum-exp L and neg-entropy B = sum_j p_j (z_j - L) of the rows in `block`, merged with a
    tile's (l, b) in log space: L' = logaddexp(L, l), B' = w (B + L - L') + w_t (b + l - L'),
    w = exp(L - L'), w_t = exp(l - L'); each part is a weighted mean of log-probs, so nothing cancels."""
    tile_lse = torch.logsumexp(z_RT, -1)
    zc_RT = z_RT - tile_lse[:, None]
    tile_b = torch.einsum("rt,rt->r", zc_RT.exp(), zc_RT)
    del zc_RT
    if first:
        state.lse[block], state.neg_entropy[block] = tile_lse, tile_b
        return
    old_lse, old_b = state.lse[block], state.neg_entropy[block]
    new_lse = torch.logaddexp(old_lse, tile_lse)
    state.neg_entropy[block] = (old_lse - new_lse).exp() * (old_b + old_lse - new_lse) + (tile_lse - new_lse).exp() * (
        tile_b + tile_lse - new_lse
    )
    state.lse[block] = new_lse
