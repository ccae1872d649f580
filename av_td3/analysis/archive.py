"""``av-td3 archive RUN_OR_SWEEP DEST``: keep what ``compare`` and ``validate`` need of finished runs, and nothing
else, in a folder meant to be committed (``results/<study>/``), so a study outlives the machine that ran it.

Per run (layout in :mod:`av_td3.rundir`): the composed config and overrides as Hydra wrote them, ``summary.json``,
every scalar (grad, alert, eval, train, episode, perf tags) as ``scalars.csv.gz``, and ``archive.json`` with the
source folder, the code version and when it was archived — tens to a few hundred kB per run. Checkpoints, event
files and images are left behind. Archived runs read exactly like run folders, and ``compare`` pools them with
runs of the same configuration from other folders.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.util import tensor_util

from av_td3 import rundir
from av_td3.analysis.runs import Run, RunDiscoveryError, find_runs

SIZE_WARNING_BYTES = 1_000_000


@dataclass
class ArchiveResult:
    archived: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # "<run>: why"
    warnings: list[str] = field(default_factory=list)


def run_info_from_events(event_files: list[Path]) -> dict[str, str]:
    """Provenance a run logged to TensorBoard as text (``run/info``: ``**key**: value`` lines), for runs whose
    summary.json predates the provenance field."""
    info: dict[str, str] = {}
    for path in event_files:
        for event in LegacyEventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.tag.startswith("run/info") and v.WhichOneof("value") == "tensor":
                    text = tensor_util.make_ndarray(v.tensor).reshape(-1)[0]
                    text = text.decode() if isinstance(text, bytes) else str(text)
                    info.update(re.findall(r"\*\*([^*]+)\*\*: ([^\n]*)", text))
    return info


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def archive_run(run: Run, target: Path) -> int:
    """Write ``run``'s archive into ``target`` (replacing an earlier archive of the same run); return its size."""
    summary: dict[str, Any] = dict(run.summary or {})
    provenance = summary.get("provenance") or run_info_from_events(run.event_files)
    record = {"source": str(run.path.resolve()), "archived_at": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "code_version": rundir.code_version({"provenance": provenance}),
        "provenance": provenance, "state": run.state}
    if target.exists():
        shutil.rmtree(target)
    _write_bytes(target / rundir.CONFIG_FILE, (run.path / rundir.CONFIG_FILE).read_bytes())
    if (run.path / rundir.OVERRIDES_FILE).is_file():
        _write_bytes(target / rundir.OVERRIDES_FILE, (run.path / rundir.OVERRIDES_FILE).read_bytes())
    _write_bytes(target / rundir.SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    # mtime 0: archiving the same run twice gives the same bytes (no spurious diff in git)
    run.scalars[["step", "tag", "value"]].to_csv(target / rundir.ARCHIVED_SCALARS_FILE, index=False,
                                                 compression={"method": "gzip", "mtime": 0})
    _write_bytes(target / rundir.ARCHIVE_FILE, json.dumps(record, indent=2).encode())
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())


# What makes a run belong to another study than the runs already archived, whatever arm it is: its length, and a
# preset such as debug=smoke (the keys an arm or a condition sets are what a study varies, so they are not checked).
STUDY_KEYS = ("trainer.total_steps",)


def _study_runs(study: Path) -> list[Run]:
    try:
        return [r for r in find_runs(study) if r.config is not None]
    except RunDiscoveryError:
        return []


def _differs_from_study(run: Run, study_runs: list[Run], study: Path) -> str | None:
    """Why ``run`` does not look like a run of the study, or None: another length than all of them, or a preset
    (debug=smoke) none of them was launched with."""
    lengths = {int(r.known_config.trainer.total_steps) for r in study_runs}
    steps = int(run.known_config.trainer.total_steps)
    why = []
    if steps not in lengths:
        why.append(f"trainer.total_steps={steps} (they: {', '.join(map(str, sorted(lengths)))})")
    extra = sorted(run.presets - set[str]().union(*(r.presets for r in study_runs)))
    if extra:
        why.append(f"launched with {', '.join(extra)} (none of them was)")
    if not why:
        return None
    return (f"{run.name}: differs from all {len(study_runs)} run(s) already in {study}: {'; '.join(why)}: compare "
            "will show it as a group of its own; archive it elsewhere unless it belongs to this study")


def archive(source: Path, dest: Path, resumable_stops: bool = False) -> ArchiveResult:
    """Archive every finished run found at ``source`` (a run folder or a sweep folder) into ``dest``, each under
    its name relative to ``source``. Unfinished runs (running, crashed, failed) are skipped and named, and so is a
    run stopped resumably (a signal, a time-out: it has not reached its end) unless ``resumable_stops``; a run whose
    target already holds the archive of another run is refused (choose another ``dest``). A run that does not look
    like the runs already in the study (``dest``'s parent, e.g. results/<study>, or ``dest``): another length, or a
    preset such as debug=smoke none of them had, is archived with a warning saying so.
    Raises :class:`~av_td3.analysis.runs.RunDiscoveryError` when ``source`` holds nothing readable."""
    result = ArchiveResult()
    study = dest.parent if dest.parent.is_dir() and any(dest.parent.iterdir()) else dest
    study_runs = _study_runs(study) if study.is_dir() else []
    for run in find_runs(source):
        if run.config is None:
            result.skipped.append(f"{run.name}: no {rundir.CONFIG_FILE}, nothing to group it by")
            continue
        if rundir.is_archived(run.path):
            result.skipped.append(f"{run.name}: already an archive (copy the folder instead)")
            continue
        if run.resumable_stop and not resumable_stops:
            s = run.summary or {}
            result.skipped.append(f"{run.name}: stopped at step {s.get('steps')} of {s.get('total_steps')} "
                                  f"({s.get('reason')}), not at its end: resume it (the same command again) and "
                                  "archive it when it ends, or archive it as it is with --resumable-stops")
            continue
        if run.state not in rundir.FINISHED:
            result.skipped.append(f"{run.name}: {run.state}; only finished runs (completed, or stopped by the NaN "
                                  "guard) are archived")
            continue
        name = run.path.name if run.path == source else run.name
        target = dest / name
        earlier = rundir.read_json(target / rundir.ARCHIVE_FILE)
        if earlier is not None and earlier.get("source") != str(run.path.resolve()):
            result.skipped.append(f"{run.name}: {target} already holds the run archived from {earlier.get('source')};"
                                  " archive into another folder (e.g. DEST/<sweep name>)")
            continue
        if target.exists() and earlier is None:
            result.skipped.append(f"{run.name}: {target} exists and is not an archived run; choose another DEST")
            continue
        differs = _differs_from_study(run, study_runs, study) if study_runs else None
        if differs:
            result.warnings.append(differs)
        size = archive_run(run, target)
        result.archived.append(target)
        if size > SIZE_WARNING_BYTES:
            result.warnings.append(f"{target}: {size / 1e6:.1f} MB (more than the ~1 MB an archived run should take)")
    return result
