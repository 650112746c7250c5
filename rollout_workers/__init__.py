"""rollout_workers: sample from the current student and push rollout records to Redis.

Owns prompt rendering (chat template via `opd.prompts`), the generation
backends (vLLM AsyncLLM, transformers `generate`), rewards, the multi-turn
tool loop, the worker loop (prompts stream in, rollouts stream out), live
weight reload on policy announcements, the fleet (local processes or Ray
actors) and the `opd_rollout_*` metrics. Does not import the trainer or the
teacher: it talks to them only through the records in `protos/` and the
Redis transport in `opd/streams.py`.
"""
