"""Model builders: timm / torchvision architectures, local weights only."""
