"""How an RD model's features become an anomaly map and an image score: the recipe, the density head, the scorer.

A **recipe** (:class:`ScoreRecipe`) says which scales count and how much, whether teacher and student features are
compared after per-channel standardisation (training mean/std, as EfficientAD does), how the map becomes an image
score (max, or the mean of the top 1% of pixels), and how much of a per-position Gaussian density map (PaDiM-like,
:class:`DensityHead`) is fused in. Every choice is made by :mod:`training.selection` on synthetic defects pasted into
held-out good images, never on the test set; the chosen recipe is stored in the checkpoint under ``"scoring"`` and
the exported ``score`` (and ``density``) parts are built from it, so evaluation, export and runtime agree.

Map (all FP32)::

    rd(x)   = sum_k w_k * upsample_bilinear(1 - cos_channel(s_k(f_k), s_k(d_k)))     s_k: identity or (x - mu_k) / sd_k
    map(x)  = blur_sigma( (1 - a) * (rd - rd_loc) / rd_scale + a * (dens - d_loc) / d_scale )
    map(x) -= median(map(x))                       only when the recipe centres (per image, its own median)
    score   = max(map)  or  mean(top 1% of map)

``rd_loc``/``rd_scale`` and ``d_loc``/``d_scale`` put both maps in units of their spread on defect-free validation
images (median and 99th-percentile pixel), so the fusion weight ``a`` means the same on every part. With ``a = 0``
and no normalisation this is exactly the RD paper's map.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian, length ``2 * int(truncate * sigma + 0.5) + 1`` (33 for sigma 4), float32."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


def reflect_index(n: int, radius: int) -> Tensor:
    """Indices that pad a length-``n`` axis by ``radius`` on both sides the way scipy's ``mode='reflect'`` does."""
    idx = torch.arange(-radius, n + radius)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


@dataclass(frozen=True)
class ScoreRecipe:
    """One scoring setting (a candidate of the selection, or the chosen one).

    Attributes:
        weights: weight of the stride-4, -8, -16 cosine maps.
        standardize: compare ``(f - mu) / sd`` with ``(d - mu) / sd`` per channel (training statistics).
        reduction: ``max`` (RD paper) or ``topk`` (mean of the top ``topk`` fraction of pixels).
        topk: fraction of pixels averaged by ``reduction == "topk"``.
        density_weight: ``a`` above, 0 = RD alone (no density part in the bundle).
        rd_norm: ``(loc, scale)`` of the RD map on good validation pixels (``(0, 1)``: raw units).
        density_norm: ``(loc, scale)`` of the density map on good validation pixels.
        centre: subtract each image's own median from its map (:func:`centre_map`), chosen per run by
            :func:`training.selection.choose_centring`.
    """

    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    standardize: bool = False
    reduction: Literal["max", "topk"] = "max"
    topk: float = 0.01
    density_weight: float = 0.0
    rd_norm: tuple[float, float] = (0.0, 1.0)
    density_norm: tuple[float, float] = (0.0, 1.0)
    centre: bool = False

    @property
    def uses_density(self) -> bool:
        return self.density_weight > 0

    def name(self) -> str:
        """Short human-readable label, e.g. ``s[0,1,1] std top1% dens0.5``."""
        w = ",".join(f"{x:g}" for x in self.weights)
        parts = [f"s[{w}]", "std" if self.standardize else "raw"]
        parts.append("max" if self.reduction == "max" else f"top{self.topk * 100:g}%")
        if self.uses_density:
            parts.append(f"dens{self.density_weight:g}")
        if self.centre:
            parts.append("ctr")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"], d["rd_norm"], d["density_norm"] = list(self.weights), list(self.rd_norm), list(self.density_norm)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreRecipe:
        return cls(
            weights=tuple(float(x) for x in d["weights"]),  # type: ignore[arg-type]
            standardize=bool(d["standardize"]),
            reduction=d["reduction"],
            topk=float(d["topk"]),
            density_weight=float(d["density_weight"]),
            rd_norm=tuple(float(x) for x in d["rd_norm"]),  # type: ignore[arg-type]
            density_norm=tuple(float(x) for x in d["density_norm"]),  # type: ignore[arg-type]
            centre=bool(d.get("centre", False)),  # checkpoints before 2026-12-03 have no field: not centred
        )


#: The RD paper's scoring: equal scales, raw features, max, no density.
PAPER_RECIPE = ScoreRecipe()


class Blur(nn.Module):
    """Gaussian blur matching ``scipy.ndimage.gaussian_filter(sigma, truncate=4, mode='reflect')`` on ``(B,1,H,W)``."""

    def __init__(self, image_size: tuple[int, int], sigma: float) -> None:
        super().__init__()
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.radius = (k.numel() - 1) // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("pad_h", reflect_index(image_size[0], self.radius), persistent=False)
        self.register_buffer("pad_w", reflect_index(image_size[1], self.radius), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.radius == 0:
            return x
        # scipy's 'reflect' border (d c b a | a b c d | d c b a) as a constant gather, then the separable blur.
        x = x.index_select(2, self.pad_h).index_select(3, self.pad_w)
        return F.conv2d(F.conv2d(x, self.kx), self.ky)


def _bilinear_matrix(n_out: int, n_in: int, align_corners: bool) -> np.ndarray:
    """``(n_out, n_in)`` float64: 1-D linear interpolation as ``F.interpolate(mode='bilinear')`` does it on one axis
    (``size`` given, no scale factor)."""
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def _blur_matrix(n: int, kernel: np.ndarray) -> np.ndarray:
    """``(n, n)`` float64: the 1-D blur of :class:`Blur` on one axis, scipy's 'reflect' border folded in."""
    r = (kernel.size - 1) // 2
    idx = reflect_index(n, r).numpy()
    m = np.zeros((n, n))
    rows = np.arange(n)
    for t, k in enumerate(kernel):
        np.add.at(m, (rows, idx[t : t + n]), k)
    return m


class UpBlur(nn.Module):
    """``Blur(upsample_bilinear(m))`` as two matrix products, ``A_h @ m @ A_w^T``: the same linear map.

    Upsampling and the separable blur are linear along each axis, so each axis folds into one ``(H, h)`` matrix
    (float64 product, stored float32). Measured on the 416 x 160 ONNX Runtime CPU score part, the resizes, the
    reflect gather and the two single-channel convolutions took about 1.9 ms; the products need a fraction of that.
    The matrices are made per input grid on first use with numpy, so an ONNX trace records them as constants.

    Args:
        image_size: ``(H, W)`` output.
        sigma: blur sigma in pixels (``0``: upsample only).
    """

    def __init__(self, image_size: tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.kernel = gaussian_kernel1d(sigma).double().numpy() if sigma > 0 else np.ones(1)
        self._ops: dict[tuple[int, int, bool, str], tuple[Tensor, Tensor]] = {}

    def _axis(self, n_out: int, n_in: int, align_corners: bool) -> np.ndarray:
        return _blur_matrix(n_out, self.kernel) @ _bilinear_matrix(n_out, n_in, align_corners)

    def operators(self, h: int, w: int, align_corners: bool, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(A_h (H, h), A_w^T (w, W))`` for an ``h x w`` input, float32 on ``device``."""
        key = (h, w, align_corners, str(device))
        if key not in self._ops:
            a_h = self._axis(self.image_size[0], h, align_corners)
            a_w = self._axis(self.image_size[1], w, align_corners)
            self._ops[key] = (
                torch.from_numpy(a_h.astype(np.float32)).to(device),
                torch.from_numpy(np.ascontiguousarray(a_w.T).astype(np.float32)).to(device),
            )
        return self._ops[key]

    def forward(self, m: Tensor, align_corners: bool, weight: float = 1.0) -> Tensor:
        """``(B, 1, h, w)`` -> ``weight * Blur(upsample(m))`` ``(B, 1, H, W)``."""
        a_h, a_wt = self.operators(int(m.shape[-2]), int(m.shape[-1]), align_corners, m.device)
        x = torch.matmul(a_h, m.float())  # (B, 1, H, w): the cheaper order when the input is the smaller grid
        if weight != 1.0:
            x = weight * x
        return torch.matmul(x, a_wt)


class ChannelStats(nn.Module):
    """Per-channel mean and std of the teacher features on the training images, one pair per scale.

    Buffers ``mean{k}``, ``std{k}`` of shape ``(1, C_k, 1, 1)``.
    """

    def __init__(self, channels: tuple[int, int, int]) -> None:
        super().__init__()
        for k, c in enumerate(channels):
            self.register_buffer(f"mean{k}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"std{k}", torch.ones(1, c, 1, 1))

    @torch.no_grad()
    def fit(self, feats: list[Tensor]) -> ChannelStats:
        """``feats``: per scale ``(N, C_k, h, w)`` training features."""
        for k, f in enumerate(feats):
            f = f.float()
            getattr(self, f"mean{k}").copy_(f.mean(dim=(0, 2, 3), keepdim=True))
            getattr(self, f"std{k}").copy_(f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        return self

    def apply(self, k: int, x: Tensor) -> Tensor:
        return (x - getattr(self, f"mean{k}")) / getattr(self, f"std{k}")


def aggregate_features(feats: list[Tensor] | tuple[Tensor, ...], k: int) -> list[Tensor]:
    """Each ``(B, C, h, w)`` map averaged over its ``k x k`` neighbourhood, stride 1, the zero padding not counted
    (PatchCore's local aggregation; border positions average fewer cells); ``k <= 1`` returns them as they are."""
    if k <= 1:
        return list(feats)
    return [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in feats]


class DensityHead(nn.Module):
    """Per-position Gaussian density of the teacher features (PaDiM, Defard et al. 2021), at stride 8.

    ``x = concat(avgpool2(f1), f2, upsample2(f3))`` ``(B, c1+c2+c3, H/8, W/8)``; a PCA fitted on the training
    features keeps ``dims`` directions (deviation from PaDiM's random channel subset: a 64-dim Gaussian per position
    keeps the part at 4 MB at 256 px instead of 164 MB); the map is the Mahalanobis distance of each position to its
    own mean and (shrunk) covariance.

    Input ``f1 (B,c1,H/4,W/4), f2 (B,c2,H/8,W/8), f3 (B,c3,H/16,W/16)``; output ``density_map (B, 1, H/8, W/8)``.

    **Optional position-free kNN blend** (``knn > 0`` memory-bank rows; PatchCore, Roth et al. 2022): the distance of
    each stride-8 patch (3x3-averaged stride-8 and upsampled stride-16 features) to its nearest neighbour in a greedy
    coreset of the training patches. The per-position Gaussian cannot follow parts that are not aligned (tiles of
    varying shape, textures); the kNN map can, but alone it loses AUPRO. With a bank the output is
    ``(1 - b) * (gauss - g_loc) / g_scale + b * (knn - k_loc) / k_scale``, both maps in units of their spread on the
    good validation images, ``b`` chosen by the validation signal (:func:`training.selection.choose_knn_blend`).

    **Optional wide Gaussian** (``aggregate = k > 0``; PatchCore's local aggregation): a second per-position
    Gaussian fitted on the teacher maps averaged over ``k x k`` (stride 1, zero padding not counted), which sees a
    wider neighbourhood per position (large, low-contrast defects) and smears thin ones. With it the Gaussian term is
    ``(1 - a) * (g - g_loc) / g_scale + a * (wide - w_loc) / w_scale``, ``a`` chosen by the validation signal
    (:func:`training.selection.choose_wide_blend`); the kNN blend, if any, is applied to that term.
    The part keeps its inputs and output, so bundles, export and runtime are unchanged.
    """

    def __init__(
        self,
        channels: tuple[int, int, int],
        image_size: tuple[int, int],
        dims: int = 64,
        knn: int = 0,
        aggregate: int = 0,
    ) -> None:
        super().__init__()
        if aggregate < 0 or (aggregate and aggregate % 2 == 0):
            raise ValueError(f"aggregate must be 0 (no wide Gaussian) or an odd window >= 1, got {aggregate}")
        c = sum(channels)
        self.grid = (image_size[0] // 8, image_size[1] // 8)
        p = self.grid[0] * self.grid[1]
        self.dims = min(dims, c)
        self.knn = int(knn)
        self.register_buffer("center", torch.zeros(c, 1))
        self.register_buffer("basis", torch.eye(c)[: self.dims].clone())  # (d, C)
        self.register_buffer("mean", torch.zeros(self.dims, p))  # (d, P)
        self.register_buffer("chol", torch.eye(self.dims).expand(p, -1, -1).clone())  # (P, d, d), precision = L L^T
        if self.knn:
            ck = channels[1] + channels[2]
            self.register_buffer("bank", torch.zeros(self.knn, ck))  # (M, c2 + c3)
            self.register_buffer("bank_sq", torch.zeros(self.knn))  # (M,) squared norms
            # blend b, (g_loc, g_scale), (k_loc, k_scale)
            self.register_buffer("blend", torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]))
        self.aggregate = int(aggregate)
        if self.aggregate:
            self.wide = DensityHead(channels, image_size, dims)
            # share a, (g_loc, g_scale), (w_loc, w_scale)
            self.register_buffer("wide_blend", torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]))

    def embed(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        """``(B, C, P)`` stride-8 features, P = H/8 * W/8."""
        x = torch.cat(
            [F.avg_pool2d(f1, 2), f2, F.interpolate(f3, size=self.grid, mode="bilinear", align_corners=False)], dim=1
        )
        return x.flatten(2)

    def gaussian(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        """The Gaussian term ``(B, 1, H/8, W/8)``: the Mahalanobis map, blended with the wide Gaussian's if any."""
        g = self.mahalanobis(f1, f2, f3)
        if not self.aggregate:
            return g
        a, gl, gs, wl, ws = self.wide_blend.unbind(0)
        return (1.0 - a) * (g - gl) / gs + a * (self.wide_map(f1, f2, f3) - wl) / ws

    def wide_map(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        """The wide Gaussian's Mahalanobis map of the ``aggregate x aggregate``-averaged features."""
        if not self.aggregate:
            raise ValueError("wide_map needs a head built with aggregate > 0")
        return self.wide.mahalanobis(*aggregate_features((f1, f2, f3), self.aggregate))

    def mahalanobis(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        """The Mahalanobis map ``(B, 1, H/8, W/8)`` of this head's own Gaussian alone."""
        x = self.embed(f1, f2, f3) - self.center  # (B, C, P)
        y = torch.matmul(self.basis, x) - self.mean  # (B, d, P)
        z = torch.matmul(y.permute(2, 0, 1), self.chol)  # (P, B, d)
        dist = torch.sqrt(z.pow(2).sum(dim=2).clamp_min(0.0))  # (P, B)
        return dist.transpose(0, 1).reshape(-1, 1, *self.grid)

    def patches(self, f2: Tensor, f3: Tensor) -> Tensor:
        """PatchCore's patch features on the stride-8 grid: ``(B, P, c2 + c3)``."""
        a = F.avg_pool2d(f2, 3, stride=1, padding=1, count_include_pad=False)
        b = F.interpolate(
            F.avg_pool2d(f3, 3, stride=1, padding=1, count_include_pad=False),
            size=self.grid,
            mode="bilinear",
            align_corners=False,
        )
        return torch.cat([a, b], dim=1).flatten(2).transpose(1, 2)

    def nearest(self, f2: Tensor, f3: Tensor) -> Tensor:
        """The kNN map ``(B, 1, H/8, W/8)``: distance of each patch to its nearest memory-bank row."""
        q = self.patches(f2, f3)  # (B, P, C)
        d2 = q.pow(2).sum(dim=2, keepdim=True) - 2.0 * torch.matmul(q, self.bank.t()) + self.bank_sq  # (B, P, M)
        dist = torch.sqrt(d2.amin(dim=2).clamp_min(0.0))  # (B, P)
        return dist.reshape(-1, 1, *self.grid)

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        g = self.gaussian(f1, f2, f3)
        if not self.knn:
            return g
        b, gl, gs, kl, ks = self.blend.unbind(0)
        return (1.0 - b) * (g - gl) / gs + b * (self.nearest(f2, f3) - kl) / ks

    @torch.no_grad()
    def fit_knn(self, feats: list[Tensor], batch: int = 16, seed: int = 0) -> DensityHead:
        """Fill the memory bank with a greedy k-centre coreset of the training patches (distances on a random
        128-d projection, as PatchCore does); ``blend`` stays 0 until :meth:`set_blend`."""
        if not self.knn:
            raise ValueError("fit_knn needs a head built with knn > 0 (memory-bank rows)")
        n = feats[0].shape[0]
        bank = torch.cat([self.patches(feats[1][i : i + batch].float(), feats[2][i : i + batch].float()).flatten(0, 1)
                          for i in range(0, n, batch)])  # fmt: skip
        m = min(self.knn, bank.shape[0])
        g = torch.Generator().manual_seed(seed)
        z = bank @ (torch.randn(bank.shape[1], min(128, bank.shape[1]), generator=g) / 128**0.5)
        zsq = z.pow(2).sum(1)
        idx = [int(torch.randint(bank.shape[0], (1,), generator=g))]
        mind = zsq - 2.0 * (z @ z[idx[0]]) + zsq[idx[0]]
        for _ in range(m - 1):
            i = int(torch.argmax(mind))
            idx.append(i)
            mind = torch.minimum(mind, zsq - 2.0 * (z @ z[i]) + zsq[i])
        chosen = bank[idx]
        if m < self.knn:  # fewer patches than rows: repeat the last (a duplicate never changes the minimum)
            chosen = torch.cat([chosen, chosen[-1:].expand(self.knn - m, -1)])
        self.bank.copy_(chosen)
        self.bank_sq.copy_(chosen.pow(2).sum(1))
        return self

    def drop_knn(self) -> None:
        """Turn this head into the plain Gaussian head (no bank, raw Mahalanobis output), in place."""
        for name in ("bank", "bank_sq", "blend"):
            delattr(self, name)
        self.knn = 0

    def set_blend(self, b: float, gauss_norm: tuple[float, float], knn_norm: tuple[float, float]) -> None:
        """``b``: share of the kNN map; the norms: ``(loc, scale)`` of each map on good validation images."""
        self.blend.copy_(torch.tensor([b, *gauss_norm, *knn_norm], dtype=torch.float32))

    @torch.no_grad()
    def fit_wide(self, feats: list[Tensor], batch: int = 8) -> DensityHead:
        """Fit the wide Gaussian on the training features (aggregated batch by batch); its share stays 0 until
        :meth:`set_wide_blend`."""
        if not self.aggregate:
            raise ValueError("fit_wide needs a head built with aggregate > 0")
        self.wide.fit(feats, batch=batch, aggregate=self.aggregate)
        return self

    def set_wide_blend(self, a: float, gauss_norm: tuple[float, float], wide_norm: tuple[float, float]) -> None:
        """``a``: share of the wide Gaussian; the norms: ``(loc, scale)`` of each map on good validation images."""
        self.wide_blend.copy_(torch.tensor([a, *gauss_norm, *wide_norm], dtype=torch.float32))

    def drop_wide(self) -> None:
        """Remove the wide Gaussian (the Gaussian term is this head's own Mahalanobis map again), in place."""
        del self.wide
        delattr(self, "wide_blend")
        self.aggregate = 0

    @torch.no_grad()
    def fit(
        self,
        feats: list[Tensor],
        batch: int = 8,
        shrink: float | Literal["lw"] = 0.01,
        window: int = 1,
        pool: str = "cov",
        aggregate: int = 1,
    ) -> DensityHead:
        """Fit on training features (per scale ``(N, C_k, h, w)``), streaming: memory is one batch of embeddings
        plus ``C x C`` and ``N x dims x P`` accumulators, whatever the teacher's width.

        Args:
            feats: the training images' teacher features (RAM or memmap).
            batch: images embedded at a time.
            shrink: covariance shrinkage ``Sigma + shrink * mean_eigenvalue * I`` (PaDiM adds 0.01 I), or ``"lw"``:
                ``(1 - rho) Sigma + rho * mean_eigenvalue * I`` with each position's Ledoit-Wolf ``rho``.
            window: ``w x w`` grid neighbourhood whose statistics each position pools (1: PaDiM, each position
                alone). With ~200 training images a 64-dim covariance per position rests on few samples; pooling
                a neighbourhood gives it ``w * w`` times as many.
            pool: ``cov`` pools only the within-position scatter (each position keeps its own mean), ``both``
                pools mean and covariance (each position models its whole neighbourhood: tolerant of shifts).
            aggregate: each batch's maps averaged over ``aggregate x aggregate`` first (:func:`aggregate_features`;
                1: as they are). The wide Gaussian is fitted this way.
        """
        n = feats[0].shape[0]

        def chunks() -> Iterator[Tensor]:
            for i in range(0, n, batch):
                maps = aggregate_features([f[i : i + batch].float() for f in feats], aggregate)
                yield self.embed(*maps)  # (b, C, P)

        c = sum(int(f.shape[1]) for f in feats)
        total, s1, s2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
        for e in chunks():  # global mean and covariance of the position vectors, for the PCA
            flat = e.permute(0, 2, 1).reshape(-1, c).double()
            total += flat.shape[0]
            s1 += flat.sum(0)
            s2 += flat.T @ flat
        center = s1 / total
        cov = (s2 - total * torch.outer(center, center)) / max(total - 1, 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending
        basis = vecs[:, -self.dims :].flip(1).T.float()  # (d, C), largest variance first
        center32 = center.float().view(1, c, 1)
        y = torch.cat([torch.matmul(basis, e - center32) for e in chunks()]).double()  # (N, d, P)
        mu = y.mean(0)  # (d, P)
        yc = (y - mu).permute(2, 0, 1)  # (P, N, d)
        sig = torch.einsum("pnd,pne->pde", yc, yc) / max(n - 1, 1)
        if window > 1:
            if pool not in ("cov", "both"):
                raise ValueError(f"pool must be 'cov' or 'both', got {pool!r}")
            gh, gw = self.grid

            def box(x: Tensor) -> Tensor:  # (P, ...) -> the same, each position the mean of its w x w neighbours
                shape = x.shape
                g = x.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
                g = F.avg_pool2d(g, window, stride=1, padding=window // 2, count_include_pad=False)
                return g.permute(0, 2, 3, 1).reshape(shape)

            if pool == "cov":
                sig = box(sig)
            else:  # pooled second moment minus the pooled mean's outer product
                m = mu.T  # (P, d)
                second = box(sig * (n - 1) / n + torch.einsum("pd,pe->pde", m, m))
                m = box(m)
                sig = (second - torch.einsum("pd,pe->pde", m, m)) * n / max(n - 1, 1)
                mu = m.T.contiguous()
        eye = torch.eye(self.dims, dtype=sig.dtype)
        if shrink == "lw":  # Ledoit-Wolf (2004): the shrinkage towards mu * I that the samples themselves call for
            if window > 1:
                raise ValueError("shrink='lw' needs window=1 (the pooled covariance has no single sample set)")
            ml = sig * (n - 1) / n  # (P, d, d)
            mu_s = torch.diagonal(ml, dim1=1, dim2=2).mean(dim=1)  # (P,)
            delta = (ml - mu_s.view(-1, 1, 1) * eye).pow(2).sum(dim=(1, 2))
            beta = (yc.pow(2).sum(dim=2).pow(2).sum(dim=1) - n * ml.pow(2).sum(dim=(1, 2))) / n**2
            rho = (beta / delta.clamp_min(1e-30)).clamp(0.0, 1.0).view(-1, 1, 1)
            self.lw_rho = rho.flatten().float()  # for diagnosis; not a buffer (the bundle does not need it)
            sig = (1.0 - rho) * ml + rho * mu_s.view(-1, 1, 1) * eye
        else:
            eps = float(shrink) * torch.diagonal(sig, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
            sig = sig + eps.view(-1, 1, 1) * eye
        prec = torch.linalg.inv(sig)
        prec = 0.5 * (prec + prec.transpose(1, 2))
        chol = torch.linalg.cholesky(prec)
        self.center.copy_(center.view(c, 1).float())
        self.basis.copy_(basis)
        self.mean.copy_(mu.float())
        self.chol.copy_(chol.float())
        return self


def cosine_maps(
    feats: list[Tensor], recon: list[Tensor], stats: ChannelStats | None, standardize: bool
) -> list[Tensor]:
    """Per scale ``1 - cos_channel`` maps ``(B, 1, h_k, w_k)``, after standardisation if asked."""
    out = []
    for k, (f, d) in enumerate(zip(feats, recon, strict=True)):
        f, d = f.float(), d.float()
        if standardize:
            if stats is None:
                raise ValueError("standardize needs channel statistics")
            f, d = stats.apply(k, f), stats.apply(k, d)
        out.append(1.0 - F.cosine_similarity(f, d, dim=1).unsqueeze(1))
    return out


def reduce_map(amap: Tensor, reduction: str, topk: float) -> Tensor:
    """``(B, 1, H, W)`` -> ``(B,)``: max, or mean of the top ``topk`` fraction of pixels.

    ``k`` comes from the map's static size (Python ints, so the ONNX exporter writes a constant ``TopK``).
    """
    flat = amap.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    n_pixels = int(amap.shape[-2]) * int(amap.shape[-1])
    k = max(1, int(round(topk * n_pixels)))
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def centre_map(amap: Tensor, grid: int = 64) -> Tensor:
    """``(B, 1, H, W)`` maps, each minus its own lower median, taken on every ``s``-th row and column (``s = H //
    grid``: at most about ``grid x grid`` pixels; the map is blurred, so the subsample loses nothing).

    Why: on parts whose good images differ in overall map level (lighting, texture density), a global threshold sees
    those offsets as anomalies; a defect that covers less than half of the image leaves the median alone. The median
    is a ``TopK`` of the smallest half (static ``k`` from the static map size), which ONNX and TensorRT export.
    """
    st = max(1, int(amap.shape[-2]) // grid)
    sub = amap[:, :, ::st, ::st].flatten(1)
    n = ((int(amap.shape[-2]) + st - 1) // st) * ((int(amap.shape[-1]) + st - 1) // st)
    med = torch.topk(sub, (n + 1) // 2, dim=1, largest=False).values.amax(dim=1)  # (B,) the lower median
    return amap - med.view(-1, 1, 1, 1)


class AnomalyScorer(nn.Module):
    """``(f1, f2, f3, d1, d2, d3)`` -> ``(anomaly_map (B, 1, H, W), score (B,))`` for a recipe without density.

    Args:
        image_size: ``(H, W)`` of the model input; maps are upsampled to it.
        sigma: Gaussian blur sigma in pixels (RD: 4). ``0`` disables the blur.
        recipe: the scoring setting (default: the RD paper's).
        stats: channel statistics (needed when ``recipe.standardize``).
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        sigma: float = 4.0,
        recipe: ScoreRecipe | None = None,
        stats: ChannelStats | None = None,
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.sigma = float(sigma)
        self.recipe = recipe or PAPER_RECIPE
        if self.recipe.standardize and stats is None:
            raise ValueError("recipe.standardize needs channel statistics")
        self.stats = stats if self.recipe.standardize else None
        self.upblur = UpBlur(self.image_size, self.sigma)

    def rd_terms(
        self, f1: Tensor, f2: Tensor, f3: Tensor, d1: Tensor, d2: Tensor, d3: Tensor, share: float = 1.0
    ) -> tuple[Tensor, float]:
        """``share`` times the blurred RD map normalised by ``recipe.rd_norm``, as ``(map part, constant)``.

        The map part is the weighted sum of the blurred, upsampled cosine maps divided by the norm's scale; the
        constant is the norm's ``-loc / scale`` (a blur leaves a constant as it is, so it is added once at the end).
        """
        r = self.recipe
        loc, scale = r.rd_norm
        maps = cosine_maps([f1, f2, f3], [d1, d2, d3], self.stats, r.standardize)
        # Every scale is computed even at weight 0, so the exported score part keeps all six inputs of the part
        # contract (the ONNX exporter drops inputs nothing uses); the cost is one small product.
        terms = [self.upblur(m, True, share * w / scale) for w, m in zip(r.weights, maps, strict=True)]
        amap = terms[0]
        for t in terms[1:]:
            amap = amap + t
        return amap, -share * loc / scale

    def finish(self, amap: Tensor) -> tuple[Tensor, Tensor]:
        """Blurred map -> ``(map, score)``: centred when the recipe says so, then reduced."""
        if self.recipe.centre:
            amap = centre_map(amap)
        return amap, reduce_map(amap, self.recipe.reduction, self.recipe.topk)

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor, d1: Tensor, d2: Tensor, d3: Tensor) -> tuple[Tensor, Tensor]:
        amap, const = self.rd_terms(f1, f2, f3, d1, d2, d3)
        return self.finish(amap + const if const else amap)


class FusedScorer(AnomalyScorer):
    """Like :class:`AnomalyScorer` with a seventh input, ``density_map (B, 1, H/8, W/8)``, fused by the recipe."""

    def forward(  # type: ignore[override]
        self, f1: Tensor, f2: Tensor, f3: Tensor, d1: Tensor, d2: Tensor, d3: Tensor, density_map: Tensor
    ) -> tuple[Tensor, Tensor]:
        r = self.recipe
        a = r.density_weight
        loc, scale = r.density_norm
        amap, const = self.rd_terms(f1, f2, f3, d1, d2, d3, share=1.0 - a)
        amap = amap + self.upblur(density_map, False, a / scale)
        const -= a * loc / scale
        return self.finish(amap + const if const else amap)


@dataclass
class Scoring:
    """The inference-side scoring of a run: recipe, scorer, and the density head when the recipe uses one."""

    recipe: ScoreRecipe
    scorer: AnomalyScorer
    density: DensityHead | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Scoring:
        self.scorer.to(device)
        if self.density is not None:
            self.density.to(device)
        return self

    def __call__(self, feats: list[Tensor], recon: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Teacher and student maps -> ``(anomaly_map (B,1,H,W), score (B,))``."""
        if self.density is not None:
            return self.scorer(*feats, *recon, self.density(*feats))
        return self.scorer(*feats, *recon)


def build_scoring(
    state: dict[str, Any] | None, channels: tuple[int, int, int], image_size: tuple[int, int], sigma: float
) -> Scoring:
    """Rebuild the scoring stored in a checkpoint (``ckpt["scoring"]``); ``None`` -> the RD paper's scoring."""
    if not state:
        return Scoring(PAPER_RECIPE, AnomalyScorer(image_size, sigma))
    recipe = ScoreRecipe.from_dict(state["recipe"])
    stats = None
    if recipe.standardize:
        stats = ChannelStats(channels)
        stats.load_state_dict(state["stats"])
    density = None
    if recipe.uses_density:
        density = DensityHead(
            channels,
            image_size,
            int(state["density_dims"]),
            int(state.get("density_knn", 0)),
            int(state.get("density_aggregate", 0)),
        )
        density.load_state_dict(state["density"])
        density.eval()
        scorer: AnomalyScorer = FusedScorer(image_size, sigma, recipe, stats)
    else:
        scorer = AnomalyScorer(image_size, sigma, recipe, stats)
    return Scoring(recipe, scorer.eval(), density, dict(state.get("info", {})))


def scoring_state(
    recipe: ScoreRecipe, stats: ChannelStats | None, density: DensityHead | None, info: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint stores under ``"scoring"`` (plain dict of tensors and JSON-able values)."""
    state: dict[str, Any] = {"recipe": recipe.to_dict(), "info": info}
    if recipe.standardize and stats is not None:
        state["stats"] = {k: v.detach().cpu() for k, v in stats.state_dict().items()}
    if recipe.uses_density and density is not None:
        state["density"] = {k: v.detach().cpu() for k, v in density.state_dict().items()}
        state["density_dims"] = density.dims
        state["density_knn"] = density.knn
        state["density_aggregate"] = density.aggregate
    return state
