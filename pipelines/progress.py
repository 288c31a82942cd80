"""Progress display on the driver: a tqdm bar fed by search trials' reports."""

from __future__ import annotations

import sys

from tqdm import tqdm


class StepProgress:
    """A bar that counts evaluated search steps and shows the latest forget accuracy."""

    def __init__(self, description: str, disable: bool = False):
        self.description = description
        self.disable = disable or not sys.stderr.isatty()
        self.bar = None

    def __enter__(self) -> StepProgress:
        self.bar = tqdm(desc=self.description, unit="step", disable=self.disable, leave=False)
        return self

    def on_result(self, result: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if "forget_acc" in result:
            self.bar.set_postfix(step=result.get("step"), forget_acc=f"{result['forget_acc']:.3f}")

    def __exit__(self, *exc) -> None:
        self.bar.close()
