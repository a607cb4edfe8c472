"""One progress bar for every long job (data, corpus, training, evaluation, benchmarks).

    with progress_bar(total=steps, desc="train P=4", unit="step") as bar:
        bar.update(1, loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")

A tqdm bar on stderr with the rate and the time left; silent when stderr is not a terminal (a log file,
CI), where the run's metrics (metrics.jsonl, result JSON) hold the same numbers. `PARSCALE_PROGRESS=1`
shows it anyway, `=0` hides it on a terminal too.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def _shown(enabled: bool) -> bool | None:
    """tqdm's `disable`: True hides; None lets tqdm hide it when stderr is not a terminal."""
    forced = os.environ.get("PARSCALE_PROGRESS")
    if not enabled or forced == "0":
        return True
    if forced == "1":
        return False
    return None


class _Bar:
    def __init__(self, bar: tqdm):
        self._bar = bar

    def update(self, n: float = 1, **postfix) -> None:
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, text: str) -> None:
        """A line above the bar (or plainly on stderr when the bar is hidden)."""
        if self._bar.disable:
            print(text, file=sys.stderr)
        else:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
             enabled: bool = True) -> _Bar:
    """A progress bar (see the module docstring); `unit_scale` writes 1.2M tok, 35.0k tok/s."""
    return _Bar(tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit != "step",
                     disable=_shown(enabled), file=sys.stderr, dynamic_ncols=True, smoothing=0.1, leave=True))
