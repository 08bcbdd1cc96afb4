"""The slide report: heat map and saliency images (saliency) and the self-contained HTML page (page)."""
