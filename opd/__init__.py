"""opd: on-policy distillation with the teacher as a shared network service.

This small entry package owns the `opd` command and the runtime every process
shares (config loading, the ops HTTP app, logging, retry/backoff). It holds no
model, loss or serving logic.
"""

__version__ = "0.1.0"
