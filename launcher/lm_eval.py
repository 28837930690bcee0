"""lm-evaluation-harness with this project's `mdiff` model registered:

    python -m launcher.lm_eval --model mdiff --model_args path=EXPORT[,draws=K,batch_size=B,seed=S] --tasks ...

Registers `mdiff` (launcher/lm_eval_model.py; its docstring says what the numbers are: ELBO bounds, not exact
log-likelihoods), then runs lm-eval's own command line (lm_eval.__main__.cli_evaluate) with these arguments.

This file is only an entry point; the glue lives in launcher/lm_eval_model.py and nothing imports this file.
Its name is the name of the `lm_eval` package, so a process started as `python launcher/<x>.py` (launcher/ is
then sys.path[0]) that imports `lm_eval` would find this file instead of the package: imported under that
name, it puts the real package in its place (below), so such an import still gets lm-eval.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent

if __name__ == "lm_eval":   # imported as the top-level `lm_eval` because launcher/ is on sys.path: hand over
    import importlib

    del sys.modules["lm_eval"]
    _saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _HERE]
    try:
        sys.modules["lm_eval"] = importlib.import_module("lm_eval")   # the import statement returns this one
    finally:
        sys.path[:] = _saved
else:
    REPO = _HERE.parent

    def main(argv: list[str] | None = None) -> None:
        """Register mdiff, then run lm-eval's CLI on argv (default sys.argv[1:])."""
        if __package__ in (None, ""):   # run as `python launcher/lm_eval.py`: put the repository first
            sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _HERE]
        import launcher.lm_eval_model  # noqa: F401  (registers mdiff)
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
        cli_evaluate()

    if __name__ == "__main__":
        main()
