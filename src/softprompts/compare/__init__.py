"""``softprompts compare``: every method on the same data and budget, side by side (optionally with PEFT).

    from softprompts.compare import CompareConfig, CompareData, run_compare
    results = run_compare(CompareConfig(model="smollm2-135m", methods=["prompt", "prefix"], steps=100),
                          CompareData(spec, train, dev, test), "out/compare")   # + out/compare/report.md, *.png

Modules: ``runner`` (runs, resume), ``peft_baseline`` (the PEFT side), ``latency`` (timing, peak memory),
``report`` (aggregation, recommendation, report.md), ``plots`` (PNG).
"""

from softprompts.compare.runner import CompareConfig, CompareData, Comparison, run_compare

__all__ = ["CompareConfig", "CompareData", "Comparison", "run_compare"]
