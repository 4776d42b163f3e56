"""User mistakes are caught before any trial starts: one line naming file/key/value and the fix,
no traceback, exit code 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sweeper.cli import main

from conftest import tiny_spec  # noqa: E402  (the one tiny spec factory)

GOOD = tiny_spec("bad", model={"moca": {"memory_size": 4}}, train={"steps": 4}, eval={"every": 2, "n_gen": 8},
                 sweep={"trials": 1, "params": {"model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}}})


def spec(tmp_path, text=None, **over):
    d = {**GOOD, "storage": str(tmp_path / "sweeps")}
    for dotted, v in over.items():
        cur = d
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur[k] = dict(cur[k])
            cur = cur[k]
        cur[keys[-1]] = v
    p = tmp_path / "space.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(d, sort_keys=False))
    return p


def run(capsys, p, *extra):
    code = main(["run", str(p), *extra])
    err = capsys.readouterr().err
    return code, err


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, (f, err)


def nothing_started(tmp_path):
    return not (tmp_path / "sweeps" / "bad" / "trials").exists()


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    p = spec(tmp_path, text="name: bad\nmodel:\n  family: [moca_fastgan\nseed: 0\n")
    code, err = run(capsys, p)
    assert_user_error(code, err, f"{p}:", "YAML syntax error")


@pytest.mark.parametrize("over,fragments", [
    ({"model__moca": {"layer": 16, "memroy_size": 4}}, ["model.moca.memroy_size", "did you mean 'memory_size'"]),
    ({"train": {"steps": "many"}}, ["train.steps", "expected int", "'many'"]),
    ({"sweep__params": {"model.moca.momentum": {"type": "float", "low": 0.9, "high": 0.1}}}, ["sweep.params.model.moca.momentum", "low"]),
    ({"model__moca": {"layer": 32}}, ["model.moca.layer", "32 is not valid for 32 px", "[8, 16]"]),
    ({"model__moca": {"layer": 16, "memory_size": 0}}, ["model.moca.memory_size", ">= 1"]),
    ({"model__moca": {"layer": 16, "momentum": 1.5}}, ["model.moca.momentum", "[0, 1]"]),
], ids=["unknown_key", "wrong_type", "empty_range", "insertion_layer", "memory_size", "momentum"])
def test_config_mistakes_name_file_key_and_line(tmp_path, capsys, over, fragments):
    code, err = run(capsys, spec(tmp_path, **over))
    assert_user_error(code, err, "space.yaml:", *fragments)
    assert nothing_started(tmp_path)


def test_missing_data_folder(tmp_path, capsys):
    code, err = run(capsys, spec(tmp_path, data={"path": str(tmp_path / "nowhere"), "image_size": 32}))
    assert_user_error(code, err, "data.path", "does not exist")
    assert nothing_started(tmp_path)


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, spec(tmp_path, data={"path": str(tmp_path / "empty"), "image_size": 32}))
    assert_user_error(code, err, "holds no images")


def test_unreadable_image_is_named(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(d / f"{i}.png")
    (d / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    code, err = run(capsys, spec(tmp_path, data={"path": str(d), "image_size": 32}))
    assert_user_error(code, err, "cut.jpg: unreadable image")


def test_unreachable_tracking_server(tmp_path, capsys, closed_port):
    code, err = run(capsys, spec(tmp_path), "--tracking", f"http://127.0.0.1:{closed_port}")
    assert_user_error(code, err, "sweep.tracking", f"127.0.0.1:{closed_port}", "unreachable")
    assert nothing_started(tmp_path)


def test_missing_bucket(tmp_path, capsys, moto_server):
    code, err = run(capsys, spec(tmp_path), "--storage", "s3://no-such-bucket-here/sweeps")
    assert_user_error(code, err, "no-such-bucket-here", "does not exist")


def test_missing_credentials(tmp_path, capsys, moto_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, err = run(capsys, spec(tmp_path), "--storage", "s3://some-bucket/sweeps")
    assert_user_error(code, err, "credentials")


def test_more_gpus_per_trial_than_any_node_has(tmp_path):
    p = spec(tmp_path, sweep={**GOOD["sweep"], "resources": {"gpus": 4, "cpus": 1}})
    r = subprocess.run([sys.executable, "-m", "sweeper.cli", "run", str(p)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sweeper: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "sweep.resources.gpus asks for 4 GPU(s)" in lines[0] and "largest node has 0" in lines[0]
    assert nothing_started(tmp_path)


def test_a_swept_training_set_size_larger_than_the_data_stops_before_any_trial(tmp_path, capsys):
    p = spec(tmp_path, sweep__params={"data.subset": {"type": "categorical", "choices": [8, 500]}})
    code, err = run(capsys, p)
    assert_user_error(code, err, "sweep.params.data.subset reaches 500 images", "holds 100", "at most 100")
    assert nothing_started(tmp_path)
