"""`opd demo`: on-policy distillation on one machine, every component its own process.

`pipeline` (the command: plan, start, supervise, report), `supervisor` (child processes), `models` (the
teacher/student pair, real or tiny), `task` (the plural-noun task, its reward and `data/`), `heldout` (the
before/after evaluation on held-out prompts) and `report` (report.md, report.json, curves.png).
"""
