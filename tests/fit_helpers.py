"""Quick but complete fits on the small synthetic store, shared by the fit and per-head tests."""

from __future__ import annotations

from protocache.pipeline import fit as F

# Small but complete configs: every stage of every head runs, in a second or two.
QUICK = {
    "linear": {"epochs": 3},
    "protoquant": {"codebook_size": 24, "codebook_epochs": 1, "prune_to": 20, "prune_rounds": 2, "epochs": 2,
                   "finetune_epochs": 1, "kmeans_iters": 5},
    "protopool": {"num_prototypes": 12, "slots_per_class": 3, "proto_dim": 16, "epochs": 2, "last_layer_epochs": 2},
    "infodisent": {"epochs": 2},
}


def quick_fit(name, store_path, out, seed=0, **fit):
    fit.setdefault("threads", 1)  # a pinned thread count makes CPU float results repeatable
    return F.fit_head(name, store_path, out, QUICK[name], F.FitConfig(seed=seed, progress=False, **fit))
