from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    INT32: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    UINT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
INT32: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
UINT8: DType

class PackedArray(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_s: float
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "score_from", "top_k", "full_vocab", "temperature", "logprob_dtype", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FROM_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FULL_VOCAB_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: PackedArray
    score_from: int
    top_k: int
    full_vocab: bool
    temperature: float
    logprob_dtype: DType
    timeout_ms: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Union[PackedArray, _Mapping]] = ..., score_from: _Optional[int] = ..., top_k: _Optional[int] = ..., full_vocab: _Optional[bool] = ..., temperature: _Optional[float] = ..., logprob_dtype: _Optional[_Union[DType, str]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("request_id", "score_from", "num_positions", "token_logprobs", "topk_ids", "topk_logprobs", "tail_logprobs", "full_logprobs", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FROM_FIELD_NUMBER: _ClassVar[int]
    NUM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    score_from: int
    num_positions: int
    token_logprobs: PackedArray
    topk_ids: PackedArray
    topk_logprobs: PackedArray
    tail_logprobs: PackedArray
    full_logprobs: PackedArray
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., score_from: _Optional[int] = ..., num_positions: _Optional[int] = ..., token_logprobs: _Optional[_Union[PackedArray, _Mapping]] = ..., topk_ids: _Optional[_Union[PackedArray, _Mapping]] = ..., topk_logprobs: _Optional[_Union[PackedArray, _Mapping]] = ..., tail_logprobs: _Optional[_Union[PackedArray, _Mapping]] = ..., full_logprobs: _Optional[_Union[PackedArray, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_name", "backend", "vocab_size", "tokenizer_fingerprint", "max_model_len", "max_top_k", "supports_full_vocab", "supports_temperature", "server_version", "dtype")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_FULL_VOCAB_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    backend: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_model_len: int
    max_top_k: int
    supports_full_vocab: bool
    supports_temperature: bool
    server_version: str
    dtype: str
    def __init__(self, model_name: _Optional[str] = ..., backend: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_model_len: _Optional[int] = ..., max_top_k: _Optional[int] = ..., supports_full_vocab: _Optional[bool] = ..., supports_temperature: _Optional[bool] = ..., server_version: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "logprob_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: PackedArray
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprob_dtype: DType
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Union[PackedArray, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprob_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("request_id", "token_ids", "logprobs", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: PackedArray
    logprobs: PackedArray
    finish_reason: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Union[PackedArray, _Mapping]] = ..., logprobs: _Optional[_Union[PackedArray, _Mapping]] = ..., finish_reason: _Optional[str] = ...) -> None: ...
