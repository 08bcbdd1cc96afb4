"""Inference: one predictor behind every command and the MLflow model."""
