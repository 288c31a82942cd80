"""The scheduled job over the ledger: claim the pending requests, unlearn them as one batch,
register the result and mark them done, exactly once (see `pipelines.ledger` for the store and
its claims, docs/requests.md for the guarantees)."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from pipelines.ledger import BatchFailed, Claim, Ledger, TargetNotMet
from unlearning.errors import UserError

log = logging.getLogger(__name__)


def process_pending(
    ledger: Ledger,
    model_name: str,
    data_spec: str,
    out_root: str | Path,
    initial_model: str | None = None,
    options=None,
    fault_point=None,
) -> dict:
    """Process every pending request in one batch; returns a summary.

    Raises BatchFailed (after marking the batch and its requests `failed`) if the batch
    cannot be done, TargetNotMet (likewise) if its version missed its forget-accuracy target
    and `options.accept_unmet` is off. `fault_point(step)` is called after each step
    ("claimed", "unlearning", the request's "written", "run_created", "version_registered",
    "recorded", then "registered", "finished"); tests pass one that stops the process there.
    """
    from pipelines.lineage import find_batch_version
    from pipelines.options import ForgetOptions
    from pipelines.summary import target_line

    pause_point = fault_point or (lambda step: None)
    options = options or ForgetOptions()
    known_ids = _check_inputs(data_spec, options)  # before any claim
    claim = ledger.claim()  # step 1
    if claim is None:
        return {"batch": None, "processed": 0, "message": "no pending requests"}
    log.info("batch %d claimed%s: requests %s", claim.batch_id, " again (resumed)" if claim.resumed else "",
             ", ".join(str(r["id"]) for r in claim.requests))
    pause_point("claimed")

    tag = ledger.batch_tag(claim.batch_id)
    adopted = find_batch_version(model_name, tag)
    if adopted is None:  # step 2
        # no model to start from is the command's mistake: the batch stays open for the next run
        job = _BatchJob(ledger, claim, model_name, data_spec, Path(out_root), initial_model)
        try:
            skipped = job.select_ids(known_ids)
            if skipped is not None:
                return skipped
            report = job.unlearn(options, fault_point)
        except UserError as error:
            if find_batch_version(model_name, tag) is not None:
                raise  # registered after all: the next run adopts it
            reason = str(error).splitlines()[0]
            failed = ledger.fail(claim.batch_id, reason)
            raise BatchFailed(f"batch {claim.batch_id} failed; requests {', '.join(map(str, failed))} "
                              f"marked failed: {reason}") from None
        entry, unmet = report.mlflow, None if report.target_met else target_line(report)
    else:  # an interrupted run registered it already: adopt it, apply nothing twice
        log.info("batch %d: version %s was registered by an interrupted run; adopted", claim.batch_id,
                 adopted["version"])
        entry, unmet = _adopt(adopted, Path(out_root), claim.batch_id, options.accept_unmet)
    if unmet is not None and not options.accept_unmet:  # recorded, not done: @current stays
        failed = ledger.fail(claim.batch_id, unmet)
        raise TargetNotMet(f"batch {claim.batch_id} failed; requests {', '.join(map(str, failed))} "
                           f"marked failed: {unmet}")
    ledger.finish(claim.batch_id, model_name, entry.parent_version, entry.model_version, entry.run_id)  # step 3
    pause_point("finished")
    done = sum(1 for r in ledger.list("done") if r["batch_id"] == claim.batch_id)
    return {"batch": claim.batch_id, "processed": done, "resumed": claim.resumed,
            "model_version": entry.model_version, "adopted": adopted is not None, "target_met": unmet is None}


def _adopt(recorded: dict, out_root: Path, batch_id: int, accept_unmet: bool):
    """(MLflow entry, the unmet-target line or None) of the batch's version that an interrupted
    run registered; what that run left undone (@current, its run, the run directory's
    report.json, found by the version's request id) is finished."""
    from pipelines.registration import complete_recorded, read_run
    from pipelines.summary import target_line

    request_id = recorded["tags"].get("request_id")
    for out in sorted(out_root.glob(f"batch-{batch_id}*")) if request_id else []:
        report = read_run(out)
        if report is not None and report.request_id == request_id:
            entry = complete_recorded(out, report, recorded, accept_unmet)
            return entry, None if report.target_met else target_line(report)
    entry = complete_recorded(None, None, recorded, accept_unmet)  # its run directory is gone
    if recorded["tags"].get("target_met") != "false":
        return entry, None
    return entry, (f"target NOT met (version {entry.model_version} is tagged target_met=false); "
                   f"@current stays at version {entry.current_version} (--accept-unmet moves it)")


def _check_inputs(data_spec: str, options) -> set[int]:
    """The job's own inputs, checked before a batch is claimed (a mistake in the command must
    not fail the requests); returns the training ids of the data. The registry is not asked
    here: only the claim's winner touches MLflow (two processes never create its store at once)."""
    import unlearning
    from pipelines.request import search_config_of

    if options.search:
        search_config_of(options)
    else:
        unlearning.get_method(options.method)
    if options.importance_store and "://" not in options.importance_store and not Path(options.importance_store).exists():
        raise UserError(f"--importance {options.importance_store}: no such importance store")
    return set(unlearning.data.open_dataset(data_spec).train.ids.tolist())  # ids only


class _BatchJob:
    """Step 2 of `process_pending` for one claimed batch: which ids to remove, then unlearn."""

    def __init__(self, ledger: Ledger, claim: Claim, model_name: str, data_spec: str, out_root: Path,
                 initial_model: str | None):
        from pipelines.lineage import lineage_removed_ids, version_info

        self.ledger, self.claim, self.model_name, self.data_spec = ledger, claim, model_name, data_spec
        self.out_root, self.wanted = out_root, set()
        self.base = version_info(model_name)  # read after the claim: no other batch moves it now
        if self.base is None:
            stays = f"(batch {claim.batch_id} stays open for the next run)"
            if not initial_model:
                raise UserError(f"model {model_name!r} is not registered yet; give --initial-model CKPT once {stays}")
            if "://" not in initial_model and not Path(initial_model).exists():
                raise UserError(f"--initial-model {initial_model}: no such checkpoint {stays}")
            self.model_uri, self.removed = initial_model, []
        else:
            self.model_uri = f"models:/{model_name}/{self.base['version']}"
            self.removed = lineage_removed_ids(model_name, self.base["version"])

    def select_ids(self, known: set[int]) -> dict | None:
        """Reject requests with ids not in the data; None if ids remain to remove, else a summary."""
        already, rejected = set(self.removed), []
        for request in self.claim.requests:
            unknown = [i for i in request["ids"] if i not in known]
            if unknown:
                rejected.append((request["id"], unknown))
            else:
                self.wanted.update(i for i in request["ids"] if i not in already)
        for request_id, unknown in rejected:
            self.ledger.reject_claimed([request_id], f"ids not in the data: {unknown[:5]}")
        if self.wanted:
            return None
        version = self.base["version"] if self.base else None  # everything asked for is gone already
        self.ledger.finish(self.claim.batch_id, self.model_name, version, version, "")
        return {"batch": self.claim.batch_id, "processed": len(self.claim.requests) - len(rejected),
                "rejected": len(rejected), "model_version": version, "message": "nothing left to remove"}

    def unlearn(self, options, fault_point):
        """Forget the wanted ids from the base version, registered with the batch's tag; the
        request's report (with its MLflow entry)."""
        from pipelines.request import run_forget
        from unlearning.outputs import OutputExists

        pause_point = fault_point or (lambda step: None)
        batch_id = self.claim.batch_id
        self.out_root.mkdir(parents=True, exist_ok=True)
        ids_file = self.out_root / f"batch-{batch_id}-ids.txt"
        ids_file.write_text("".join(f"{i}\n" for i in sorted(self.wanted)))
        options.model_name, options.track = self.model_name, True
        options.batch_tag = self.ledger.batch_tag(batch_id)
        out = self.out_root / f"batch-{batch_id}"
        pause_point("unlearning")
        try:  # a previous attempt's unrecorded run directory is adopted (run_forget)
            report = run_forget(self.model_uri, self.data_spec, str(ids_file), str(out), options, fault_point=fault_point)
        except OutputExists:  # one made with other settings: kept, and this attempt writes anew
            out = self.out_root / f"batch-{batch_id}-attempt-{datetime.now().strftime('%H%M%S')}"
            report = run_forget(self.model_uri, self.data_spec, str(ids_file), str(out), options, fault_point=fault_point)
        pause_point("registered")
        return report
