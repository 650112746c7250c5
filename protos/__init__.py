"""Every cross-process contract of opd: the teacher gRPC service (`teacher.proto`
and its generated stubs), packed arrays, the tokenizer fingerprint, and (from the
rollout issue on) the msgpack records. Imports neither torch, vllm nor any component."""
