"""Test-only: tiny_synth_retinanet_lazy.py with a deterministic training input (a plain 64x64 resize) and a fixed
seed, so that runs in one and in several processes train on the same images from the same weights."""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .tiny_synth_retinanet_lazy import dataloader, lr_multiplier, model, optimizer, train

dataloader.train.mapper.augmentations = [L(T.Resize)(shape=(64, 64))]
dataloader.test.dataset.names = "synth_shapes_val"
train.seed = 0
train.eval_period = 0
