"""Image metrics for the mini SDXL, computable offline on a CPU (no DINO/CLIP/Inception weights exist here).

- :class:`SmallCNN`: a 1.15 M-parameter CIFAR-10 classifier trained on the train split only
  (:func:`train_classifier`); its held-out accuracy is the ceiling for class-conditional accuracy of generations,
  its penultimate features (256-d) stand in for Inception's;
- :func:`class_accuracy`: share of images the classifier assigns to the prompted class;
- :func:`frechet_distance`: ``‖μ₁-μ₂‖² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}`` between two feature
  sets (Heusel et al. 2017, FID's formula, here in the classifier's feature space);
- :func:`nearest_rmse`: pixel RMSE (images in [0, 1]) of every sample to its nearest reference image, and which one;
  used for subject fidelity and for the memorisation check (generated vs train must be no closer than held-out
  real vs train);
- subject fidelity: :func:`subject_retrieval` (share of samples whose nearest image among subject photos + real
  images is a subject photo; the mini SDXL study found it tracks what one sees, while classifier-feature cosine
  does not), :func:`feature_similarity`; :func:`diversity` (mean pairwise RMSE, 0 for a collapsed set).

Images are float tensors N x 3 x H x W in [-1, 1] unless a function says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.io import atomic_write_json, load_safetensors, save_safetensors

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class SmallCNN(nn.Module):
    """Six 3x3 conv-BN-ReLU layers in three stages (w, 2w, 4w), global average pool, linear head."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.width, self.num_classes = width, num_classes

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        w = width
        self.f = nn.Sequential(block(3, w), block(w, w), nn.MaxPool2d(2), nn.Dropout(0.1),
                               block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2), nn.Dropout(0.1),
                               block(2 * w, 4 * w), block(4 * w, 4 * w), nn.MaxPool2d(2), nn.Dropout(0.1),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and one random 4-px-padded crop offset per batch."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    i, j = torch.randint(0, 9, (2,), generator=gen).tolist()
    h, w = x.shape[-2:]
    return F.pad(x, (4, 4, 4, 4), mode="reflect")[:, :, i:i + h, j:j + w]


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 15, batch_size: int = 128, width: int = 64,
                     seed: int = 0, progress: bool = True) -> SmallCNN:
    """SGD (Nesterov, OneCycle to 0.1), label smoothing 0.1, flip/crop augmentation, bf16 autocast on CPU."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(width, int(y.max()) + 1)
    steps_per_epoch = len(x) // batch_size
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * steps_per_epoch, pct_start=0.25)
    model.train()
    for _ in tqdm(range(epochs), desc="classifier epochs", disable=not progress):
        perm = torch.randperm(len(x), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(_augment(x[idx], gen))
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_classifier(model: SmallCNN, out_dir: Path, dtype: torch.dtype = torch.float32, **info: object) -> None:
    """Weights (floating tensors in ``dtype``) and a json of the width, classes and ``info``."""
    out_dir = Path(out_dir)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_safetensors(state, out_dir / CLASSIFIER_WEIGHTS)
    atomic_write_json(out_dir / CLASSIFIER_CONFIG, {"width": model.width, "num_classes": model.num_classes, **info})


def load_classifier(directory: Path) -> SmallCNN:
    """A classifier saved by :func:`save_classifier`, in float32, in eval mode."""
    directory = Path(directory)
    config = json.loads((directory / CLASSIFIER_CONFIG).read_text())
    model = SmallCNN(config["width"], config["num_classes"])
    model.load_state_dict(load_safetensors(directory / CLASSIFIER_WEIGHTS))
    return model.eval()


@torch.no_grad()
def logits(model: SmallCNN, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(model: SmallCNN, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def class_accuracy(model: SmallCNN, x: torch.Tensor, label: torch.Tensor | int) -> float:
    """Share of ``x`` the classifier assigns to ``label`` (one class for all, or one per image)."""
    pred = logits(model, x).argmax(1)
    return float((pred == torch.as_tensor(label)).float().mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N x d) and ``b`` (M x d), in float64.

    tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2} is taken from the eigenvalues of that symmetric PSD matrix (no complex sqrtm).
    """
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(mu @ mu + cov_a.trace() + cov_b.trace() - 2 * cross)


def nearest_rmse(samples: torch.Tensor, references: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For every sample, the pixel RMSE (on [0, 1] images) to its nearest reference and that reference's index."""
    s = ((samples.flatten(1).double() + 1) / 2)
    r = ((references.flatten(1).double() + 1) / 2)
    dims = s.shape[1]
    best, where = [], []
    for i in range(0, len(s), chunk):
        d = torch.cdist(s[i:i + chunk], r).pow(2) / dims
        m, j = d.min(1)
        best.append(m.clamp(min=0).sqrt())
        where.append(j)
    return torch.cat(best).float(), torch.cat(where)


def subject_retrieval(samples: torch.Tensor, subject: torch.Tensor, gallery: torch.Tensor) -> float:
    """Share of ``samples`` whose nearest image (pixel RMSE) among ``subject`` ∪ ``gallery`` is a subject image.

    Chance is about len(subject) / (len(subject) + len(gallery)) for samples unrelated to both.
    """
    _, where = nearest_rmse(samples, torch.cat([subject, gallery]))
    return float((where < len(subject)).float().mean())


def feature_similarity(model: SmallCNN, samples: torch.Tensor, subject: torch.Tensor,
                       center: torch.Tensor | None = None) -> float:
    """Mean cosine between the samples' classifier features and the subject's mean feature, both centred by
    ``center`` (e.g. the mean feature of real images; default: no centring)."""
    f, g = features(model, samples), features(model, subject).mean(0, keepdim=True)
    if center is not None:
        f, g = f - center, g - center
    return float(F.cosine_similarity(f, g).mean())


def diversity(samples: torch.Tensor) -> float:
    """Mean pixel RMSE (images in [0, 1]) over all pairs of distinct samples."""
    x = (samples.flatten(1).double() + 1) / 2
    n = len(x)
    if n < 2:
        raise ValueError("diversity needs at least 2 samples")
    d = torch.cdist(x, x).pow(2) / x.shape[1]
    return float(d.clamp(min=0).sqrt().sum() / (n * (n - 1)))
