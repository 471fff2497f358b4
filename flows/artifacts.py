"""What the Prefect UI shows for a train run: a progress bar updated each epoch, and at the end a
table of the lineage's checkpoints, a link to the latest one and a summary with the loss curve.

Artifacts are a view, never the truth (the store is): a failure to publish one is logged and
training goes on.
"""

from __future__ import annotations

import base64
import re
import struct
import zlib
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from ckpt import CheckpointStore, Manifest

if TYPE_CHECKING:
    from .train import TrainSummary

__all__ = ["TrainProgress", "artifact_key", "line_chart_png", "publish_run"]

# Series colours (RGB) in drawing order; the markdown names them, since the picture has no text.
COLOURS = [("blue", (31, 119, 180)), ("orange", (255, 127, 14)), ("green", (44, 160, 44)),
           ("red", (214, 39, 40)), ("purple", (148, 103, 189))]


def artifact_key(lineage: str, what: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", lineage.lower()).strip("-") or "lineage"
    return f"{slug}-{what}"


def _warn(what: str, err: Exception) -> None:
    get_run_logger().warning("could not publish the %s artifact: %s: %s", what, type(err).__name__, err)


class TrainProgress:
    """A progress artifact of the epochs the lineage has committed, out of the epochs asked for."""

    def __init__(self, lineage: str, epochs: int, epochs_done: int):
        self.lineage, self.epochs, self.shown = lineage, epochs, epochs_done
        self.artifact_id = None
        try:
            self.artifact_id = create_progress_artifact(
                self._percent(epochs_done), key=artifact_key(lineage, "progress"),
                description=f"epochs of {lineage} committed, out of {epochs}")
        except Exception as err:
            _warn("progress", err)

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

    def follow(self, future, store: CheckpointStore, poll_s: float = 2.0):
        """Wait for a block's result, moving the bar as its epochs are committed."""
        while True:
            try:
                ref = future.result(timeout=poll_s)
            except (TimeoutError, FutureTimeout):
                try:
                    latest = store.latest(self.lineage)
                except Exception:  # a listing error must not fail the block it watches
                    continue
                self.update(latest.epochs_done if latest else 0)
                continue
            self.update(ref.epochs_done)
            return ref


def publish_run(store: CheckpointStore, summary: "TrainSummary") -> None:
    """The checkpoint table, the link to the latest checkpoint and the summary with curves."""
    manifests = store.list(summary.lineage)
    for what, publish in (("checkpoints", _publish_table), ("latest", _publish_link),
                          ("summary", _publish_summary)):
        try:
            publish(store, summary, manifests)
        except Exception as err:
            _warn(what, err)


def _publish_table(store: CheckpointStore, summary: "TrainSummary", manifests: list[Manifest]) -> None:
    names = sorted({name for m in manifests for name in m.metrics})
    rows = []
    for m in manifests:
        row: dict[str, Any] = {"id": m.id, "epoch": m.epoch, "step": m.step}
        row.update({name: round(m.metrics[name], 6) if name in m.metrics else None for name in names})
        row.update(uri=store.uri(m.lineage, m.id), digest=m.digest, created_at=m.created_at.isoformat())
        rows.append(row)
    create_table_artifact(rows, key=artifact_key(summary.lineage, "checkpoints"),
                          description=f"committed checkpoints of {summary.lineage} in {summary.store}")


def _publish_link(store: CheckpointStore, summary: "TrainSummary", manifests: list[Manifest]) -> None:
    if summary.final is None:
        return
    final = summary.final
    link = final.uri if "://" in final.uri else f"file://{final.uri}"
    create_link_artifact(link, link_text=f"{final.lineage}/{final.id} (epoch {final.epoch}, step {final.step})",
                         key=artifact_key(summary.lineage, "latest"),
                         description=f"latest checkpoint of {summary.lineage}")


def _curves(manifests: list[Manifest]) -> dict[str, list[tuple[float, float]]]:
    """Per metric, (epoch, value) at each end-of-epoch checkpoint."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for m in manifests:
        if m.position.epoch_complete:
            for name, value in m.metrics.items():
                curves.setdefault(name, []).append((float(m.epoch), float(value)))
    return curves


def _publish_summary(store: CheckpointStore, summary: "TrainSummary", manifests: list[Manifest]) -> None:
    create_markdown_artifact(summary_markdown(summary, manifests), key=artifact_key(summary.lineage, "summary"),
                             description=f"training summary of {summary.lineage}")


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
            lines += ["", f"#### {title} by epoch", "", _chart_markdown(title, {n: curves[n] for n in names}, y_range)]
    return "\n".join(lines) + "\n"


def _chart_markdown(title: str, series: dict[str, list[tuple[float, float]]],
                    y_range: tuple[float, float] | None) -> str:
    png = line_chart_png(list(series.values()), y_range=y_range)
    legend = "; ".join(
        f"{colour}: **{name}** {points[0][1]:.4f} (epoch {points[0][0]:.0f}) → {points[-1][1]:.4f} (epoch {points[-1][0]:.0f})"
        for (colour, _), (name, points) in zip(COLOURS, series.items()))
    return f"![{title.lower()} curve](data:image/png;base64,{base64.b64encode(png).decode()})\n\n{legend}"


# ---- a dependency-free line chart as PNG ------------------------------------------------------

def line_chart_png(series: list[list[tuple[float, float]]], width: int = 560, height: int = 240,
                   y_range: tuple[float, float] | None = None) -> bytes:
    """Lines (with a dot per point) on a white canvas with a light grid; no text."""
    canvas = _Canvas(width, height)
    left, right, top, bottom = 40, width - 16, 14, height - 26
    xs = [x for points in series for x, _ in points] or [0.0]
    ys = [y for points in series for _, y in points] or [0.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = y_range or (min(ys), max(ys))
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0) if y_range is None else 0.0
    y0, y1 = y0 - pad, y1 + pad

    def at(x: float, y: float) -> tuple[int, int]:
        return (round(left + (x - x0) / (x1 - x0) * (right - left)),
                round(bottom - (y - y0) / (y1 - y0) * (bottom - top)))

    for i in range(5):
        gy = round(top + i * (bottom - top) / 4)
        canvas.line(left, gy, right, gy, (225, 225, 225))
    for x in sorted(set(xs)):
        px, _ = at(x, y0)
        canvas.line(px, bottom, px, bottom + 4, (120, 120, 120))
    canvas.line(left, top, left, bottom, (120, 120, 120))
    canvas.line(left, bottom, right, bottom, (120, 120, 120))
    for (_, colour), points in zip(COLOURS, series):
        pixels = [at(x, y) for x, y in points]
        for a, b in zip(pixels, pixels[1:]):
            canvas.line(*a, *b, colour, thick=True)
        for px, py in pixels:
            canvas.dot(px, py, colour)
    return canvas.png()


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.rows[y][3 * x:3 * x + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour, thick: bool = False) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:  # Bresenham
            self.put(x0, y0, colour)
            if thick:
                self.put(x0, y0 + 1, colour)
                self.put(x0 + 1, y0, colour)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def dot(self, x: int, y: int, colour, radius: int = 3) -> None:
        for ddx in range(-radius, radius + 1):
            for ddy in range(-radius, radius + 1):
                if ddx * ddx + ddy * ddy <= radius * radius:
                    self.put(x + ddx, y + ddy, colour)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
