"""The trainer: an FSDP2 student trained on its own rollouts against a teacher's scores, publishing its weights.

The training loop is a producer and a consumer (docs/architecture.md draws one rollout's path through them):

- `batches.BatchProducer` yields ready batches: whole rollout groups pulled from Redis (rank 0, through
  `groups.source.RolloutSource`), split across ranks, their teacher scores prefetched (`score_sources`),
  staleness judged;
- `trainer.Trainer` trains them: the model (`model`, `attention`), the step (`step.StepRunner`, `batching`, the
  losses in `loss/`), the optimizer (`optim`), publishing (`publish`) and checkpoints (`checkpoint`); each trained
  step's effects outside the model (used samples, acks after commits, the prompt feeder, steps.jsonl) are applied
  by `settlement.Settlement`, and its one `report.StepReport` goes to every sink (`metrics`: Prometheus,
  `/status`, TensorBoard/W&B; steps.jsonl; stdout);
- `groups/`: rollout groups, the prompt feeder and its ledger, eval rounds (rank 0);
- `runtime.TrainerRuntime` builds and wires the parts and serves the ops port; `__main__` is `opd train`.

Importing this package imports nothing else (torch is loaded by the modules that need it).
"""
