"""megatron_mft.plot: a metrics.jsonl as the training recipe writes it -> one PNG, a curve per task."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mft.plot import load_metrics, make_figure, plot_metrics  # noqa: E402

TASKS = ["code_completion", "text2code", "unit_test"]


def write_metrics(path: Path, steps: int = 30) -> None:
    """Train lines every step, validation lines (step + val keys only) every 10 steps, then a
    resumed run that re-logs steps 21..30 with new values."""
    lines = []

    def train(step, shift=0.0):
        rec = {"step": step, "loss": 3 * math.exp(-step / 20) + shift, "lr": 1e-4, "grad_norm": 1.0}
        for i, t in enumerate(TASKS):
            rec[f"task_loss/{t}"] = (2 + i) * math.exp(-step / (10 + 5 * i)) + 0.3 + shift
            rec[f"task_tokens/{t}"] = 100 * (i + 1)
            rec[f"task_weight/{t}"] = 1 / 3 + 0.05 * math.sin(step / 5 + i)
        return rec

    for s in range(1, steps + 1):
        lines.append(train(s))
        if s % 10 == 0:
            lines.append({"step": s, **{f"val_loss/{t}": 2.0 + i - s / 30 for i, t in enumerate(TASKS)}})
    lines.append({"step": 21, "loss": None, "task_loss/unit_test": None})  # missing values
    for s in range(21, steps + 1):
        lines.append(train(s, shift=0.25))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_plot_cli_writes_a_valid_png_with_one_curve_per_task(tmp_path):
    metrics, out = tmp_path / "metrics.jsonl", tmp_path / "loss.png"
    write_metrics(metrics)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-m", "megatron_mft.plot", "--metrics", str(metrics), "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    from PIL import Image

    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        assert len(set(im.convert("RGB").resize((64, 64)).getdata())) > 10  # not blank

    fig = plot_metrics(str(metrics), str(tmp_path / "again.png"))
    ax_loss, ax_w = fig.axes
    lab = labels(ax_loss)
    assert sorted(x for x in lab if x.startswith("train ")) == [f"train {t}" for t in TASKS]
    assert sorted(x for x in lab if x.startswith("val ")) == [f"val {t}" for t in TASKS]
    assert lab.count("loss (overall)") == 1
    assert sorted(labels(ax_w)) == [f"weight {t}" for t in TASKS]
    # the resumed run's values win, steps are not duplicated
    train_cc = ax_loss.get_lines()[lab.index("train code_completion")]
    xs, ys = train_cc.get_xdata(), train_cc.get_ydata()
    assert list(xs) == list(range(1, 31))
    assert ys[-1] == pytest.approx(2 * math.exp(-30 / 10) + 0.3 + 0.25)
    val_cc = ax_loss.get_lines()[lab.index("val code_completion")]
    assert list(val_cc.get_xdata()) == [10, 20, 30]


def test_load_metrics_merges_lines_and_keeps_the_last_value(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "val_loss/a": 1.5}\n\n'
                 '{"step": 2, "loss": 1.0, "task_loss/a": NaN}\n{"step": 1, "loss": 1.8}\n')
    m = load_metrics(str(f))
    assert m == {1: {"loss": 1.8, "val_loss/a": 1.5}, 2: {"loss": 1.0}}


def test_missing_keys_are_tolerated(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    fig = plot_metrics(str(f), str(tmp_path / "x.png"))
    assert labels(fig.axes[0]) == ["loss (overall)"] and labels(fig.axes[1]) == []
    assert make_figure({}) is not None


@pytest.mark.parametrize("bad, why", [('{"step": 2', "invalid metrics line"),
                                      ('{"loss": 1.0}', "no 'step' key"),
                                      ('[1, 2]', "expected a JSON object"),
                                      ('{"step": "x"}', "'step' must be an integer")])
def test_invalid_line_is_reported_with_file_and_line(tmp_path, bad, why):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n' + bad + "\n")
    with pytest.raises(ValueError, match=rf"m\.jsonl:2: .*{why}"):
        load_metrics(str(f))
    with pytest.warns(UserWarning, match=r"m\.jsonl:2"):
        assert load_metrics(str(f), skip_invalid=True) == {1: {"loss": 2.0}}
