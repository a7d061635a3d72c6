"""protocache stages: datasets, backbones, extract, codebook, heads, fit, evaluate, explain, ablate, bench."""
