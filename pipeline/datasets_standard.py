"""Standard on-disk dataset layouts (CUB-200-2011, Stanford Cars, Stanford Dogs, ImageNet, folder trees)."""
