"""``python -m evaluators.run``: the earlier name of ``python -m analysis.evaluate`` (kept so that commands written
for it keep working). It runs that module as ``__main__``; nothing here is imported by the library."""

import runpy

if __name__ == "__main__":
    runpy.run_module("analysis.evaluate", run_name="__main__", alter_sys=True)
