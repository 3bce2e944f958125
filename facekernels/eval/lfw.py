"""Reading the Labeled Faces in the Wild pairs files (Huang et al. 2007).

Layout assumed: images at ``<root>/<name>/<name>_<index:04d>.jpg`` (e.g.
``Aaron_Peirsol/Aaron_Peirsol_0001.jpg``), indices starting at 1.
"""

import os

from facekernels.eval._checks import check_int


def _relative_path(name, index):
    return f"{name}/{name}_{index:04d}.jpg"


def lfw_image_path(root, name, index):
    """Path of image ``index`` (1-based) of person ``name`` under the LFW image root, as
    a str: ``<root>/<name>/<name>_<index:04d>.jpg``."""
    index = check_int("lfw_image_path", "index", index, 1)  # LFW numbers images from 1
    if not isinstance(name, str):
        raise TypeError(f"lfw_image_path: name must be a str (a person's folder), got {name!r}")
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"lfw_image_path: name must name one folder, got {name!r}")
    return os.path.join(os.fspath(root), *_relative_path(name, index).split("/"))


def _parse_index(token, path, line_number):
    try:
        index = int(token)
    except ValueError:
        raise ValueError(f"{path}, line {line_number}: image index {token!r} is not an integer") from None
    if index < 1:
        raise ValueError(f"{path}, line {line_number}: image index {index} must be >= 1")
    return index


def read_lfw_pairs(path):
    """Reads an LFW pairs file (pairs.txt, pairsDevTrain.txt, pairsDevTest.txt).

    Format (Huang et al. 2007): a header line, either ``N`` (one set) or ``folds N``
    (``folds`` sets, e.g. pairs.txt's ``10 300``); then each set's N matched pairs
    ``name idx1 idx2`` followed by its N mismatched pairs ``name1 idx1 name2 idx2``
    (tab- or space-separated). The pair count is checked against the header
    (``folds * 2N`` lines), so a truncated file is an error. Blank lines are skipped.

    Returns:
        A list of ``(path_a, path_b, same)`` in file order (so contiguous folds match the
        protocol's folds), paths relative to the LFW image root as
        ``name/name_0001.jpg``.

    Raises:
        ValueError naming the file and line number of a malformed or non-UTF-8 line, a
        header that declares no pairs, or a count mismatch.
    """
    path = os.fspath(path)
    lines = []
    with open(path, "rb") as f:  # decoded line by line, so that an error can name its line
        for number, raw in enumerate(f, start=1):
            try:
                tokens = raw.decode("utf-8").split()
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {number}: not UTF-8 text ({error.reason} "
                                 f"at byte {error.start} of the line)") from None
            if tokens:
                lines.append((number, tokens))
    if not lines:
        raise ValueError(f"{path}: empty pairs file")

    header_number, header = lines[0]
    if len(header) not in (1, 2) or not all(token.isdecimal() for token in header):
        raise ValueError(f"{path}, line {header_number}: header must be 'N' or 'folds N', "
                         f"got {' '.join(header)!r}")
    folds, per_set = (1, int(header[0])) if len(header) == 1 else map(int, header)
    if folds == 0 or per_set == 0:
        raise ValueError(f"{path}, line {header_number}: header declares no pairs, got {' '.join(header)!r}")

    pairs = []
    for number, tokens in lines[1:]:
        if len(tokens) == 3:
            name, a, b = tokens
            a, b = _parse_index(a, path, number), _parse_index(b, path, number)
            pairs.append((_relative_path(name, a), _relative_path(name, b), True))
        elif len(tokens) == 4:
            name_a, a, name_b, b = tokens
            a, b = _parse_index(a, path, number), _parse_index(b, path, number)
            pairs.append((_relative_path(name_a, a), _relative_path(name_b, b), False))
        else:
            raise ValueError(f"{path}, line {number}: expected 'name idx1 idx2' or "
                             f"'name1 idx1 name2 idx2', got {len(tokens)} fields")
    if len(pairs) != 2 * folds * per_set:
        raise ValueError(f"{path}: header promises {folds} x (2 x {per_set}) = "
                         f"{2 * folds * per_set} pairs, found {len(pairs)}")
    return pairs
