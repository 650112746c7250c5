"""The application layer: programs that drive several components, above the components themselves.

Holds `opd demo` (the whole pipeline on one machine: `demo`, its models, its
report and the process supervisor) and every `opd bench ...` benchmark. It may
import any component and the shared `opd` runtime; no component and nothing
in `opd` imports it (`lint-imports` enforces the layers, see pyproject.toml).
`opd.cli` reaches these modules only by name, through importlib.
"""
