"""Eval-gated promotion: move `champion` to the candidate only when the gate's conditions hold.

`promote` resolves both aliases to versions, gets eval-stage results that score the candidate
and the current champion together (the candidate's last evaluation run when it covers the
gate's suites and the same champion, else a new stage run on exactly those suites), checks
every condition of `registry.promotion.gate`, and records the decision, the numbers and the
gate in the candidate version's tags and description. `--force --reason` overrides a failed
gate (recorded as forced); `rollback` points the alias back at the champion before.

Every move records first and moves the alias last, and only while the alias still points where it
did when the decision was made: an error between the two leaves the alias untouched, and a
promote that lost a race to another one says so and moves nothing.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import JUDGE_SUITES, ConfigError, ExperimentConfig, GateCondition
from pipeline.eval import stage
from pipeline.eval.report import ADAPTER_CHECK_TAG

log = logging.getLogger("loraforge")

PREFIX = "loraforge.promotion"
PREVIOUS_TAG = f"{PREFIX}.previous_champion"


@dataclass
class Check:
    metric: str
    condition: str
    candidate: float | None
    champion: float | None
    passed: bool
    detail: str


@dataclass
class Decision:
    model_name: str
    candidate_version: str
    champion_version: str | None
    checks: list[Check]
    eval_run_id: str | None
    promoted: bool = False
    forced: bool = False
    reason: str | None = None
    action: str = "rejected"  # promoted | forced | rejected | rolled_back
    gate: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _gain(condition: GateCondition, candidate: float, champion: float) -> float:
    """How much better the candidate is than the champion, in the metric's units (negative: worse)."""
    return candidate - champion if condition.direction == "higher" else champion - candidate


def check_gate(gate: list[GateCondition], candidate: dict[str, float], champion: dict[str, float] | None) -> list[Check]:
    """Every condition against the candidate's and champion's `<suite>.<metric>` values."""
    checks = []
    for cond in gate:
        value = candidate.get(cond.metric)
        other = champion.get(cond.metric) if champion is not None else None
        if value is None:
            checks.append(Check(cond.metric, "present", None, other, False,
                                f"the eval stage gave no {cond.metric} for the candidate (it has: "
                                f"{', '.join(sorted(candidate)) or 'nothing'})"))
            continue
        if cond.min is not None:
            checks.append(Check(cond.metric, f">= {cond.min:g}", value, other, value >= cond.min,
                                f"{value:.4f} {'>=' if value >= cond.min else '<'} floor {cond.min:g}"))
        if cond.max is not None:
            checks.append(Check(cond.metric, f"<= {cond.max:g}", value, other, value <= cond.max,
                                f"{value:.4f} {'<=' if value <= cond.max else '>'} ceiling {cond.max:g}"))
        relative = cond.min_gain if cond.min_gain is not None else cond.max_drop
        if relative is None:
            continue
        label = (f"gain >= {cond.min_gain:g} ({cond.direction} is better)" if cond.min_gain is not None
                 else f"drop <= {cond.max_drop:g} ({cond.direction} is better)")
        if champion is None:
            # no champion: only the absolute floors decide (the first candidate to pass them becomes it)
            checks.append(Check(cond.metric, label, value, None, True, "no champion yet: relative condition skipped"))
            continue
        if other is None:
            checks.append(Check(cond.metric, label, value, None, False, f"the eval stage gave no {cond.metric} for the champion"))
            continue
        gain = _gain(cond, value, other)
        passed = gain >= cond.min_gain if cond.min_gain is not None else -gain <= cond.max_drop
        checks.append(Check(cond.metric, label, value, other, passed,
                            f"{value:.4f} vs champion {other:.4f}: {'gain' if gain >= 0 else 'drop'} {abs(gain):.4f}"))
    return checks


def calibration_check(mlflow_client: Any, results: dict[str, Any], spec: Any) -> Check:
    """The judge behind the gate's judge metrics has a calibration run (`loraforge judge calibrate`), with at least
    `spec.min_spearman` when set: else the judge's numbers are unmeasured and the gate does not pass."""
    from pipeline.eval.judge.calibrate import latest_run

    judge_id = (results.get("judge") or {}).get("id")
    condition = "judge calibrated" + (f", Spearman{' (lower bound)' if spec.use_lower_bound else ''} >= "
                                      f"{spec.min_spearman:g}" if spec.min_spearman is not None else "")
    if not judge_id:
        return Check("judge", condition, None, None, False, "the evaluation names no judge")
    run = latest_run(mlflow_client, judge_id)
    if run is None:
        return Check("judge", condition, None, None, False,
                     f"judge {judge_id} has no calibration run, so its metrics are unmeasured: run `loraforge judge "
                     "calibrate CONFIG --labels FILE` first (or promote with --force --reason)")
    name = "spearman_low" if spec.use_lower_bound else "spearman"
    value = run.data.metrics.get(name)
    if spec.min_spearman is None:
        return Check("judge", condition, value, None, True, f"calibration run {run.info.run_id}: {name} "
                     f"{'undefined' if value is None else f'{value:.3f}'}")
    passed = value is not None and value >= spec.min_spearman
    return Check("judge", condition, value, None, passed,
                 f"calibration run {run.info.run_id}: {name} {'undefined' if value is None else f'{value:.3f}'} "
                 f"{'>=' if passed else '<'} {spec.min_spearman:g}")


def flat_metrics(per_suite: dict[str, dict[str, dict[str, float]]], role: str) -> dict[str, float]:
    return {f"{suite}.{metric}": value for suite, per_model in per_suite.items()
            for metric, value in per_model.get(role, {}).items()}


def _version_or_none(mlflow_client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "INVALID_PARAMETER_VALUE" in str(err.error_code):
            return None
        raise


def cached_results(mlflow_client: Any, candidate: Any, champion: Any, suites: set[str]) -> dict[str, Any] | None:
    """The candidate's last eval-stage results if they cover `suites` and were scored against this champion."""
    run_id = candidate.tags.get("loraforge.eval_run_id")
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow_client.download_artifacts(run_id, "results.json", tmp)
        except Exception:  # the run or its artifact is gone: evaluate again
            return None
        results = json.loads(Path(path).read_text())
    if str(results.get("model_version")) != str(candidate.version):
        return None
    scored = {s for s, per_model in results.get("suites", {}).items() if "candidate" in per_model}
    if not suites <= scored or any(s in results.get("failed", {}) for s in [*suites, "adapter"]):
        return None
    champion_then = results.get("models", {}).get("champion", {}).get("version")
    if champion is not None and str(champion_then) != str(champion.version):
        return None
    if champion is not None and any("champion" not in results["suites"][s] for s in suites):
        return None
    results["_run_id"] = run_id
    return results


def evaluate(config: ExperimentConfig, candidate: Any, champion: Any, suites: list[str]) -> dict[str, Any]:
    """Results with the candidate and champion scored on `suites`: reused from the cache, else a new stage run."""
    mlflow_client = tracking.client(config.tracking.tracking_uri)
    cached = cached_results(mlflow_client, candidate, champion, set(suites))
    if cached is not None:
        log.info("reusing evaluation run %s of version %s (suites %s)", cached["_run_id"], candidate.version,
                 ", ".join(suites))
        return cached
    result = stage.run_stage(config, model_ref=f"models:/{candidate.name}/{candidate.version}", names=suites,
                             reports_dir=None)
    if result.failed:
        raise ConfigError([f"registry.promotion.gate: suite {k} failed on version {candidate.version}: {v}"
                           for k, v in result.failed.items()])
    return {**result.results, "_run_id": result.run_id}


def promote(config: ExperimentConfig, *, force: bool = False, reason: str | None = None) -> Decision:
    """Check the gate for `from_alias` against `to_alias` and move `to_alias` when it passes (or when forced)."""
    spec = config.registry.promotion
    name = config.tracking.registered_model_name
    mlflow_client = tracking.client(config.tracking.tracking_uri)
    if force and not (reason or "").strip():
        raise ConfigError(["--force: give --reason TEXT; the override is recorded with it"])
    if not spec.gate and not force:
        raise ConfigError(["registry.promotion.gate: empty; add conditions (e.g. {metric: classification.accuracy, "
                           "min_gain: 0.01}) or promote with --force --reason TEXT"])
    candidate = _version_or_none(mlflow_client, name, spec.from_alias)
    if candidate is None:
        raise ConfigError([f"--from: registered model {name!r} has no version with alias {spec.from_alias!r}; "
                           "run a sweep first (loraforge run) or pass --from ALIAS"])
    if (check := candidate.tags.get(ADAPTER_CHECK_TAG, "")).startswith("failed"):
        raise ConfigError([f"--from: version {candidate.version}'s adapter does not apply, so it is the base model "
                           f"again and cannot be promoted, even with --force ({check.removeprefix('failed: ')})"])
    champion = _version_or_none(mlflow_client, name, spec.to_alias)
    if champion is not None and champion.version == candidate.version:
        raise ConfigError([f"--from: version {candidate.version} is already {spec.to_alias!r}"])
    suites = sorted({c.suite for c in spec.gate})
    results = evaluate(config, candidate, champion, suites) if suites else {"suites": {}, "_run_id": None}
    checks = check_gate(spec.gate, flat_metrics(results["suites"], "candidate"),
                        flat_metrics(results["suites"], "champion") if champion is not None else None)
    if any(s in JUDGE_SUITES for s in suites):
        checks.append(calibration_check(mlflow_client, results, spec.judge_calibration))
    decision = Decision(name, str(candidate.version), str(champion.version) if champion else None, checks,
                        results.get("_run_id"), gate=[c.model_dump(exclude_none=True) for c in spec.gate])
    if decision.passed or force:
        decision.promoted, decision.forced = True, not decision.passed
        decision.action = "forced" if decision.forced else "promoted"
        decision.reason = reason
        # decided against `champion`: refuse before recording if another promote moved the alias meanwhile
        _check_alias_unmoved(mlflow_client, name, spec.to_alias, decision.champion_version)
    # record first, move last: an error or interrupt in between leaves the alias where it was, and
    # the version already names the champion it replaces, so --rollback can undo the move
    _record(mlflow_client, decision, candidate, spec.to_alias)
    if decision.promoted:
        try:
            _move_alias(mlflow_client, name, spec.to_alias, candidate.version, expected=decision.champion_version)
        except ConfigError:  # lost the race after recording: the record must not claim a move
            mlflow_client.set_model_version_tag(name, candidate.version, f"{PREFIX}.decision", "superseded")
            raise
    return decision


def _alias_version(mlflow_client: Any, name: str, alias: str) -> str | None:
    version = _version_or_none(mlflow_client, name, alias)
    return None if version is None else str(version.version)


def _check_alias_unmoved(mlflow_client: Any, name: str, alias: str, expected: str | None) -> None:
    now = _alias_version(mlflow_client, name, alias)
    if now != expected:
        raise ConfigError([
            f"{alias}: moved to {'version ' + now if now else 'no version'} while this decision was made against "
            f"{'version ' + expected if expected else 'no ' + alias} (another promote or rollback ran); nothing was "
            f"moved. Run loraforge promote again to decide against the new {alias}"])


def _move_alias(mlflow_client: Any, name: str, alias: str, version: Any, *, expected: str | None) -> None:
    """Point `alias` at `version` only if it still points at `expected` (compare-and-set, as close as MLflow allows).

    MLflow has no conditional alias update: the check and the move are two requests, so two promotes
    racing within that gap (milliseconds, after minutes of evaluation) can still both move it.
    """
    _check_alias_unmoved(mlflow_client, name, alias, expected)
    mlflow_client.set_registered_model_alias(name, alias, version)


def _record(mlflow_client: Any, decision: Decision, version: Any, to_alias: str) -> None:
    """The decision, numbers and gate on the version (tags) and in its description (one line per decision)."""
    name, number = decision.model_name, decision.candidate_version
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    tags = {
        f"{PREFIX}.decision": decision.action,
        f"{PREFIX}.to": to_alias,
        f"{PREFIX}.time": stamp,
        f"{PREFIX}.gate": json.dumps(decision.gate),
        f"{PREFIX}.checks": json.dumps([asdict(c) for c in decision.checks]),
        f"{PREFIX}.champion_compared": decision.champion_version or "none",
    }
    if decision.eval_run_id:
        tags[f"{PREFIX}.eval_run_id"] = decision.eval_run_id
    if decision.reason:
        tags[f"{PREFIX}.reason"] = decision.reason
    if decision.promoted:
        tags[PREVIOUS_TAG] = decision.champion_version or "none"
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, number, key, value[:5000])
    summary = "; ".join(f"{c.metric} {c.condition}: {'pass' if c.passed else 'FAIL'} ({c.detail})" for c in decision.checks)
    line = (f"[{stamp}] {decision.action} to {to_alias!r}"
            f"{' over version ' + decision.champion_version if decision.champion_version else ' (no champion before)'}"
            f"{': ' + summary if summary else ''}{' | forced: ' + decision.reason if decision.forced else ''}")
    description = ((version.description or "").rstrip() + "\n\n" + line).strip()
    mlflow_client.update_model_version(name, number, description=description[:5000])


def rollback(config: ExperimentConfig, reason: str | None = None) -> Decision:
    """Point `to_alias` back at the champion the current one replaced; recorded on both versions."""
    spec = config.registry.promotion
    name = config.tracking.registered_model_name
    mlflow_client = tracking.client(config.tracking.tracking_uri)
    current = _version_or_none(mlflow_client, name, spec.to_alias)
    if current is None:
        raise ConfigError([f"--rollback: registered model {name!r} has no {spec.to_alias!r} to roll back"])
    previous = current.tags.get(PREVIOUS_TAG)
    if not previous or previous == "none":
        raise ConfigError([f"--rollback: version {current.version} became {spec.to_alias!r} with no champion before "
                           "it (or not through loraforge promote); set the alias by hand if you mean it"])
    try:
        back = mlflow_client.get_model_version(name, previous)
    except Exception as err:  # deleted since
        raise ConfigError([f"--rollback: version {previous}, the {spec.to_alias!r} before version {current.version}, "
                           f"is gone ({err.__class__.__name__}); set the alias by hand"]) from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for number, text, model_version in ((current.version, f"rolled back: {spec.to_alias!r} moved to version {previous}",
                                         current),
                                        (previous, f"{spec.to_alias!r} again by rollback from version {current.version}",
                                         back)):
        mlflow_client.set_model_version_tag(name, number, f"{PREFIX}.rollback", f"{stamp}: {text}"
                                            + (f" ({reason})" if reason else ""))
        description = ((model_version.description or "").rstrip() + f"\n\n[{stamp}] {text}"
                       + (f" ({reason})" if reason else "")).strip()
        mlflow_client.update_model_version(name, number, description=description[:5000])
    _move_alias(mlflow_client, name, spec.to_alias, previous, expected=str(current.version))
    return Decision(name, str(previous), str(current.version), [], None, promoted=True, action="rolled_back",
                    reason=reason)


def print_decision(decision: Decision, to_alias: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if decision.checks:
        table = Table(title=f"promotion gate: {decision.model_name} version {decision.candidate_version} vs "
                            f"{'version ' + decision.champion_version if decision.champion_version else 'no champion'}")
        for column in ("metric", "condition", "candidate", "champion", "result", "detail"):
            table.add_column(column, justify="right" if column in ("candidate", "champion") else "left")
        for c in decision.checks:
            table.add_row(c.metric, c.condition, "-" if c.candidate is None else f"{c.candidate:.4f}",
                          "-" if c.champion is None else f"{c.champion:.4f}", "pass" if c.passed else "FAIL", c.detail)
        console.print(table)
    match decision.action:
        case "promoted":
            console.print(f"promoted: version {decision.candidate_version} is now {to_alias!r}", highlight=False)
        case "forced":
            console.print(f"promoted by --force (gate failed): version {decision.candidate_version} is now "
                          f"{to_alias!r}; reason recorded: {decision.reason}", highlight=False)
        case "rolled_back":
            console.print(f"rolled back: {to_alias!r} is version {decision.candidate_version} again "
                          f"(was {decision.champion_version})", highlight=False)
        case _:
            console.print(f"not promoted: the gate failed; {to_alias!r} stays "
                          f"{'version ' + decision.champion_version if decision.champion_version else 'unset'}",
                          highlight=False)
