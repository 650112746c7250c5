"""The application layer: the programs above the components, one subpackage per program.

- `demo/`: `opd demo`, the whole pipeline on one machine (its models, its task and data, the held-out
  before/after evaluation, the report and the process supervisor);
- `eval/`: `opd eval`, pass@k of a model or checkpoint on a prompt file, with divergence to a teacher;
- `score/`: `opd score`, a file of sequences scored by a teacher once, into Parquet (offline scores);
- `bench/`: every `opd bench ...` (`bench/common.py` holds what several benchmarks share);
- `tools/`: operator tools that drive no component of their own but work on what the components read and
  write: `opd queue` (the dead-letter stream) and `opd convert-prompts` (dataset files to the prompt schema);
- `progress.py`: the progress line `opd eval` and `opd score` print.

The statistics these programs report (pass@k, intervals, divergences, teacher diagnostics) are the trainer's
evaluation core, `student_trainer.evaluation`. This package may import any component and the shared `opd`
runtime; no component and nothing in `opd` imports it (`lint-imports` enforces the layers, see pyproject.toml).
`opd.cli` reaches these modules only by name, through importlib. Test code (the fuzz oracles) is not here.
"""
