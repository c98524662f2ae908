"""metrics.jsonl on resume: lines that are not epoch records are dropped with a note on
stderr, and the file is rewritten atomically, so that a failure or a kill during the
rewrite keeps every earlier record."""
import json
import os
import signal
import subprocess
import sys

import pytest

from utils.run_folder import METRICS, RunLog, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = [{"epoch": e, "lr": 0.001, "train": {"accuracy": 0.5}} for e in range(4)]


def _write(folder, lines):
    path = folder / METRICS
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _good_lines():
    return [json.dumps(r) for r in GOOD]


def _truncate(folder, last_epoch):
    RunLog(str(folder), enabled=False)._truncate(last_epoch)  # no tensorboard writer


BAD = ['{"epoch": 2, "lr": 0.001, "tra',  # cut short by a kill
       '[1, 2]', '"text"', '{"lr": 0.1}', '{"epoch": "3"}', '{"epoch": 1.5}',
       '{"epoch": true}', '{"epoch": null}', 'NaN', '{"epoch": NaN}']


def test_lines_that_are_not_epoch_records_are_dropped_with_one_note(tmp_path, capsys):
    lines = _good_lines()
    path = _write(tmp_path, [lines[0], BAD[1], lines[1], *BAD[2:], lines[2], BAD[0]])
    _truncate(tmp_path, 5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"{path}: dropped {len(BAD)} lines that are not epoch records")
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert path.read_text().splitlines() == lines[:3]  # kept lines are kept byte for byte


def test_one_dropped_line_is_named(tmp_path, capsys):
    path = _write(tmp_path, _good_lines()[:2] + [BAD[0]])
    _truncate(tmp_path, 1)
    assert capsys.readouterr().err.strip() == (
        f"{path}: dropped 1 line that is not an epoch record (a JSON object with an integer "
        f"'epoch'; a kill can cut the last line short): line 3")


def test_read_metrics_skips_them_too(tmp_path):
    _write(tmp_path, [BAD[4], _good_lines()[0], '{"epoch": 1.0}', BAD[6]])
    notes = []
    assert [r["epoch"] for r in read_metrics(str(tmp_path), notes.append)] == [0, 1]
    assert len(notes) == 1 and "dropped 2 lines" in notes[0] and "lines 1, 4" in notes[0]


def test_a_clean_file_is_left_alone(tmp_path, monkeypatch):
    path = _write(tmp_path, _good_lines())
    before = os.stat(path)
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("rewrote a clean file"))
    _truncate(tmp_path, 3)
    assert os.stat(path).st_ino == before.st_ino


def _no_temporaries(folder):
    assert sorted(os.listdir(folder)) == [METRICS]


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = _write(tmp_path, _good_lines())
    before = path.read_bytes()

    def broken(src, dst):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        _truncate(tmp_path, 1)
    assert path.read_bytes() == before
    _no_temporaries(tmp_path)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_during_the_rewrite_keeps_every_record(tmp_path):
    """Writes beyond 40 bytes fail (EFBIG, like a full disk): the rewrite of 3 records
    cannot finish, and the file must still hold all 4."""
    import resource

    path = _write(tmp_path, _good_lines())
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40, hard))
    try:
        with pytest.raises(OSError):
            _truncate(tmp_path, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before
    _no_temporaries(tmp_path)


@pytest.mark.slow
def test_a_kill_during_the_rewrite_keeps_every_record(tmp_path):
    path = _write(tmp_path, _good_lines() + [BAD[0]])
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": ROOT, "BLOCKDROP_TEST_FAULT": f"kill:{METRICS}"}
    code = ("import sys; from utils.run_folder import RunLog; "
            "RunLog(sys.argv[1], enabled=False)._truncate(2)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert path.read_bytes() == before
    # the half-written temporary file is a .tmp_ orphan, removed by the next run
    orphans = [n for n in os.listdir(tmp_path) if n != METRICS]
    assert len(orphans) == 1 and orphans[0].startswith(".tmp_")
    env.pop("BLOCKDROP_TEST_FAULT")
    _truncate(tmp_path, 2)
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines()] == [0, 1, 2]
