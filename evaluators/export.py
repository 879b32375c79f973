"""``python -m evaluators.export``: the earlier name of ``python -m analysis.export`` (kept so that commands written
for it keep working). It runs that module as ``__main__``; nothing here is imported by the library."""

import runpy

if __name__ == "__main__":
    runpy.run_module("analysis.export", run_name="__main__", alter_sys=True)
