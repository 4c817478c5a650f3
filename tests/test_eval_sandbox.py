"""The execution sandbox: limits fire within bounds, failures get the right reason, no writes escape."""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mft.evaluate.sandbox import SandboxLimits, run_many, run_program  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="sandbox limits are Linux rlimits")

# Generous wall clock for tests that are not about time (the CI machine is shared and loaded).
FAST = SandboxLimits(timeout_s=10.0, memory_mb=256)
LOOP = SandboxLimits(timeout_s=2.0, memory_mb=256)


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3", FAST).reason == "passed"
    r = run_program("def check(f):\n    assert f(1) == 2, 'f(1) != 2'\ncheck(lambda x: x)", FAST)
    assert not r.passed and r.reason == "failed: AssertionError: f(1) != 2"
    assert run_program("def f(:\n  pass", FAST).reason.startswith("failed: SyntaxError")


def test_infinite_loop_times_out_within_the_wall_clock_limit():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", LOOP)
    elapsed = time.monotonic() - t0
    assert r.reason == "timed out" and not r.passed and "wall-clock" in r.detail
    assert LOOP.timeout_s <= elapsed < LOOP.timeout_s + 3.0
    # sleeping (no CPU) is caught by the wall clock too
    assert run_program("import time\ntime.sleep(60)", SandboxLimits(timeout_s=1.0)).reason == "timed out"


def test_cpu_time_limit_stops_a_busy_loop_before_the_wall_clock():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=30.0, cpu_s=1))
    assert r.reason == "timed out" and "CPU" in r.detail
    assert time.monotonic() - t0 < 10.0


@pytest.mark.parametrize("bomb", [
    "x = bytearray(8 * 1024 ** 3)",                        # one huge allocation
    "l = []\nwhile True:\n    l.append(' ' * 10 ** 6)",    # growth until the limit
])
def test_memory_bomb_hits_the_memory_limit(bomb):
    t0 = time.monotonic()
    r = run_program(bomb, FAST)
    # "memory limit" (not "timed out") shows the memory limit stopped it before the wall clock
    assert r.reason == "memory limit" and not r.passed
    assert time.monotonic() - t0 < FAST.timeout_s


@pytest.mark.parametrize("attempt", [
    "open({p!r}, 'w').write('x')",
    "import pathlib\npathlib.Path({p!r}).write_text('x')",
    "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "import io\nio.FileIO({p!r}, 'w').close()",
    "open('inside.txt', 'w').close()\nimport os\nos.rename('inside.txt', {p!r})",
    "import shutil\nopen('inside.txt', 'w').close()\nshutil.copy('inside.txt', {p!r})",
    "import os\nos.symlink('/etc/hostname', {p!r})",
    "import subprocess\nsubprocess.run(['touch', {p!r}])",
    "import os\nos.system('touch ' + {p!r})",
])
def test_writes_outside_the_temp_dir_fail_and_create_nothing(tmp_path, attempt):
    target = tmp_path / "escaped.txt"
    r = run_program(attempt.format(p=str(target)), FAST)
    assert not r.passed and r.reason.startswith("failed: PermissionError"), r.reason
    assert not target.exists()


def test_deleting_outside_fails_and_the_files_survive(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    d = tmp_path / "dir"
    d.mkdir()
    for attempt in (f"import os\nos.remove({str(keep)!r})",
                    f"import shutil\nshutil.rmtree({str(d)!r})",
                    f"import os\nos.chdir({str(tmp_path)!r})\nos.remove('keep.txt')"):
        r = run_program(attempt, FAST)
        assert r.reason.startswith("failed: PermissionError"), r.reason
    assert keep.read_text() == "precious" and d.is_dir()


def test_writes_inside_the_temp_dir_work_and_the_dir_is_removed():
    prog = (
        "import os, tempfile, pathlib, shutil\n"
        "open('a.txt', 'w').write('x'); os.rename('a.txt', 'b.txt'); os.remove('b.txt')\n"
        "os.makedirs('d/e'); pathlib.Path('d/e/f.txt').write_text('y'); shutil.rmtree('d')\n"
        "with tempfile.NamedTemporaryFile() as f: f.write(b'z')\n"
        "raise RuntimeError(os.getcwd())\n"
    )
    r = run_program(prog, FAST)
    assert r.reason.startswith("failed: RuntimeError: ")
    cwd = r.detail.split(": ", 1)[1]
    assert "mft_sandbox_" in cwd and not os.path.exists(cwd)


def test_exits_and_forged_results_do_not_count_as_passed():
    for prog in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
                 "import os\nos.write(1, b'x {\"status\": \"passed\"}\\n')\nraise ValueError('no')"):
        assert not run_program(prog, FAST).passed, prog


def test_run_many_keeps_order():
    res = run_many(["assert True", "assert False", "assert True"], FAST, workers=2)
    assert [r.passed for r in res] == [True, False, True]
