"""How much of the target do the priors already give away? Best trivial baseline r per prior-layer exclusion.

For a CNN checkpoint and its config, extracts every CAM layer's map once on the validation split, then forms the
priors for several exclusion settings and prints, per setting, the mean Pearson r with the target of each
trivial baseline (best single prior, mean of the priors, image intensity; chosen on these same val images, which
is what the GAN stage does). The default prior set is chosen so that the best trivial baseline stays <= 0.75.

    python bench/baselines.py --config configs/fashion_resnet18.yaml --num 256
"""

from __future__ import annotations

import argparse
import sys

import torch

from cnnprior.cnn.model import load_cnn
from cnnprior.core.config import load_config
from cnnprior.data.splits import load_split
from cnnprior.maps.baselines import choose
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.spec import PriorSpec

SETTINGS = {  # label -> (include_target_layer, exclude)
    "every layer, the target's block included": (True, []),
    "the target's block left out (default)": (False, []),
}


def settings_for(arch: str) -> dict[str, tuple[bool, list[str]]]:
    """The settings to compare; for ResNets also 'all but the last conv' and 'nothing from layer4'."""
    out = dict(SETTINGS)
    if arch.startswith("resnet"):
        out = {"every layer, the target's block included": (True, []),
               "all but the last conv (layer4.1's conv2)": (True, ["net.layer4.1.bn2"]),
               "the target's block layer4.1 left out (default)": (False, []),
               "nothing from layer4": (False, ["net.layer4"])}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    model, meta = load_cnn(cfg.cnn_checkpoint)
    ds = load_split(cfg.data, args.split)
    count = min(args.num, len(ds))
    images = torch.stack([ds[i]["image"] for i in range(count)])
    base = PriorSpec(cfg.priors.size, cfg.priors.n, cfg.priors.method, cfg.priors.order, cfg.priors.target,
                     True, cfg.priors.explain, [], cfg.priors.layer_outputs, cfg.priors.target_layer)
    ex = extractor_from(model, base)
    maps = torch.cat([ex.layer_maps(images[s:s + args.batch_size])[0] for s in range(0, count, args.batch_size)])
    small = torch.nn.functional.interpolate(images, size=(cfg.priors.size,) * 2, mode="bilinear",
                                            align_corners=False, antialias=True)
    print(f"{meta['arch']} ({cfg.cnn_checkpoint}), {count} {args.split} images, target {ex.target_name}")
    print(f"{'prior layers':<50} {'layers':>6} {'best prior':>11} {'mean':>6} {'image':>6} {'best':>6}")
    for label, (include, exclude) in settings_for(meta["arch"]).items():
        spec = PriorSpec(**{**base.as_dict(), "include_target_layer": include, "exclude": exclude})
        sub = extractor_from(model, spec)
        priors, target = sub.priors_from_maps(maps)
        c = choose(small, priors, target.unsqueeze(1), chosen_on=args.split)
        r = c.val_r
        print(f"{label:<50} {len(sub.average_order):>6} {r['best_prior']:>7.3f} C{c.best_prior:<2} "
              f"{r['mean_prior']:>6.3f} {r['image']:>6.3f} {max(r['best_prior'], r['mean_prior'], r['image']):>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
