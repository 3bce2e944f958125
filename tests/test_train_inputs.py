"""facekernels-train refuses bad input before the first training step: exit status 2 and
one line on stderr, no traceback. `train` is replaced by a failure here, so a check that
only happens after training fails the test instead of taking minutes (and no timing is
asserted: DESIGN.md section 5)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from facekernels.train import cli

PREFIX = "facekernels-train: error: "


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(cli, "train", train)


def faces(root, photos_per_person):
    """An ImageFolder tree of tiny grey PNGs: person_<k>/<i>.png."""
    for person, count in enumerate(photos_per_person):
        folder = root / f"person_{person}"
        folder.mkdir(parents=True)
        for photo in range(count):
            Image.new("L", (12, 14), color=20 * person + photo).save(folder / f"{photo}.png")
    return root


def error_line(argv, capsys):
    """The one stderr line of a run that must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(PREFIX), err
    return err[len(PREFIX):]


def test_valid_input_reaches_training(tmp_path):
    data = faces(tmp_path / "faces", [4] * 6)
    with pytest.raises(AssertionError, match="training started"):
        cli.run(["--data", str(data), "--holdout", "0.5", "--report", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "p.png")])


def test_held_out_people_with_one_photo(tmp_path, capsys):
    # Before: trained for minutes, then make_pairs raised with a traceback (status 1).
    line = error_line(["--data", str(faces(tmp_path, [1] * 8))], capsys)
    assert "every held-out person needs two photos or more" in line and "2 of 2 have a single photo" in line


def test_too_few_verification_pairs(tmp_path, capsys):
    # Two held-out people with two photos each give 4 pairs: no 10-fold accuracy.
    line = error_line(["--data", str(faces(tmp_path, [2] * 8))], capsys)
    assert "give 4 verification pairs, fewer than the 10 folds" in line


def test_valid_folds_reach_training(tmp_path):
    data = faces(tmp_path / "faces", [4] * 6)
    with pytest.raises(AssertionError, match="training started"):
        cli.run(["--data", str(data), "--folds", "3"])


def test_more_folds_than_groups_of_two_people(tmp_path, capsys):
    line = error_line(["--data", str(faces(tmp_path, [4] * 7)), "--folds", "4"], capsys)
    assert line == ("--folds 4: 7 people make at most 3 held-out groups of two or more people "
                    "(verification pairs need two people in each group)\n")


def test_a_fold_with_a_single_photo_person(tmp_path, capsys):
    line = error_line(["--data", str(faces(tmp_path, [4] * 5 + [1])), "--folds", "2"], capsys)
    assert "of 2: every held-out person needs two photos or more" in line
    assert "1 of 3 have a single photo: person_5 (people are held out at random by --folds and --seed)" in line


def test_folds_too_small_for_the_protocol(tmp_path, capsys):
    # Four folds of two people with two photos each: 4 pairs per fold.
    line = error_line(["--data", str(faces(tmp_path, [2] * 8)), "--folds", "4"], capsys)
    assert line == ("fold 1 of 4: the 2 held-out people give 4 verification pairs, fewer than the 10 folds "
                    "of the protocol: add people or photos, or lower --folds\n")


def test_folder_named_like_an_image_is_refused(tmp_path, capsys):
    data = faces(tmp_path / "faces", [4] * 6)
    (data / "person_0" / "9.png").mkdir()
    line = error_line(["--data", str(data)], capsys)
    assert line == f"--data {data}: {data / 'person_0' / '9.png'} is not a regular file\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_named_like_an_image_is_refused_without_opening_it(tmp_path):
    # Before: opening the FIFO waited forever for a writer. A subprocess, so that a
    # regression times out instead of hanging the suite, and to see the real exit.
    data = faces(tmp_path / "faces", [4] * 6)
    fifo = data / "person_1" / "9.png"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "facekernels.train", "--data", str(data)],
                            capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert result.stderr == f"{PREFIX}--data {data}: {fifo} is not a regular file\n"


def test_empty_data_argument_is_not_the_synthetic_set(tmp_path, capsys):
    # Before: --data "" silently trained on the built-in synthetic faces.
    assert error_line(["--data", ""], capsys) == "--data : no such directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_unlistable_person_folder(tmp_path, capsys):
    data = faces(tmp_path / "faces", [4] * 6)
    (data / "person_2").chmod(0)
    try:
        assert "cannot list" in error_line(["--data", str(data)], capsys)
    finally:
        (data / "person_2").chmod(0o755)


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_output_in_a_missing_folder(tmp_path, capsys, option):
    # Before: found out after training.
    path = tmp_path / "missing" / "out.png"
    assert error_line([option, str(path)], capsys) == (
        f"{option} {path}: no such directory {path.parent}\n")


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_output_that_is_a_folder(tmp_path, capsys, option):
    assert error_line([option, str(tmp_path)], capsys) == f"{option} {tmp_path}: is a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_output_in_a_read_only_folder(tmp_path, capsys, option):
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    assert error_line([option, str(folder / "out.png")], capsys).endswith(": permission denied\n")


def test_plot_format_matplotlib_cannot_write(tmp_path, capsys):
    line = error_line(["--plot", str(tmp_path / "curves.xyz")], capsys)
    assert line.startswith(f"--plot {tmp_path / 'curves.xyz'}: matplotlib cannot write .xyz files")


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--epochs", "2.5"], "argument --epochs: expected an integer >= 1, got '2.5'"),
    (["--batch-size", "-8"], "argument --batch-size: expected an integer >= 1, got '-8'"),
    (["--batch-size", "6"], "--batch-size must be a multiple of 4, at least 8, got 6"),
    (["--embedding-size", "0"], "argument --embedding-size: expected an integer >= 1, got '0'"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["--weight-decay=-1e-4"], "argument --weight-decay: expected a finite number >= 0, got '-1e-4'"),
    (["--weight-decay", "nan"], "argument --weight-decay: expected a finite number >= 0, got 'nan'"),
    (["--holdout", "nan"], "argument --holdout: expected a number in (0, 1), got 'nan'"),
    (["--holdout", "1"], "argument --holdout: expected a number in (0, 1), got '1'"),
    (["--seed", str(2**64)], f"argument --seed: expected an integer in [-2^63, 2^64), got '{2**64}'"),
    (["--mining", "hard"], "--mining applies to --loss triplet only, got --loss arcface"),
    (["--folds", "0"], "argument --folds: expected an integer >= 1, got '0'"),
    (["--folds", "-2"], "argument --folds: expected an integer >= 1, got '-2'"),
    (["--folds", "41"], "--folds 41: 40 people make at most 20 held-out groups"),  # the synthetic faces
    (["--folds", "4", "--holdout", "0.3"],
     "--holdout applies to --folds 1 only: --folds 4 holds out each person once"),
    (["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
])
def test_options_out_of_range(capsys, argv, expected):
    assert error_line(argv, capsys).startswith(expected)


def test_plot_and_report_on_one_file(tmp_path, capsys):
    path = tmp_path / "out.png"
    assert error_line(["--plot", str(path), "--report", str(path)], capsys) == (
        f"--plot and --report name the same file, {path}\n")


def test_existing_output_files_are_checked_themselves(tmp_path):
    # os.devnull exists, so it is checked itself, not its folder /dev (which only root
    # may write): devices and /dev/stdout are valid outputs.
    with pytest.raises(AssertionError, match="training started"):
        cli.run(["--epochs", "1", "--report", os.devnull])


@pytest.mark.parametrize("environment, message", [
    (dict(WORLD_SIZE="1", RANK="5"), "RANK must lie in [0, WORLD_SIZE = 1), got 5"),  # hung before
    (dict(WORLD_SIZE="0", RANK="0"), "WORLD_SIZE must be at least 1, got 0"),
    (dict(WORLD_SIZE="abc", RANK="0"), "WORLD_SIZE must be a non-negative integer, got 'abc'"),
    (dict(WORLD_SIZE="-2", RANK="0"), "WORLD_SIZE must be a non-negative integer, got '-2'"),
    (dict(WORLD_SIZE="2", RANK="x"), "RANK must be a non-negative integer, got 'x'"),
    (dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR=None), "MASTER_ADDR is not set (torchrun sets it)"),
    (dict(WORLD_SIZE="2", RANK="1", MASTER_PORT="http"), "MASTER_PORT must be a port number, got 'http'"),
])
def test_distributed_launch_environment(monkeypatch, capsys, environment, message):
    """torchrun's variables are checked before a process group waits on them."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **environment}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert error_line(["--distributed", "--loss", "arcface"], capsys) == f"--distributed: {message}\n"
