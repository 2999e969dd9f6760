"""Parity check (not a test): evaluate.py's metrics against CLIP_benchmark's own functions on the same model and inputs.

Same open_clip model object (evaluate.py's cached one, so the weights are the same tensors), same images, the model's
own eval transform, same prompts, fp32 on the CPU on both sides (no autocast, so the embeddings are the same up to the
order of floating-point sums). Tasks: the shipped example splits, emoji_zeroshot (29 classes, 186 images, 4
templates) and emoji_retrieval (297 images, 1,195 captions).
CLIP_benchmark's functions: zeroshot_classification.evaluate (acc1, acc5, mean_per_class_recall) and
zeroshot_retrieval.evaluate (image_retrieval_recall@k = text -> image, text_retrieval_recall@k = image -> text).

    pip install --no-deps clip-benchmark==1.6.2 scikit-learn   # not project requirements
    python bench/evaluate_parity.py                           # random ViT-B-32 weights; --pretrained for real ones
Writes bench/evaluate_parity.md (--out for another path) and prints it.
"""
import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as ev  # noqa: E402


def captions_collate(batch):
    """CLIP_benchmark's image-captions collate: stacked images, the list of caption lists as is."""
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


class Captioned(torch.utils.data.Dataset):
    def __init__(self, paths, captions, transform):
        self.paths, self.captions, self.transform = paths, captions, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with ev.Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.captions[i]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none", help="open_clip tag or path; none = random weights (seeded)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default="/tmp/evaluate_parity_cache")
    p.add_argument("--out", default=str(ROOT / "bench" / "evaluate_parity.md"))
    a = p.parse_args()
    from clip_benchmark.metrics import zeroshot_classification as cb_cls
    from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
    if int(np.__version__.split(".")[0]) >= 2:
        # CLIP_benchmark 1.6.2's accuracy() calls float() on a 1-element array, an error under NumPy 2: the same top-k
        # accuracy (a target among the k largest logits), written out
        cb_cls.accuracy = lambda logits, target, topk=(1,): [
            (logits.topk(k, dim=1).indices == target[:, None]).any(1).float().mean().item() for k in topk]

    eargs = ev.parse_args(["--model", a.model, "--pretrained", a.pretrained, "--device", "cpu", "--cache-dir",
                           a.cache_dir, "--batch-size", str(a.batch_size), "--workers", "0"])
    model = ev.load_model(eargs)
    ours = {}
    for name, task in ev.resolve_tasks("emoji").items():
        data, skipped = ev.read_task(name, task, eargs)
        assert not skipped, skipped
        ours[name] = (data, ev.evaluate_task(model, name, task, data, eargs)["metrics"])
    clip, preprocess = ev._openclip_model(a.model, "" if a.pretrained == "none" else a.pretrained, "cpu")
    import open_clip
    tokenizer = open_clip.get_tokenizer(a.model)

    data, m = ours["emoji_zeroshot"]
    data.images.transform = preprocess  # torchvision ImageFolder: (transformed image, label)
    loader = torch.utils.data.DataLoader(data.images, batch_size=a.batch_size)
    templates = [t.replace("{}", "{c}") for t in data.templates]  # CLIP_benchmark formats templates with c=
    cb = cb_cls.evaluate(clip, loader, tokenizer, data.classnames, templates, "cpu", amp=False)
    rows = [("emoji_zeroshot", k, m[k], cb[cbk]) for k, cbk in
            (("acc1", "acc1"), ("acc5", "acc5"), ("mean_per_class_recall", "mean_per_class_recall"))]

    data, m = ours["emoji_retrieval"]
    loader = torch.utils.data.DataLoader(Captioned(data.images, data.captions, preprocess), batch_size=a.batch_size,
                                         collate_fn=captions_collate)
    cb = cb_ret.evaluate(clip, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        rows.append(("emoji_retrieval", f"i2t_R@{k}", m[f"i2t_R@{k}"], cb[f"text_retrieval_recall@{k}"]))
        rows.append(("emoji_retrieval", f"t2i_R@{k}", m[f"t2i_R@{k}"], cb[f"image_retrieval_recall@{k}"]))

    worst = max(abs(o - c) for *_, o, c in rows)
    lines = ["# evaluate.py vs CLIP_benchmark 1.6.2: the same metrics on the same model and inputs", "",
             f"`python {' '.join(sys.argv)}`; see the script's docstring.", "",
             f"device: CPU ({platform.machine()}), fp32, no autocast on either side; torch {torch.__version__}; "
             f"model {a.model}/{a.pretrained}; the shipped emoji splits", "",
             "| task | metric | evaluate.py | CLIP_benchmark | abs diff |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {t} | {k} | {o:.6f} | {c:.6f} | {abs(o - c):.1e} |" for t, k, o, c in rows]
    lines += ["", f"largest difference: {worst:.1e} over {len(rows)} metrics "
                  f"({'identical to 1e-6' if worst <= 1e-6 else 'NOT identical to 1e-6'})"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
