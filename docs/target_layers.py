"""Draw docs/target_layers.png: which map the GAN learns (the standard Grad-CAM target) and what its priors show.

Columns: the input; Grad-CAM at the CNN's final feature map (`priors.target: final`, the target since this
version); Grad-CAM at the raw output of the last conv (`last_conv` + `layer_outputs: raw`, the old target);
the first and last conditional prior (C0 = the deepest layers outside the target's block, C7 = all of them).

    python docs/target_layers.py --config configs/fashion_resnet18.yaml --num 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnprior.cnn.model import load_cnn
from cnnprior.core.config import load_config  # noqa: E402
from cnnprior.data.splits import load_split  # noqa: E402
from cnnprior.present.viz import colorize, make_sheet  # noqa: E402
from cnnprior.priors.extract import extractor_from  # noqa: E402
from cnnprior.priors.spec import PriorSpec, spec_from_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fashion_resnet18.yaml")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--out", default="docs/target_layers.png")
    args = p.parse_args()
    cfg = load_config(args.config)
    model, _ = load_cnn(cfg.cnn_checkpoint)
    ds = load_split(cfg.data, "test")
    images = torch.stack([ds[i]["image"] for i in range(args.num)])
    new = extractor_from(model, spec_from_config(cfg.priors))
    old = extractor_from(model, PriorSpec(size=cfg.priors.size, n=cfg.priors.n, target="last_conv",
                                          layer_outputs="raw"))
    out = new(images)
    old_target = old(images, classes=out["explained"])["target"]
    small = torch.nn.functional.interpolate(images, size=(cfg.priors.size,) * 2, mode="bilinear",
                                            align_corners=False, antialias=True)
    rows, titles = [], []
    for i in range(args.num):
        img = (small[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rows.append([img, colorize(out["target"][i].numpy()), colorize(old_target[i].numpy()),
                     colorize(out["priors"][i, 0].numpy()), colorize(out["priors"][i, -1].numpy())])
        titles.append(f"{model.class_names[int(out['explained'][i])]} (p={float(out['prob'][i]):.2f})")
    make_sheet(rows, ["input", f"target: Grad-CAM at {new.target_name[4:]}",
                      f"old: raw {old.target_name[4:]}", "prior C0", f"prior C{cfg.priors.n - 1}"],
               args.out, cell=128, titles=titles)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
