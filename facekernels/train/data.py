"""Face datasets for the trainer: a built-in synthetic set, ImageFolder trees on disk, the
open-set split into training and held-out people, and identity-balanced batches."""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = (64, 52)  # every image is resized to this (H, W), the AT&T aspect ratio
CROP_SIZE = (56, 48)  # random crops for training, the center crop for evaluation
IMAGE_SUFFIXES = (".pgm", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class FaceSet:
    images: torch.Tensor  # [N, 1, H, W] float in [0, 1]
    labels: torch.Tensor  # [N] int64, 0..num_people-1
    names: list  # identity names, indexed by label

    @property
    def num_people(self):
        return len(self.names)

    def subset(self, people):
        """The images of the given people (labels), relabelled 0..len(people)-1."""
        people = torch.as_tensor(people, dtype=torch.int64)
        remap = torch.full((self.num_people,), -1, dtype=torch.int64)
        remap[people] = torch.arange(len(people))
        keep = remap[self.labels] >= 0
        return FaceSet(self.images[keep], remap[self.labels[keep]], [self.names[p] for p in people.tolist()])


def synthetic_faces(num_people=40, per_person=10, seed=0):
    """A deterministic face-like dataset generated at run time (no download): each person is
    a random smooth template on an oval with eye and mouth blobs; each photo varies it by
    shift, scale, lighting (gain, bias, a left-right gradient) and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_SIZE
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    oval = torch.sigmoid(12 * (1 - (xx / 0.75) ** 2 - (yy / 0.95) ** 2))

    def blob(cx, cy, sx, sy):
        return torch.exp(-(((xx - cx) / sx) ** 2) - ((yy - cy) / sy) ** 2)

    images, labels = [], []
    for person in range(num_people):
        smooth = F.interpolate(torch.randn(1, 1, 6, 5, generator=g), size=IMAGE_SIZE,
                               mode="bicubic", align_corners=False)[0, 0]
        eye_x, eye_y, mouth_y = (0.3 + 0.1 * torch.rand(3, generator=g)).tolist()
        features = (blob(-eye_x, -eye_y, 0.12, 0.08) + blob(eye_x, -eye_y, 0.12, 0.08)
                    + blob(0.0, mouth_y + 0.2, 0.3, 0.07))
        template = oval * (0.6 + 0.25 * smooth - 0.4 * features)
        for _ in range(per_person):
            scale = 0.9 + 0.2 * torch.rand((), generator=g)
            shift = 0.12 * (torch.rand(2, generator=g) - 0.5)
            theta = torch.tensor([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])
            grid = F.affine_grid(theta[None], (1, 1, h, w), align_corners=False)
            photo = F.grid_sample(template[None, None], grid, align_corners=False)[0]
            gain, bias, slope = (torch.rand(3, generator=g) - 0.5).tolist()
            photo = photo * (1 + 0.4 * gain) + 0.2 * bias + 0.2 * slope * xx
            photo = photo + 0.05 * torch.randn(photo.shape, generator=g)
            images.append(photo.clamp(0, 1))
            labels.append(person)
    names = [f"synthetic_{p:03d}" for p in range(num_people)]
    return FaceSet(torch.stack(images), torch.tensor(labels), names)


def _read_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
            size = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    image = pixels.view(1, 1, size[1], size[0]).float() / 255.0
    return F.interpolate(image, size=IMAGE_SIZE, mode="bilinear", antialias=True,
                         align_corners=False)[0]


def _listdir(root, folder):
    try:
        return sorted(os.listdir(folder))
    except OSError as error:
        raise ValueError(f"--data {root}: cannot list {folder}: {error.strerror}") from error


def image_folder(root):
    """An ImageFolder tree: one folder per person holding that person's photos (PGM, PNG,
    JPEG, through Pillow). Files of other types are ignored. A name with an image suffix
    that is not a regular file (a FIFO, a device, a folder) is an error, raised without
    opening it: opening a FIFO would wait forever for a writer."""
    if not os.path.isdir(root):
        raise ValueError(f"--data {root}: no such directory")
    people = [d for d in _listdir(root, root) if os.path.isdir(os.path.join(root, d))]
    images, labels, names = [], [], []
    for person in people:
        folder = os.path.join(root, person)
        files = [os.path.join(folder, f) for f in _listdir(root, folder) if f.lower().endswith(IMAGE_SUFFIXES)]
        if not files:
            continue
        names.append(person)
        for path in files:
            if not os.path.isfile(path):  # follows symlinks; stat only, never opens
                raise ValueError(f"--data {root}: {path} is not a regular file")
            images.append(_read_image(path))
            labels.append(len(names) - 1)
    if len(names) < 2:
        raise ValueError(f"--data {root}: need at least two people (folders with images), found {len(names)}")
    return FaceSet(torch.stack(images), torch.tensor(labels), names)


def open_set_split(faces, holdout, seed):
    """Split the people (not the photos) into training and held-out sets."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"--holdout must be in (0, 1), got {holdout}")
    order = torch.randperm(faces.num_people, generator=torch.Generator().manual_seed(seed))
    held = max(2, round(holdout * faces.num_people))
    if faces.num_people - held < 2:
        raise ValueError(f"{faces.num_people} people leave too few for training with holdout {holdout}")
    return faces.subset(order[held:].sort().values), faces.subset(order[:held].sort().values)


def fold_splits(faces, folds, seed):
    """The people (not the photos) split into `folds` >= 2 disjoint held-out groups that
    together cover everyone, sizes within one of each other, drawn from `seed`: one
    (training set, held-out set) per fold, everyone outside the group training. With the
    same seed, the first group is the one open_set_split holds out at 1 / folds."""
    most = faces.num_people // 2  # verification pairs need two people or more in each group
    if not 2 <= folds <= most:
        raise ValueError(f"--folds {folds}: {faces.num_people} people make at most {most} held-out groups of "
                         f"two or more people (verification pairs need two people in each group)"
                         if folds > most else f"fold_splits: folds must be >= 2, got {folds}")
    order = torch.randperm(faces.num_people, generator=torch.Generator().manual_seed(seed))
    everyone = torch.arange(faces.num_people)
    return [(faces.subset(everyone[~torch.isin(everyone, group)]), faces.subset(group.sort().values))
            for group in torch.tensor_split(order, folds)]


def augment(images, generator):
    """Random crop to CROP_SIZE and random horizontal flip, per image."""
    n = images.shape[0]
    ch, cw = CROP_SIZE
    top = torch.randint(0, images.shape[2] - ch + 1, (n,), generator=generator)
    left = torch.randint(0, images.shape[3] - cw + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    crops = [images[i, :, t:t + ch, l:l + cw] for i, (t, l) in enumerate(zip(top.tolist(), left.tolist()))]
    out = torch.stack(crops)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def center_crop(images):
    ch, cw = CROP_SIZE
    top = (images.shape[2] - ch) // 2
    left = (images.shape[3] - cw) // 2
    return images[:, :, top:top + ch, left:left + cw]


def identity_batches(labels, people_per_batch, per_person, generator):
    """One epoch of batches, each `people_per_batch` people x `per_person` photos (drawn with
    replacement when a person has fewer), covering about every photo once, so batch-all
    triplet and contrastive losses always see positives and negatives."""
    num_people = int(labels.max()) + 1
    by_person = [torch.nonzero(labels == p).squeeze(1) for p in range(num_people)]
    batch = people_per_batch * per_person
    steps = max(1, math.ceil(len(labels) / batch))
    for _ in range(steps):
        people = torch.randperm(num_people, generator=generator)[:people_per_batch]
        picks = []
        for p in people.tolist():
            photos = by_person[p]
            if len(photos) >= per_person:
                picks.append(photos[torch.randperm(len(photos), generator=generator)[:per_person]])
            else:
                picks.append(photos[torch.randint(0, len(photos), (per_person,), generator=generator)])
        yield torch.cat(picks)
