"""Fuzz oracles: hypothesis strategies and the properties every answer must have, per target.

`teacher_rpcs` (Score, ScoreStream, Generate and raw bytes over gRPC), `ops_http` (the ops app's OpenAPI
operations, with schemathesis) and `records` (the Redis record decoders). Test code: the fuzz tests import them,
and so does `opd bench fuzz` (`opd_apps/bench/fuzz.py`) when run from a source checkout; the wheel does not ship
them.
"""
