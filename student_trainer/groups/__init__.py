"""Rank 0's rollout groups: from the prompts the trainer feeds to the whole groups a step takes, and eval rounds.

- `source.RolloutSource`: reads `{ns}:rollouts` (dedupe, acks after commits), assembles whole groups
  (`group_size` samples of one prompt), sets eval rollouts aside, announces published versions; its `Admission`
  (the prompt feeder) decides which rollouts may join a group and learns which groups a step took;
- `feeder.PromptFeeder`: feeds the training prompts into `{ns}:prompts` within the in-flight bound, each until
  it is trained or lost (refeeds, `prompts.jsonl`);
- `ledger.PromptLedger`: the feeder's bookkeeping as plain data (open, taken, lost), saved in every checkpoint;
- `eval.EvalRounds`: eval rounds of one policy version on held-out prompts, never trained on.

`Group` (the samples of one prompt) is defined here, once. Runs on the trainer's I/O loop; no model, no loss.
"""

from __future__ import annotations

from protos.records import RolloutRecord

Group = list[RolloutRecord]  # the samples of one prompt (or, split across ranks or micro-batches, part of them)
