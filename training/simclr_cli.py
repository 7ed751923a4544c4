"""``rdedge pretrain``: SimCLR pretraining of the auxiliary backbone (see :mod:`training.simclr`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training._deps import require

_DESCRIPTION = """\
SimCLR on the defect-free training images (train/good minus the validation split that 'rdedge train' keeps aside;
the test set is never read). The result is the auxiliary backbone for 'rdedge train --aux DIR': it only guides
training and is not part of the exported model.

Augmentation policies (--augment):
  default   the SimCLR paper's: random resized crop, horizontal flip, colour jitter (p 0.8), greyscale (p 0.2),
            Gaussian blur (p 0.5). Use it when neither colour nor orientation can be a defect.
  no-color  no colour jitter, no greyscale. Use it when colour IS the defect (e.g. swapped cable wires): jitter
            would teach the auxiliary to ignore colour.
  no-flip   no flips. Use it when orientation IS the defect (e.g. a metal nut upside down, a misplaced transistor).
  FILE.yaml a custom policy: any fields of training.augment.AugmentPolicy (crop_scale, crop_ratio, hflip_p, vflip_p,
            jitter_p, brightness, contrast, saturation, hue, grayscale_p, blur_p, blur_sigma); unknown keys are errors.

Grey images (e.g. KolektorSDD, magnetic tiles): the default jitter reduces to +-80% brightness/contrast, which can make
two views of one image unmatchable (measured on KolektorSDD: ImageNet features pick the right view 0-8% of the time
with default, 17-20% with no-color); prefer no-color there.

Writes DIR/simclr.pt, DIR/config.json and DIR/log.jsonl (loss and contrastive top-1 accuracy per epoch).
"""


def pretrain_command(args: argparse.Namespace) -> int:
    require("torch", "train", "needed for SimCLR pretraining")
    from pydantic import ValidationError

    from training.config import format_errors
    from training.errors import ConfigError
    from training.simclr import SimCLRConfig, pretrain

    given = {
        "backbone": args.backbone,
        "init": args.init,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "temperature": args.temperature,
        "augment": args.augment,
        "image_size": args.image_size,
        "lr": args.lr,
        "device": args.device,
        "seed": args.seed,
        "max_images": args.max_images,
        "max_minutes": args.max_minutes,
    }
    try:
        cfg = SimCLRConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, "rdedge pretrain")) from None
    print(pretrain(cfg, args.data, args.out, show_progress=not args.no_progress))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``pretrain`` to the ``rdedge`` parser."""
    p = sub.add_parser(
        "pretrain",
        help="SimCLR-pretrain the auxiliary backbone for 'rdedge train --aux'",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, type=Path, help="MVTec-layout category (train/good) or a folder of good images"
    )
    p.add_argument("--out", required=True, type=Path, help="SimCLR folder: simclr.pt, config.json, log.jsonl")
    p.add_argument("--backbone", help="registry backbone; use the teacher's (default efficientnet_lite0)")
    p.add_argument(
        "--init", choices=["imagenet", "scratch"], help="fine-tune ImageNet weights (default) or from scratch"
    )
    p.add_argument("--epochs", type=int, help="passes over the training images (default 100)")
    p.add_argument("--batch-size", type=int, help="images per step, 2 views each (default 32)")
    p.add_argument("--temperature", type=float, help="NT-Xent temperature (default 0.5)")
    p.add_argument("--augment", help="default | no-color | no-flip | FILE.yaml (see above; default 'default')")
    p.add_argument("--image-size", type=int, help="square side in pixels; use the RD training size (default 256)")
    p.add_argument("--lr", type=float, help="Adam lr (default 1e-4 for imagenet, 1e-3 for scratch)")
    p.add_argument("--max-images", type=int, help="at most N train/good images, chosen evenly (as in rdedge train)")
    p.add_argument("--max-minutes", type=float, help="stop at the end of the epoch that passes this wall time")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--seed", type=int, help="split, init, shuffling and augmentation seed (default 0; match training)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=pretrain_command)
