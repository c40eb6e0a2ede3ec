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


def nearest_rmse(samples: torch.Tensor, references: torch.Tensor,
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
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


def augment_views(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random views of ``images`` (N x 3 x R x R): a random image, random-resized crop (70-100 % of the side,
    any position), horizontal flip with p = 0.5, brightness x U(0.85, 1.15), and with p = 0.5 a blur (down to
    50-80 % of the side and back up; generations of a small model are blurrier than photos). Deterministic for
    ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    out = []
    for _ in range(n):
        x = images[int(torch.randint(len(images), (1,), generator=gen))]
        side = max(8, int(size * (0.7 + 0.3 * float(torch.rand(1, generator=gen)))))
        top, left = (int(torch.randint(size - side + 1, (1,), generator=gen)) for _ in range(2))
        x = F.interpolate(x[None, :, top:top + side, left:left + side], size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[0]
        if float(torch.rand(1, generator=gen)) < 0.5:
            x = x.flip(-1)
        x = ((x + 1) * (0.85 + 0.3 * float(torch.rand(1, generator=gen))) - 1).clamp(-1, 1)
        if float(torch.rand(1, generator=gen)) < 0.5:
            low = max(4, int(size * (0.5 + 0.3 * float(torch.rand(1, generator=gen)))))
            x = F.interpolate(F.interpolate(x[None], size=(low, low), mode="bilinear", antialias=True),
                              size=(size, size), mode="bilinear")[0]
        out.append(x)
    return torch.stack(out)


class SubjectProbe:
    """A subject-vs-real-images detector: logistic regression on the classifier's standardised features, positives
    = augmented views of the subject photos, negatives = non-subject images (class-balanced, L2 1e-2, L-BFGS).

    What the study asked for instead of a subject-feature cosine: it answers "does this look like *the* subject
    rather than like any other image of its class", learned from the subject photos alone."""

    def __init__(self, model: SmallCNN, subject: torch.Tensor, negatives: torch.Tensor, views: int = 256,
                 seed: int = 0) -> None:
        pos = features(model, augment_views(subject, views, seed))
        neg = features(model, negatives)
        x = torch.cat([pos, neg]).double()
        self.model, self.mean, self.std = model, x.mean(0), x.std(0).clamp(min=1e-6)
        x = (x - self.mean) / self.std
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
        weight = torch.where(y == 1, 0.5 / len(pos), 0.5 / len(neg))
        self.w = torch.zeros(x.shape[1], dtype=torch.double, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.double, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (weight * F.binary_cross_entropy_with_logits(x @ self.w + self.b, y, reduction="none")).sum()
            loss = loss + 1e-2 * self.w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()

    @torch.no_grad()
    def probability(self, images: torch.Tensor) -> torch.Tensor:
        x = (features(self.model, images).double() - self.mean) / self.std
        return torch.sigmoid(x @ self.w + self.b).float()

    def score(self, images: torch.Tensor) -> float:
        """Mean probability that ``images`` show the subject (≈0 for the negatives, ≈1 for views of the photos)."""
        return float(self.probability(images).mean())


def load_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """Image files -> N x 3 x R x R in [-1, 1], as the trainer sees them with ``--center_crop`` (the trainer's
    :class:`tsd_diffusion.data.SDXLTransform` after :func:`tsd_diffusion.data.load_image`)."""
    from .data import SDXLTransform, load_image

    transform = SDXLTransform(resolution, center_crop=True)
    return torch.stack([transform(load_image(p))[0] for p in paths])


def prompt_class(prompt: str, classes: tuple[str, ...]) -> str | None:
    """The class a prompt names (its last word that is one of ``classes``): ``"a photo of sks automobile"`` ->
    ``"automobile"``; None when it names none."""
    words = prompt.lower().replace(",", " ").split()
    return next((w for w in reversed(words) if w in classes), None)


class SubjectEvaluator:
    """Scores generations of a subject-driven fine-tune of the mini SDXL (no DINO/CLIP offline, so pixels and the
    shipped CIFAR classifier):

    - subject fidelity: ``subject_probe`` (:class:`SubjectProbe`: the mean probability a subject-vs-gallery
      detector trained on the subject photos gives the generations), ``subject_retrieval``
      (:func:`subject_retrieval` against the subject photos + the gallery; chance ≈ n_subject / (n_subject +
      len(gallery)); strict: it needs the same framing and background as a photo), ``subject_rmse`` (mean pixel RMSE
      to the nearest subject photo), ``feature_similarity`` (classifier-feature cosine to the subject's mean,
      centred by the gallery's mean; reported, but the study found it does not track what one sees);
    - prompt fidelity: ``class_accuracy``, the share the classifier assigns to the CIFAR class the prompt names
      (for the subject prompt, the class prompt and other classes: drift shows up as a drop);
    - ``diversity`` (:func:`diversity`).

    The gallery is the base's own generations of the ten classes that ship with it
    (:func:`tsd_diffusion.mini_sdxl.reference_images`). The metrics are validated on cases with a known answer in
    ``tests/test_mini_sdxl.py`` and ``tests/test_mini_dreambooth.py``.
    """

    def __init__(self, classifier: SmallCNN, subject: torch.Tensor, gallery: torch.Tensor,
                 classes: tuple[str, ...]) -> None:
        self.classifier, self.subject, self.gallery, self.classes = classifier, subject, gallery, classes
        self.center = features(classifier, gallery).mean(0, keepdim=True)
        self.probe = SubjectProbe(classifier, subject, gallery)

    @classmethod
    def for_base(cls, base: str | Path, subject_paths: list[Path], resolution: int) -> SubjectEvaluator | None:
        """The evaluator of a pipeline dir that ships the mini SDXL's classifier (None for any other base)."""
        from .mini_sdxl import CLASSES, EVALUATION_DIR, RESOLUTION, reference_images

        directory = Path(base) / EVALUATION_DIR
        if resolution != RESOLUTION or not (directory / CLASSIFIER_WEIGHTS).is_file():
            return None
        gallery, _ = reference_images(base)
        return cls(load_classifier(directory), load_images(subject_paths, resolution), gallery, CLASSES)

    def score(self, prompt: str, images: torch.Tensor) -> dict[str, float | str | int | None]:
        """All metrics of one prompt's generations (N x 3 x R x R in [-1, 1])."""
        name = prompt_class(prompt, self.classes)
        c = self.classes.index(name) if name is not None else None
        return {
            "prompt": prompt, "num_images": len(images),
            "subject_probe": self.probe.score(images),
            "subject_retrieval": subject_retrieval(images, self.subject, self.gallery),
            "subject_rmse": float(nearest_rmse(images, self.subject)[0].mean()),
            "feature_similarity": feature_similarity(self.classifier, images, self.subject, self.center),
            "class": name,
            "class_accuracy": class_accuracy(self.classifier, images, c) if c is not None else None,
            "diversity": diversity(images) if len(images) > 1 else None,
        }
