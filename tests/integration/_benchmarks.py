"""benchmarks/bench.py (a script, not part of the package): its path, and the script imported by path."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


@functools.cache
def load_bench() -> ModuleType:
    """benchmarks/bench.py as a module (once per session); its workers still run as the script itself."""
    spec = importlib.util.spec_from_file_location("open_clip_sigrel_benchmarks_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
