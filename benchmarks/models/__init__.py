"""Layer 3, models: architectures, pretrained weights, weights files (imports core, data)."""
