"""The time-to-quality benchmark, as a package; `benchmarks/time_to_quality.py` is its entry point and its
docstring says what the benchmark measures and how.

Modules, each below the next: `profiles` (variants, workloads, profiles), `measure` (budget arithmetic, targets),
`run` (one run in its process: the budget clock around the project's `Trainer`), `results` (results.json),
`plots`, `report` (the markdown RESULTS.md takes), `parent` (the MLflow parent run), `runner` (the runs, in
parallel processes) and `cli` (flags, then plan, run, report).
"""
