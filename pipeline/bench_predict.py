"""The predict figure of `protocache bench`: predict on image files over the bare backbone forward.

Both sides run the same images in the same batches on the same rebuilt backbone: the bare
side is the backbone's forward_features at the store's precision on images already decoded,
resized and normalised in memory (what extraction's figure calls the bare forward, tokens
copied to the host); the predict side is everything `protocache predict` does per image
(decode the PNG files as predict plans it, preprocess, backbone, float16 rounding, head,
top-k, the Parquet file). Loading the model (a fixed cost per run) is left out of both.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def bench_predict(num_images: int = 64, batch_size: int = 32, repeats: int = 2, head: str = "protoquant"):
    """Predict time on `num_images` digit PNG files over the bare forward time on the same images (target <= 1.2)."""
    import pyarrow.parquet as pq
    import torch

    from .bench_stages import Ratio, _best_of, _digits_store
    from .datasets import create_dataset
    from .fit import FitConfig, fit_head
    from .model import decode_image, load_model
    from .extract_loop import decode_plan
    from .predict import predict_items

    quick_head = {"protoquant": {"codebook_size": 32, "codebook_epochs": 1, "epochs": 2, "finetune_epochs": 1,
                                 "prune_rounds": 1, "kmeans_iters": 5}}.get(head, {"epochs": 2})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = _digits_store(tmp, num_images)
        fit_head(head, store, tmp / "run", quick_head, FitConfig(progress=False, val_fraction=0.0))
        dataset = create_dataset("digits").limit(num_images)
        (tmp / "images").mkdir()
        files = []
        for i in range(num_images):
            files.append(tmp / "images" / f"{i:05d}.png")
            dataset.load_image(i).save(files[-1])
        model = load_model(tmp / "run")
        images = torch.stack([model.preprocess(decode_image(f)) for f in files])

        def bare():
            with torch.inference_mode():
                for b in range(0, num_images, batch_size):
                    model.backbone_features(images[b:b + batch_size]).cpu()

        def predict():
            table = predict_items(model, files, 5, batch_size)
            pq.write_table(table, tmp / "predictions.parquet")

        bare(), predict()  # warm-up: first-call allocations and kernel selection
        timings = [(_best_of(bare, 1), _best_of(predict, 1)) for _ in range(repeats)]  # interleaved: same load
        bare_s, predict_s = min(t[0] for t in timings), min(t[1] for t in timings)
    ratio = predict_s / bare_s
    return Ratio("predict on image files / bare forward (time)", ratio, "<= 1.2", ratio <= 1.2,
                 {"images": num_images, "head": head, "bare_images_per_s": num_images / bare_s,
                  "predict_images_per_s": num_images / predict_s,
                  "decode": "{} x{}".format(*decode_plan(None, model.device)),
                  "device": str(model.device), "precision": model.precision})
