import json
import os
import sys
from pathlib import Path

import pytest
import torch

from facekernels.train import data
from facekernels.train import cli
from facekernels.train.objectives import LOSSES, Objective

ATT = Path(__file__).resolve().parents[2] / "shared" / "data" / "att_faces"
needs_att = pytest.mark.skipif(not ATT.is_dir(), reason=f"the AT&T faces are not at {ATT}")


@pytest.fixture
def att_subset(tmp_path):
    """The first 12 people of AT&T, linked into a fresh ImageFolder tree."""
    root = tmp_path / "att12"
    root.mkdir()
    for person in sorted(p for p in ATT.iterdir() if p.is_dir())[:12]:
        os.symlink(person, root / person.name)
    return root


def run(argv):
    return cli.run([*argv, "--epochs", "3"])


@needs_att
@pytest.mark.parametrize("loss", ["arcface", "triplet", "center"])
def test_both_impls_agree_on_real_faces(att_subset, tmp_path, loss):
    report_path = tmp_path / "report.json"
    report = run(["--loss", loss, "--data", str(att_subset), "--report", str(report_path)])
    assert json.loads(report_path.read_text()) == json.loads(json.dumps(report))
    parity = report["parity"]
    assert parity["max_rel_loss_diff"] <= 1e-5
    assert parity["max_rel_grad_diff"] <= 1e-4
    runs = report["impls"]
    assert set(runs) == {"reference", "facekernels"}
    assert len(runs["reference"]["losses"]) == len(runs["facekernels"]["losses"]) > 0
    # Same start, same data order: the first step's loss is the same computation.
    assert runs["reference"]["losses"][0] == pytest.approx(runs["facekernels"]["losses"][0], rel=1e-5)
    for run_report in runs.values():
        v = run_report["verification"]
        assert 0.0 <= v["accuracy"] <= 1.0 and 0.0 <= v["eer"] <= 1.0
        assert run_report["step_ms"] > 0 and run_report["peak_mem_mb"] > 0
    assert report["speedup"] > 0
    assert set(report["baselines"]) == {"raw_pixels", "eigenfaces"}


def test_console_script_on_synthetic_faces(tmp_path):
    plot_path, report_path = tmp_path / "curves.png", tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:  # what the installed facekernels-train does
        sys.exit(cli.main(["--loss", "cosface", "--epochs", "1", "--impl", "facekernels",
                           "--plot", str(plot_path), "--report", str(report_path)]))
    assert exit_info.value.code is None  # status 0
    assert plot_path.stat().st_size > 1000
    report = json.loads(report_path.read_text())
    assert report["data"] == "built-in synthetic faces"
    assert "speedup" not in report and report["parity"]["max_rel_grad_diff"] <= 1e-4


def test_synthetic_faces_are_deterministic():
    a, b = data.synthetic_faces(6, 3, seed=5), data.synthetic_faces(6, 3, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (18, 1, *data.IMAGE_SIZE)
    assert not torch.equal(a.images, data.synthetic_faces(6, 3, seed=6).images)


def test_open_set_split_separates_people():
    faces = data.synthetic_faces(12, 2)
    train, held = data.open_set_split(faces, 0.25, seed=1)
    assert held.num_people == 3 and train.num_people == 9
    assert not set(train.names) & set(held.names)
    assert int(train.labels.max()) == 8 and int(held.labels.max()) == 2


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_matches_its_reference(loss):
    torch.manual_seed(0)
    objective = Objective(loss, num_classes=5, embedding_size=8)
    e = torch.randn(20, 8, requires_grad=True)
    y = torch.arange(5).repeat_interleave(4)
    expected = objective.reference_loss(e, y, objective.tensors())
    fused, _ = objective(e, y, "facekernels")
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_missing_data_dir_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.run(["--data", str(tmp_path / "nowhere")])
    assert "nowhere: no such directory" in capsys.readouterr().err


def test_one_person_is_not_enough(tmp_path, capsys):
    (tmp_path / "alice").mkdir()
    torch.manual_seed(0)
    from PIL import Image

    Image.new("L", (92, 112)).save(tmp_path / "alice" / "1.png")
    with pytest.raises(SystemExit):
        cli.run(["--data", str(tmp_path)])
    assert "need at least two people" in capsys.readouterr().err


def test_unreadable_image_is_named(tmp_path, capsys):
    for person in ("alice", "bob"):
        (tmp_path / person).mkdir()
    (tmp_path / "alice" / "1.pgm").write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        cli.run(["--data", str(tmp_path)])
    assert f"cannot read image {tmp_path / 'alice' / '1.pgm'}" in capsys.readouterr().err
