"""Score sources beyond the gRPC teacher service, chosen by the trainer config.

`student_trainer/score_source.py` owns the `ScoreSource` interface and the
gRPC teacher (`TeacherServiceSource`); this package owns the others and
which one a config asks for (`special_score_source`, called by
`create_score_source`):

- `http_teacher.HttpTeacherSource`: an `http(s)://` teacher address, an
  OpenAI-compatible server (vLLM's own, or an opd teacher's --openai-port);
- `offline.OfflineScoreSource`: `teacher.scores_file`, scores written by
  `opd score`, with no teacher running;
- `multi.MultiTeacherSource`: `teachers` (several teachers, one per prompt
  domain), each of them any of the above or a gRPC teacher;
- `no_teacher.NoTeacherSource`: `teacher.enabled=false`, pure RL (GRPO) that
  asks no teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opd.loop_thread import LoopThread
    from student_trainer.config import TeacherEndpointConfig, TrainerConfig
    from student_trainer.score_source import ScoreSource


def endpoint_source(config: TrainerConfig, endpoint: TeacherEndpointConfig, io: LoopThread) -> ScoreSource:
    """The source of one teacher endpoint: a file of offline scores, an HTTP server, or the gRPC service."""
    if endpoint.scores_file:
        from student_trainer.score_sources.offline import OfflineScoreSource

        return OfflineScoreSource(config, endpoint.scores_file)
    if endpoint.is_http:
        from student_trainer.score_sources.http_teacher import HttpTeacherSource

        return HttpTeacherSource(config, endpoint, io)
    from student_trainer.score_source import TeacherServiceSource

    # one k for every teacher: the default teacher's (a domain's own top_k may only repeat it)
    endpoint = endpoint.model_copy(update={"top_k": config.teacher_top_k()})
    return TeacherServiceSource(config.model_copy(update={"teacher": endpoint}), io)


def special_score_source(config: TrainerConfig, io: LoopThread) -> ScoreSource | None:
    """The source for no teacher, several teachers, an HTTP teacher or offline scores; None for the one gRPC
    teacher."""
    if not config.teacher.enabled:
        from student_trainer.score_sources.no_teacher import NoTeacherSource

        return NoTeacherSource(config)
    if config.teachers:
        from student_trainer.score_sources.multi import MultiTeacherSource

        return MultiTeacherSource(config, io)
    if config.teacher.scores_file or config.teacher.is_http:
        return endpoint_source(config, config.teacher, io)
    return None
