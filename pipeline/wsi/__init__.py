"""Whole-slide image core: opening slides, tiling, cell detection and crop reading.

Sits below pipeline.inference (which scores the cells found here) and never imports it.
Coordinates are level-0 pixels; bounding boxes are (x0, y0, x1, y1) with x1/y1 exclusive.
"""
