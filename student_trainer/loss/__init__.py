"""The distillation losses of the student trainer, computed in chunks from hidden states.

One entry point, `compute_distillation_loss` (`compute`, with the data that
crosses it, `TeacherTensors`, `LossInputs` and `LossStats`, and its
validation; `inputs` re-exports them under their former path; `config`:
`LossConfig`). Inside: the registry of divergences (`registry`: name ->
function + what it needs from the teacher), their formulas (`divergences`),
the weighting rules (`weighting`), the per-row plan of a step (`planning`),
the chunked lm-head pass that bounds memory (`fused_linear`: row chunks) and
its tiled schedule (`tiled`: row blocks x vocabulary tiles,
`loss.chunking=tiles`).

To add a divergence, write its function and add its row to
`registry.DIVERGENCES`; nothing else changes. This file imports nothing, so
that `loss.config` and `loss.registry` load without torch: import from the
modules.
"""
