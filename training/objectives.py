"""Training objectives beyond plain RD: SimCLR-auxiliary alignment (``aux``) and RD++ (``rdpp``).

Both read the projected features by a forward hook on ``model.projection`` while the model runs through its own
``forward`` (so a DistributedDataParallel wrapper sees every forward and synchronises every gradient), and keep
their training-only parts (auxiliary backbone, width adapters, noise bank) outside the inference model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from training.backbones import get_spec
from training.config import TrainConfig
from training.errors import ConfigError
from training.loss import flattened_cosine_loss
from training.model import ReverseDistillation
from training.train import Objective

log = logging.getLogger(__name__)


class _Tap:
    """Forward hook that keeps the last output of a module while armed: ``[p1, p2, p3]``."""

    def __init__(self, module: nn.Module) -> None:
        self.armed = False
        self.out: list[Tensor] | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: list[Tensor]) -> None:
        if self.armed:
            self.out = list(output)

    def run(self, student: nn.Module, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``student(*feats)`` -> (projected feats, decoder feats)."""
        self.armed, self.out = True, None
        try:
            recon = student(*feats)
        finally:
            self.armed = False
        assert self.out is not None
        proj, self.out = self.out, None
        return proj, recon


def _grad_allreduce(p: Tensor) -> None:
    """Average a parameter's gradient across ranks (for trainable parts outside the DDP-wrapped model)."""

    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()

    p.register_hook(hook)


class Renormalize(nn.Module):
    """Teacher-normalised images -> auxiliary-normalised: ``((x * s_t + m_t) - m_a) / s_a`` per channel."""

    def __init__(self, src: tuple[tuple[float, ...], tuple[float, ...]], dst: tuple[tuple[float, ...], ...]) -> None:
        super().__init__()
        (ms, ss), (md, sd) = src, dst
        scale = torch.tensor(ss) / torch.tensor(sd)
        shift = (torch.tensor(ms) - torch.tensor(md)) / torch.tensor(sd)
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.register_buffer("shift", shift.view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class AuxObjective(Objective):
    """RD + SimCLR auxiliary: ``L = L_KD(teacher, decoder) + lambda * L_align(adapter(p_k), aux_k)``.

    The SimCLR backbone is loaded frozen (eval mode, no gradients) from ``aux_dir`` and sees its own normalisation.
    ``L_align`` is the flattened cosine loss (:func:`training.loss.flattened_cosine_loss`) over ``extra.aux.scales``
    between the projected teacher features and the auxiliary's. Where widths differ, a 1x1 conv adapter (training
    only, saved under ``checkpoint["aux"]``) maps the projection's width to the auxiliary's; for the default, an
    auxiliary of the teacher's architecture, the adapters are identities. The auxiliary's weights are never saved in
    the run: the SimCLR folder is their source.
    """

    def __init__(self, cfg: TrainConfig, model: ReverseDistillation, aux_dir: str | Path) -> None:
        from training.simclr import load_aux_backbone

        device = next(model.ocbe.parameters()).device
        self.aux_dir = str(aux_dir)
        self.aux, self.aux_name = load_aux_backbone(aux_dir)
        self.aux.to(device)
        t_spec, a_spec = get_spec(cfg.model.backbone), get_spec(self.aux_name)
        self.renorm: nn.Module = nn.Identity()
        if (t_spec.mean, t_spec.std) != (a_spec.mean, a_spec.std):
            self.renorm = Renormalize((t_spec.mean, t_spec.std), (a_spec.mean, a_spec.std)).to(device)
        self.scales = list(cfg.extra.aux.scales)
        self.weight = cfg.extra.aux.weight
        self.proj_lr = cfg.extra.aux.proj_lr
        self.adapters = nn.ModuleList(
            [
                nn.Identity() if ct == ca else nn.Conv2d(ct, ca, 1)
                for ct, ca in zip(t_spec.channels, a_spec.channels, strict=True)
            ]
        ).to(device)
        if dist.is_available() and dist.is_initialized():
            for p in self.adapters.parameters():
                _grad_allreduce(p)
        self.tap = _Tap(model.projection)
        log.info(
            "auxiliary: SimCLR %s from %s, lambda %.3g, scales %s%s",
            self.aux_name,
            aux_dir,
            self.weight,
            self.scales,
            "" if t_spec.channels == a_spec.channels else f", 1x1 adapters {t_spec.channels} -> {a_spec.channels}",
        )

    def parameters_groups(self, model: ReverseDistillation, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        proj = [p for p in model.projection.parameters() if p.requires_grad] + list(self.adapters.parameters())
        rest = list(model.ocbe.parameters()) + list(model.decoder.parameters())
        lr = self.proj_lr or cfg.optim.lr
        groups = [{"params": rest, "lr": cfg.optim.lr}, {"params": proj, "lr": lr}]
        return [torch.optim.Adam(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)]

    def loss(self, student: nn.Module, feats: list[Tensor], images: Tensor) -> tuple[Tensor, dict[str, float]]:
        proj, recon = self.tap.run(student, feats)
        kd = flattened_cosine_loss(feats, recon)
        if self.weight == 0:  # the control: the same trainable heads, trained by the KD loss alone
            return kd, {"kd": float(kd.detach()), "align": 0.0}
        with torch.no_grad():
            target = self.aux(self.renorm(images))
        align = flattened_cosine_loss(
            [self.adapters[s](proj[s]) for s in self.scales], [target[s] for s in self.scales]
        )
        loss = kd + self.weight * align
        return loss, {"kd": float(kd.detach()), "align": float(align.detach())}

    def state_dict(self) -> dict[str, Any] | None:
        return {
            "kind": "aux",
            "simclr_dir": self.aux_dir,
            "backbone": self.aux_name,
            "adapters": self.adapters.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapters.load_state_dict(state["adapters"])


def sinkhorn_divergence(x: Tensor, y: Tensor, blur: float = 0.05, iters: int = 50) -> Tensor:
    """Debiased entropic OT (Sinkhorn divergence) between uniform point clouds, log-domain, geomloss conventions.

    ``S(a, b) = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2`` with cost ``|x - y|^2 / 2`` and ``epsilon = blur^2`` (what
    ``geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, debias=True)`` computes, without its epsilon-scaling
    schedule: a fixed epsilon and ``iters`` iterations).

    Args:
        x: ``(N, D)`` points.
        y: ``(M, D)`` points.

    Returns:
        Scalar divergence (>= 0 up to numerical error; 0 when ``x`` and ``y`` are the same set).
    """
    eps = blur**2

    def cost(a: Tensor, b: Tensor) -> Tensor:
        return 0.5 * torch.cdist(a, b).pow(2)

    def ot(a: Tensor, b: Tensor, symmetric: bool) -> Tensor:
        c = cost(a, b)
        log_wa = torch.full((a.shape[0],), -torch.log(torch.tensor(float(a.shape[0]))).item(), device=a.device)
        log_wb = torch.full((b.shape[0],), -torch.log(torch.tensor(float(b.shape[0]))).item(), device=a.device)
        f = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        g = torch.zeros(b.shape[0], device=a.device, dtype=a.dtype)
        for _ in range(iters):
            g_new = -eps * torch.logsumexp(log_wa.view(-1, 1) + (f.view(-1, 1) - c) / eps, dim=0)
            if symmetric:  # OT(a, a): averaged updates converge faster and keep f == g
                g = f = 0.5 * (g + g_new)
            else:
                g = g_new
                f = -eps * torch.logsumexp(log_wb.view(1, -1) + (g.view(1, -1) - c) / eps, dim=1)
        return f.mean() + g.mean()

    return ot(x, y, False) - 0.5 * ot(x, x, True) - 0.5 * ot(y, y, True)


class RDPPObjective(Objective):
    """RD++ (Tien et al., CVPR 2023): ``L = L_KD + w * (L_ssot + 0.01 L_recon + 0.1 L_contrast) / 1.11``.

    Semantics of the official ``Revisit_RDLoss`` / ``main.py``, per scale k (weights from ``extra.rdpp``):

    - ``L_ssot``: Sinkhorn divergence between the batch's projected features (softmax over each flattened
      ``C*H*W`` vector, one point per image) and the same batch shuffled. Note: the shuffled batch is the same point
      set, so the debiased divergence is 0 up to numerical error - a property of the official objective, kept as is
      and logged (``ssot``) so anyone can see it.
    - ``L_recon``: ``mean(1 - cos_channel(proj(teacher(noisy)), proj(teacher(image))))``: the projection must map a
      pseudo-anomalous image back to its clean features.
    - ``L_contrast``: ``CosineEmbeddingLoss(margin)`` with target -1 between the flattened teacher features of the
      noisy image and the projected clean features: ``mean(max(0, cos - margin))``.
    - Pseudo-anomalies: simplex-noise patches added in ``[0, 1]`` image space (:class:`training.simplex
      .PseudoAnomaly`); our images are normalised, so the noise is divided by the teacher's std (no clipping, as in
      the official code). ``noise_ms`` in the training log is the time spent making the noise per step.
    - Two Adam optimisers: decoder + OCBE at ``optim.lr`` (0.005), projection at ``extra.rdpp.proj_lr`` (0.001).
    """

    def __init__(self, cfg: TrainConfig, model: ReverseDistillation) -> None:
        from training.simplex import PseudoAnomaly

        r = cfg.extra.rdpp
        self.r = r
        spec = get_spec(cfg.model.backbone)
        device = next(model.ocbe.parameters()).device
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.noise = PseudoAnomaly(
            cfg.data.input_hw(),
            (r.noise_min, r.noise_max),
            r.noise_scale,
            r.octaves,
            r.persistence,
            r.noise_bank,
            seed=cfg.seed,
        )
        self.g = torch.Generator().manual_seed(cfg.seed + 1)
        self.tap = _Tap(model.projection)
        self.teacher = model.teacher
        self.projection = model.projection

    def parameters_groups(self, model: ReverseDistillation, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        rest = list(model.ocbe.parameters()) + list(model.decoder.parameters())
        return [
            torch.optim.Adam(rest, lr=cfg.optim.lr, betas=cfg.optim.betas),
            torch.optim.Adam(model.projection.parameters(), lr=self.r.proj_lr, betas=cfg.optim.betas),
        ]

    def loss(self, student: nn.Module, feats: list[Tensor], images: Tensor) -> tuple[Tensor, dict[str, float]]:
        t0 = time.perf_counter()
        noisy = images + self.noise(images.shape[0]).to(images.device) / self.std
        noise_ms = 1000 * (time.perf_counter() - t0)
        proj, recon = self.tap.run(student, feats)
        with torch.no_grad():
            feats_noise = self.teacher(noisy)
        proj_noise = self.projection(*feats_noise)
        kd = flattened_cosine_loss(feats, recon)
        b = images.shape[0]
        perm = torch.randperm(b, generator=self.g).to(images.device)
        target = -torch.ones(b, device=images.device)
        ssot = recon_l = contrast = torch.zeros((), device=images.device)
        for p, pn, fn in zip(proj, proj_noise, feats_noise, strict=True):
            sp = torch.softmax(p.flatten(1), dim=-1)
            ssot = ssot + sinkhorn_divergence(sp, sp[perm], self.r.sinkhorn_blur, self.r.sinkhorn_iters)
            recon_l = recon_l + (1 - F.cosine_similarity(pn, p, dim=1)).mean()
            contrast = contrast + F.cosine_embedding_loss(fn.flatten(1), p.flatten(1), target, margin=self.r.margin)
        r = self.r
        proj_loss = (r.w_ssot * ssot + r.w_recon * recon_l + r.w_contrast * contrast) / r.norm
        loss = kd + r.weight * proj_loss
        parts = {
            "kd": float(kd.detach()),
            "ssot": float(ssot.detach()),
            "recon": float(recon_l.detach()),
            "contrast": float(contrast.detach()),
            "noise_ms": noise_ms,
        }
        return loss, parts


def build(cfg: TrainConfig, model: ReverseDistillation, aux_dir: str | Path | None) -> Objective:
    """The objective for ``cfg.model.projection`` ("aux" needs ``aux_dir``; "rdpp" must not get one)."""
    kind = cfg.model.projection
    if kind == "aux":
        if aux_dir is None:
            raise ConfigError("model.projection 'aux' needs a SimCLR folder: rdedge train --aux SIMCLR_DIR")
        return AuxObjective(cfg, model, aux_dir)
    if kind == "rdpp":
        if aux_dir is not None:
            raise ConfigError("--aux cannot be combined with model.projection 'rdpp'")
        return RDPPObjective(cfg, model)
    raise ConfigError(f"model.projection: no objective for {kind!r}")
