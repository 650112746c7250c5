"""Where a step's teacher scores come from: one interface, its sources, and the config's choice among them.

- `base`: the `ScoreSource` interface, `TeacherMismatch`, and the one start-up check every source runs
  (`check_teacher`: tokenizer, vocabulary, top-k, full vocabulary, temperature);
- `factory.create_score_source`: the source a trainer config asks for;
- the sources: `grpc_teacher.TeacherServiceSource` (the opd teacher service), `http_teacher.HttpTeacherSource`
  (an OpenAI-compatible `http(s)://` server, through `openai_client`), `offline.OfflineScoreSource` (a file of
  `opd score`, read with `score_file`; `offline.OfflineRolloutFeeder` feeds its sequences as rollouts),
  `multi.MultiTeacherSource` (several teachers, one per prompt domain) and `no_teacher.NoTeacherSource` (pure RL).

Imports nothing itself: `score_file` and `openai_client` stay importable without torch.
"""
