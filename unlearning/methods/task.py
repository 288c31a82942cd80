"""`UnlearningTask`: everything a method may use for one deletion request."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from unlearning.data import Dataset, ForgetSet, Split
from unlearning.data.containers import seeded_sample
from unlearning.passes import LocalExecutor
from unlearning.search import Step, dampened_copy
from unlearning.settling import AtLeast, rows_allowed
from unlearning.targets import forget_target, request_rho, slack_targets, unseen_accuracy
from unlearning.training import TrainConfig


@dataclass
class UnlearningTask:
    """Everything a method may use for one deletion request.

    `full_importance` is I^D from an importance store when there is one; otherwise it is
    computed over the training split on first use. Importances are cached by (which, kind).
    """

    model: nn.Module
    dataset: Dataset
    forget: ForgetSet
    retain_split: Split
    forget_split: Split
    normalize: dict | None
    importance_mode: str = "per_sample"
    batch_size: int = 64
    shuffle_batches: bool = False  # batch mode: the papers' unshuffled reference order
    seed: int = 0
    device: str = "cpu"
    train_config: TrainConfig | None = None
    full_importance: dict[str, Tensor] | None = None
    full_importance_kind: str | None = None
    full_importance_mode: str | None = None
    rho: float | None = None  # poison requests: target = rho * original forget accuracy
    progress: Callable[[dict], None] | None = None  # gets {"step", "forget_acc"} per search step
    # Where passes over rows run (unlearning.passes): in this process by default, or on a Ray
    # cluster for large splits (pipelines.distributed.RayExecutor).
    executor: LocalExecutor | None = None
    inference_precision: str = "fp32"  # outcome passes' precision: "fp32" or "bf16" (unlearning.passes)
    cache: dict = field(default_factory=dict)
    importance_seconds: float = 0.0  # time spent computing importances (reported apart)

    def __post_init__(self):
        if self.executor is None:
            self.executor = LocalExecutor(self.device, precision=self.inference_precision)

    @property
    def forget_fraction(self) -> float:
        return len(self.forget_split) / (len(self.forget_split) + len(self.retain_split))

    def batches(self, split: Split):
        return split.batches(
            self.batch_size, shuffle=self.shuffle_batches, seed=self.seed, normalize=self.normalize
        )

    def importance(self, which: str, kind: str) -> dict[str, Tensor]:
        """I over `which` in {"full", "retain", "forget"} of importance kind `kind`, cached."""
        key = (which, kind)
        if key in self.cache:
            return self.cache[key]
        started = time.perf_counter()
        if which == "full" and self.full_importance is not None and self.full_importance_kind == kind:
            result = self.full_importance
        elif which == "retain" and self._store_gives_retain(kind):
            result = self._retain_from_full(kind)
        else:
            split = {
                "full": self.dataset.train,
                "retain": self.retain_split,
                "forget": self.forget_split,
            }[which]
            sums = self.executor.importance(
                self.model, split, kind, self.importance_mode, self.batch_size, self.normalize,
                shuffle=self.shuffle_batches, seed=self.seed,
            )
            result = sums.mean()
        self.cache[key] = result
        if which != "retain" or not self._store_gives_retain(kind):
            self.importance_seconds += time.perf_counter() - started
        return result

    def _store_gives_retain(self, kind: str) -> bool:
        """Only per-sample importances split exactly into retained + forgotten parts."""
        return (
            self.full_importance is not None
            and self.full_importance_kind == kind
            and self.importance_mode == "per_sample"
            and self.full_importance_mode in (None, "per_sample")
        )

    def _retain_from_full(self, kind: str) -> dict[str, Tensor]:
        """I^{D_r} from a stored I^D: exact in per_sample mode, (N I^D - N_f I^f) / N_r."""
        n_forget, n_retain = len(self.forget_split), len(self.retain_split)
        forget = self.importance("forget", kind)
        return {
            name: ((full * (n_forget + n_retain) - forget[name] * n_forget) / n_retain).clamp_min(0)
            for name, full in self.full_importance.items()
        }

    def original_accuracy(self, which: str) -> float:
        """The original model's accuracy on D_f ("forget"), or on unseen data ("test"), or the
        standard error of the latter as a prediction for D_f ("test_se").

        "test" is weighted to the forget set's class mix: the mean over forget samples of the
        test accuracy of their class, i.e. what the model scores on unseen samples like them.
        For a sub-class request the "class" is the fine class.
        """
        key = ("accuracy", which)
        if key not in self.cache:
            if which == "forget":
                self.cache[key] = self.accuracy(self.model, self.forget_split)
            else:
                test = self.dataset.test
                [outcomes] = self.executor.outcomes([self.model], test, self.normalize)
                fine = self.forget.kind == "subclass" and test.fine_labels is not None
                mix, se = unseen_accuracy(
                    outcomes.pred == test.labels,
                    test.fine_labels if fine else test.labels,
                    self.forget_split.fine_labels if fine else self.forget_split.labels,
                )
                self.cache[("accuracy", "test")], self.cache[("accuracy", "test_se")] = mix, se
        return self.cache[key]

    def search_rho(self, rho: float | None = None) -> float | None:
        """The rho of a poison-style target: `rho`, else the request's, else the poison default."""
        return request_rho(self.forget.kind, rho if rho is not None else self.rho)

    def search_target(self, target: float | None = None, rho: float | None = None) -> float:
        """The forget-accuracy target a search aims at (docs/methods.md#forget-targets)."""
        if target is not None:
            return target
        rho = self.search_rho(rho)
        needs_forget = rho is not None or self.forget.kind != "class"
        return forget_target(
            self.forget.kind,
            original_test_acc=self.original_accuracy("test"),
            unseen_se=self.original_accuracy("test_se"),
            original_forget_acc=self.original_accuracy("forget") if needs_forget else None,
            rho=rho,
            forget_size=len(self.forget_split),
        )

    def search_kind(self) -> str:
        """The importance a PTN search reads unless told: label-free `l2` for a sub-class (the Fisher
        importance of its coarse label singles out its misclassified rows, so dampening raises
        their accuracy until the model breaks: docs/methods.md#ptn-search), else `fisher`."""
        return "l2" if self.forget.kind == "subclass" else "fisher"

    def search_targets(self, target: float, given: float | None, rho: float | None) -> list[float]:
        """A rho target and the looser ones it may take when meeting it costs retained accuracy
        (`slack_targets`); [target] alone when the request gave one (`given`) or it is no rho target."""
        if given is not None or rho is None:
            return [target]
        return slack_targets(target, self.original_accuracy("forget"), len(self.forget_split))

    def retain_sample(self, size: int, seed: int | None = None) -> Split:
        """`size` retained rows drawn with `seed` (default: the task's), all of them if fewer; the
        same rows on every call (the PTN refinement, TPE trials and the report's search curve)."""
        seed = self.seed if seed is None else seed
        key = ("retain_sample", size, seed)
        if key not in self.cache:
            self.cache[key] = self.retain_split.subset(seeded_sample(len(self.retain_split), size, seed))
        return self.cache[key]

    def retained_scorer(self, full_importance, forget_importance, size: int) -> Callable[[Step], float]:
        """step -> the accuracy of the original dampened at `step` on `retain_sample(size)`, each
        step scored once (the refinement, the slack's walks and the ceiling ask for the same steps)."""
        sample = self.retain_sample(size)
        return functools.cache(lambda step: self.accuracy(dampened_copy(self.model, full_importance,
                                                                        forget_importance, step), sample))

    def forget_accuracy(self, model: nn.Module, ceiling: float | None = None) -> float:
        """`model`'s accuracy on D_f; with `ceiling`, the pass stops once the accuracy is past it
        and gives what it has seen as an `AtLeast` (above the ceiling: the verdict is exact)."""
        if ceiling is None:
            return self.accuracy(model, self.forget_split)
        rows = len(self.forget_split)
        right, read = self.executor.rows_right(model, self.forget_split, self.normalize, rows_allowed(ceiling, rows))
        return AtLeast(right / rows) if read < rows else right / rows

    def accuracy(self, model: nn.Module, split: Split) -> float:
        """`model`'s accuracy on `split`, in one outcome pass wherever the executor runs it."""
        [outcomes] = self.executor.outcomes([model], split, self.normalize)
        return outcomes.accuracy(split.labels)
