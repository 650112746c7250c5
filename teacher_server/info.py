"""`TeacherInfo`: what the teacher's `Info` RPC answers, defined once.

A backend fills one when its model is loaded; the servicer sends it as an
`InfoReply` (`to_reply`), the ops port's `/v1/info` as JSON (`asdict`), and
the client decodes it (`from_reply`). Its fields are the `InfoReply` fields,
one for one, in name and order (`tests/unit/test_teacher_info.py` checks), so
a field added to the proto is added here and nowhere else. Imports neither
torch nor grpc: the client and the engines both use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from opd import __version__
from protos import teacher_pb2 as pb


@dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    model_name: str  # the served name (default: the model path)
    backend: str  # "vllm" or "hf"
    vocab_size: int  # rows of the teacher's lm-head; token ids must be below it
    tokenizer_fingerprint: str  # protos.tokenizer_fingerprint of the teacher's tokenizer
    max_model_len: int  # longest token sequence a request may carry
    max_top_k: int  # largest top_k a request may ask for
    supports_full_vocab: bool  # full_vocab=true allowed
    supports_temperature: bool  # a teacher temperature != 1 is applied exactly (hf), else refused (vllm)
    server_version: str = __version__  # opd version of the serving process (the engines leave the default)
    dtype: str  # the engine's compute dtype

    def to_reply(self) -> pb.InfoReply:
        return pb.InfoReply(**asdict(self))

    @classmethod
    def from_reply(cls, reply: pb.InfoReply) -> TeacherInfo:
        return cls(**{f.name: getattr(reply, f.name) for f in fields(cls)})
