"""The teacher service: per-token log-probs of given token ids over gRPC.

Owns the gRPC servicer, the engine backends (`vllm`, `hf`), batching and fair
scheduling across clients, auth, metrics, the ops routes, and the public
`teacher_server.client.TeacherClient` (grpc + numpy only). Knows nothing of
training.
"""
