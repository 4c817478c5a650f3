"""Per-task loss curves and task weights from a run's metrics.jsonl.

``python -m megatron_mft.plot --metrics OUTPUT_DIR/metrics.jsonl --out loss.png``

metrics.jsonl holds one JSON object per line, each with ``step``. Keys read (all optional):

- ``loss``: the overall training loss;
- ``task_loss/<task>``: training loss of one task;
- ``val_loss/<task>``: validation loss of one task (often on its own line: step + val keys);
- ``task_weight/<task>``: the balancer's weight of one task.

Lines of the same step are merged, and for each (step, key) the last value wins (a file from
before the trainer set repeated steps aside at a resume may hold a step twice). Non-numeric,
non-finite (NaN, inf, an integer beyond float range) or missing values are skipped. An invalid
line is an error naming ``file:line`` (or a warning with ``--skip-invalid``).

The figure has two panels: losses (training solid, validation dashed with markers, one colour
per task, the overall loss in black) and task weights. Library use: :func:`load_metrics`,
:func:`make_figure`, :func:`plot_metrics`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Callable, Optional

from megatron_mft.errors import HELP, ArgumentParser, UsageError, command

TRAIN, VAL, WEIGHT = "task_loss/", "val_loss/", "task_weight/"


def load_metrics(path: str, skip_invalid: bool = False,
                 warn: Optional[Callable[[str], None]] = None) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}``, merged over lines; the last value of a (step, key) wins. With
    ``skip_invalid`` an invalid line is passed to ``warn`` (default: a Python warning) and skipped."""
    steps: dict[int, dict[str, float]] = {}
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is named by its line
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("expected a JSON object")
                if "step" not in rec:
                    raise ValueError("no 'step' key")
                step = rec["step"]
                if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step):
                    raise ValueError(f"'step' must be an integer, got {step!r}")
                if abs(step) > 2**53:  # beyond float precision: no plot axis can place it
                    raise ValueError("'step' out of range (|step| > 2**53)")
            except (ValueError, OverflowError) as e:
                msg = f"{path}:{lineno}: invalid metrics line: {e}"
                if skip_invalid:
                    if warn is not None:
                        warn(msg)
                    else:
                        warnings.warn(msg, stacklevel=2)
                    continue
                raise ValueError(msg) from None
            row = steps.setdefault(int(step), {})
            for k, v in rec.items():
                if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                try:
                    v = float(v)
                except OverflowError:  # an integer beyond float range: as non-finite as inf
                    v = math.inf
                if math.isfinite(v):
                    row[k] = v
                else:
                    row.pop(k, None)
    return steps


def _series(steps: dict[int, dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    xs = [s for s in sorted(steps) if key in steps[s]]
    return xs, [steps[s][key] for s in xs]


def _tasks(steps: dict[int, dict[str, float]], prefix: str) -> list[str]:
    return sorted({k[len(prefix):] for row in steps.values() for k in row if k.startswith(prefix)})


def make_figure(steps: dict[int, dict[str, float]], title: Optional[str] = None, logy: bool = False):
    """The matplotlib Figure: losses (top) and task weights (bottom).

    Line labels: ``train <task>``, ``val <task>``, ``loss (overall)``, ``weight <task>``.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no GUI, no global state

    tasks = sorted(set(_tasks(steps, TRAIN)) | set(_tasks(steps, VAL)) | set(_tasks(steps, WEIGHT)))
    cmap = matplotlib.colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    color = {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}

    fig = Figure(figsize=(10, 7.5), dpi=110, layout="constrained")
    ax_loss, ax_w = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
    for t in tasks:
        xs, ys = _series(steps, TRAIN + t)
        if xs:
            ax_loss.plot(xs, ys, color=color[t], lw=1.4, label=f"train {t}")
    for t in tasks:
        xs, ys = _series(steps, VAL + t)
        if xs:
            ax_loss.plot(xs, ys, color=color[t], lw=1.4, ls="--", marker="o", ms=4, label=f"val {t}")
    xs, ys = _series(steps, "loss")
    if xs:
        ax_loss.plot(xs, ys, color="black", lw=2.0, alpha=0.8, label="loss (overall)")
    ax_loss.set_ylabel("loss")
    if logy:
        ax_loss.set_yscale("log")
    ax_loss.set_title(title or "Per-task loss (solid: train, dashed: validation)")
    _legend_or_note(ax_loss, "no loss keys in metrics")

    for t in tasks:
        xs, ys = _series(steps, WEIGHT + t)
        if xs:
            ax_w.plot(xs, ys, color=color[t], lw=1.4, label=f"weight {t}")
    ax_w.set_title("Task weights")
    ax_w.set_xlabel("step")
    ax_w.set_ylabel("weight")
    _legend_or_note(ax_w, "no task_weight/<task> keys in metrics")
    return fig


def _legend_or_note(ax, note: str) -> None:
    """Grid, and a legend beside the axes, or ``note`` in the middle when nothing was drawn."""
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


#: the image metadata (Creator) that marks a file as this command's: it replaces only those
WRITTEN_BY = "megatron_mft.plot"


def is_own_image(path: str) -> bool:
    """An image this command wrote. PNG, PDF, SVG and PostScript carry :data:`WRITTEN_BY` as
    plain text; other formats have no metadata, so an existing file of theirs is never ours."""
    mark = WRITTEN_BY.encode()
    try:  # the metadata sits near the start (PNG, SVG, PostScript) or in the trailer (PDF)
        with open(path, "rb") as f:
            if mark in f.read(1 << 20):
                return True
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 20)))
            return mark in f.read()
    except OSError:
        return False


def plot_metrics(metrics: str, out: str, title: Optional[str] = None, logy: bool = False,
                 skip_invalid: bool = False, warn: Optional[Callable[[str], None]] = None):
    """Read ``metrics``, write the image to ``out`` (atomically, and only over an image of this
    command's), return the Figure."""
    from megatron_mft.compat.fsops import replace_file_atomically

    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give an image file name, e.g. {os.path.join(out, 'loss.png')}")
    if os.path.lexists(out) and not is_own_image(out):
        raise ValueError(f"--out {out} exists and is not an image this command wrote; it is never replaced: "
                         "give another file name, or move that file away (it replaces only the images it "
                         "marked: .png, .pdf, .svg, .eps, .ps)")
    steps = load_metrics(metrics, skip_invalid=skip_invalid, warn=warn)
    if not steps:
        raise ValueError(f"{metrics}: no metrics lines")
    fig = make_figure(steps, title=title, logy=logy)

    def save(path: str) -> None:
        try:
            fig.savefig(path, metadata={"Creator": WRITTEN_BY})
        except ValueError as e:  # JPEG, TIFF, WebP: no metadata
            if "metadata not supported" not in str(e):
                raise
            fig.savefig(path)

    replace_file_atomically(out, save)
    return fig


@command
def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="python -m megatron_mft.plot", description=__doc__, epilog=HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", required=True, help="OUTPUT_DIR/metrics.jsonl")
    ap.add_argument("--out", default="loss.png", help="image path (default: %(default)s)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--logy", action="store_true", help="log-scale loss axis")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="warn about invalid lines (e.g. one cut by a crash) instead of failing")
    args = ap.parse_args(argv)
    out = args.out  # matplotlib adds its default format to a name without one: say what was written
    if not os.path.splitext(out)[1] and not os.path.isdir(out):
        out += ".png"
    if not os.path.exists(args.metrics) or os.path.isdir(args.metrics):  # a pipe (<(...)) is fine
        raise UsageError(f"--metrics {args.metrics}: " + (
            "is a folder; give the run's metrics file, OUTPUT_DIR/metrics.jsonl" if os.path.isdir(args.metrics)
            else "no such file (a run writes OUTPUT_DIR/metrics.jsonl)"))
    try:
        plot_metrics(args.metrics, out, title=args.title, logy=args.logy, skip_invalid=args.skip_invalid,
                     warn=lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    except OSError as e:  # an unreadable metrics file, an unwritable --out
        where = f"--metrics {args.metrics}" if e.filename == args.metrics else f"--out {out}"  # not its temporary
        raise UsageError(f"{where}: {e.strerror or e}") from e
    except ValueError as e:  # a bad metrics line, an unsupported --out
        raise UsageError(str(e)) from e
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
