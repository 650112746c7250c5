"""`opd eval`: pass@k of a model or checkpoint on a prompt file, with per-token divergence to a teacher.

`command` (the command: check inputs, sample, score, report), `config` (flags), `model` (resolving the
student), `run` (sampling through the rollout engine, teacher scoring), `student` (the student's teacher-forced
log-probs), `report` (eval.json, eval.md, samples.jsonl).
"""
