import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from facekernels.train import data
from facekernels.train import cli, loss_speed
from facekernels.train.model import EmbeddingNet
from facekernels.train.objectives import ADAPTIVE, LOSSES, Objective

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
    return cli.run([*argv, "--epochs", "3", "--no-scale-benchmark"])


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
        sys.exit(cli.main(["--loss", "cosface", "--epochs", "1", "--impl", "facekernels", "--no-scale-benchmark",
                           "--plot", str(plot_path), "--report", str(report_path)]))
    assert exit_info.value.code is None  # status 0
    assert plot_path.stat().st_size > 1000
    report = json.loads(report_path.read_text())
    assert report["data"] == "built-in synthetic faces"
    assert "speedup" not in report and report["parity"]["max_rel_grad_diff"] <= 1e-4
    # Without a reference run, the parity check's reference calls still time the loss.
    speed = report["loss_interleaved"]
    assert speed["steps"] == len(report["impls"]["facekernels"]["losses"])
    assert speed["speedup_q1"] <= speed["speedup"] <= speed["speedup_q3"]
    assert speed["noise_exceeds_difference"] == (speed["speedup_q1"] <= 1 <= speed["speedup_q3"])
    assert "loss_at_scale" not in report


def test_scale_benchmark_times_both_impls_interleaved(monkeypatch):
    monkeypatch.setitem(loss_speed.SHAPES, "cpu", dict(rows=8, dim=4, classes=50))
    report = loss_speed.measure("cosface", rounds=3)
    assert report["shape"]["classes"] == 50 and report["shape"]["loss"] == "cosface"
    for name in ("reference", "facekernels"):
        timing = report[name]
        assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
        assert timing["peak_extra_mb"] >= 0
    up = report["speedup"]
    assert up["min"] <= up["median"] <= up["max"]
    assert report["noise_exceeds_difference"] == (up["min"] <= 1 <= up["max"])
    assert "speed-up" in loss_speed.describe(report)


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


def test_fold_splits_hold_out_every_person_once():
    faces = data.synthetic_faces(11, 2)
    splits = data.fold_splits(faces, 3, seed=4)
    held = [set(h.names) for _, h in splits]
    assert sorted(len(h) for h in held) == [3, 4, 4]  # as even as 11 people allow
    assert set().union(*held) == set(faces.names) and sum(map(len, held)) == faces.num_people
    for (train, held_out), names in zip(splits, held):
        assert set(train.names) == set(faces.names) - names  # everyone else trains
        assert int(train.labels.max()) == train.num_people - 1 and int(held_out.labels.max()) == len(names) - 1
        assert len(train.labels) + len(held_out.labels) == len(faces.labels)
    again = data.fold_splits(faces, 3, seed=4)
    assert [h.names for _, h in again] == [h.names for _, h in splits]
    assert torch.equal(again[1][0].images, splits[1][0].images)
    assert [h.names for _, h in data.fold_splits(faces, 3, seed=5)] != [h.names for _, h in splits]
    # The first group is the one a single split by --holdout 1/K holds out.
    assert data.open_set_split(faces, 1 / 3, seed=4)[1].names == splits[0][1].names


@pytest.mark.parametrize("folds", [0, 1, 6])
def test_fold_splits_refuse_groups_too_small_to_verify(folds):
    with pytest.raises(ValueError, match="folds"):
        data.fold_splits(data.synthetic_faces(11, 2), folds, seed=0)


def test_folds_train_from_scratch_and_report_mean_and_std(tmp_path, capsys):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "folds.png"
    report = cli.run(["--loss", "cosface", "--folds", "2", "--epochs", "1", "--no-scale-benchmark",
                      "--report", str(report_path),
                      "--plot", str(plot_path)])
    assert json.loads(report_path.read_text()) == json.loads(json.dumps(report))
    assert plot_path.stat().st_size > 1000
    folds = report["folds"]
    assert len(folds) == 2 and "impls" not in report
    assert not set(folds[0]["held_out"]) & set(folds[1]["held_out"])
    assert len(folds[0]["held_out"]) + len(folds[1]["held_out"]) == 40  # the synthetic faces' people
    for fold in folds:
        assert set(fold["impls"]) == {"reference", "facekernels"}
        assert set(fold["baselines"]) == {"raw_pixels", "eigenfaces"}
        assert fold["parity"]["max_rel_loss_diff"] <= 1e-5
    summary = report["summary"]
    assert set(summary["impls"]) == {"reference", "facekernels"}
    assert set(summary["baselines"]) == {"raw_pixels", "eigenfaces"}
    verifications = {("impls", impl): [fold["impls"][impl]["verification"] for fold in folds]
                     for impl in ("reference", "facekernels")}
    verifications["baselines", "eigenfaces"] = [fold["baselines"]["eigenfaces"] for fold in folds]
    for (group, name), per_fold in verifications.items():
        accuracies = [v["accuracy"] for v in per_fold]
        entry = summary[group][name]
        assert entry["accuracies"] == accuracies
        assert entry["accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
        assert entry["accuracy_std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2)
    for key in ("parity", "parity_fp64"):
        assert report[key] == {field: max(fold[key][field] for fold in folds) for field in folds[0][key]}
    out = capsys.readouterr().out
    assert "fold 1/2: held out" in out and "fold 2/2: held out" in out and "over the 2 folds" in out


def test_embedding_norm_is_free_to_carry_signal():
    # AdaFace and MagFace read quality from the embedding's norm: no unit-norm last layer.
    torch.manual_seed(0)
    model = EmbeddingNet(16).eval()
    with torch.no_grad():
        norms = model(torch.rand(8, 1, *data.CROP_SIZE)).norm(dim=1)
    assert float(norms.std() / norms.mean()) > 1e-3


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_matches_its_reference(loss):
    torch.manual_seed(0)
    objective = Objective(loss, num_classes=5, embedding_size=8)
    e = torch.randn(20, 8, requires_grad=True)
    y = torch.arange(5).repeat_interleave(4)
    expected = objective.reference_loss(e, y, objective.tensors())
    fused, _ = objective(e, y, "facekernels")
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ADAPTIVE)
def test_both_impls_train_an_adaptive_head_alike(loss):
    """Three training steps: the same losses from both impls, and the same running state
    (CurricularFace's t, AdaFace's norm statistics, ElasticFace's margin draws) after."""
    torch.manual_seed(0)
    fused = Objective(loss, num_classes=5, embedding_size=8).double().train()
    reference = copy.deepcopy(fused)
    initial = copy.deepcopy(fused.head.state_dict())
    y = torch.arange(5).repeat_interleave(4)
    for step in range(3):
        e = torch.randn(20, 8, dtype=torch.float64) * (step + 2)
        got, _ = fused(e, y, "facekernels")
        want, _ = reference(e, y, "reference")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(fused.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    moved = [name for name, value in fused.head.state_dict().items()
             if name != "weight" and not torch.equal(value, initial[name])]
    assert moved == {"curricularface": ["t"], "adaface": ["batch_mean", "batch_std"]}.get(loss, [])
    if loss == "elasticface":
        assert torch.equal(fused.head.generator.get_state(), reference.head.generator.get_state())


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
