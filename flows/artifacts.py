"""What the Prefect UI shows for a train run.

Per run: a progress bar updated each epoch, and at the end a summary with the loss curve. Per
lineage, under keys that every run of the lineage updates (so the Artifacts page has one page per
lineage, across runs, crashes, retries): `<lineage>-lineage` (where the lineage stands, its loss
curve across runs, and its checkpoints with the flow run that committed each),
`<lineage>-checkpoints` (the same table, as data) and `<lineage>-latest` (the latest checkpoint's
location). The lineage artifacts are published also when a run fails, saying where Retry resumes.

Artifacts are a view, never the truth (the store is): a failure to publish one is logged and
training goes on. Locations are plain text: a browser will not open `file://` links.
"""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from ckpt import CheckpointStore, LeaseRecord, Manifest

if TYPE_CHECKING:
    from .config import TrainSummary

__all__ = ["TrainProgress", "artifact_key", "committed_by", "line_chart_png", "lineage_markdown",
           "failure_status", "publish_failure", "publish_run"]

_RUN_IN_OWNER = re.compile(r"^flow run (?P<name>\S*) (?P<id>[0-9a-f-]{36}) ")


def artifact_key(lineage: str, what: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", lineage.lower()).strip("-") or "lineage"
    return f"{slug}-{what}"


def _warn(what: str, err: Exception) -> None:
    get_run_logger().warning("could not publish the %s artifact: %s: %s", what, type(err).__name__, err)


class TrainProgress:
    """A progress artifact of the epochs the lineage has committed, out of the epochs asked for:
    one per flow run. A retried run (same flow run id) moves its own bar on, rather than leaving a
    stale one behind and adding a second."""

    def __init__(self, lineage: str, epochs: int, epochs_done: int):
        self.lineage, self.epochs, self.shown = lineage, epochs, None
        self.artifact_id = None
        key = artifact_key(lineage, "progress")
        try:
            self.artifact_id = _run_artifact_id(key, "progress")
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    self._percent(epochs_done), key=key, description=f"epochs of {lineage} committed, out of {epochs}")
                self.shown = epochs_done
        except Exception as err:
            _warn("progress", err)
        self.update(epochs_done)

    def _percent(self, epochs_done: int) -> float:
        return round(100.0 * min(epochs_done, self.epochs) / self.epochs, 1)

    def update(self, epochs_done: int) -> None:
        if self.artifact_id is None or epochs_done == self.shown:
            return
        try:
            update_progress_artifact(self.artifact_id, self._percent(epochs_done))
            self.shown = epochs_done
        except Exception as err:
            _warn("progress", err)

    def update_from(self, store: CheckpointStore) -> None:
        try:
            latest = store.latest(self.lineage)
        except Exception:  # a listing error must not hide the error being handled
            return
        self.update(latest.epochs_done if latest else 0)

    def follow(self, future, store: CheckpointStore, poll_s: float = 2.0):
        """Wait for a block's result, moving the bar as its epochs are committed."""
        from tasks.runtime.waiting import wait_for

        def result() -> list | None:
            try:
                return [future.result(timeout=poll_s)]
            except (TimeoutError, FutureTimeout):
                self.update_from(store)  # a listing error must not fail the block it watches
                return None

        # The waiting is the future's own (`result(timeout=...)`): nothing to sleep between polls.
        (ref,) = wait_for(result, timeout_s=float("inf"), interval_s=0)
        self.update(ref.epochs_done)
        return ref


def _run_artifact_id(key: str, kind: str):
    """The id of this flow run's artifact of that key and type, if an earlier attempt made one."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        ArtifactFilterType,
    )

    run_id = flow_run.get_id()
    if run_id is None:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]),
            type=ArtifactFilterType(any_=[kind])))
    return found[0].id if found else None


# ---- who committed what --------------------------------------------------------------------------

def committed_by(store: CheckpointStore, lineage: str, manifests: list[Manifest]) -> dict[int, str]:
    """Fencing number -> the flow run that held the lease with it ("name (id)").

    Every manifest carries its writer's fencing number, and the lease keeps one claim record per
    number, whose owner the train flow writes as "flow run NAME ID (host:pid)": so the store
    itself says which run committed each checkpoint, across crashes and retries."""
    runs: dict[int, str] = {}
    for fence in sorted({m.fence for m in manifests if m.fence}):
        try:
            raw = store.fs.cat_file(store.path(lineage, "_lease", f"claim-{fence:012d}"))
            owner = LeaseRecord.model_validate_json(raw).owner
        except Exception:  # an old claim format, or removed: the table says so
            continue
        found = _RUN_IN_OWNER.match(owner)
        runs[fence] = f"{found['name']} ({found['id'][:8]})" if found and found["name"] else owner
    return runs


def _location(store: CheckpointStore, m: Manifest) -> str:
    return store.uri(m.lineage, m.id)


# ---- publishing ----------------------------------------------------------------------------------

def publish_run(store: CheckpointStore, summary: "TrainSummary") -> None:
    """At the end of a run: the lineage's artifacts and this run's summary with its curves."""
    manifests = store.list(summary.lineage)
    status = (f"Run `{_this_run()}` completed: epoch {summary.final.epochs_done if summary.final else 0} "
              f"of {summary.epochs}, {summary.epochs_trained} epoch(s) trained in {summary.wall_time_s:.1f} s.")
    _publish_lineage(store, summary.lineage, manifests, status)
    try:
        create_markdown_artifact(summary_markdown(summary, manifests), key=artifact_key(summary.lineage, "summary"),
                                 description=f"training summary of {summary.lineage}")
    except Exception as err:
        _warn("summary", err)


def publish_failure(store: CheckpointStore, lineage: str, epochs: int, error: BaseException,
                    cancelled: bool = False) -> None:
    """When a run fails, is cancelled or stops on a preemption notice: where the lineage stands,
    and where a Retry resumes."""
    try:
        manifests = store.list(lineage)
    except Exception as err:
        _warn("lineage", err)
        return
    status = failure_status(_this_run(), error, cancelled)
    _publish_lineage(store, lineage, manifests, status, epochs=epochs, failed=True)


def failure_status(run: str, error: BaseException, cancelled: bool = False) -> str:
    """The lineage page's status line for a run that did not complete."""
    from tasks.errors import preempted_in

    stopped = preempted_in(error)
    if stopped is None:
        return f"Run `{run}` **failed**: {error_text(error)}"
    if cancelled:
        return f"Run `{run}` was **cancelled**: {stopped}"
    return f"Run `{run}` **stopped** on a preemption notice: {stopped}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# A traceback's last line: `[module.path.]Name: message`, Name a known exception class (Python's,
# Baton's own families, which do not all end in Error: InjectedFailure, AsyncSaveFailed, RankHung...).
_RAISED_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?P<name>[A-Z]\w*): (?P<message>\S.*)$")


def _exception_names() -> set[str]:
    import ckpt.errors  # noqa: F401 - their classes join BaseException's subclasses
    import tasks.errors  # noqa: F401

    names, todo = set(), [BaseException]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _raised(line: str, known: set[str]) -> str | None:
    """`Name: message` when `line` is a raised exception's line (its module path dropped)."""
    found = _RAISED_LINE.match(line)
    if found is None or (found["name"] not in known and not found["name"].endswith(("Error", "Exception"))):
        return None
    return f"{found['name']}: {found['message']}"


def error_text(error: BaseException) -> str:
    """What went wrong, in one line: the error raised in the worker, not Ray's wrapper of it
    (a RayTaskError names the actor, its pid and its repr, in terminal colours) nor the heading of
    Ray Train's summary ("Training failed due to worker errors:", then each rank's traceback)."""
    while getattr(error, "cause", None) is not None and type(error).__name__.startswith("Ray"):
        error = error.cause
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    known = _exception_names()
    raised = [told for line in lines[1:] if (told := _raised(line, known))]
    if raised:
        return raised[-1]
    first = _raised(lines[0], known) if lines else None
    return first or f"{type(error).__name__}: {lines[0] if lines else ''}"


def _this_run() -> str:
    name, run_id = flow_run.get_name(), flow_run.get_id()
    return f"{name} ({run_id[:8]})" if run_id else "(no flow run)"


def _publish_lineage(store: CheckpointStore, lineage: str, manifests: list[Manifest], status: str,
                     epochs: int | None = None, failed: bool = False) -> None:
    runs = {}
    try:
        runs = committed_by(store, lineage, manifests)
    except Exception as err:
        _warn("lineage", err)
    for what, publish in (("checkpoints", _publish_table), ("latest", _publish_latest), ("lineage", _publish_page)):
        try:
            publish(store, lineage, manifests, runs, status=status, epochs=epochs, failed=failed)
        except Exception as err:
            _warn(what, err)


def _publish_table(store: CheckpointStore, lineage: str, manifests: list[Manifest], runs: dict[int, str],
                   **_: Any) -> None:
    names = sorted({name for m in manifests for name in m.metrics})
    rows = []
    for m in manifests:
        row: dict[str, Any] = {"id": m.id, "epoch": m.epoch, "step": m.step}
        row.update({name: round(m.metrics[name], 6) if name in m.metrics else None for name in names})
        row.update(flow_run=runs.get(m.fence, "-"), location=_location(store, m), digest=m.digest,
                   created_at=m.created_at.isoformat())
        rows.append(row)
    create_table_artifact(rows, key=artifact_key(lineage, "checkpoints"),
                          description=f"committed checkpoints of {lineage} in {store.url}")


def _publish_latest(store: CheckpointStore, lineage: str, manifests: list[Manifest], runs: dict[int, str],
                    **_: Any) -> None:
    if not manifests:
        return
    latest = manifests[-1]
    create_markdown_artifact(
        f"Latest committed checkpoint of `{lineage}`: `{_location(store, latest)}` "
        f"(epoch {latest.epoch}, step {latest.step}, id {latest.id})\n",
        key=artifact_key(lineage, "latest"), description=f"latest checkpoint of {lineage}")


def _publish_page(store: CheckpointStore, lineage: str, manifests: list[Manifest], runs: dict[int, str],
                  status: str, epochs: int | None, failed: bool) -> None:
    create_markdown_artifact(lineage_markdown(store, lineage, manifests, runs, status, failed=failed),
                             key=artifact_key(lineage, "lineage"),
                             description=f"lineage {lineage}: every run, checkpoint and the loss across runs")


# ---- markdown ------------------------------------------------------------------------------------

def lineage_markdown(store: CheckpointStore, lineage: str, manifests: list[Manifest], runs: dict[int, str],
                     status: str, failed: bool = False) -> str:
    """The lineage page: status line, where a Retry resumes, loss across runs, checkpoint table."""
    latest = manifests[-1] if manifests else None
    lines = [f"### Lineage `{lineage}`", "", status, ""]
    if failed:
        lines += [f"latest committed checkpoint is `{latest.id}` (epoch {latest.epoch}, step {latest.step}); "
                  "Retry resumes there" if latest else "no checkpoint committed yet; Retry starts from scratch", ""]
    lines += [f"- store: `{store.url}`",
              f"- latest: `{_location(store, latest)}`" if latest else "- latest: none yet",
              f"- flow runs: {len({runs.get(m.fence, m.fence) for m in manifests})} "
              f"(attempts: {len({m.fence for m in manifests})}), checkpoints: {len(manifests)}"]
    series = _loss_by_run(manifests, runs)
    if series:
        png = line_chart_png(series, title=f"loss of {lineage}, by flow run", xlabel="global step", ylabel="loss")
        lines += ["", f"![loss of {lineage} across runs](data:image/png;base64,{base64.b64encode(png).decode()})"]
    names = sorted({name for m in manifests for name in m.metrics})
    lines += ["", "| checkpoint | epoch | step | " + " | ".join(names) + (" | " if names else "")
              + "flow run | UTC |",
              "|---|---:|---:|" + "---:|" * len(names) + "---|---|"]
    for m in reversed(manifests):
        values = " | ".join(f"{m.metrics[n]:.4g}" if n in m.metrics else "" for n in names)
        lines.append(f"| `{m.id}` | {m.epoch} | {m.step} | {values}{' | ' if names else ''}"
                     f"{runs.get(m.fence, '-')} | {m.created_at:%m-%d %H:%M} |")
    return "\n".join(lines) + "\n"


def _loss_by_run(manifests: list[Manifest], runs: dict[int, str]) -> dict[str, list[tuple[float, float]]]:
    """The loss at every checkpoint against the global step, one series per committing flow run."""
    series: dict[str, list[tuple[float, float]]] = {}
    for m in manifests:
        if "loss" in m.metrics:
            series.setdefault(runs.get(m.fence, f"fence {m.fence}"), []).append((float(m.step), m.metrics["loss"]))
    return series


def _curves(manifests: list[Manifest]) -> dict[str, list[tuple[float, float]]]:
    """Per metric, (epoch, value) at each end-of-epoch checkpoint."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for m in manifests:
        if m.position.epoch_complete:
            for name, value in m.metrics.items():
                curves.setdefault(name, []).append((float(m.epoch), float(value)))
    return curves


def summary_markdown(summary: "TrainSummary", manifests: list[Manifest]) -> str:
    final = summary.final
    lines = [f"### Lineage `{summary.lineage}`: epoch {final.epochs_done if final else 0} of {summary.epochs}",
             "",
             f"- trained {summary.epochs_trained} epoch(s) in {summary.blocks_trained} block(s), "
             f"{summary.wall_time_s:.1f} s",
             f"- store: `{summary.store}`"]
    if final:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.metrics.items()))
        lines += [f"- final checkpoint: `{final.id}` (epoch {final.epoch}, step {final.step}): {metrics}",
                  f"- digest: `{final.digest[:16]}`"]
    curves = _curves(manifests)
    for title, names, y_range in (("Loss", sorted(n for n in curves if "loss" in n), None),
                                  ("Accuracy", sorted(n for n in curves if "acc" in n), (0.0, 1.0))):
        if names:
            png = line_chart_png({n: curves[n] for n in names}, title=f"{title.lower()} of {summary.lineage}",
                                 xlabel="epoch", ylabel=title.lower(), y_range=y_range)
            lines += ["", f"#### {title} by epoch", "",
                      f"![{title.lower()} curve](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines) + "\n"


# ---- the picture ---------------------------------------------------------------------------------

def line_chart_png(series: dict[str, list[tuple[float, float]]], title: str = "", xlabel: str = "",
                   ylabel: str = "", y_range: tuple[float, float] | None = None,
                   size: tuple[float, float] = (7.0, 3.2), dpi: int = 100) -> bytes:
    """A line chart with axes, ticks, labels, a grid and a legend naming each series, as PNG."""
    # matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, points in series.items():
        xs, ys = zip(*points) if points else ((), ())
        axes.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.6, label=name)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y_range is not None:
        axes.set_ylim(*y_range)
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend(fontsize=8, loc="best")
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
