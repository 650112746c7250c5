"""`opd bench ...`: the benchmarks, each measured against a baseline in the same run, and the fuzzing run.

One module per benchmark (`teacher`, `openai`, `losses`, `queue`, `trainer` with `trainer_step`, `tenants` with
`tenant_load`), `fuzz` (`opd bench fuzz`: property-based fuzzing with counts, from a source checkout) and
`common` (what several benchmarks share: the measured model, client processes, wire bytes).
"""
