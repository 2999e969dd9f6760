"""Deterministic stand-in encoders for the feature-store tests (spec `py:store_encoders:text` / `:image`): no model,
features a fixed function of the input, so a resumed extraction can be compared bit for bit. Environment knobs
(subprocess tests): STORE_SLEEP seconds per batch; STORE_KILL_AFTER = n: SIGKILL this process after n batches
(only on rank STORE_KILL_RANK under torchrun, default 0). Run as a script (`python tests/store_encoders.py CACHE`,
or under torchrun) it extracts 20 texts into a store under CACHE, 4 items a shard, 2 a batch: 5 shards."""
import os
import signal
import sys
import time
import zlib

import torch
import torchvision.transforms as T

from plumbing import Encoder

DIM = 16


def _pace():
    _pace.batches = getattr(_pace, "batches", 0) + 1
    time.sleep(float(os.environ.get("STORE_SLEEP", "0")))
    kill = int(os.environ.get("STORE_KILL_AFTER", "0"))
    if kill and _pace.batches > kill and os.environ.get("RANK", "0") == os.environ.get("STORE_KILL_RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def text(modality, device="cpu") -> Encoder:
    """A text's features: standard normal, seeded by the CRC-32 of its UTF-8 bytes."""
    def forward(texts):
        _pace()
        return torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                            for t in texts])
    return Encoder("", "text", DIM, forward)


def image(modality, device="cpu") -> Encoder:
    """An image's features: a fixed random projection of its 8 x 8 thumbnail."""
    W = torch.randn(3 * 8 * 8, DIM, generator=torch.Generator().manual_seed(0))
    transform = T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize((8, 8)), T.ToTensor()])

    def forward(x):  # (B, 3, 8, 8)
        _pace()
        return x.flatten(1) @ W
    return Encoder("", "image", DIM, forward, transform, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)


if __name__ == "__main__":
    import plumbing
    import sotalign as so
    plumbing.SHARD_ROWS = 4
    rank, world, device = so.setup("cpu")
    args = so.Args(pairs="-", text_encoder="py:store_encoders:text", cache_dir=sys.argv[1], extract_batch_size=2)
    so.features("unpaired", "text", [f"text {i}" for i in range(20)], args, {}, rank, world, device)
