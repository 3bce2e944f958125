"""LFW pairs-file reading on small files written to tmp_path."""

import os

import pytest

from facekernels.eval import lfw_image_path, read_lfw_pairs


def write(tmp_path, text):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    return path


def test_single_set_format(tmp_path):
    # "N" header: N matched pairs, then N mismatched pairs (as pairsDevTrain.txt).
    path = write(tmp_path, "2\n"
                           "Abel_Pacheco\t1\t4\n"
                           "Akhmed_Zakayev\t1\t3\n"
                           "Abdel_Madi_Shabneh\t1\tDean_Barker\t1\n"
                           "Abdel_Madi_Shabneh 1 Giancarlo_Fisichella 10\n")
    assert read_lfw_pairs(path) == [
        ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg", True),
        ("Akhmed_Zakayev/Akhmed_Zakayev_0001.jpg", "Akhmed_Zakayev/Akhmed_Zakayev_0003.jpg", True),
        ("Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001.jpg", "Dean_Barker/Dean_Barker_0001.jpg", False),
        ("Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001.jpg",
         "Giancarlo_Fisichella/Giancarlo_Fisichella_0010.jpg", False),
    ]


def test_folds_format(tmp_path):
    # "folds N" header (pairs.txt's "10 300"): here 2 folds of 1 matched + 1 mismatched,
    # with a trailing blank line.
    path = write(tmp_path, "2\t1\n"
                           "Aaron_Peirsol\t1\t2\n"
                           "AJ_Cook\t1\tMarsha_Thomason\t1\n"
                           "Zico\t1\t123\n"
                           "Zico\t2\tAaron_Peirsol\t3\n"
                           "\n")
    pairs = read_lfw_pairs(str(path))
    assert [same for _, _, same in pairs] == [True, False, True, False]
    assert pairs[2] == ("Zico/Zico_0001.jpg", "Zico/Zico_0123.jpg", True)
    assert pairs[3] == ("Zico/Zico_0002.jpg", "Aaron_Peirsol/Aaron_Peirsol_0003.jpg", False)


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "1\nAaron_Peirsol 1 2\nAJ_Cook 1 Marsha_Thomason 1 2\n")
    with pytest.raises(ValueError, match=r"pairs\.txt, line 3: expected"):
        read_lfw_pairs(path)
    path = write(tmp_path, "1\nAaron_Peirsol 1 two\nAJ_Cook 1 Marsha_Thomason 1\n")
    with pytest.raises(ValueError, match=r"pairs\.txt, line 2: image index 'two'"):
        read_lfw_pairs(path)
    path = write(tmp_path, "1\nAaron_Peirsol 0 2\nAJ_Cook 1 Marsha_Thomason 1\n")
    with pytest.raises(ValueError, match=r"line 2: image index 0 must be >= 1"):
        read_lfw_pairs(path)
    path = write(tmp_path, "ten\nAaron_Peirsol 1 2\n")
    with pytest.raises(ValueError, match=r"pairs\.txt, line 1: header"):
        read_lfw_pairs(path)


def test_pair_count_must_match_header(tmp_path):
    path = write(tmp_path, "10 300\nAaron_Peirsol 1 2\nAJ_Cook 1 Marsha_Thomason 1\n")
    with pytest.raises(ValueError, match="6000 pairs, found 2"):
        read_lfw_pairs(path)


def test_lfw_image_path():
    assert lfw_image_path("/data/lfw", "Zico", 3) == os.path.join("/data/lfw", "Zico", "Zico_0003.jpg")
    with pytest.raises(ValueError, match="index"):
        lfw_image_path("/data/lfw", "Zico", 0)
