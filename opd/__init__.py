"""opd: on-policy distillation with the teacher as a shared network service.

This entry package owns the `opd` command and the runtime every process
shares: config loading (YAML < env < CLI), the ops HTTP app and its auth,
logging, TLS and secret redaction, the retry loop, the Redis Streams transport
(producer, consumer, heartbeats, dead letters, policy announcements), prompt
sources, model-directory resolution and process supervision helpers. It
imports no component and holds no model, loss or serving logic.
"""

__version__ = "0.1.0"
