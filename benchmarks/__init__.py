"""memctl's benchmark suite: memctl against real peers, run in one process.

``python -m benchmarks`` runs every workload; see ``benchmarks/__main__.py``.
"""
