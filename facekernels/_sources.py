"""The digest of the C++/CUDA sources. setup.py embeds it in the build and the import
compares it, so an extension left over from older sources is refused, not run. csrc/simt/
(the test-only CUDA emulator, not part of the extension) does not count."""

import hashlib
import os

SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def sources_digest(root):
    root = os.fspath(root)
    paths = []
    for folder, subfolders, files in os.walk(root):
        if folder == root and "simt" in subfolders:
            subfolders.remove("simt")
        paths += [os.path.join(folder, f) for f in files if f.endswith(SOURCE_SUFFIXES)]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()
