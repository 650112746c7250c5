"""Every cross-process contract of opd: the teacher gRPC service (`teacher.proto`
and its generated stubs), packed arrays, the tokenizer fingerprint, and the
msgpack records that cross Redis (prompt, rollout, policy announcement).
Imports neither torch, vllm nor any component."""
