"""Datasets, deterministic augmentation, the search split and rank-aware samplers.

Augmentation is seeded per sample from (seed, stream, epoch, index), so the same sample gets the same
augmentation whatever the number of ranks, the number of loader workers, or a resume in between.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, Subset

from .errors import UsageError
from .tools.images import ImageReader

CIFAR10_MEAN, CIFAR10_STD = (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "synthetic")
DIGITS_SIZE = 16


@dataclass
class DataBundle:
    """Train and test sets (augmentation not yet applied) and what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    kind: str  # "tensor" (uint8 CHW tensors) or "pil"


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


# --- loaders of each dataset -------------------------------------------------------------------------------
# digits' test images: scikit-learn's train_test_split(test_size=0.2, random_state=0, stratified by label) of its
# 1,797 images as a bit mask (bit i, most significant first, set: image i is a test image). Stored so that loading
# the data needs no scikit-learn import (2 s of every process); tests/test_train_eval.py checks it against the split.
DIGITS_TEST_MASK = (
    "000004883524104000064100934205001a00080100240028062c12001000940a009019120420f8a0028110a000080a882044"
    "1524494240a00a0000004004d80000818020004805c400104008a0100005404800301000020ec409000224840083a8013c20"
    "a6980a0000000b08400804a0184802024041c1008004404684376a810216004480004042a0a4180a5000840b8561c6081080"
    "08004c80c02004068e00010882008100380803c008190000100e01008410a0210033282904c044c080680e01028300820088"
    "22a6402c24042108a860809081a00c02820242120138a41500"
)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) in 0..16, labels) of scikit-learn's bundled digits file, read as its load_digits reads
    it, without importing scikit-learn's estimators."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if not os.path.exists(path):
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits_test_mask(n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(DIGITS_TEST_MASK), dtype=np.uint8))[:n].astype(bool)


def _digits() -> DataBundle:
    images, target = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.tensor(target, dtype=torch.long)
    test = digits_test_mask(len(y))
    idx_train, idx_test = torch.tensor(np.flatnonzero(~test)), torch.tensor(np.flatnonzero(test))
    xt = x[idx_train].float() / 255
    mean = tuple(float(v) for v in xt.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in xt.std(dim=(0, 2, 3)))
    return DataBundle(TensorImages(x[idx_train], y[idx_train]), TensorImages(x[idx_test], y[idx_test]), 10,
                      DIGITS_SIZE, mean, std, "tensor")


class _SafeUnpickler(pickle.Unpickler):
    """Only the few numpy globals that the CIFAR python pickles need; anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: str, label_key: str):
    try:
        with open(path, "rb") as f:
            entry = _SafeUnpickler(f, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as e:
        raise UsageError(f"{path}: not a CIFAR python batch file ({type(e).__name__}: {str(e)[:120]})") from None
    if len(labels) != len(data):
        raise UsageError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def cifar_files(dataset: str, root: str):
    if dataset == "cifar10":
        base = os.path.join(root, "cifar-10-batches-py")
        return base, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    base = os.path.join(root, "cifar-100-python")
    return base, ["train"], ["test"], "fine_labels"


def cifar_present(dataset: str, root: str) -> bool:
    base, tr, te, _ = cifar_files(dataset, root)
    return all(os.path.isfile(os.path.join(base, f)) for f in tr + te)


def download_cifar(dataset: str, root: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        os.makedirs(root, exist_ok=True)
        cls(root=root, train=True, download=True)
        cls(root=root, train=False, download=True)
    except Exception as e:
        raise UsageError(f"could not download {dataset} into {root}: {str(e).splitlines()[0][:200]}") from None


def _cifar(dataset: str, root: str) -> DataBundle:
    base, tr, te, key = cifar_files(dataset, root)
    if not cifar_present(dataset, root):
        name = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
        raise UsageError(f"{name} not found under {base} (expected the python version: {', '.join(tr + te)}): "
                         f"pass --download to fetch it, or unpack the python-version archive into {root}")
    parts = [_read_cifar_batch(os.path.join(base, f), key) for f in tr]
    test = _read_cifar_batch(os.path.join(base, te[0]), key)
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    num_classes = 10 if dataset == "cifar10" else 100
    for lab, where in ((y, "train"), (torch.from_numpy(test[1]), "test")):
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise UsageError(f"{base}: {where} labels outside 0..{num_classes - 1}")
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return DataBundle(TensorImages(x, y), TensorImages(torch.from_numpy(test[0]), torch.from_numpy(test[1])),
                      num_classes, 32, mean, std, "tensor")


def _imagefolder(root: str, image_size: int, need_val: bool) -> DataBundle:
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train_dir):
        raise UsageError(f"imagefolder: {train_dir} does not exist (expected {root}/train/<class>/<images>)")
    reader = ImageReader(root)  # an unreadable file: one line naming it, whichever loader worker meets it
    try:
        train = ImageFolder(train_dir, loader=reader)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"imagefolder: {train_dir}: {str(e).splitlines()[0]}") from None
    if os.path.isdir(val_dir):
        try:
            test = ImageFolder(val_dir, loader=reader)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(f"imagefolder: {val_dir}: {str(e).splitlines()[0]}") from None
        if test.classes != train.classes:
            raise UsageError(f"imagefolder: classes of {val_dir} differ from those of {train_dir}")
    elif need_val:
        raise UsageError(f"imagefolder: {val_dir} does not exist (expected {root}/val/<class>/<images>)")
    else:
        test = Subset(train, [])
    return DataBundle(train, test, len(train.classes), image_size, IMAGENET_MEAN, IMAGENET_STD, "pil")


def _synthetic(image_size: int, num_classes: int, n_train: int, n_test: int, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(seed + 12345)
    x = torch.randint(0, 256, (n_train + n_test, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    return DataBundle(TensorImages(x[:n_train], y[:n_train]), TensorImages(x[n_train:], y[n_train:]), num_classes,
                      image_size, (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), "tensor")


def load_dataset(name: str, data_dir: str, download: bool = False, image_size: int | None = None,
                 need_test: bool = True, seed: int = 0, synthetic_size: int = 1024, synthetic_classes: int = 10,
                 is_local_root: bool = True, barrier=lambda: None, agree=lambda ok: ok) -> DataBundle:
    """Load a dataset. Downloads happen on one process per node (`is_local_root`), the others wait at `barrier`;
    `agree(ok)` must return True only if every rank succeeded, so a failure ends every rank, not one."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(image_size or 32, synthetic_classes, synthetic_size, max(synthetic_size // 4, 1), seed)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir} is a file, not a folder")
    if name in ("cifar10", "cifar100"):
        err = None
        if download and is_local_root and not cifar_present(name, data_dir):
            try:
                download_cifar(name, data_dir)
            except UsageError as e:
                err = e
        barrier()
        if not agree(err is None):
            raise err or UsageError(f"downloading {name} failed on another rank")
        return _cifar(name, data_dir)
    return _imagefolder(data_dir, image_size or 224, need_val=need_test)


# --- transforms ----------------------------------------------------------------------------------------------
def make_transform(bundle: DataBundle, train: bool, augment: bool, dataset: str, color_jitter: bool = False,
                   cutout: int = 0):
    """torchvision transforms: PC-DARTS CIFAR recipe (pad-4 crop + flip), digits (pad-2 crop, no flip),
    ImageNet (random-resized crop + flip [+ jitter]; resize + center crop for evaluation)."""
    import torchvision.transforms as T

    norm = T.Normalize(bundle.mean, bundle.std)
    tf = []
    if bundle.kind == "pil":
        size = bundle.image_size
        if train and augment:
            tf += [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
            if color_jitter:
                tf.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2))
        else:
            tf += [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)]
        tf += [T.ToTensor(), norm]
    else:
        tf.append(T.ConvertImageDtype(torch.float32))
        if train and augment:
            if dataset == "digits":
                tf.append(T.RandomCrop(bundle.image_size, padding=2))
            elif dataset != "synthetic":
                tf += [T.RandomCrop(bundle.image_size, padding=4), T.RandomHorizontalFlip()]
        tf.append(norm)
    if train and augment and cutout > 0:
        tf.append(Cutout(cutout))
    return T.Compose(tf)


class Cutout:
    """Zero one random square of side `length` (clipped at the borders), as in the DARTS retraining recipe."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y = int(torch.randint(0, h, (1,)))
        x = int(torch.randint(0, w, (1,)))
        y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
        x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
        img = img.clone()
        img[..., y1:y2, x1:x2] = 0.0
        return img


class SeededView(Dataset):
    """A view of `base` restricted to `indices`, with a transform seeded per (seed, stream, epoch, index).

    Items are (image, label, base_index). `set_epoch(e)` changes the augmentation of the next pass; it must be
    called before the loader's iterator is created (workers copy the dataset then).
    """

    def __init__(self, base: Dataset, indices, transform, seed: int, stream: int = 0):
        self.base, self.indices, self.transform = base, list(int(i) for i in indices), transform
        self.seed, self.stream, self.epoch = int(seed), int(stream), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.indices)

    def targets(self):
        t = getattr(self.base, "targets", None)
        if t is None:
            return [int(self.base[i][1]) for i in self.indices]
        return [int(t[i]) for i in self.indices]

    def __getitem__(self, i):
        idx = self.indices[i]
        img, label = self.base[idx]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, self.stream, self.epoch, idx))
                img = self.transform(img)
        return img, int(label), idx


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# --- the search split ---------------------------------------------------------------------------------------
def search_split(n: int, train_portion: float):
    """PC-DARTS split: the first `train_portion` of the training set trains the weights, the rest the arch."""
    split = int(np.floor(train_portion * n))
    return list(range(split)), list(range(split, n))


def class_sample_split(targets, weight_frac: float, arch_frac: float, seed: int):
    """Per-class sample (ImageNet search recipe): from each class, a seeded random `weight_frac` of its images
    for the weights and a disjoint `arch_frac` for the architecture. Identical on every rank (depends only on
    the seed and the file list)."""
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    w_idx, a_idx = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        perm = idx[rng.permutation(len(idx))]
        nw = max(1, int(round(weight_frac * len(idx))))
        na = max(1, int(round(arch_frac * len(idx))))
        if nw + na > len(idx):
            raise UsageError(f"class {int(c)} has {len(idx)} images: too few for {weight_frac:g} + {arch_frac:g} "
                             f"sample fractions")
        w_idx += perm[:nw].tolist()
        a_idx += perm[nw:nw + na].tolist()
    return sorted(w_idx), sorted(a_idx)


# --- samplers ------------------------------------------------------------------------------------------------
class ShardSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, last partial round dropped) that can start mid-pass.

    With drop_last here and in the loader, rank r's k-th batch of size B/W holds global positions
    r, r+W, ... of the k-th global batch of size B, so the union over ranks of each step's batch is the same
    set of samples whatever W is: N ranks see the same global batches as 1 rank.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` of this rank's indices in the current epoch (resume inside a pass)."""
        self.start = int(start)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self):
        return max(0, self.num_samples - self.start)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for elastic runs: resumable at any global position, for any number of ranks.

    A pass is the permutation ShardSampler uses (seed + epoch). Step k takes the global batch of
    `world * local_batch` samples starting at `start + k * world * local_batch` and gives rank r its positions
    r, r+W, ... - the very batches ShardSampler gives when nothing changes. When the job shrinks or grows,
    the samples of the pass not yet consumed are re-split over the new ranks from the committed position.
    """

    def __init__(self, n: int, seed: int, epoch: int, world: int, rank: int, local_batch: int, start: int = 0):
        self.n, self.seed, self.epoch = n, seed, epoch
        self.world, self.rank, self.local_batch, self.start = world, rank, local_batch, start

    @property
    def global_batch(self) -> int:
        return self.world * self.local_batch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        pos, G = self.start, self.global_batch
        while pos + G <= self.n:
            yield perm[pos + self.rank:pos + G:self.world]
            pos += G

    def __len__(self):
        return max(0, (self.n - self.start) // self.global_batch)


class EvalShardSampler(torch.utils.data.Sampler):
    """Rank r evaluates samples r, r+W, r+2W, ...: every sample exactly once, no padding, no repeats."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(dataset, batch_size: int, sampler, workers: int, drop_last: bool, pin: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       drop_last=drop_last, pin_memory=pin, persistent_workers=False)


def make_batch_loader(dataset, batch_sampler, workers: int, pin: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                                       persistent_workers=False)
