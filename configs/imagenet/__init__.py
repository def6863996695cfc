"""ImageNet-1k recipes, one file each (see docs/training.md, ImageNet recipes); `common` holds
what they share."""
