"""Which source of teacher scores a trainer config asks for, built: `create_score_source`.

- `teacher.enabled=false`: `no_teacher.NoTeacherSource` (pure RL, asks no teacher);
- `teachers` (several, one per prompt domain): `multi.MultiTeacherSource` over one source per endpoint;
- otherwise the one `teacher` endpoint (`endpoint_source`): a file of offline scores
  (`offline.OfflineScoreSource`), an `http(s)://` OpenAI-compatible server (`http_teacher.HttpTeacherSource`),
  or the opd teacher service over gRPC (`grpc_teacher.TeacherServiceSource`).

Each source module is imported only when the config asks for it. Another kind of source is one class in this
package and one branch here; the training loop does not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opd.loop_thread import LoopThread
    from student_trainer.config import TeacherEndpointConfig, TrainerConfig
    from student_trainer.score_sources.base import ScoreSource


def create_score_source(config: TrainerConfig, io: LoopThread) -> ScoreSource:
    """The configured source of teacher scores, on the trainer's I/O loop `io`."""
    if not config.teacher.enabled:
        from student_trainer.score_sources.no_teacher import NoTeacherSource

        return NoTeacherSource(config)
    if config.teachers:
        from student_trainer.score_sources.multi import DEFAULT, MultiTeacherSource

        endpoints = {DEFAULT: config.teacher, **config.teachers}
        return MultiTeacherSource(config, io, lambda endpoint: endpoint_source(config, endpoint, io), endpoints)
    return endpoint_source(config, config.teacher, io)


def endpoint_source(config: TrainerConfig, endpoint: TeacherEndpointConfig, io: LoopThread) -> ScoreSource:
    """The source of one teacher endpoint: a file of offline scores, an HTTP server, or the gRPC service."""
    if endpoint.scores_file:
        from student_trainer.score_sources.offline import OfflineScoreSource

        return OfflineScoreSource(config, endpoint.scores_file)
    if endpoint.is_http:
        from student_trainer.score_sources.http_teacher import HttpTeacherSource

        return HttpTeacherSource(config, endpoint, io)
    from student_trainer.score_sources.grpc_teacher import TeacherServiceSource

    # one k for every teacher: the default teacher's (a domain's own top_k may only repeat it)
    endpoint = endpoint.model_copy(update={"top_k": config.teacher_top_k()})
    return TeacherServiceSource(config.model_copy(update={"teacher": endpoint}), io)
