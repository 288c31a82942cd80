"""A calibrated membership test: offline RMIA (Zarifzadeh, Liu and Shokri, "Low-Cost High-Power
Membership Inference Attacks", ICML 2024) with reference models trained on halves of the data.

The loss-threshold MIA (`unlearning.metrics.membership_inference`) asks one question of every
row. RMIA asks, per row, whether the model gives x more probability than models that never saw
x do, relative to how it treats population rows z that nobody trained on:

    Pr(x)     = ½ ((1 + a) · mean_OUT Pr(x | θ_ref) + (1 − a))      (offline: OUT models only)
    LR(x, z)  = (Pr(x | θ) / Pr(x)) / (Pr(z | θ) / Pr(z))
    score(x)  = share of population rows z with LR(x, z) ≥ γ

Pr(x | θ) is the softmax probability of x's label. References come in pairs trained on
complementary seeded halves of the training split, so every training row is OUT in exactly
half of them. `a` is chosen when the references are built, as the paper does: the value that
best tells one reference's own training rows from the rows it never saw (`choose_a`).

For an unlearned model the test is run on D_f (the rows that should now look unseen) against
held-out test rows (truly unseen; of the forgotten classes for a class request): `rmia_auc` is
the attack's AUC (0.5 = D_f looks like unseen data) and `rmia_flagged` the share of D_f called
member at the threshold that flags `FPR` of the unseen rows (≈ FPR for a retrained model).
docs/implementation-notes.md, "A calibrated membership test", says why the rows are sampled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearning.data import Dataset, ForgetSet, Split
from unlearning.data.containers import seeded_sample
from unlearning.errors import UserError
from unlearning.metrics import predict_logits

GAMMA = 1.0  # score(x) is then the rank of x's ratio among the population's
FPR = 0.05  # the false-positive rate `rmia_flagged` is read at
SAMPLE_ROWS = 2000  # seeded rows of D_f, of unseen candidates and of the population, at most
A_GRID = tuple(round(0.1 * i, 1) for i in range(11))
MEMBERS_FILE = "members.safetensors"
INFO_FILE = "references.json"


def member_halves(n: int, count: int, seed: int) -> Tensor:
    """[count, n] bool: pairs of complementary seeded halves (each row IN for one of a pair)."""
    if count < 2 or count % 2:
        raise UserError(f"the reference count must be an even number of at least 2, got {count}")
    generator = torch.Generator().manual_seed(seed)
    members = torch.zeros(count, n, dtype=torch.bool)
    for pair in range(count // 2):
        first = torch.randperm(n, generator=generator)[: n // 2]
        members[2 * pair, first] = True
        members[2 * pair + 1] = ~members[2 * pair]
    return members


@dataclass
class References:
    """Reference models with the training ids they were split over and who saw what."""

    models: list[nn.Module]
    ids: Tensor  # int64, the training split's ids
    members: Tensor  # bool [K, len(ids)]
    a: float

    def out_mask(self, ids: Tensor) -> Tensor:
        """[K, len(ids)] bool: reference k never trained on row i (ids it was not split over: never)."""
        position = {int(i): j for j, i in enumerate(self.ids.tolist())}
        found = torch.tensor([position.get(int(i), -1) for i in ids.tolist()], dtype=torch.int64)
        mask = torch.ones(len(self.models), len(ids), dtype=torch.bool)
        known = found >= 0
        mask[:, known] = ~self.members[:, found[known]]
        return mask


def label_probs(model: nn.Module, split: Split, normalize: dict | None) -> Tensor:
    """Softmax probability of each row's label (float64), in eval mode."""
    log_p = F.log_softmax(predict_logits(model, split, normalize).double(), dim=1)
    return log_p.gather(1, split.labels.view(-1, 1)).squeeze(1).exp()


def rmia_scores(target_x: Tensor, ref_x: Tensor, out_x: Tensor, target_z: Tensor, ref_z: Tensor, a: float,
                gamma: float = GAMMA) -> Tensor:
    """score(x) for each candidate: `ref_x` [K, n] with `out_x` [K, n] saying which references
    never saw x; the population's rows were seen by no reference."""
    weights = out_x.double()
    counts = weights.sum(0)
    # a row no reference left out (not possible with paired halves) falls back to all of them
    mean_out = torch.where(counts > 0, (ref_x * weights).sum(0) / counts.clamp(min=1), ref_x.mean(0))
    prior_x = 0.5 * ((1 + a) * mean_out + (1 - a))
    prior_z = 0.5 * ((1 + a) * ref_z.mean(0) + (1 - a))
    ratio_x, ratio_z = target_x / prior_x, target_z / prior_z
    ordered = torch.sort(ratio_z).values
    return torch.searchsorted(ordered, ratio_x / gamma, right=True).double() / len(ordered)


def auc(positives: Tensor, negatives: Tensor) -> float:
    """P(score of a positive > score of a negative) + ½ P(equal): the Mann-Whitney AUC."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    both = torch.cat([positives, negatives]).double()
    order = torch.argsort(both, stable=True)
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    for value in torch.unique(both):  # mid-ranks for ties
        tied = both == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flagged_share(positives: Tensor, negatives: Tensor, fpr: float = FPR) -> float:
    """Share of positives scored above the threshold that flags `fpr` of the negatives."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    threshold = torch.quantile(negatives.double(), 1 - fpr)
    return float((positives > threshold).double().mean())


def choose_a(references: References, dataset: Dataset, normalize: dict | None, seed: int = 0,
             rows: int = SAMPLE_ROWS) -> tuple[float, dict]:
    """The paper's way to set `a`: reference 0 plays the target, its IN and OUT training rows
    the members and non-members, the other references the references; the best AUC's a."""
    if len(references.models) < 4:
        return 0.3, {}  # one pair: no reference left to play the target against (0.3: see the docs)
    train = dataset.train.subset(seeded_sample(len(dataset.train), rows, seed))
    population = dataset.test.subset(seeded_sample(len(dataset.test), rows, seed + 1))
    probs_x = torch.stack([label_probs(m, train, normalize) for m in references.models])
    probs_z = torch.stack([label_probs(m, population, normalize) for m in references.models])
    out = references.out_mask(train.ids)
    member = ~out[0]
    aucs = {}
    for a in A_GRID:
        scores = rmia_scores(probs_x[0], probs_x[2:], out[2:], probs_z[0], probs_z[2:], a)
        aucs[a] = auc(scores[member], scores[~member])
    best = max(aucs, key=lambda a: (aucs[a], -abs(a - 0.5)))
    return best, aucs


def calibrated_mia(models: list[nn.Module], references: References, dataset: Dataset, forget: ForgetSet,
                   normalize: dict | None, seed: int = 0, rows: int = SAMPLE_ROWS, fpr: float = FPR) -> list[dict]:
    """`rmia_auc` and `rmia_flagged` of each model for the forget set (see the module's doc)."""
    in_forget = torch.isin(dataset.train.ids, forget.ids)
    forgotten = dataset.train.where(in_forget)
    forgotten = forgotten.subset(seeded_sample(len(forgotten), rows, seed))
    test = dataset.test
    if forget.kind in ("class", "subclass"):  # unseen candidates like D_f: the same classes
        classes = test.fine_labels if forget.kind == "subclass" else test.labels
        same = torch.isin(classes, torch.tensor(forget.classes))
    else:
        same = torch.ones(len(test), dtype=torch.bool)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed + 1))
    same_rows = order[same[order]]
    candidates = same_rows[: min(rows, len(same_rows) // 2)]  # the rest stays for the population
    population = order[~torch.isin(order, candidates)][:rows]
    unseen, population = test.subset(torch.sort(candidates).values), test.subset(torch.sort(population).values)
    ref_x = torch.stack([label_probs(m, forgotten, normalize) for m in references.models])
    ref_n = torch.stack([label_probs(m, unseen, normalize) for m in references.models])
    ref_z = torch.stack([label_probs(m, population, normalize) for m in references.models])
    out_x = references.out_mask(forgotten.ids)
    out_n = torch.ones_like(ref_n, dtype=torch.bool)
    results = []
    for model in models:
        target_z = label_probs(model, population, normalize)
        positives = rmia_scores(label_probs(model, forgotten, normalize), ref_x, out_x, target_z, ref_z, references.a)
        negatives = rmia_scores(label_probs(model, unseen, normalize), ref_n, out_n, target_z, ref_z, references.a)
        results.append({"rmia_auc": auc(positives, negatives), "rmia_flagged": flagged_share(positives, negatives, fpr)})
    return results


def save_references(references: References, path: str | os.PathLike, info: dict) -> None:
    """A reference directory: ref-NN/ checkpoints, members.safetensors and references.json."""
    from safetensors.torch import save_file

    from unlearning.checkpoint import write_model_files
    from unlearning.outputs import atomic_directory

    with atomic_directory(path) as staging:
        for k, model in enumerate(references.models):
            (staging / f"ref-{k:02d}").mkdir()
            write_model_files(model, staging / f"ref-{k:02d}")
        save_file({"ids": references.ids.contiguous(), "members": references.members.to(torch.uint8).contiguous()},
                  str(staging / MEMBERS_FILE))
        (staging / INFO_FILE).write_text(json.dumps({**info, "count": len(references.models), "a": references.a},
                                                    indent=1))


def load_references(path: str | os.PathLike) -> References:
    from safetensors.torch import load_file

    from unlearning.checkpoint import load_model

    path = Path(path)
    if not (path / INFO_FILE).is_file() or not (path / MEMBERS_FILE).is_file():
        raise UserError(f"{path} is not a reference directory (made by `unlearn references`)")
    try:
        info = json.loads((path / INFO_FILE).read_text())
        tensors = load_file(str(path / MEMBERS_FILE))
        count, a = int(info["count"]), float(info["a"])
    except (ValueError, KeyError, OSError, TypeError) as error:
        raise UserError(f"{path}: unreadable reference directory ({error})") from None
    members = tensors["members"].bool()
    if members.shape != (count, len(tensors["ids"])):
        raise UserError(f"{path / MEMBERS_FILE}: membership of {tuple(members.shape)} for {count} references")
    models = [load_model(path / f"ref-{k:02d}") for k in range(count)]
    return References(models, tensors["ids"], members, a)


def train_reference(original: nn.Module, train: Split, members: Tensor, config, normalize: dict | None,
                    seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """One reference: the original's architecture, fresh, trained with `config` on its half."""
    from dataclasses import replace

    from unlearning.training import fresh_like
    from unlearning.training import train as train_model

    model = fresh_like(original, seed)
    train_model(model, train.where(members), replace(config, seed=seed), normalize, device=device)
    return model.cpu()


def train_references(original: nn.Module, dataset: Dataset, config, count: int = 4, seed: int = 0,
                     device: str | torch.device = "cpu") -> References:
    """`count` references one after another, in this process (pipelines.references: on Ray)."""
    from unlearning.checkpoint import model_meta

    normalize = model_meta(original).get("normalize")
    members = member_halves(len(dataset.train), count, seed)
    models = [train_reference(original, dataset.train, members[k], config, normalize, seed * 1000 + k, device)
              for k in range(count)]
    references = References(models, dataset.train.ids.clone(), members, 0.3)
    references.a, _ = choose_a(references, dataset, normalize, seed)
    return references
