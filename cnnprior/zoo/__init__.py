"""The zoo: a population of small CNNs of several architecture families, each trained on the config's data and
explained by the standard prior rule (`train.py --stage zoo`; docs/zoo.md)."""

from cnnprior.zoo.families import FAMILIES, build_member, family_arch
from cnnprior.zoo.sample import sample_member, sample_members
from cnnprior.zoo.stage import build_zoo, zoo_json, zoo_out, zoo_report
from cnnprior.zoo.train import load_member, train_member

__all__ = ["build_member", "build_zoo", "FAMILIES", "family_arch", "load_member", "sample_member", "sample_members",
           "train_member", "zoo_json", "zoo_out", "zoo_report"]
